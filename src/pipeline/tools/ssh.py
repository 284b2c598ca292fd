"""OpenSSH client: argv builders for one multiplexed connection, and the remote deploy script.

Pure: nothing here runs a program or touches a file. The deploy stage asks for
an argv, runs it through :mod:`pipeline.shell`, and parses the markers the
remote script prints with :func:`parse_markers`.

- One connection per deploy: :func:`master_argv` opens a ControlMaster in the
  background (``ControlPersist``), :func:`session_argv` runs a script over it
  (no new handshake), :func:`exit_argv` closes it.
- The client is isolated from the runner's own configuration (``-F /dev/null``,
  no agent, only the given key) and checks host keys strictly against the given
  known_hosts file; trust-on-first-use (``accept-new``) only when asked.
- :func:`remote_script` composes a POSIX ``sh`` script from a :class:`RemotePlan`
  whose every value was validated against its grammar here, then shell-quoted.
  The script is sent on stdin (``sh -s``): the registry password reaches
  ``docker login --password-stdin`` through a here-document, never an argv.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from importlib import resources
from pathlib import Path

HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?\Z")
USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\Z")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
REPOSITORY = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)+\Z")
REGISTRY = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?\Z")
REMOTE_PATH = re.compile(r"/[A-Za-z0-9_.@%+=:,/-]{0,255}\Z")
FILE_NAME = re.compile(r"[A-Za-z0-9_.@%+=:,-][A-Za-z0-9_.@%+=:,/-]{0,254}\Z")
SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
COMPOSE_WORD = re.compile(r"[A-Za-z0-9_./-]+\Z")
URL = re.compile(r"https?://[A-Za-z0-9.\[\]:-]+(/[A-Za-z0-9_.~%/?=&+:@,-]*)?\Z")
TOKEN = re.compile(r"[0-9a-f]{16,64}\Z")
OWNER = re.compile(r"[A-Za-z0-9_.:/@+=,-][A-Za-z0-9_.:/@+=, -]{0,255}\Z")
USERNAME = re.compile(r"[^\s'\"\\`$]{1,256}\Z")
_MARKER = re.compile(
    r"^@deploy (?P<step>[a-z-]+) (?P<status>begin|ok|fail|warn|info)(?: (?P<text>.*))?$"
)

#: What the remote shell runs: the script arrives on its stdin.
REMOTE_COMMAND = "sh -s"


class RemoteExit(IntEnum):
    """Exit codes of the remote script (ssh itself exits 255 when the connection fails)."""

    OK = 0
    REFUSED = 65  # preflight: bad deploy dir, compose file or service name; nothing changed
    LOCKED = 66  # the lock could not be taken, or is no longer ours
    NOT_CHANGED = 67  # login or pull failed; nothing changed on the server
    ROLLED_BACK = 68  # deploy failed, previous version restored and healthy
    ROLLBACK_FAILED = 69  # deploy failed, restoring the previous version failed too
    NO_ROLLBACK = 70  # deploy failed on a first deploy: nothing to roll back to
    DEPLOY_FAILED = 71  # runner mode: `up -d` failed; the runner asks for the roll back
    WORKERS_FAILED = 72  # deployed and healthy, but restarting the workers failed
    CONNECTION = 255


class InvalidValueError(ValueError):
    """A value that does not match its grammar: it must never reach a shell."""


def check(value: str, grammar: re.Pattern[str], what: str) -> str:
    """``value`` if it matches ``grammar`` whole; otherwise :class:`InvalidValueError` naming it."""
    if not grammar.match(value):
        raise InvalidValueError(f"{what} {value!r} does not match {grammar.pattern}")
    return value


# --- the connection -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Connection:
    """Where and how to connect; files are private copies the stage wrote."""

    host: str
    port: int
    user: str
    key_file: Path
    known_hosts_file: Path
    control_path: Path
    connect_timeout: int = 15
    persist_seconds: int = 900
    trust_on_first_use: bool = False

    def __post_init__(self) -> None:
        check(self.host, HOST, "host")
        check(self.user, USER, "user")
        for path in (self.key_file, self.known_hosts_file, self.control_path):
            if any(c.isspace() for c in str(path)):
                raise InvalidValueError(
                    f"path {str(path)!r} holds white space (ssh splits options on it)"
                )

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}"


def client_options(conn: Connection) -> list[str]:
    """Options every invocation shares: isolation, strict host keys, the control socket."""
    checking = "accept-new" if conn.trust_on_first_use else "yes"
    options = {
        "BatchMode": "yes",
        "IdentitiesOnly": "yes",
        "IdentityAgent": "none",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "StrictHostKeyChecking": checking,
        "UserKnownHostsFile": str(conn.known_hosts_file),
        "GlobalKnownHostsFile": "/dev/null",
        "UpdateHostKeys": "no",
        "ConnectTimeout": str(conn.connect_timeout),
        "ServerAliveInterval": "10",
        "ServerAliveCountMax": "3",
        "ControlPath": str(conn.control_path),
        "LogLevel": "ERROR",
    }
    argv = ["-F", "/dev/null", "-i", str(conn.key_file), "-p", str(conn.port)]
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    return argv


def master_argv(conn: Connection) -> list[str]:
    """Open the one connection: authenticate, then background as the ControlMaster."""
    return [
        "ssh",
        *client_options(conn),
        "-o",
        "ControlMaster=yes",
        "-o",
        f"ControlPersist={conn.persist_seconds}",
        "-N",
        "-f",
        conn.target,
    ]


def session_argv(conn: Connection) -> list[str]:
    """Run the script on stdin over the master (``ControlMaster=no``: never become one)."""
    return [
        "ssh",
        *client_options(conn),
        "-o",
        "ControlMaster=no",
        "-T",
        conn.target,
        REMOTE_COMMAND,
    ]


def exit_argv(conn: Connection) -> list[str]:
    """Ask the master to close the connection."""
    return ["ssh", *client_options(conn), "-O", "exit", conn.target]


def keygen_public_argv(key_file: Path) -> list[str]:
    """``ssh-keygen -y``: proves a private key file is readable without a passphrase."""
    return ["ssh-keygen", "-y", "-P", "", "-f", str(key_file)]


# --- the remote script ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Health:
    """An HTTP health check: success is status 200."""

    url: str
    tries: int
    interval: float
    timeout: float

    def __post_init__(self) -> None:
        check(self.url, URL, "health URL")
        if self.tries < 1 or self.interval <= 0 or self.timeout <= 0:
            raise InvalidValueError("health tries, interval and timeout must be positive")


@dataclass(frozen=True, kw_only=True)
class RemotePlan:
    """Everything the remote script needs; validated on construction."""

    deploy_dir: str
    compose_command: tuple[str, ...]
    compose_file: str | None
    services: tuple[str, ...]
    workers: tuple[str, ...]
    repository: str
    tag: str
    digest: str
    env_vars: tuple[tuple[str, str], ...]
    rollback_file: str
    token: str
    owner: str
    lock_stale_seconds: int
    lock_wait_seconds: int
    registry_user: str | None = None
    registry_password: str | None = field(default=None, repr=False)
    server_health: Health | None = None

    def __post_init__(self) -> None:
        check(self.deploy_dir, REMOTE_PATH, "deploy directory")
        for word in self.compose_command:
            check(word, COMPOSE_WORD, "compose command word")
        for name in (self.compose_file, self.rollback_file):
            if name is not None and ".." in check(name, FILE_NAME, "file").split("/"):
                raise InvalidValueError(f"file {name!r} leaves the deploy directory")
        for service in (*self.services, *self.workers):
            check(service, SERVICE, "service")
        check(self.repository, REPOSITORY, "repository")
        check(self.tag, TAG, "tag")
        check(self.digest, DIGEST, "digest")
        for name, _ in self.env_vars:
            check(name, ENV_NAME, ".env variable")
        check(self.token, TOKEN, "lock token")
        check(self.owner, OWNER, "lock owner")
        self._check_credentials()

    def _check_credentials(self) -> None:
        if (self.registry_user is None) != (self.registry_password is None):
            raise InvalidValueError("registry user and password go together")
        if self.registry_user is not None:
            check(self.registry_user, USERNAME, "registry user")
        if self.registry_password is not None and (
            not self.registry_password or "\n" in self.registry_password
        ):
            raise InvalidValueError("the registry password is empty or holds a line break")

    @property
    def registry(self) -> str:
        return self.repository.split("/", 1)[0]

    @property
    def image_ref(self) -> str:
        """What is pulled and deployed: the image by digest."""
        return f"{self.repository}@{self.digest}"

    @property
    def tag_ref(self) -> str:
        """The local tag pointed at the pulled digest (for compose files using the tag)."""
        return f"{self.repository}:{self.tag}"


class Phase:
    """Names of the remote script's entry points (shell functions of deploy.sh)."""

    ALL = "deploy_all"  # server-side health: the whole flow in one session
    UP = "deploy_up"  # runner-side health: up to `up -d`, lock kept
    FINISH = "deploy_finish"  # runner said healthy: workers, unlock
    ROLLBACK = "deploy_rollback"  # runner said unhealthy: restore, up -d, lock kept
    SETTLE_HEALTHY = "settle_healthy"  # the restored version is healthy: unlock
    SETTLE_UNHEALTHY = "settle_unhealthy"  # the restored version is not: unlock
    RECOVER = "deploy_recover"  # after a lost connection: wait for the old phase, roll back
    FOLLOW = "deploy_follow"  # after a lost connection: wait for deploy_all, report its result


