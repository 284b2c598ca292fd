"""``build.env``: the one artifact that crosses jobs, and its reader and writer.

The file obeys GitLab's dotenv rules: ``KEY=value`` lines only (no blank lines,
comments or quotes), at most 20 variables, under 5 KB, and no ``$`` in values
(GitLab would expand it). GitLab injects the same variables into later jobs, so
the reader accepts the file, the environment, or both, and refuses a
disagreement: a project variable named ``IMAGE_TAG`` silently overrides the
artifact, and deploying that would deploy the wrong image.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import ArtifactError
from pipeline.tags import DOCKER_TAG, TagPlan

SCHEMA_VERSION = "1"
MAX_VARIABLES = 20
MAX_BYTES = 5 * 1024
PRODUCER = "the build stage (job build-push)"
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
REPOSITORY = re.compile(r"[A-Za-z0-9.-]+(:[0-9]+)?(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)+\Z")
_FORBIDDEN = re.compile(r"[\"'`$#\s\\]")


class BuildEnv(BaseModel):
    """The schema of ``build.env``; field names are the dotenv keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    BUILD_ENV_SCHEMA: Literal["1"] = "1"
    IMAGE_TAG: str
    IMAGE_DIGEST: str
    IMAGE_PUSH_REPOSITORY: str
    IMAGE_PULL_REPOSITORY: str
    IMAGE_IMMUTABLE_TAGS: str
    IMAGE_MOVING_TAGS: str = ""
    IMAGE_COMMIT_SHA: str = Field(pattern=r"^[0-9a-f]{40}([0-9a-f]{24})?$")
    IMAGE_PULL_REF: str

    @field_validator("IMAGE_TAG")
    @classmethod
    def _tag(cls, value: str) -> str:
        if not DOCKER_TAG.match(value):
            raise ValueError(f"{value!r} is not a valid Docker tag")
        return value

    @field_validator("IMAGE_IMMUTABLE_TAGS", "IMAGE_MOVING_TAGS")
    @classmethod
    def _tag_list(cls, value: str) -> str:
        for tag in filter(None, value.split(",")):
            if not DOCKER_TAG.match(tag):
                raise ValueError(f"{tag!r} is not a valid Docker tag")
        return value

    @field_validator("IMAGE_DIGEST")
    @classmethod
    def _digest(cls, value: str) -> str:
        if not DIGEST.match(value):
            raise ValueError(f"must be sha256: followed by 64 lower-case hex digits, got {value!r}")
        return value

    @field_validator("IMAGE_PUSH_REPOSITORY", "IMAGE_PULL_REPOSITORY")
    @classmethod
    def _repository(cls, value: str) -> str:
        if not REPOSITORY.match(value):
            raise ValueError(f"must be host[:port]/name, got {value!r}")
        return value

    @property
    def immutable_tags(self) -> tuple[str, ...]:
        return tuple(filter(None, self.IMAGE_IMMUTABLE_TAGS.split(",")))

    @property
    def moving_tags(self) -> tuple[str, ...]:
        return tuple(filter(None, self.IMAGE_MOVING_TAGS.split(",")))

    @property
    def push_ref(self) -> str:
        """The image in the push registry, by digest."""
        return f"{self.IMAGE_PUSH_REPOSITORY}@{self.IMAGE_DIGEST}"

    @property
    def pull_ref(self) -> str:
        """The image in the pull registry, by digest: what scans and deploys use."""
        return f"{self.IMAGE_PULL_REPOSITORY}@{self.IMAGE_DIGEST}"


#: Stands in for the digest in a dry-run, where it exists only after the push would happen.
DRY_RUN_DIGEST = "sha256:" + "0" * 64
#: How a dry-run shows :data:`DRY_RUN_DIGEST` to people.
DRY_RUN_DIGEST_SHOWN = "sha256:<digest-of-the-build>"


def from_plan(plan: TagPlan, *, digest: str, commit_sha: str) -> BuildEnv:
    """The build.env for a tag plan's build, once its digest is known (or planned)."""
    return make(
        image_tag=plan.image_tag,
        digest=digest,
        push_repository=plan.push_repository,
        pull_repository=plan.pull_repository,
        immutable_tags=plan.immutable_tags,
        moving_tags=plan.moving_tags,
        commit_sha=commit_sha,
    )


def make(
    *,
    image_tag: str,
    digest: str,
    push_repository: str,
    pull_repository: str,
    immutable_tags: tuple[str, ...],
    moving_tags: tuple[str, ...],
    commit_sha: str,
) -> BuildEnv:
    """A validated :class:`BuildEnv` from the build's results."""
    return _validate(
        {
            "IMAGE_TAG": image_tag,
            "IMAGE_DIGEST": digest,
            "IMAGE_PUSH_REPOSITORY": push_repository,
            "IMAGE_PULL_REPOSITORY": pull_repository,
            "IMAGE_IMMUTABLE_TAGS": ",".join(immutable_tags),
            "IMAGE_MOVING_TAGS": ",".join(moving_tags),
            "IMAGE_COMMIT_SHA": commit_sha,
            "IMAGE_PULL_REF": f"{pull_repository}@{digest}",
        },
        source="build.env",
    )


