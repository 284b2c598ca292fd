"""Kaniko executor: the argv of one build, its digest files, and what its failures mean.

Everything here is pure. :func:`build_argv` turns a frozen :class:`Build` into
the executor's argv; every flag it can emit is in :data:`FLAGS`, the flag list
of the maintained fork (``osscontainertools/kaniko`` v1.28.3), and every flag
but the fork's restore mode is in upstream Kaniko v1.24.0 too. Extra flags from
a setting are checked against the same list (:func:`parse_extra_flags`).

Kaniko exits 1 for nearly every failure (a failing ``RUN`` passes its own code
through), so :func:`classify_failure` reads its stderr to tell a transient
network or registry hiccup (worth a rebuild) from a permanent mistake (a broken
Dockerfile, bad credentials, a policy refusal), with one line on what to fix.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

#: The fork's restore mode: without it Kaniko leaves this job's filesystem wiped.
RESTORE_FLAGS = ("--pre-cleanup", "--preserve-context", "--cleanup")
LABEL_PREFIX = "org.opencontainers.image."
DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_SECRET_KEY = re.compile(r"PASS|SECRET|TOKEN|CREDENTIAL|PRIVATE|API_?KEY", re.IGNORECASE)
BUILD_ARG = re.compile(r"(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)\Z", re.DOTALL)


class Kind(StrEnum):
    """How a flag takes its value on the command line."""

    BOOL = "bool"
    VALUE = "value"
    REPEATABLE = "repeatable"


_B, _V, _R = Kind.BOOL, Kind.VALUE, Kind.REPEATABLE

#: Every executor flag of osscontainertools/kaniko v1.28.3 (a superset of upstream v1.24.0).
FLAGS: dict[str, Kind] = {
    "--dockerfile": _V, "--context": _V, "--context-sub-path": _V, "--bucket": _V,
    "--destination": _R, "--snapshot-mode": _V, "--custom-platform": _V, "--build-arg": _R,
    "--insecure": _B, "--skip-tls-verify": _B, "--insecure-pull": _B,
    "--skip-tls-verify-pull": _B, "--push-retry": _V, "--push-ignore-immutable-tag-errors": _B,
    "--image-fs-extract-retry": _V, "--image-download-retry": _V, "--kaniko-dir": _V,
    "--tar-path": _V, "--single-snapshot": _B, "--reproducible": _B, "--target": _R,
    "--no-push": _B, "--no-push-cache": _B, "--cache-repo": _V, "--cache-dir": _V,
    "--digest-file": _V, "--image-name-with-digest-file": _V,
    "--image-name-tag-with-digest-file": _V, "--oci-layout-path": _V, "--compression": _V,
    "--compression-level": _V, "--cache": _B, "--compressed-caching": _B, "--cleanup": _B,
    "--cache-ttl": _V, "--insecure-registry": _R, "--skip-tls-verify-registry": _R,
    "--registry-certificate": _R, "--registry-client-cert": _R, "--registry-map": _R,
    "--registry-mirror": _R, "--skip-default-registry-fallback": _B, "--ignore-var-run": _B,
    "--label": _R, "--skip-unused-stages": _B, "--use-new-run": _B, "--git": _V,
    "--cache-copy-layers": _B, "--cache-run-layers": _B, "--ignore-path": _R,
    "--force-build-metadata": _B, "--skip-push-permission-check": _B, "--verbosity": _V,
    "--log-format": _V, "--log-timestamp": _B, "--force": _B, "--whitelist-var-run": _B,
    "--snapshotMode": _V, "--customPlatform": _V, "--tarPath": _V, "--image-format": _V,
    "--pre-cleanup": _B, "--annotation": _R, "--preserve-context": _B, "--materialize": _B,
    "--secret": _R, "--dryrun": _B, "--credential-helpers": _R,
}  # fmt: skip
SHORT_FLAGS = {"-f": "--dockerfile", "-c": "--context", "-b": "--bucket", "-d": "--destination", "-v": "--verbosity"}  # fmt: skip

#: Flags the build stage sets itself, and the setting that controls each instead.
OWNED_FLAGS = {
    "--context": "PIPELINE_BUILD_CONTEXT",
    "--dockerfile": "PIPELINE_BUILD_DOCKERFILE",
    "--destination": "the tag plan (NEXUS_REGISTRY, NEXUS_IMAGE_NAME)",
    "--digest-file": "the build stage (it reads the digest back)",
    "--image-name-with-digest-file": "the build stage (it reads the digest back)",
    "--registry-mirror": "NEXUS_REGISTRY_PULL",
    "--build-arg": "PIPELINE_BUILD_ARGS",
    "--cache": "PIPELINE_BUILD_CACHE",
    "--cache-repo": "PIPELINE_BUILD_CACHE_REPO",
    "--push-retry": "PIPELINE_BUILD_PUSH_RETRY",
    "--image-download-retry": "PIPELINE_BUILD_IMAGE_DOWNLOAD_RETRY",
    "--image-fs-extract-retry": "PIPELINE_BUILD_IMAGE_FS_EXTRACT_RETRY",
    "--registry-certificate": "PIPELINE_REGISTRY_CA_FILE",
    "--target": "PIPELINE_BUILD_TARGET",
    "--pre-cleanup": "the build stage (restore mode is always on)",
    "--preserve-context": "the build stage (restore mode is always on)",
    "--cleanup": "the build stage (restore mode is always on)",
    "--kaniko-dir": "nothing: moving Kaniko's directory leaves it unprotected",
    "--no-push": "nothing: build.env must name an image that was pushed",
    "--dryrun": "nothing: use pipeline build --dry-run",
}


# --- argv -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Build:
    """One executor run: what to build, where to push it, and how hard to try."""

    executor: str
    context: Path
    dockerfile: Path
    destinations: tuple[str, ...]
    digest_file: Path
    image_name_with_digest_file: Path
    registry_mirror: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    build_args: tuple[str, ...] = ()
    cache: bool = True
    cache_repo: str | None = None
    push_retry: int = 0
    image_download_retry: int = 0
    image_fs_extract_retry: int = 0
    registry_certificates: tuple[tuple[str, Path], ...] = ()
    target: str | None = None
    extra_flags: tuple[str, ...] = ()


def build_argv(build: Build) -> tuple[str, ...]:
    """The executor's argv for ``build``: always ``--flag=value``, restore mode always on."""
    if not build.destinations:
        raise ValueError("a build needs at least one --destination")
    argv = [build.executor, *_flag("--context", str(build.context))]
    argv += _flag("--dockerfile", str(build.dockerfile))
    argv += _repeat("--destination", build.destinations)
    argv += _flag("--digest-file", str(build.digest_file))
    argv += _flag("--image-name-with-digest-file", str(build.image_name_with_digest_file))
    argv += _repeat("--registry-mirror", [build.registry_mirror] if build.registry_mirror else [])
    argv += _repeat("--label", [f"{key}={value}" for key, value in build.labels])
    argv += _repeat("--build-arg", build.build_args)
    argv += _cache(build)
    argv += _retries(build)
    argv += _repeat("--registry-certificate", [f"{h}={p}" for h, p in build.registry_certificates])
    argv += _flag("--target", build.target) if build.target else []
    argv += RESTORE_FLAGS
    argv += build.extra_flags
    return tuple(argv)


