"""A real DEV server on loopback: a private sshd in front of a real podman engine.

The deploy stage reaches the DEV server over SSH and runs `docker compose` there.
Here that server is this machine: an sshd of the test's own on 127.0.0.1 logs in
the dedicated user `pipedeploy`, whose sessions see `DOCKER_HOST` (podman's
Docker-compatible socket) and a `docker compose` CLI plugin that runs Debian's
docker-compose 1.29 (Compose v1). reference/container-engine.md explains the
engine settings.

The engine (one podman store, so pulled images stay cached) is shared by the
session and restarted only when a test asks for a registry it was not started
with. Each test gets its own sshd (so `handshakes()` counts only that test's
logins), its own deploy directory, and no containers left over from earlier
tests. Tests that use it must not run in parallel: they share one engine and the
host network.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import pytest

from tests.infra.oci import File, ImageSpec, busybox_rootfs, write_docker_archive
from tests.infra.ports import LOOPBACK, free_port
from tests.infra.registry import Registry, skopeo_copy_archive

USER = "pipedeploy"
COMPOSE_FILE = "docker-compose.yml"
IMAGE_VARIABLE = "IMAGE_REF"
CLI_TIMEOUT = 120.0
_START_TIMEOUT = 30.0
_SSHD_ATTEMPTS = 3
_COMPOSE_PLUGIN = """#!/bin/sh
# docker CLI plugin: `docker compose ...` runs Debian's docker-compose 1.29 (Compose v1).
if [ "$1" = docker-cli-plugin-metadata ]; then
  echo '{"SchemaVersion":"0.1.0","Vendor":"orchestrator-pipeline tests","Version":"1.29.2"}'
  exit 0
fi
shift
exec /usr/bin/docker-compose "$@"
"""

ImageKind = Literal["healthy", "no-health", "crash"]


# --- the container engine ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Engine:
    """A running `podman system service` and the private config it was started with."""

    root: Path
    socket: Path
    insecure_registries: frozenset[str]
    env: Mapping[str, str]
    """CONTAINERS_* variables: the podman CLI with these sees the same store."""
    process: subprocess.Popen[bytes] = field(repr=False, compare=False)

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the podman CLI on this engine's store."""
        return _run(["podman", *args], env=self.env, check=check)


def start_engine(
    root: Path, insecure_registries: Iterable[str] = (), *, socket_group: str | None = None
) -> Engine:
    """Start the API service under `root`; the caller must `stop_engine` it.

    registries.conf is read once per process, so the loopback registries to pull
    from (over http, or TLS without verification) are fixed here.
    """
    registries = frozenset(insecure_registries)
    env = _write_engine_config(root, registries)
    sock = root / "sock" / "podman.sock"
    sock.parent.mkdir(mode=0o750)
    with (root / "service.log").open("wb") as log:
        process = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{sock}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    engine = Engine(
        root=root, socket=sock, insecure_registries=registries, env=env, process=process
    )
    try:
        _wait_ping(engine)
        if socket_group is not None:
            for path in (sock.parent, sock):
                shutil.chown(path, group=socket_group)
            sock.chmod(0o660)
    except BaseException:
        stop_engine(engine)
        raise
    return engine


def stop_engine(engine: Engine) -> None:
    """Tear down in container-engine.md's order, leaving no mount or cgroup behind."""
    engine.podman("rm", "--all", "--force", "--time", "0", check=False)
    _stop_process(engine.process)
    _unmount_under(engine.root)
    _unmount_under(Path("/run/netns"))
    for cgroup in Path("/sys/fs/cgroup").glob("*/libpod_parent"):
        _remove_cgroup(cgroup)
    for state in ("/run/runc", "/run/containers"):
        shutil.rmtree(state, ignore_errors=True)
    shutil.rmtree(engine.root, ignore_errors=True)