def render(env: BuildEnv) -> str:
    """The file's text; refuses anything GitLab's dotenv parser would reject."""
    values = env.model_dump()
    for key, value in values.items():
        _check_value(key, str(value), source="build.env")
    text = "".join(f"{key}={value}\n" for key, value in values.items())
    _check_size(len(values), len(text.encode()), source="build.env")
    return text


def write(path: Path, env: BuildEnv) -> None:
    """Write ``build.env`` atomically: a reader sees the old file or the whole new one."""
    text = render(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        Path(tmp).chmod(0o644)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse(text: str, *, source: str) -> dict[str, str]:
    """Parse dotenv text under GitLab's rules, strictly: every violation is an error."""
    text = text.removeprefix("\ufeff")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    values: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        where = f"{source} line {number}"
        if not line.strip() or line.lstrip().startswith("#") or "=" not in line:
            raise ArtifactError(
                f"{where} {_bad_line(line)}: GitLab rejects the whole file (KEY=value lines only)"
            )
        key, value = (part.strip() for part in line.split("=", 1))
        if not KEY.match(key):
            raise ArtifactError(f"{where}: {key!r} is not a valid key (A-Z a-z 0-9 _ only)")
        if key in values:
            raise ArtifactError(
                f"{where}: {key} appears twice (GitLab would keep the last one silently)"
            )
        _check_value(key, value, source=where)
        values[key] = value
    _check_size(len(values), len(text.encode()), source=source)
    return values


def _bad_line(line: str) -> str:
    if not line.strip():
        return "is blank"
    if line.lstrip().startswith("#"):
        return "is a comment"
    return "has no '='"


def read(path: Path | None, environ: Mapping[str, str]) -> BuildEnv:
    """``build.env`` from the file, the injected environment, or both (which must agree)."""
    from_file = _read_file(path) if path is not None and path.exists() else None
    from_env = {key: environ[key] for key in BuildEnv.model_fields if key in environ}
    if from_file is None and not from_env:
        where = f"{path} does not exist" if path is not None else "no file was given"
        raise ArtifactError(
            f"build.env not found ({where}) and IMAGE_DIGEST is not in the environment: "
            f"{PRODUCER} must run first and pass build.env as artifacts:reports:dotenv"
        )
    if from_file is None:
        return _validate(from_env, source="the environment")
    _refuse_disagreement(from_file, from_env, path)
    return _validate(from_file, source=str(path))


def _read_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(
            f"{path}: cannot read it: {getattr(exc, 'strerror', None) or exc}"
        ) from exc
    return parse(text, source=str(path))


def _refuse_disagreement(
    from_file: dict[str, str], from_env: dict[str, str], path: Path | None
) -> None:
    for key, value in from_env.items():
        if key in from_file and from_file[key] != value:
            raise ArtifactError(
                f"{key} is {from_file[key]!r} in {path} but {value!r} in the environment: "
                f"a project, group or pipeline variable named {key} overrides the artifact; remove it"
            )


def _validate(values: Mapping[str, str], *, source: str) -> BuildEnv:
    version = values.get("BUILD_ENV_SCHEMA")
    if version is not None and version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{source}: BUILD_ENV_SCHEMA is {version!r}, this version reads {SCHEMA_VERSION!r}: "
            "the build and later jobs must run the same pipeline version"
        )
    try:
        env = BuildEnv.model_validate(dict(values))
    except ValidationError as exc:
        raise ArtifactError(_first_problem(exc, source)) from None
    expected = f"{env.IMAGE_PULL_REPOSITORY}@{env.IMAGE_DIGEST}"
    if env.IMAGE_PULL_REF != expected:
        raise ArtifactError(
            f"{source}: IMAGE_PULL_REF is {env.IMAGE_PULL_REF!r}, expected {expected!r}"
        )
    if env.IMAGE_TAG not in env.immutable_tags:
        raise ArtifactError(
            f"{source}: IMAGE_TAG {env.IMAGE_TAG!r} is not among IMAGE_IMMUTABLE_TAGS"
        )
    return env


def _first_problem(exc: ValidationError, source: str) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        return f"{source}: {key} is missing ({PRODUCER} writes it)"
    if error["type"] == "extra_forbidden":
        return f"{source}: {key} is not a build.env key (unknown to schema {SCHEMA_VERSION})"
    return f"{source}: {key} {str(error['msg']).removeprefix('Value error, ')}"


def _check_value(key: str, value: str, *, source: str) -> None:
    if _FORBIDDEN.search(value):
        raise ArtifactError(
            f"{source}: the value of {key} holds a quote, '$', '#', backslash or space: "
            "GitLab keeps quotes literally and expands '$'"
        )


def _check_size(count: int, size: int, *, source: str) -> None:
    if count > MAX_VARIABLES:
        raise ArtifactError(f"{source}: {count} variables, GitLab accepts at most {MAX_VARIABLES}")
    if size >= MAX_BYTES:
        raise ArtifactError(f"{source}: {size} bytes, GitLab accepts less than {MAX_BYTES}")