def _flag(name: str, value: str) -> list[str]:
    return [f"{name}={value}"]


def _repeat(name: str, values: Iterable[str]) -> list[str]:
    return [f"{name}={value}" for value in values]


def _cache(build: Build) -> list[str]:
    if not build.cache:
        return ["--cache=false"]
    return ["--cache=true", *(_flag("--cache-repo", build.cache_repo) if build.cache_repo else [])]


def _retries(build: Build) -> list[str]:
    return [
        *_flag("--push-retry", str(build.push_retry)),
        *_flag("--image-download-retry", str(build.image_download_retry)),
        *_flag("--image-fs-extract-retry", str(build.image_fs_extract_retry)),
    ]


def oci_labels(
    *, revision: str, created: str, version: str, ref_name: str, title: str, source: str | None
) -> tuple[tuple[str, str], ...]:
    """The ``org.opencontainers.image.*`` labels; ``source`` is left out when unknown."""
    labels = {
        "revision": revision,
        "source": source,
        "created": created,
        "version": version,
        "ref.name": ref_name,
        "title": title,
    }
    return tuple((LABEL_PREFIX + key, value) for key, value in labels.items() if value)


# --- settings text ----------------------------------------------------------------------


def parse_build_args(text: str) -> tuple[str, ...]:
    """``KEY=VALUE`` items: one per line when the text has several lines, else space-separated."""
    items = text.splitlines() if "\n" in text.strip() else text.split()
    args = tuple(item.strip() for item in items if item.strip())
    for arg in args:
        if not BUILD_ARG.match(arg):
            raise ValueError(
                f"{arg!r} is not KEY=VALUE (KEY: letters, digits, _; a bare KEY would "
                "read the value from the job's environment, which the build refuses)"
            )
    return args


