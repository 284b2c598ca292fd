"""Settings: pydantic-settings models over the job's environment.

GitLab's and the platform's variable names are used as they are
(``CI_COMMIT_SHA``, ``NEXUS_REGISTRY``, ``DEV_SERVER_IP``); knobs of our own are
``PIPELINE_*``. Every model reads one mapping, the :func:`read_environment`
result, so a run is a pure function of that mapping. :func:`load` validates
every model a command needs at once and reports every bad variable together.
"""

from __future__ import annotations

import contextvars
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar, TypeVar

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pipeline.errors import SettingsError, UsageError
from pipeline.log import log

M = TypeVar("M", bound="Settings")

_ENVIRON: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("environ")
HOST_PORT = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?\Z")
IMAGE_NAME = re.compile(r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*\Z")
HEX_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?\Z")


def read_environment(env_file: Path | None = None) -> dict[str, str]:
    """The process environment over the ``--env-file`` values (the environment wins)."""
    from dotenv import dotenv_values

    values: dict[str, str] = {}
    if env_file is not None:
        try:
            with env_file.open(encoding="utf-8") as stream:
                loaded = dotenv_values(stream=stream)
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise UsageError(f"--env-file {env_file}: cannot read it: {reason}") from exc
        values = {key: value for key, value in loaded.items() if value is not None}
    return {**values, **os.environ}


class _MappingSource(EnvSettingsSource):
    """The env source, reading the mapping given to :func:`load` instead of os.environ."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get({})
        pairs = {k: v for k, v in environ.items() if not (self.env_ignore_empty and v == "")}
        if self.case_sensitive:
            return pairs
        return {key.lower(): value for key, value in pairs.items()}


class Settings(BaseSettings):
    """Base of every settings model: read-only, empty means unset."""

    model_config = SettingsConfigDict(
        case_sensitive=False, env_ignore_empty=True, extra="ignore", frozen=True, defer_build=True
    )
    #: Shown in the effective-settings listing under this heading.
    title: ClassVar[str] = "settings"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _MappingSource(settings_cls))

    @classmethod
    def variable(cls, field: str) -> str:
        """The environment variable that sets ``field``."""
        info = cls.model_fields[field]
        return _variable_name(cls, field, info)

    def effective(self) -> Iterator[tuple[str, str]]:
        """(variable, shown value) for every field, secrets masked."""
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                shown = "[MASKED]" if value.get_secret_value() else "(unset)"
            elif value is None:
                shown = "(unset)"
            elif isinstance(value, tuple | list):
                shown = ",".join(str(item) for item in value) or "(empty)"
            else:
                shown = str(value)
            yield _variable_name(type(self), name, info), shown


def _variable_name(model: type[BaseSettings], field: str, info: FieldInfo) -> str:
    alias = info.validation_alias
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    prefix = model.model_config.get("env_prefix", "")
    return f"{prefix}{field}".upper()


def load(
    models: tuple[type[Settings], ...], environ: Mapping[str, str]
) -> dict[type[Settings], Settings]:
    """Validate every model against ``environ``; raise one error listing every problem."""
    loaded: dict[type[Settings], Settings] = {}
    problems: list[str] = []
    token = _ENVIRON.set(environ)
    try:
        for model in models:
            try:
                loaded[model] = model()
            except ValidationError as exc:
                problems.extend(_describe(model, exc))
    finally:
        _ENVIRON.reset(token)
    if problems:
        raise SettingsError(problems)
    for instance in loaded.values():
        for value in instance.model_dump().values():
            if isinstance(value, SecretStr):
                log.add_secret(value.get_secret_value())
    return loaded


def _describe(model: type[Settings], exc: ValidationError) -> Iterator[str]:
    for error in exc.errors(include_url=False, include_input=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        if field in model.model_fields:
            variable = model.variable(field)
        else:
            variable = field.upper() or model.title
        message = str(error["msg"]).removeprefix("Value error, ")
        yield f"{variable}: {message}"


def _host_port(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if "://" in value or "/" in value:
        raise ValueError(f"must be host:port without a scheme or path, got {value!r}")
    if not HOST_PORT.match(value):
        raise ValueError(f"is not a valid {what} host:port: {value!r}")
    return value


class OutputSettings(Settings):
    """How output looks: colour policy and GitLab sections."""

    title: ClassVar[str] = "output"

    gitlab_ci: bool = Field(False, validation_alias="GITLAB_CI")
    no_color: str | None = Field(None, validation_alias="NO_COLOR")
    force_color: str | None = Field(None, validation_alias="FORCE_COLOR")


class GitLabSettings(Settings):
    """GitLab's predefined ``CI_*`` variables (all optional outside CI)."""

    model_config = SettingsConfigDict(env_prefix="CI_")
    title: ClassVar[str] = "GitLab context"

    gitlab_ci: bool = Field(False, validation_alias="GITLAB_CI")
    commit_sha: str | None = None
    commit_short_sha: str | None = None
    commit_branch: str | None = None
    commit_tag: str | None = None
    commit_ref_name: str | None = None
    commit_ref_slug: str | None = None
    commit_timestamp: str | None = None
    default_branch: str | None = None
    project_name: str | None = None
    project_path: str | None = None
    project_url: str | None = None
    project_dir: Path | None = None
    pipeline_id: str | None = None
    pipeline_source: str | None = None
    job_id: str | None = None
    job_url: str | None = None
    job_timeout: int | None = None

    @field_validator("commit_sha")
    @classmethod
    def _hex_sha(cls, value: str | None) -> str | None:
        if value is not None and not HEX_SHA.match(value):
            raise ValueError(f"must be a full hexadecimal commit SHA, got {value!r}")
        return value


class RegistrySettings(Settings):
    """The Nexus push and pull registries and the image name."""

    model_config = SettingsConfigDict(env_prefix="NEXUS_")
    title: ClassVar[str] = "registry"

    registry: str = "nexus.shared.cwiq.io:8443"
    registry_pull: str = "nexus.shared.cwiq.io:8444"
    image_name: str | None = None
    image: str | None = None
    user: str | None = None
    password: SecretStr | None = None
    ca_file: Path | None = Field(None, validation_alias="PIPELINE_REGISTRY_CA_FILE")
    #: ``false``: no certificate checks and plain http allowed, in every stage (test registries).
    tls_verify: bool = Field(True, validation_alias="PIPELINE_REGISTRY_TLS_VERIFY")

    @field_validator("registry", "registry_pull")
    @classmethod
    def _valid_host(cls, value: str) -> str:
        return _host_port(value, "registry") or value

    @field_validator("image_name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        if value is not None and not IMAGE_NAME.match(value):
            raise ValueError(
                f"must be a lower-case repository name like orchestrator-server, got {value!r}"
            )
        return value

    def repository_name(self, project_name: str) -> str:
        """``NEXUS_IMAGE_NAME``, or the platform's default ``orchestrator-<project>``."""
        if self.image_name:
            return self.image_name
        return f"orchestrator-{project_name.lower()}"

    def check_image(self, name: str) -> None:
        """Refuse a ``NEXUS_IMAGE`` that points somewhere else than registry/name."""
        expected = f"{self.registry}/{name}"
        if self.image and self.image != expected:
            raise SettingsError(
                [
                    f"NEXUS_IMAGE: is {self.image!r} but NEXUS_REGISTRY/NEXUS_IMAGE_NAME give {expected!r}; unset one or make them agree"
                ]
            )


class PipelineSettings(Settings):
    """Knobs every stage shares."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_")
    title: ClassVar[str] = "pipeline"

    build_env: Path = Path("build.env")
    retry_attempts: int = Field(4, ge=1, le=20)
    retry_budget_seconds: float = Field(600.0, gt=0)
    retry_initial_seconds: float = Field(2.0, ge=0)
    retry_max_seconds: float = Field(30.0, ge=0)


# Per-stage knobs. Each stage declares the models it needs in its SETTINGS tuple,
# so a command validates exactly the variables it will use.


class VaultSettings(Settings):
    """Where registry credentials come from: Vault JWT login, or an existing docker config."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_VAULT_")
    title: ClassVar[str] = "credentials"

    addr: str | None = Field(None, validation_alias="VAULT_ADDR")
    id_token: SecretStr | None = Field(None, validation_alias="VAULT_ID_TOKEN")
    legacy_jwt: SecretStr | None = Field(None, validation_alias="CI_JOB_JWT_V2")
    namespace: str | None = Field(None, validation_alias="VAULT_NAMESPACE")
    cacert: Path | None = Field(None, validation_alias="VAULT_CACERT")
    role: str = "nexus-ci"
    auth_path: str = "jwt"
    secret_path: str = "secret/data/nexus/svc-orchestrator"  # noqa: S105 - a path, not a secret
    pull_secret_path: str | None = None
    username_field: str = "username"
    password_field: str = "password"  # noqa: S105 - a field name
    timeout_seconds: float = Field(10.0, gt=0)
    docker_config: Path | None = Field(None, validation_alias="DOCKER_CONFIG")

    @field_validator("addr")
    @classmethod
    def _valid_addr(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://[^/\s]+/?\Z", value):
            raise ValueError(f"must be http(s)://host[:port] without a path, got {value!r}")
        return value.rstrip("/") if value else value

    @field_validator("cacert")
    @classmethod
    def _readable_cacert(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"must be a CA bundle file (PEM), {str(value)!r} is not a file")
        return value

    @field_validator("auth_path", "secret_path", "pull_secret_path")
    @classmethod
    def _valid_path(cls, value: str | None) -> str | None:
        if value is None:
            return value
        path = value.strip("/").removeprefix("v1/")
        if not path or "//" in path or any(c.isspace() for c in path):
            raise ValueError(f"must be a Vault API path like secret/data/nexus/x, got {value!r}")
        return path


class BuildSettings(Settings):
    """The build stage: Kaniko executor and its inputs."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_BUILD_")
    title: ClassVar[str] = "build"

    executor: str | None = None
    context: Path = Path()
    dockerfile: Path = Path("Dockerfile")
    args: str | None = None
    target: str | None = None
    cache: bool = True
    cache_repo: str | None = None
    push_retry: int = Field(3, ge=0, le=10)
    image_download_retry: int = Field(3, ge=0, le=10)
    image_fs_extract_retry: int = Field(2, ge=0, le=10)
    extra_flags: str | None = None

    @field_validator("args")
    @classmethod
    def _valid_args(cls, value: str | None) -> str | None:
        from pipeline.tools.kaniko import parse_build_args

        if value is not None:
            parse_build_args(value)
        return value

    @field_validator("extra_flags")
    @classmethod
    def _valid_flags(cls, value: str | None) -> str | None:
        from pipeline.tools.kaniko import parse_extra_flags

        if value is not None:
            parse_extra_flags(value)
        return value

    @field_validator("cache_repo")
    @classmethod
    def _valid_cache_repo(cls, value: str | None) -> str | None:
        if value is not None and not IMAGE_NAME.match(value):
            raise ValueError(
                "must be a repository name in the push registry like "
                f"orchestrator-server/cache, without a host, got {value!r}"
            )
        return value

    @field_validator("target")
    @classmethod
    def _valid_target(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z", value):
            raise ValueError(f"must be a stage name from a FROM ... AS <name> line, got {value!r}")
        return value

    @property
    def build_args(self) -> tuple[str, ...]:
        from pipeline.tools.kaniko import parse_build_args

        return parse_build_args(self.args) if self.args else ()

    @property
    def flags(self) -> tuple[str, ...]:
        """``PIPELINE_BUILD_EXTRA_FLAGS`` as checked ``--flag=value`` items."""
        from pipeline.tools.kaniko import parse_extra_flags

        return parse_extra_flags(self.extra_flags) if self.extra_flags else ()


class PushSettings(Settings):
    """The push stage: promotion of moving tags."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_PUSH_")
    title: ClassVar[str] = "push"

    #: How long to wait for the pull registry to serve the new digest (0: check once).
    pull_wait_seconds: float = Field(120.0, ge=0)
    pull_wait_interval_seconds: float = Field(2.0, gt=0)
    #: Move a moving tag even onto an older commit (a deliberate roll back of ``latest``).
    force: bool = False
    #: Commits ``git fetch --deepen`` adds before falling back to ``--unshallow``.
    git_deepen: int = Field(200, ge=1)
    git_remote: str = Field("origin", pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
    command_timeout_seconds: float = Field(300.0, gt=0)


class ScanSettings(Settings):
    """The trivy-image-scan stage: Trivy, reports, policy, DefectDojo."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_SCAN_")
    title: ClassVar[str] = "scan"

    fail_on: str = "off"
    severity: str = "UNKNOWN,LOW,MEDIUM,HIGH,CRITICAL"
    ignore_unfixed: bool = False
    scanners: str = "vuln"
    timeout: str = "15m"
    db_repository: str | None = None
    java_db_repository: str | None = None
    skip_db_update: bool = False
    cache_dir: Path = Path(".trivycache")
    ignore_file: Path = Path(".trivyignore")
    json_report: Path = Path("trivy-report.json")
    gitlab_report: Path = Path("gl-container-scanning-report.json")
    top_findings: int = Field(10, ge=0, le=1000)
    insecure: bool = False
    platform: str | None = None
    defectdojo_url: str | None = Field(None, validation_alias="DEFECTDOJO_URL")
    defectdojo_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("DEFECTDOJO_TOKEN", "DEFECTDOJO_API_KEY")
    )
    defectdojo_product_type: str = "orchestrator"

    @field_validator("fail_on")
    @classmethod
    def _valid_fail_on(cls, value: str) -> str:
        from pipeline.report import parse_threshold

        return parse_threshold(value) or "off"

    @field_validator("severity", "scanners")
    @classmethod
    def _valid_list(cls, value: str, info: ValidationInfo) -> str:
        from pipeline.tools.trivy import SCANNERS, SEVERITIES

        upper = info.field_name == "severity"
        allowed = SEVERITIES if upper else SCANNERS
        items = [item.strip().upper() if upper else item.strip() for item in value.split(",")]
        unknown = [item for item in items if item not in allowed]
        if unknown or not any(items):
            raise ValueError(f"{value!r}: use a comma-separated list of {','.join(allowed)}")
        return ",".join(dict.fromkeys(items))

    @field_validator("timeout")
    @classmethod
    def _valid_timeout(cls, value: str) -> str:
        from pipeline.tools.trivy import TIMEOUT

        if not TIMEOUT.match(value):
            raise ValueError(f"must be a Go duration like 15m or 1h30m, got {value!r}")
        return value

    @field_validator("platform")
    @classmethod
    def _valid_platform(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?\Z", value):
            raise ValueError(f"must be os/architecture[/variant] like linux/arm64, got {value!r}")
        return value

    @field_validator("defectdojo_url")
    @classmethod
    def _valid_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://[^/\s]+(/[^\s]*)?\Z", value):
            raise ValueError(f"must be http(s)://host[:port][/path], got {value!r}")
        return value.rstrip("/") if value else value

    @property
    def threshold(self) -> str | None:
        """The severity that fails the job, or None when the policy is off."""
        return None if self.fail_on == "off" else self.fail_on


_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_REMOTE_PATH = re.compile(r"/[A-Za-z0-9_.@%+=:,/-]{0,255}\Z")
_RELATIVE_FILE = re.compile(r"[A-Za-z0-9_.@%+=:,-][A-Za-z0-9_.@%+=:,/-]{0,254}\Z")
_COMPOSE_WORD = re.compile(r"[A-Za-z0-9_./-]+\Z")
_PRIVATE_KEY = re.compile(
    r"-----BEGIN (OPENSSH|RSA|EC|DSA) PRIVATE KEY-----\n.+\n-----END \1 PRIVATE KEY-----\n?\Z",
    re.DOTALL,
)


class DeploySettings(Settings):
    """The deploy-dev stage: SSH target, compose project, health check."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_DEPLOY_")
    title: ClassVar[str] = "deploy"

    server_ip: str | None = Field(None, validation_alias="DEV_SERVER_IP")
    server_host: str | None = Field(None, validation_alias="DEV_SERVER_HOST")
    ssh_user: str | None = Field(None, validation_alias="SSH_USER")
    ssh_private_key: SecretStr | None = Field(None, validation_alias="SSH_PRIVATE_KEY")
    ssh_known_hosts: str | None = Field(None, validation_alias="SSH_KNOWN_HOSTS")
    ssh_port: int = Field(22, ge=1, le=65535, validation_alias="SSH_PORT")
    deploy_only: bool = Field(False, validation_alias="DEPLOY_ONLY")
    dir: str | None = None
    compose_file: str | None = None
    compose_command: str = "docker compose"
    services: str = ""
    worker_services: str = ""
    health_url: str | None = None
    health_from: str = "server"
    health_tries: int = Field(30, ge=1, le=1000)
    health_interval: float = Field(5.0, gt=0, le=600)
    health_timeout: float = Field(5.0, gt=0, le=600)
    env_tag_var: str = "IMAGE_TAG"
    env_digest_var: str = "IMAGE_DIGEST"
    env_ref_var: str = "IMAGE_REF"
    rollback_file: str = ".env.rollback"
    trust_on_first_use: bool = False
    lock_stale_seconds: int = Field(900, ge=1)
    lock_wait_seconds: int = Field(600, ge=0)
    connect_timeout: int = Field(15, ge=1, le=600)

    @field_validator("server_ip", "server_host")
    @classmethod
    def _valid_server(cls, value: str | None) -> str | None:
        if value is not None and (not HOST_PORT.match(value) or ":" in value):
            raise ValueError(
                f"must be a host name or IPv4 address (port goes in SSH_PORT), got {value!r}"
            )
        return value

    @field_validator("ssh_user")
    @classmethod
    def _valid_user(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"[a-z_][a-z0-9_.-]{0,31}\Z", value):
            raise ValueError(f"must be a Unix user name like deployer, got {value!r}")
        return value

    @field_validator("ssh_private_key")
    @classmethod
    def _valid_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        text = value.get_secret_value().replace("\r\n", "\n").strip() + "\n"
        if text.startswith("-----BEGIN") and not _PRIVATE_KEY.match(text):
            raise ValueError(
                "is not a PEM/OpenSSH private key (-----BEGIN ... PRIVATE KEY----- to -----END ...-----); "
                "paste the whole key file, or make the variable a GitLab File variable"
            )
        return SecretStr(text) if text.startswith("-----BEGIN") else value

    @field_validator("dir")
    @classmethod
    def _valid_dir(cls, value: str | None) -> str | None:
        if value is not None and (not _REMOTE_PATH.match(value) or "/../" in f"{value}/"):
            raise ValueError(
                f"must be an absolute path of letters, digits and _.@%+=:,/- , got {value!r}"
            )
        return value.rstrip("/") or "/" if value else value

    @field_validator("compose_file", "rollback_file")
    @classmethod
    def _valid_file(cls, value: str | None) -> str | None:
        if value is not None and (not _RELATIVE_FILE.match(value) or ".." in value.split("/")):
            raise ValueError(f"must be a file name inside PIPELINE_DEPLOY_DIR, got {value!r}")
        return value

    @field_validator("compose_command")
    @classmethod
    def _valid_compose(cls, value: str) -> str:
        words = value.split()
        if not words or not all(_COMPOSE_WORD.match(word) for word in words):
            raise ValueError(
                f"must be a command like 'docker compose' or 'docker-compose', got {value!r}"
            )
        return " ".join(words)

    @field_validator("services", "worker_services")
    @classmethod
    def _valid_services(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        for name in names:
            if not _SERVICE.match(name):
                raise ValueError(f"{name!r} is not a compose service name (letters, digits, _.-)")
        return ",".join(names)

    @field_validator("health_url")
    @classmethod
    def _valid_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(
            r"https?://[A-Za-z0-9.\[\]:-]+(/[A-Za-z0-9_.~%/?=&+:@,-]*)?\Z", value
        ):
            raise ValueError(
                f"must be an http(s)://host[:port]/path URL without spaces or quotes, got {value!r}"
            )
        return value

    @field_validator("health_from")
    @classmethod
    def _valid_from(cls, value: str) -> str:
        if value not in ("runner", "server"):
            raise ValueError(f"must be 'runner' or 'server', got {value!r}")
        return value

    @field_validator("env_tag_var", "env_digest_var", "env_ref_var")
    @classmethod
    def _valid_env_name(cls, value: str) -> str:
        if not _ENV_NAME.match(value):
            raise ValueError(f"must be a variable name (letters, digits, _), got {value!r}")
        return value

    @property
    def service_names(self) -> tuple[str, ...]:
        return tuple(filter(None, self.services.split(",")))

    @property
    def worker_names(self) -> tuple[str, ...]:
        return tuple(filter(None, self.worker_services.split(",")))

    @property
    def server(self) -> str | None:
        """``DEV_SERVER_IP``, else ``DEV_SERVER_HOST``."""
        return self.server_ip or self.server_host