def remote_script(plan: RemotePlan, phase: str) -> str:
    """The script for one session: quoted values, the shell library, then ``phase``."""
    if not phase.isidentifier() or phase not in vars(Phase).values():
        raise InvalidValueError(f"unknown phase {phase!r}")
    return "\n".join([*_prelude(plan), _library(), _login_function(plan), f"main {phase}\n"])


def _prelude(plan: RemotePlan) -> Iterator[str]:
    health = plan.server_health
    values: dict[str, str] = {
        "DEPLOY_DIR": plan.deploy_dir,
        "COMPOSE": " ".join(plan.compose_command),
        "COMPOSE_FILE_ARG": plan.compose_file or "",
        "SERVICES": " ".join(plan.services),
        "WORKERS": " ".join(plan.workers),
        "IMAGE_REF": plan.image_ref,
        "TAG_REF": plan.tag_ref,
        "REGISTRY": plan.registry,
        "ENV_NAMES": "|".join(name for name, _ in plan.env_vars),
        "ROLLBACK": plan.rollback_file,
        "TOKEN": plan.token,
        "OWNER": plan.owner,
        "STALE": str(plan.lock_stale_seconds),
        "WAIT": str(plan.lock_wait_seconds),
        "HEALTH_URL": health.url if health else "",
        "HEALTH_TRIES": str(health.tries) if health else "0",
        "HEALTH_INTERVAL": f"{health.interval:g}" if health else "0",
        "HEALTH_TIMEOUT": f"{health.timeout:g}" if health else "0",
    }
    yield "set -u -f"
    for name, value in values.items():
        yield f"{name}={shlex.quote(value)}"
    lines = [f"{name}={value}" for name, value in plan.env_vars]
    yield "ENV_LINES() { printf '%s\\n' " + " ".join(shlex.quote(line) for line in lines) + "; }"