def secret_looking(build_args: tuple[str, ...]) -> tuple[str, ...]:
    """Keys of build args named like credentials (their values end up in the image history)."""
    keys = (arg.partition("=")[0] for arg in build_args)
    return tuple(key for key in keys if _SECRET_KEY.search(key))


def parse_extra_flags(text: str) -> tuple[str, ...]:
    """Shell-split executor flags, each checked against :data:`FLAGS`, as ``--flag=value``."""
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"cannot be split like a shell line: {exc}") from None
    flags: list[str] = []
    while tokens:
        flags.append(_take_flag(tokens))
    return tuple(flags)


def _take_flag(tokens: list[str]) -> str:
    token = tokens.pop(0)
    name, has_value, value = token.partition("=")
    name = SHORT_FLAGS.get(name, name)
    kind = FLAGS.get(name)
    if kind is None:
        raise ValueError(
            f"{name!r} is not a Kaniko executor flag (osscontainertools/kaniko v1.28.3); "
            "check its spelling in the executor's --help"
        )
    if name in OWNED_FLAGS:
        raise ValueError(f"{name} is set by the build stage; use {OWNED_FLAGS[name]}")
    if kind is Kind.BOOL:
        return _bool_flag(name, value if has_value else "true")
    if not has_value:
        if not tokens or tokens[0].startswith("-"):
            raise ValueError(f"{name} needs a value ({name}=VALUE)")
        value = tokens.pop(0)
    return f"{name}={value}"


def _bool_flag(name: str, value: str) -> str:
    if value.lower() not in {"true", "false", "1", "0"}:
        raise ValueError(f"{name} takes true or false, got {value!r}")
    return f"{name}={value.lower() in {'true', '1'}}".lower()


def emitted_flags(argv: tuple[str, ...]) -> tuple[str, ...]:
    """The flag names in an executor argv (``--name=value`` or bare ``--name``)."""
    return tuple(arg.partition("=")[0] for arg in argv[1:] if arg.startswith("-"))


# --- outputs ----------------------------------------------------------------------------


class OutputError(ValueError):
    """A digest file Kaniko wrote does not hold what it should."""


def parse_digest_file(text: str) -> str:
    """The ``sha256:...`` digest ``--digest-file`` holds."""
    digest = text.strip()
    if not DIGEST.match(digest):
        raise OutputError(f"holds {digest[:80]!r}, not sha256: and 64 hex digits")
    return digest


def parse_image_names(text: str, *, digest: str) -> tuple[str, ...]:
    """The repositories in ``--image-name-with-digest-file`` (``repo@digest`` lines)."""
    repositories = []
    for line in filter(None, (raw.strip() for raw in text.splitlines())):
        repository, _, line_digest = line.rpartition("@")
        if not repository or line_digest != digest:
            raise OutputError(f"line {line[:120]!r} is not <repository>@{digest}")
        repositories.append(repository)
    if not repositories:
        raise OutputError("is empty")
    return tuple(repositories)


# --- failures ---------------------------------------------------------------------------


