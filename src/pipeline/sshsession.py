"""The deploy-dev stage's SSH connection: private key and known_hosts files, one ControlMaster.

The key from ``SSH_PRIVATE_KEY`` (its text, or the file a GitLab File variable
names) and the host keys from ``SSH_KNOWN_HOSTS`` are written to a private 0700
directory that also holds the control socket, and removed when the deploy ends.
Both are checked locally (``ssh-keygen -y``, ``ssh-keygen -F``) before the first
connection, so a bad key or a missing host entry is a settings error (exit 2)
before anything remote. The argv come from :mod:`pipeline.tools.ssh`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import CommandError, ExternalError, SettingsError
from pipeline.log import log
from pipeline.runtime import Runtime
from pipeline.settings import DeploySettings
from pipeline.tools import ssh

_PRIVATE_KEY_START = "-----BEGIN"


@contextlib.contextmanager
def private_dir() -> Iterator[Path]:
    """A 0700 directory for the key, known_hosts and control socket; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="pipeline-ssh-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def connection(rt: Runtime, settings: DeploySettings, private: Path) -> ssh.Connection:
    """Write and check the key and known_hosts files under ``private``; describe the target."""
    if settings.trust_on_first_use:
        log.warn(
            "PIPELINE_DEPLOY_TRUST_ON_FIRST_USE=true: an unknown DEV server host key is accepted "
            "unverified (a man in the middle would be trusted); set SSH_KNOWN_HOSTS instead"
        )
    assert settings.server
    assert settings.ssh_user
    assert settings.ssh_private_key
    key_file = _write_private(
        private / "id", _key_text(settings.ssh_private_key.get_secret_value())
    )
    _check_key(rt, key_file)
    known_hosts = _write_private(private / "known_hosts", _known_hosts_text(settings))
    conn = ssh.Connection(
        host=settings.server,
        port=settings.ssh_port,
        user=settings.ssh_user,
        key_file=key_file,
        known_hosts_file=known_hosts,
        control_path=private / "cm",
        connect_timeout=settings.connect_timeout,
        trust_on_first_use=settings.trust_on_first_use,
    )
    _check_known_host(rt, conn, settings)
    return conn


def _key_text(value: str) -> str:
    """The key itself, or the content of the file a GitLab File variable points at."""
    if value.startswith(_PRIVATE_KEY_START):
        return value
    path = Path(value.strip())
    if "\n" in value or not path.is_file():
        raise SettingsError(
            [
                "SSH_PRIVATE_KEY: is neither a private key (-----BEGIN ... PRIVATE KEY-----) nor a readable key file"
            ]
        )
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    log.add_secret(text.strip())
    if not text.startswith(_PRIVATE_KEY_START):
        raise SettingsError(
            [f"SSH_PRIVATE_KEY: the file {path} does not hold a private key (-----BEGIN ...)"]
        )
    return text.strip() + "\n"


def _known_hosts_text(settings: DeploySettings) -> str:
    value = settings.ssh_known_hosts or ""
    path = Path(value.strip())
    if value and "\n" not in value.strip() and len(value.split()) == 1 and path.is_file():
        value = path.read_text(encoding="utf-8", errors="replace")
    lines = [line.strip() for line in value.replace("\r\n", "\n").splitlines() if line.strip()]
    bad = [line for line in lines if not line.startswith("#") and len(line.split()) < 3]
    if bad:
        raise SettingsError(
            [f"SSH_KNOWN_HOSTS: {bad[0][:60]!r} is not a known_hosts line (host key-type key)"]
        )
    return "".join(f"{line}\n" for line in lines)


def _write_private(path: Path, text: str) -> Path:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        stream.write(text)
    return path


def _check_key(rt: Runtime, key_file: Path) -> None:
    try:
        rt.shell.run(ssh.keygen_public_argv(key_file), query=True, stream=False)
    except CommandError as exc:
        reason = exc.stderr_tail.splitlines()[-1] if exc.stderr_tail else "unreadable"
        raise SettingsError(
            [
                f"SSH_PRIVATE_KEY: ssh-keygen cannot use the key ({reason}): a damaged or passphrase-protected key"
            ]
        ) from None


def _check_known_host(rt: Runtime, conn: ssh.Connection, settings: DeploySettings) -> None:
    name = conn.host if conn.port == 22 else f"[{conn.host}]:{conn.port}"
    found = rt.shell.run(
        ["ssh-keygen", "-F", name, "-f", str(conn.known_hosts_file)],
        query=True,
        stream=False,
        ok_codes=(0, 1),
    )
    if found.returncode != 0 and not settings.trust_on_first_use:
        raise SettingsError(
            [
                f"SSH_KNOWN_HOSTS: has no host key for {name} (ssh-keyscan -p {conn.port} {conn.host})"
            ]
        )


@contextlib.contextmanager
def connected(rt: Runtime, conn: ssh.Connection) -> Iterator[None]:
    """The one SSH connection (ControlMaster) for the whole deploy, closed at the end."""
    with log.step(f"connect to {conn.target} port {conn.port}"):
        open_master(rt, conn)
    try:
        yield
    finally:  # under dry-run the shell prints it: the preview ends as the real run does
        rt.shell.run(ssh.exit_argv(conn), ok_codes=range(256), stream=False, timeout=30)


def open_master(rt: Runtime, conn: ssh.Connection) -> None:
    try:
        rt.shell.run(
            ssh.master_argv(conn),
            classify=_transient_connect,
            what="ssh connect",
            timeout=conn.connect_timeout + 30,
        )
    except CommandError as exc:
        raise ExternalError(_connect_problem(conn, exc.stderr_tail)) from None


def _connect_problem(conn: ssh.Connection, stderr: str) -> str:
    where = f"{conn.target} port {conn.port}"
    if "Host key verification failed" in stderr or "REMOTE HOST IDENTIFICATION" in stderr:
        return f"ssh to {where}: the server's host key does not match SSH_KNOWN_HOSTS; nothing was run (update SSH_KNOWN_HOSTS if the server was rebuilt)"
    if "Permission denied" in stderr:
        return f"ssh to {where}: the server refused SSH_PRIVATE_KEY for SSH_USER {conn.user}"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
    return f"ssh to {where} failed: {last}"


def _transient_connect(error: BaseException) -> str | None:
    if isinstance(error, CommandError) and re.search(
        r"Connection refused|timed out|Connection reset|Network is unreachable", error.stderr_tail
    ):
        return "connection failed"
    return None
