"""Registry credentials, and the docker ``config.json`` every tool reads them from.

Sources, the first that applies: ``NEXUS_USER``/``NEXUS_PASSWORD`` (masked CI
variables); a Vault JWT login (GitLab ``id_tokens`` -> ``auth/jwt/login`` -> a
KV secret, see :mod:`pipeline.vault`); a developer's own ``docker login``
(their ``config.json``). :func:`docker_config` writes ``auths`` for both
registries into ``DOCKER_CONFIG`` (0600) and undoes its writes when it exits.

Every password, token and ``auth`` string is registered with ``log.add_secret``
the moment it exists, so no output can show it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import SettingsError, UsageError
from pipeline.log import log
from pipeline.runtime import Runtime
from pipeline.settings import GitLabSettings, RegistrySettings, VaultSettings

#: The runner image's DOCKER_CONFIG: Kaniko reads ``config.json`` from here.
KANIKO_DOCKER_DIR = Path("/kaniko/.docker")
CONFIG_NAME = "config.json"
ENV_SOURCE = "NEXUS_USER/NEXUS_PASSWORD"


@dataclass(frozen=True, kw_only=True)
class Credentials:
    """A registry account; the password is registered as a secret on creation.

    ``placeholder`` marks the stand-in a dry-run gets instead of reading Vault.
    """

    username: str
    password: str = field(repr=False)
    source: str
    placeholder: bool = False

    def __post_init__(self) -> None:
        log.add_secret(self.password)
        log.add_secret(self.auth)

    @property
    def auth(self) -> str:
        """The docker ``config.json`` ``auth`` value: base64 of ``user:password``."""
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def registry_credentials(rt: Runtime) -> Credentials | None:
    """Credentials for the push and pull registries from the first source that has them.

    Under dry-run Vault is not contacted: the login it would do is printed and the
    result is a placeholder (``placeholder=True``).
    """
    return _resolve(rt, prefer=_registries(rt)[0])


def pull_credentials(rt: Runtime) -> Credentials | None:
    """Credentials a server uses to pull (deploy): the pull-only Vault account when
    ``PIPELINE_VAULT_PULL_SECRET_PATH`` is set, otherwise :func:`registry_credentials`.
    """
    settings = rt.settings(VaultSettings)
    if settings.pull_secret_path and _vault_configured(settings):
        return _from_vault(rt, settings.pull_secret_path)
    return _resolve(rt, prefer=_registries(rt)[1])


@contextlib.contextmanager
def docker_config(rt: Runtime) -> Iterator[Path]:
    """Yield a DOCKER_CONFIG directory whose ``config.json`` has ``auths`` for both
    registries; at exit remove what was created, or restore what was merged into.
    """
    written = write_docker_config(rt)
    try:
        yield written.directory
    finally:
        written.undo()


def _resolve(rt: Runtime, *, prefer: str) -> Credentials | None:
    from_env = _from_env(rt)
    if from_env is not None:
        return from_env
    if _uses_vault(rt):
        return _from_vault(rt, rt.settings(VaultSettings).secret_path)
    logins = _docker_logins(rt)
    return logins.get(prefer) or next(iter(logins.values()), None)


def _from_env(rt: Runtime) -> Credentials | None:
    registry = rt.settings(RegistrySettings)
    password = registry.password.get_secret_value() if registry.password else ""
    if not registry.user and not password:
        return None
    if not registry.user or not password:
        missing = "NEXUS_PASSWORD" if registry.user else "NEXUS_USER"
        raise SettingsError([f"{missing}: not set, but its partner is; set both or neither"])
    return Credentials(username=registry.user, password=password, source=ENV_SOURCE)


def _vault_configured(settings: VaultSettings) -> bool:
    return bool(settings.addr and (settings.id_token or settings.legacy_jwt))


def _uses_vault(rt: Runtime) -> bool:
    """Whether Vault is the source: VAULT_ADDR and an ID token; half of it is an error in CI."""
    settings = rt.settings(VaultSettings)
    if _vault_configured(settings):
        return True
    # CI_JOB_JWT_V2 alone says nothing: GitLab before 17.0 gives it to every job.
    if settings.id_token:
        raise SettingsError(["VAULT_ADDR: not set, but VAULT_ID_TOKEN is; set VAULT_ADDR"])
    if settings.addr and rt.settings(GitLabSettings).gitlab_ci:
        raise SettingsError(
            [
                "VAULT_ID_TOKEN: not set, but VAULT_ADDR is; declare it in the job "
                "(id_tokens: VAULT_ID_TOKEN: aud: <the role's bound audience>) "
                "or set NEXUS_USER/NEXUS_PASSWORD"
            ]
        )
    return False


def _from_vault(rt: Runtime, path: str) -> Credentials:
    from pipeline import vault

    return vault.read_credentials(rt, path)


# --- a developer's own docker login -------------------------------------------------


def user_config_path(rt: Runtime) -> Path | None:
    """The user's docker ``config.json``: ``$DOCKER_CONFIG`` or ``~/.docker``."""
    settings = rt.settings(VaultSettings)
    if settings.docker_config is not None:
        return settings.docker_config / CONFIG_NAME
    home = rt.environ.get("HOME")
    return Path(home) / ".docker" / CONFIG_NAME if home else None