def _login_function(plan: RemotePlan) -> str:
    """``registry_login``: the password on docker login's stdin through a here-document."""
    if plan.registry_user is None or plan.registry_password is None:
        return "registry_login() { mark pull info 'no registry credentials: pulling anonymously'; }"
    delimiter = f"PIPELINE_SECRET_{plan.token}"
    if delimiter in plan.registry_password:
        raise InvalidValueError("the registry password holds the here-document delimiter")
    return (
        "registry_login() {\n"
        '  DOCKER_CONFIG="$PULL_CONFIG" docker login '
        f"--username {shlex.quote(plan.registry_user)} --password-stdin "
        f"\"$REGISTRY\" >/dev/null <<'{delimiter}'\n"
        f"{plan.registry_password}\n"
        f"{delimiter}\n"
        "}"
    )


def _library() -> str:
    return resources.files("pipeline.tools").joinpath("deploy.sh").read_text(encoding="utf-8")


# --- markers ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Marker:
    """One ``@deploy <step> <status> <text>`` line of the remote script."""

    step: str
    status: str
    text: str


def parse_markers(stdout: str) -> list[Marker]:
    """Every marker line of the script's output, in order; other lines are ignored."""
    markers = []
    for line in stdout.splitlines():
        found = _MARKER.match(line.rstrip("\r"))
        if found:
            markers.append(
                Marker(step=found["step"], status=found["status"], text=found["text"] or "")
            )
    return markers


def last_step(markers: Sequence[Marker]) -> str | None:
    """The step that was running last (begun or failed), for "failed during <step>"."""
    for marker in reversed(markers):
        if marker.status in ("begin", "fail"):
            return marker.step
    return markers[-1].step if markers else None