class Verdict(StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    UNKNOWN = "unknown"


@dataclass(frozen=True, kw_only=True)
class Failure:
    """What a failed executor run means: retry or not, and what to fix."""

    verdict: Verdict
    reason: str
    fix: str

    @property
    def transient(self) -> bool:
        return self.verdict is Verdict.TRANSIENT

    def message(self, attempts: int = 1) -> str:
        tried = "" if attempts <= 1 else f" after {attempts} attempts"
        retried = {Verdict.TRANSIENT: "", Verdict.PERMANENT: " (not retried)"}.get(self.verdict, "")
        return f"kaniko build failed{tried}: {self.reason}{retried}; {self.fix}"


_RUN_STEP = re.compile(r"failed to execute command.*?exit status (\d+)", re.IGNORECASE)
_RULES: tuple[tuple[Verdict, re.Pattern[str], str, str], ...] = (
    (Verdict.PERMANENT, re.compile(r"valid path to a Dockerfile|Dockerfile\S*: no such file", re.I),
     "the Dockerfile was not found in the build context",
     "set PIPELINE_BUILD_DOCKERFILE (relative to PIPELINE_BUILD_CONTEXT) to an existing file"),
    (Verdict.PERMANENT, re.compile(r"is not a valid target build stage", re.I),
     "the target stage is not in the Dockerfile",
     "set PIPELINE_BUILD_TARGET to a stage name from a FROM ... AS <name> line"),
    (Verdict.PERMANENT, re.compile(r"\b401\b|UNAUTHORIZED|authentication required", re.I),
     "the registry refused the credentials (401 UNAUTHORIZED)",
     "check NEXUS_USER/NEXUS_PASSWORD or the Vault secret the job reads"),
    (Verdict.PERMANENT, re.compile(r"\b403\b|DENIED|forbidden", re.I),
     "the account may not push there (403 DENIED)",
     "grant the account push rights on the push registry repository"),
    (Verdict.PERMANENT, re.compile(r"MANIFEST_INVALID", re.I),
     "the registry refused the manifest (MANIFEST_INVALID), usually a policy such as an "
     "immutable tag that already exists",
     "do not rebuild an existing immutable tag: push a new commit, or ask for the tag's removal"),
    (Verdict.PERMANENT, re.compile(r"MANIFEST_UNKNOWN|NAME_UNKNOWN|manifest unknown", re.I),
     "a base image was not found",
     "check the FROM lines: base images come through the pull registry (NEXUS_REGISTRY_PULL)"),
    (Verdict.PERMANENT, re.compile(r"x509:|certificate signed by unknown authority", re.I),
     "the registry's TLS certificate is not trusted",
     "set PIPELINE_REGISTRY_CA_FILE to the CA bundle that signed it"),
    (Verdict.PERMANENT, re.compile(r"no such host", re.I),
     "a registry host name does not resolve",
     "check NEXUS_REGISTRY, NEXUS_REGISTRY_PULL and the FROM lines"),
    (Verdict.TRANSIENT, re.compile(r"TOOMANYREQUESTS|\b429\b|too many requests", re.I),
     "the registry is rate limiting (429 TOOMANYREQUESTS)",
     "wait and rerun the job, or use a pull-through mirror for base images"),
    (Verdict.TRANSIENT,
     re.compile(r"\b50[0-4]\b|internal server error|bad gateway|service unavailable|gateway time-?out", re.I),
     "the registry answered with a server error (5xx)",
     "the registry is failing: rerun the job later, or tell the registry's operators"),
    (Verdict.TRANSIENT, re.compile(r"TLS handshake timeout|i/o timeout|deadline exceeded|timed out", re.I),
     "a network operation timed out",
     "check the runner's network path to the registries, then rerun the job"),
    (Verdict.TRANSIENT, re.compile(r"connection reset|unexpected EOF|broken pipe|connection refused", re.I),
     "the connection to a registry dropped or was refused",
     "check that NEXUS_REGISTRY/NEXUS_REGISTRY_PULL are up and reachable, then rerun the job"),
)  # fmt: skip


def classify_failure(returncode: int, stderr: str) -> Failure:
    """What a failed executor run means, from its exit status and the tail of its stderr."""
    if returncode < 0:
        return _killed(-returncode)
    run_step = _RUN_STEP.search(stderr)
    if run_step or returncode > 1:
        code = run_step.group(1) if run_step else str(returncode)
        return Failure(
            verdict=Verdict.PERMANENT,
            reason=f"a RUN step in the Dockerfile failed with exit status {code}",
            fix="fix that step (its output is above); a rebuild would fail the same way",
        )
    for verdict, pattern, reason, fix in _RULES:
        if pattern.search(stderr):
            return Failure(verdict=verdict, reason=reason, fix=fix)
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    return Failure(
        verdict=Verdict.UNKNOWN,
        reason=f"exit status {returncode}: {last[:300] or 'no error output'}",
        fix="read the executor's output above; unknown failures are not retried",
    )


def _killed(signum: int) -> Failure:
    if signum == 15:
        fix = (
            "the job was cancelled or hit its timeout; raise the job's timeout if it was too short"
        )
    else:
        fix = "if the runner ran out of memory, use a larger one (runner tag medium or large)"
    return Failure(
        verdict=Verdict.UNKNOWN, reason=f"the executor was killed by signal {signum}", fix=fix
    )
