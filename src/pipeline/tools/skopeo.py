"""skopeo: argv builders and output parsers for reading and promoting images by digest.

Pure: nothing here runs a program. The push stage asks for an argv, runs it
through :mod:`pipeline.shell`, and hands the output back to a parser here.

- :func:`copy_by_digest` promotes registry-side: ``--all`` keeps a multi-arch
  index whole and ``--preserve-digests`` refuses any rewrite, so the moving tag
  ends up on exactly the bytes that were built and no layer is transferred.
- :func:`inspect_raw` fetches the manifest as served; its sha256 *is* the digest
  (:func:`raw_digest`), for single images and indexes alike, in two requests.
- :func:`inspect_image` reads the labels and creation time (``--no-tags``
  saves listing every tag of the repository).
- :func:`classify_failure` sorts skopeo's error text into what to tell a user;
  :func:`transient` is the retry classifier built on it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import CommandError
from pipeline.retry import classify_text

REVISION_LABEL = "org.opencontainers.image.revision"
Role = Literal["", "src", "dest"]
_COMMIT = re.compile(r"[0-9a-f]{7,64}\Z")
_FATAL_MSG = re.compile(r'level=fatal msg="(?P<msg>(?:[^"\\]|\\.)*)"')
_NAME_PREFIX = re.compile(r'^Error parsing image name \\?"[^"\\]*\\?": ')


@dataclass(frozen=True, kw_only=True)
class Access:
    """How skopeo reaches the registries: credentials file, CA directory, TLS verification."""

    authfile: Path | None = None
    cert_dir: Path | None = None
    tls_verify: bool = True

    def flags(self, role: Role = "") -> list[str]:
        """Flags for ``inspect`` (role "") or one side of ``copy`` ("src", "dest")."""
        prefix = f"--{role}-" if role else "--"
        flags = [f"{prefix}tls-verify={str(self.tls_verify).lower()}"]
        if self.cert_dir is not None:
            flags += [f"{prefix}cert-dir", str(self.cert_dir)]
        if self.authfile is not None:
            flags += [f"{prefix}authfile", str(self.authfile)]
        return flags


def copy_by_digest(*, source: str, destination: str, access: Access) -> list[str]:
    """``skopeo copy`` of ``repo@digest`` to ``repo:tag``, whole index, digests preserved."""
    return [
        "skopeo",
        "copy",
        "--all",
        "--preserve-digests",
        *access.flags("src"),
        *access.flags("dest"),
        f"docker://{source}",
        f"docker://{destination}",
    ]


def inspect_raw(reference: str, *, access: Access) -> list[str]:
    """``skopeo inspect --raw``: the manifest (or index) exactly as the registry serves it."""
    return ["skopeo", "inspect", "--raw", *access.flags(), f"docker://{reference}"]


def inspect_image(reference: str, *, access: Access) -> list[str]:
    """``skopeo inspect --no-tags``: digest, labels and creation time of an image."""
    return ["skopeo", "inspect", "--no-tags", *access.flags(), f"docker://{reference}"]


def raw_digest(raw: str) -> str:
    """The digest of a manifest as served: ``sha256:`` of its bytes."""
    if not raw.strip():
        raise ValueError("skopeo inspect --raw printed nothing")
    return f"sha256:{hashlib.sha256(raw.encode()).hexdigest()}"


@dataclass(frozen=True, kw_only=True)
class ImageInfo:
    """What ``skopeo inspect`` says about an image (of an index: this platform's image)."""

    digest: str
    labels: dict[str, str] = field(default_factory=dict)
    created: datetime.datetime | None = None

    @property
    def revision(self) -> str | None:
        """The commit it was built from (OCI ``revision`` label), when it is a commit SHA.

        Anything else (a branch name, a version) is ignored: git would resolve it to
        some other commit, and a value starting with ``-`` would be read as an option.
        """
        value = self.labels.get(REVISION_LABEL, "")
        return value if _COMMIT.match(value) else None


def parse_inspect(stdout: str) -> ImageInfo:
    """An :class:`ImageInfo` from ``skopeo inspect`` JSON."""
    data: dict[str, Any] = json.loads(stdout)
    labels = data.get("Labels") or {}
    return ImageInfo(
        digest=str(data["Digest"]),
        labels={str(k): str(v) for k, v in labels.items()},
        created=_timestamp(data.get("Created")),
    )


def _timestamp(value: object) -> datetime.datetime | None:
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


class Failure(StrEnum):
    """Kinds of skopeo failure that call for different advice."""

    NO_PLATFORM = "no image for this platform"
    UNAUTHORIZED = "unauthorized"
    DENIED = "denied"
    NOT_FOUND = "not found"
    TLS = "tls"
    UNREACHABLE = "unreachable"
    OTHER = "other"


_FAILURES: tuple[tuple[re.Pattern[str], Failure], ...] = (
    (re.compile(r"no image found in (image index|manifest list)", re.I), Failure.NO_PLATFORM),
    (re.compile(r"unauthorized|authentication required|\b401\b", re.I), Failure.UNAUTHORIZED),
    (re.compile(r"denied|forbidden|\b403\b", re.I), Failure.DENIED),
    (re.compile(r"manifest unknown|name unknown|not found|\b404\b", re.I), Failure.NOT_FOUND),
    (re.compile(r"x509:|certificate|tls:|server gave HTTP response", re.I), Failure.TLS),
    (
        re.compile(r"connection refused|no such host|dial tcp|i/o timeout", re.I),
        Failure.UNREACHABLE,
    ),
)


def classify_failure(stderr: str) -> Failure:
    """What kind of failure skopeo's error output describes."""
    for pattern, kind in _FAILURES:
        if pattern.search(stderr):
            return kind
    return Failure.OTHER


def error_message(stderr: str) -> str:
    """skopeo's own one-line reason, without the log prefix and the repeated image name."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else "no error output"
    found = _FATAL_MSG.search(last)
    message = found.group("msg").replace('\\"', '"') if found else last
    return _NAME_PREFIX.sub("", message)


def transient(error: BaseException) -> str | None:
    """Retry classifier: a failed skopeo run is worth retrying only for transient causes."""
    if not isinstance(error, CommandError):
        return None
    return classify_text(error.stderr_tail)