def _write_engine_config(root: Path, registries: frozenset[str]) -> dict[str, str]:
    # Only settings that podman's exit command (`podman container cleanup`, started by
    # conmon with flags but without CONTAINERS_CONF) also gets: a static_dir or an
    # events_logfile_path here makes it open another database, and every container
    # exit then waits 20 s for a cleanup that never comes.
    root.chmod(0o711)
    storage = f'[storage]\ndriver = "overlay"\ngraphroot = "{root}/graph"\nrunroot = "{root}/run"\n'
    containers = (
        "[containers]\n"
        'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        'netns = "host"\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'tmp_dir = "{root}/tmp"\n'
        f'volume_path = "{root}/volumes"\n'
        "[network]\n"
        f'network_config_dir = "{root}/networks"\n'
    )
    entries = [
        f'[[registry]]\nlocation = "{host}"\ninsecure = true\n' for host in sorted(registries)
    ]
    files = {
        "CONTAINERS_STORAGE_CONF": ("storage.conf", storage),
        "CONTAINERS_CONF": ("containers.conf", containers),
        "CONTAINERS_REGISTRIES_CONF": (
            "registries.conf",
            "unqualified-search-registries = []\n" + "".join(entries),
        ),
    }
    env = {}
    for variable, (name, text) in files.items():
        (root / name).write_text(text)
        env[variable] = str(root / name)
    return env


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _wait_ping(engine: Engine) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if engine.process.poll() is not None:
            log = (engine.root / "service.log").read_text(errors="replace")
            raise RuntimeError(f"podman system service exited:\n{log[-2000:]}")
        with contextlib.suppress(OSError):
            connection = _UnixHTTPConnection(engine.socket)
            try:
                connection.request("GET", "/_ping")
                if connection.getresponse().status == 200:
                    return
            finally:
                connection.close()
        time.sleep(0.05)
    raise RuntimeError(f"podman did not answer /_ping in {_START_TIMEOUT} s")


def _unmount_under(path: Path) -> None:
    """Unmount every mount at or below `path`, deepest first."""
    prefix = str(path)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        _run(["umount", "--lazy", point], check=False)