def _docker_logins(rt: Runtime, *, explain: bool = True) -> dict[str, Credentials]:
    """Registry host:port -> the credentials the user's docker login stored for it."""
    path = user_config_path(rt)
    if path is None or not path.is_file():
        return {}
    entries = _auth_entries(_read_config(path))
    found: dict[str, Credentials] = {}
    for host in _registries(rt):
        entry = entries.get(host)
        credentials = _decode_entry(entry, f"docker config {path}") if entry else None
        if credentials is not None:
            found[host] = credentials
    if explain:
        _explain_helpers(rt, path, entries, found)
    return found


def _auth_entries(config: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``auths`` keyed by bare host:port (docker also writes ``https://host/v1/`` keys)."""
    auths = config.get("auths")
    if not isinstance(auths, Mapping):
        return {}
    return {_host_key(key): value for key, value in auths.items() if isinstance(value, Mapping)}


def _host_key(key: str) -> str:
    return key.split("://", 1)[-1].split("/", 1)[0]


def _decode_entry(entry: Mapping[str, Any], source: str) -> Credentials | None:
    username, password = entry.get("username"), entry.get("password")
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            username, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            log.warn(f"{source}: an auths entry is not valid base64 user:password; ignored")
            return None
    if not isinstance(username, str) or not isinstance(password, str) or not password:
        return None
    return Credentials(username=username, password=password, source=source)


def _explain_helpers(
    rt: Runtime, path: Path, entries: Mapping[str, Any], found: Mapping[str, Credentials]
) -> None:
    missing = [host for host in _registries(rt) if host in entries and host not in found]
    if missing:
        log.warn(
            f"docker config {path}: the login for {', '.join(missing)} has no user:password "
            "(a credential helper or an identity token holds it), which this pipeline "
            "cannot pass to Kaniko; set NEXUS_USER/NEXUS_PASSWORD instead"
        )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SettingsError([f"{path}: not a readable docker config.json ({exc})"]) from exc
    if not isinstance(config, dict):
        raise SettingsError([f"{path}: not a docker config.json (not a JSON object)"])
    return config


# --- writing config.json ------------------------------------------------------------


@dataclass(kw_only=True)
class WrittenConfig:
    """What :func:`write_docker_config` did, so that :meth:`undo` can take it back."""

    directory: Path
    created_directory: bool = False
    previous: bytes | None = None
    previous_mode: int = 0o600
    wrote: bool = False

    @property
    def path(self) -> Path:
        return self.directory / CONFIG_NAME

    def undo(self) -> None:
        """Remove the file (and directory) created, or put back the previous content."""
        if self.wrote and self.previous is not None:
            _atomic_write(self.path, self.previous, self.previous_mode)
        elif self.wrote:
            self.path.unlink(missing_ok=True)
        if self.created_directory:
            with contextlib.suppress(OSError):
                self.directory.rmdir()


def write_docker_config(rt: Runtime, *, required: bool = False) -> WrittenConfig:
    """Merge ``auths`` for both registries into ``DOCKER_CONFIG/config.json`` (0600).

    Without credentials nothing is written: a warning, or exit 2 when ``required``.
    """
    directory, planned = _target_directory(rt)
    credentials = registry_credentials(rt)
    if rt.dry_run:
        _print_plan(rt, directory, credentials, planned=planned)
        return WrittenConfig(directory=directory)
    entries = _new_entries(rt, credentials)
    if not entries:
        if required:
            raise UsageError(_no_credentials_message(rt))
        log.warn(f"{_no_credentials_message(rt)}; registry calls go anonymous")
    written = _prepare(directory, planned=planned)
    if entries:
        _merge_into(written, entries)
        assert credentials is not None
        log.info(f"registry credentials: {credentials.source} (user {credentials.username})")
        log.info(f"auths for {', '.join(entries)} in {written.path}")
    return written


def _target_directory(rt: Runtime) -> tuple[Path, bool]:
    """(directory, whether it is a private temporary one still to be made)."""
    configured = rt.settings(VaultSettings).docker_config
    if configured is not None:
        return configured, False
    if KANIKO_DOCKER_DIR.is_dir():
        return KANIKO_DOCKER_DIR, False
    return Path(tempfile.gettempdir()) / "pipeline-docker-XXXXXXXX", True


def _prepare(directory: Path, *, planned: bool) -> WrittenConfig:
    if planned:
        return WrittenConfig(
            directory=Path(tempfile.mkdtemp(prefix="pipeline-docker-")), created_directory=True
        )
    created = not directory.exists()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return WrittenConfig(directory=directory, created_directory=created)


def _new_entries(rt: Runtime, credentials: Credentials | None) -> dict[str, dict[str, str]]:
    """host:port -> auths entry: one account for both registries, or the user's logins."""
    if credentials is None:
        return {}
    if not credentials.source.startswith("docker config"):
        return {host: {"auth": credentials.auth} for host in _registries(rt)}
    logins = _docker_logins(rt, explain=False)
    return {host: {"auth": login.auth} for host, login in logins.items()}


def _merge_into(written: WrittenConfig, entries: Mapping[str, dict[str, str]]) -> None:
    config: dict[str, Any] = {}
    if written.path.exists():
        written.previous = written.path.read_bytes()
        written.previous_mode = written.path.stat().st_mode & 0o777
        config = _read_config(written.path)
    _warn_helpers_win(written.path, config, entries)
    auths = config.setdefault("auths", {})
    if all(auths.get(host) == entry for host, entry in entries.items()):
        written.previous = None
        return
    auths.update(entries)
    _atomic_write(written.path, json.dumps(config, indent=2).encode() + b"\n", 0o600)
    written.wrote = True


def _warn_helpers_win(path: Path, config: Mapping[str, Any], hosts: Iterable[str]) -> None:
    """docker, skopeo and Kaniko ask a credential helper before reading ``auths``."""
    found = config.get("credHelpers")
    helpers: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    shadowed = [h for h in hosts if config.get("credsStore") or h in helpers]
    if shadowed:
        log.warn(
            f"{path} names a credential helper (credsStore/credHelpers) that tools ask before "
            f"these auths for {', '.join(shadowed)}; point DOCKER_CONFIG at another directory"
        )


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        Path(temporary).replace(path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _print_plan(
    rt: Runtime, directory: Path, credentials: Credentials | None, *, planned: bool
) -> None:
    where = f"a private temporary directory ({directory})" if planned else str(directory)
    if credentials is None:
        log.info(f"would write no {CONFIG_NAME}: {_no_credentials_message(rt)}")
        return
    hosts = " and ".join(_registries(rt))
    log.info(
        f"would write auths for {hosts} ({credentials.source}) to {where}/{CONFIG_NAME}, mode 0600"
    )


def _no_credentials_message(rt: Runtime) -> str:
    where = user_config_path(rt)
    return (
        "no registry credentials: set NEXUS_USER/NEXUS_PASSWORD, or VAULT_ADDR with "
        f"VAULT_ID_TOKEN, or docker login to {' and '.join(_registries(rt))} "
        f"(looked in {where or 'no docker config: HOME is not set'})"
    )


def _registries(rt: Runtime) -> tuple[str, str]:
    """(push, pull) registry host:port."""
    registry = rt.settings(RegistrySettings)
    return registry.registry, registry.registry_pull