def _remove_cgroup(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir():
            _remove_cgroup(child)
    with contextlib.suppress(OSError):
        path.rmdir()


class _EnginePool:
    """At most one engine at a time, restarted when a test needs more registries."""

    def __init__(self, base: Path) -> None:
        self._base = base
        self._engine: Engine | None = None
        self._count = itertools.count(1)

    def get(self, registries: Iterable[str]) -> Engine:
        wanted = frozenset(registries)
        current = self._engine
        if current is not None and wanted <= current.insecure_registries:
            return current
        known = current.insecure_registries if current is not None else frozenset()
        self.close()
        root = self._base / f"engine-{next(self._count)}"
        root.mkdir()
        self._engine = start_engine(root, known | wanted, socket_group=USER)
        return self._engine

    def remove_containers(self, engine: Engine) -> None:
        """Remove every container, unless `engine` was replaced (and so stopped) meanwhile."""
        if engine is self._engine:
            engine.podman("rm", "--all", "--force", "--time", "0", check=False)

    def close(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            stop_engine(engine)


# --- the DEV server ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DevServer:
    """One test's view of the DEV server: where to SSH, as whom, and where to deploy."""

    host: str = LOOPBACK
    port: int
    user: str
    private_key_path: Path
    private_key_pem: str
    known_hosts_line: str
    wrong_known_hosts_line: str
    known_hosts_path: Path
    """A known_hosts file holding `known_hosts_line`."""
    deploy_dir: Path
    docker_host: str
    sshd_log: Path
    env_for_local_docker: Mapping[str, str]
    """Variables (merge into os.environ) for docker/podman CLIs run by the test itself."""

    def ssh_argv(self, command: str, *, known_hosts_path: Path | None = None) -> list[str]:
        """An isolated client with strict host key checking, running `command`."""
        options = {
            "IdentitiesOnly": "yes",
            "BatchMode": "yes",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": str(known_hosts_path or self.known_hosts_path),
            "GlobalKnownHostsFile": "/dev/null",
            "ConnectTimeout": "10",
        }
        flags = [f"-o{name}={value}" for name, value in options.items()]
        target = f"{self.user}@{self.host}"
        key = str(self.private_key_path)
        return ["ssh", "-F", "/dev/null", *flags, "-i", key, "-p", str(self.port), target, command]

    def ssh_run(
        self, command: str, *, known_hosts_line: str | None = None, timeout: float = CLI_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` on the DEV server; `known_hosts_line` replaces the right one."""
        known_hosts = None
        if known_hosts_line is not None:
            digest = hashlib.sha256(known_hosts_line.encode()).hexdigest()[:12]
            known_hosts = self.known_hosts_path.with_name(f"known_hosts-{digest}")
            known_hosts.write_text(known_hosts_line + "\n")
        argv = self.ssh_argv(command, known_hosts_path=known_hosts)
        return _run(argv, check=False, timeout=timeout)

    def handshakes(self) -> int:
        """Successful SSH logins to this test's sshd so far."""
        if not self.sshd_log.exists():
            return 0
        return self.sshd_log.read_text(errors="replace").count("Accepted publickey for ")

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The docker CLI, run by the test itself against the DEV server's engine."""
        return _run(["docker", *args], env=self.env_for_local_docker, check=check)

    def running_image(self, service: str) -> str | None:
        """The reference the running container of `service` in `deploy_dir` was created from.

        As written in the compose file (`.Config.Image`): `docker ps` drops a digest.
        """
        running = self.docker(
            "ps",
            "--quiet",
            "--filter",
            f"label=com.docker.compose.project.working_dir={self.deploy_dir}",
            "--filter",
            f"label=com.docker.compose.service={service}",
        ).stdout.split()
        if not running:
            return None
        return self.docker("inspect", "--format", "{{.Config.Image}}", running[0]).stdout.strip()

    def write_compose_project(
        self, *, web_port: int, image_ref: str | None = None, variable: str = IMAGE_VARIABLE
    ) -> Path:
        """Write `docker-compose.yml` (and `.env` when `image_ref` is given) as the user."""
        compose = self.deploy_dir / COMPOSE_FILE
        _write_as(compose, compose_file(web_port=web_port, variable=variable), self.user)
        if image_ref is not None:
            _write_as(self.deploy_dir / ".env", f"{variable}={image_ref}\n", self.user)
        return compose


def compose_file(*, web_port: int, variable: str = IMAGE_VARIABLE) -> str:
    """A compose project of a `web` service and a `worker`, both from `${variable}`.

    Only what docker-compose 1.29 and Compose v2 both accept: no `version:`, host
    networking (podman's Docker API ignores `netns = "host"`), `init: true` (busybox
    httpd ignores SIGTERM as PID 1).
    """
    return (
        "services:\n"
        "  web:\n"
        f"    image: ${{{variable}}}\n"
        "    network_mode: host\n"
        "    init: true\n"
        "    environment:\n"
        f'      HTTP_PORT: "{web_port}"\n'
        "  worker:\n"
        f"    image: ${{{variable}}}\n"
        "    network_mode: host\n"
        "    init: true\n"
        '    entrypoint: ["/bin/sleep", "86400"]\n'
    )


@dataclass(frozen=True, kw_only=True)
class DevServerSession:
    """What every test's DEV server shares: the user, the keys, the docker configs."""

    base: Path
    host_key: Path
    wrong_host_key: Path
    client_key: Path
    authorized_keys: Path
    remote_docker_config: Path
    local_docker_config: Path
    engines: _EnginePool = field(repr=False, compare=False)


def _start_session(base: Path) -> DevServerSession:
    ensure_user(USER)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    base.chmod(0o711)
    keys = base / "keys"
    keys.mkdir(mode=0o755)
    for name in ("host", "wrong-host", "client"):
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(keys / name)])
    authorized = keys / "authorized_keys"
    authorized.write_text((keys / "client.pub").read_text())
    authorized.chmod(0o644)
    (base / "deploy").mkdir(mode=0o711)
    return DevServerSession(
        base=base,
        host_key=keys / "host",
        wrong_host_key=keys / "wrong-host",
        client_key=keys / "client",
        authorized_keys=authorized,
        remote_docker_config=_docker_config(base / "docker-remote", owner=USER),
        local_docker_config=_docker_config(base / "docker-local", owner=None),
        engines=_EnginePool(base),
    )


def ensure_user(name: str) -> None:
    """A system user with a home and bash that a `UsePAM no` sshd lets in."""
    if _run(["id", "-u", name], check=False).returncode != 0:
        _run(["useradd", "--system", "--create-home", "--shell", "/bin/bash", name])
    shadow = Path("/etc/shadow").read_text().splitlines()
    entry = next(line.split(":") for line in shadow if line.startswith(f"{name}:"))
    if entry[1].startswith("!"):  # a locked account: sshd refuses it even for keys
        _run(["usermod", "-p", "*", name])


def _docker_config(path: Path, *, owner: str | None) -> Path:
    plugin = path / "cli-plugins" / "docker-compose"
    plugin.parent.mkdir(parents=True)
    plugin.write_text(_COMPOSE_PLUGIN)
    plugin.chmod(0o755)
    if owner is not None:
        for item in (path, plugin.parent, plugin):
            shutil.chown(item, user=owner, group=owner)
    return path


@contextlib.contextmanager
def open_dev_server(
    session: DevServerSession, workdir: Path, insecure_registries: Iterable[str] = ()
) -> Iterator[DevServer]:
    """A DEV server with a fresh sshd and deploy directory, torn down on exit."""
    engine = session.engines.get(insecure_registries)
    deploy_dir = Path(tempfile.mkdtemp(prefix="app-", dir=session.base / "deploy")).resolve()
    shutil.chown(deploy_dir, user=USER, group=USER)
    remote_env = {
        "DOCKER_HOST": engine.docker_host,
        "DOCKER_CONFIG": str(session.remote_docker_config),
    }
    try:
        sshd, port = _start_sshd(workdir, session, remote_env)
        try:
            yield _dev_server(session, engine, workdir, port=port, deploy_dir=deploy_dir)
        finally:
            _stop_sshd(sshd)
    finally:
        session.engines.remove_containers(engine)
        shutil.rmtree(deploy_dir, ignore_errors=True)


def _dev_server(
    session: DevServerSession, engine: Engine, workdir: Path, *, port: int, deploy_dir: Path
) -> DevServer:
    known_hosts_line = _known_hosts_line(session.host_key, port)
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(known_hosts_line + "\n")
    return DevServer(
        port=port,
        user=USER,
        private_key_path=session.client_key,
        private_key_pem=session.client_key.read_text(),
        known_hosts_line=known_hosts_line,
        wrong_known_hosts_line=_known_hosts_line(session.wrong_host_key, port),
        known_hosts_path=known_hosts,
        deploy_dir=deploy_dir,
        docker_host=engine.docker_host,
        sshd_log=workdir / "sshd.log",
        env_for_local_docker={
            **engine.env,
            "DOCKER_HOST": engine.docker_host,
            "DOCKER_CONFIG": str(session.local_docker_config),
        },
    )


def _known_hosts_line(host_key: Path, port: int) -> str:
    key_type, key = (host_key.with_suffix(".pub").read_text().split())[:2]
    return f"[{LOOPBACK}]:{port} {key_type} {key}"


def _sshd_config(
    session: DevServerSession, workdir: Path, port: int, env: Mapping[str, str]
) -> str:
    set_env = " ".join(f"{name}={value}" for name, value in env.items())
    return (
        f"Port {port}\n"
        f"ListenAddress {LOOPBACK}\n"
        f"HostKey {session.host_key}\n"
        f"PidFile {workdir / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {session.authorized_keys}\n"
        f"AllowUsers {USER}\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "LogLevel VERBOSE\n"
        "Subsystem sftp internal-sftp\n"
        f"SetEnv {set_env}\n"
    )


def _start_sshd(
    workdir: Path, session: DevServerSession, env: Mapping[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    """sshd on a free port, retried when another process took the port first."""
    config, log = workdir / "sshd_config", workdir / "sshd.log"
    for _ in range(_SSHD_ATTEMPTS):
        port = free_port()
        config.write_text(_sshd_config(session, workdir, port, env))
        log.write_bytes(b"")
        process = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(config), "-E", str(log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if _wait_log(log, f"Server listening on {LOOPBACK} port {port}.", process):
            return process, port
        _stop_process(process)
    raise RuntimeError(f"sshd did not start:\n{log.read_text(errors='replace')[-2000:]}")


def _wait_log(log: Path, line: str, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        if line in log.read_text(errors="replace"):
            return True
        time.sleep(0.02)
    return False


def _stop_sshd(process: subprocess.Popen[bytes]) -> None:
    """Stop the listener's per-connection children (each in its own session), then it."""
    for child in _children(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGTERM)
    _stop_process(process)


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # The command name (field 2) may hold spaces: the fields after its ")" are safe.
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


# --- service images ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ServiceImage:
    """A test service image pushed to a registry."""

    registry_host: str
    repo: str
    tag: str
    digest: str
    version: str
    kind: ImageKind

    @property
    def ref(self) -> str:
        return f"{self.registry_host}/{self.repo}:{self.tag}"

    @property
    def ref_by_digest(self) -> str:
        return f"{self.registry_host}/{self.repo}@{self.digest}"


def service_image_spec(version: str, kind: ImageKind = "healthy") -> ImageSpec:
    """busybox httpd on 127.0.0.1:$HTTP_PORT serving /www: `/health` and `/version`.

    "no-health" serves no `/health` (404); "crash" exits 3 at once.
    """
    www: dict[str, bytes | File] = {"www/version": f"{version}\n".encode()}
    if kind != "no-health":
        www["www/health"] = b"ok\n"
    serve = 'exec httpd -f -p "127.0.0.1:${HTTP_PORT:-8080}" -h /www'
    crash = "echo 'service: cannot start (test image built to crash)' >&2; exit 3"
    return ImageSpec(
        layers=[busybox_rootfs(), www],
        entrypoint=["/bin/sh", "-c", crash if kind == "crash" else serve],
        labels={"org.opencontainers.image.version": version},
    )


def push_service_image(
    registry: Registry,
    repo: str,
    tag: str,
    *,
    version: str,
    workdir: Path,
    kind: ImageKind = "healthy",
) -> ServiceImage:
    """Write the image as a docker-archive and push it with skopeo."""
    archive = write_docker_archive(workdir / f"{repo}-{tag}.tar", service_image_spec(version, kind))
    try:
        digest = skopeo_copy_archive(archive.path, f"{repo}:{tag}", registry=registry)
    finally:
        archive.path.unlink()
    return ServiceImage(
        registry_host=registry.host, repo=repo, tag=tag, digest=digest, version=version, kind=kind
    )


# --- fixtures ------------------------------------------------------------------------------


class DevServerFactory(Protocol):
    def __call__(self, insecure_registries: Sequence[str] = ()) -> DevServer: ...


@pytest.fixture(scope="session")
def dev_server_session() -> Iterator[DevServerSession]:
    """The user, keys and engine pool shared by every DEV server of the session."""
    base = Path(tempfile.mkdtemp(prefix="devserver-", dir="/tmp"))  # pytest's tmp is 0700
    try:
        session = _start_session(base)
        try:
            yield session
        finally:
            session.engines.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def dev_server_factory(
    dev_server_session: DevServerSession, tmp_path: Path
) -> Iterator[DevServerFactory]:
    """`make(insecure_registries)`: a DEV server whose engine pulls from those registries."""
    with contextlib.ExitStack() as stack:
        counter = itertools.count(1)

        def make(insecure_registries: Sequence[str] = ()) -> DevServer:
            workdir = tmp_path / f"dev-server-{next(counter)}"
            workdir.mkdir()
            return stack.enter_context(
                open_dev_server(dev_server_session, workdir, insecure_registries)
            )

        yield make


@pytest.fixture
def dev_server_registries() -> Sequence[str]:
    """Registries (host:port) the `dev_server` engine pulls from; override to add some."""
    return ()


@pytest.fixture
def dev_server(
    dev_server_factory: DevServerFactory, dev_server_registries: Sequence[str]
) -> DevServer:
    """A DEV server for this test, pulling from `dev_server_registries`."""
    return dev_server_factory(dev_server_registries)


# --- processes -----------------------------------------------------------------------------


def _run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = CLI_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run under `timeout -s KILL` (docker forwards SIGTERM to containers and stays)."""
    full_env = {**os.environ, **env} if env is not None else None
    wrapped = ["timeout", "-s", "KILL", str(int(timeout)), *argv]
    done = subprocess.run(
        wrapped, capture_output=True, text=True, env=full_env, timeout=timeout + 10
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{shlex.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _write_as(path: Path, text: str, user: str) -> None:
    path.write_text(text)
    shutil.chown(path, user=user, group=user)
