"""Trivy: the ``trivy image`` argv, the ignore-file check, and the JSON report parser.

Everything here is pure. The argv never carries a secret (registry credentials
go in ``TRIVY_USERNAME``/``TRIVY_PASSWORD`` or ``DOCKER_CONFIG``) and always
carries ``--skip-version-check --disable-telemetry`` (runners have no internet)
and ``--exit-code 0``: Trivy exits 1 when it crashes, so the policy is decided
from the JSON, never from Trivy's exit code.

The parser reads Trivy's JSON (``SchemaVersion`` 2) into frozen records and
tolerates what real reports do: omitted empty lists, ``null`` results, results
of class ``secret``/``config``/``custom``, a missing ``FixedVersion``, and a
severity it does not know (kept as ``UNKNOWN``, the raw value remembered).
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

#: Trivy's severities, lowest first.
SEVERITIES = ("UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL")
SCANNERS = ("vuln", "secret", "misconfig", "license")
TIMEOUT = re.compile(r"(\d+(\.\d+)?(ns|us|ms|s|m|h))+\Z")
_IGNORE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]*\Z")
_KIND_VULNERABILITY = "vulnerability"


class ReportError(ValueError):
    """Trivy's JSON could not be read or does not have the shape of a report."""


# --- argv -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ImageScan:
    """What one ``trivy image`` run scans, where it writes, and how."""

    image: str
    output: Path
    cache_dir: Path
    severities: tuple[str, ...] = SEVERITIES
    scanners: tuple[str, ...] = ("vuln",)
    ignore_unfixed: bool = False
    ignorefile: Path | None = None
    timeout: str = "15m"
    db_repository: str | None = None
    java_db_repository: str | None = None
    skip_db_update: bool = False
    insecure: bool = False
    platform: str | None = None
    program: str = "trivy"


def image_argv(scan: ImageScan) -> tuple[str, ...]:
    """The argv of ``trivy image`` for ``scan`` (pure; every flag is in Trivy's reference)."""
    argv = [scan.program, "image", "--skip-version-check", "--disable-telemetry", "--no-progress"]
    argv += ["--image-src", "remote", "--format", "json", "--output", str(scan.output)]
    argv += ["--exit-code", "0", "--severity", ",".join(scan.severities)]
    argv += ["--scanners", ",".join(scan.scanners), "--timeout", scan.timeout]
    argv += ["--cache-dir", str(scan.cache_dir)]
    # An empty --ignorefile disables Trivy's default of reading ./.trivyignore unasked.
    argv += ["--ignorefile", str(scan.ignorefile) if scan.ignorefile else ""]
    argv += _optional(scan)
    argv.append(scan.image)
    return tuple(argv)


def _optional(scan: ImageScan) -> list[str]:
    flags: list[str] = []
    if scan.ignore_unfixed:
        flags.append("--ignore-unfixed")
    if scan.db_repository:
        flags += ["--db-repository", scan.db_repository]
    if scan.java_db_repository:
        flags += ["--java-db-repository", scan.java_db_repository]
    if scan.skip_db_update:
        flags += ["--skip-db-update", "--skip-java-db-update"]
    if scan.insecure:
        flags.append("--insecure")
    if scan.platform:
        # Only consulted when the digest is an index (a multi-arch build).
        flags += ["--platform", scan.platform]
    return flags


# --- .trivyignore -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class IgnoreEntry:
    """One line of a ``.trivyignore``: an ID and, maybe, the day it stops applying."""

    line: int
    id: str
    expires: datetime.date | None = None


def parse_ignorefile(text: str) -> tuple[IgnoreEntry, ...]:
    """The entries of a plain ``.trivyignore``; ValueError("line N: ...") on a bad line."""
    return tuple(_ignore_entries(text))


def _ignore_entries(text: str) -> Iterator[IgnoreEntry]:
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.partition("#")[0].strip() if not raw.strip().startswith("#") else ""
        if line:
            yield _ignore_entry(number, line.split())


def _ignore_entry(number: int, fields: list[str]) -> IgnoreEntry:
    ident, *rest = fields
    if not _IGNORE_ID.match(ident):
        raise ValueError(f"line {number}: {ident!r} is not a vulnerability, secret or check ID")
    expires: datetime.date | None = None
    for field in rest:
        if not field.startswith("exp:"):
            raise ValueError(
                f"line {number}: unexpected {field!r} after {ident} (only exp:YYYY-MM-DD may follow; comments start with #)"
            )
        try:
            expires = datetime.date.fromisoformat(field.removeprefix("exp:"))
        except ValueError:
            raise ValueError(
                f"line {number}: {field!r} is not a date like exp:2025-12-31"
            ) from None
    return IgnoreEntry(line=number, id=ident, expires=expires)


# --- the JSON report ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One thing Trivy found: a vulnerability in a package, a secret, or a misconfiguration."""

    kind: str
    id: str
    severity: str
    raw_severity: str
    target: str
    result_class: str
    result_type: str
    package: str
    installed_version: str
    fixed_version: str | None = None
    pkg_path: str | None = None
    status: str | None = None
    title: str | None = None
    description: str | None = None
    primary_url: str | None = None
    references: tuple[str, ...] = ()
    cwe_ids: tuple[str, ...] = ()
    cvss: tuple[tuple[str, str], ...] = ()

    @property
    def rank(self) -> int:
        """Position in SEVERITIES: higher is worse."""
        return SEVERITIES.index(self.severity)

    @property
    def is_vulnerability(self) -> bool:
        return self.kind == _KIND_VULNERABILITY


@dataclass(frozen=True, kw_only=True)
class Report:
    """A parsed ``trivy image --format json`` report."""

    artifact_name: str
    artifact_type: str
    trivy_version: str
    created_at: str | None
    os_family: str | None
    os_name: str | None
    results: int
    findings: tuple[Finding, ...]

    @property
    def operating_system(self) -> str:
        """``debian 10.2`` (or ``unknown`` when Trivy detected no OS)."""
        parts = [part for part in (self.os_family, self.os_name) if part]
        return " ".join(parts) or "unknown"


def load_report(text: str | bytes) -> Report:
    """Parse Trivy's JSON text; ReportError says what is wrong with it."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReportError(f"not JSON ({exc})") from None
    return parse_report(data)


def parse_report(data: object) -> Report:
    """The report in ``data`` (Trivy's JSON, already decoded)."""
    if not isinstance(data, dict):
        raise ReportError(f"expected a JSON object, got {type(data).__name__}")
    if data.get("SchemaVersion") != 2:
        raise ReportError(f"SchemaVersion is {data.get('SchemaVersion')!r}, expected 2")
    results = _list(data.get("Results"), "Results")
    metadata = _dict(data.get("Metadata"))
    os_info = _dict(metadata.get("OS"))
    return Report(
        artifact_name=_text(data.get("ArtifactName")) or "unknown",
        artifact_type=_text(data.get("ArtifactType")) or "unknown",
        trivy_version=_text(_dict(data.get("Trivy")).get("Version")) or "unknown",
        created_at=_text(data.get("CreatedAt")),
        os_family=_text(os_info.get("Family")),
        os_name=_text(os_info.get("Name")),
        results=len(results),
        findings=tuple(f for result in results for f in _result_findings(_dict(result))),
    )


@dataclass(frozen=True, kw_only=True)
class _Where:
    """The result a finding belongs to."""

    target: str
    result_class: str
    result_type: str


def _result_findings(result: Mapping[str, Any]) -> Iterator[Finding]:
    where = _Where(
        target=_text(result.get("Target")) or "unknown",
        result_class=_text(result.get("Class")) or "unknown",
        result_type=_text(result.get("Type")) or "",
    )
    for item in _list(result.get("Vulnerabilities"), "Vulnerabilities"):
        yield _vulnerability(_dict(item), where)
    for item in _list(result.get("Secrets"), "Secrets"):
        yield _secret(_dict(item), where)
    for item in _list(result.get("Misconfigurations"), "Misconfigurations"):
        yield _misconfiguration(_dict(item), where)


def _vulnerability(item: Mapping[str, Any], where: _Where) -> Finding:
    return Finding(
        kind=_KIND_VULNERABILITY,
        id=_required(item, "VulnerabilityID"),
        **_severity(item),
        target=where.target,
        result_class=where.result_class,
        result_type=where.result_type,
        package=_required(item, "PkgName"),
        installed_version=_text(item.get("InstalledVersion")) or "",
        fixed_version=_text(item.get("FixedVersion")),
        pkg_path=_text(item.get("PkgPath")),
        status=_text(item.get("Status")),
        title=_text(item.get("Title")),
        description=_text(item.get("Description")),
        primary_url=_text(item.get("PrimaryURL")),
        references=tuple(_strings(item.get("References"))),
        cwe_ids=tuple(_strings(item.get("CweIDs"))),
        cvss=tuple(_cvss(_dict(item.get("CVSS")))),
    )


def _secret(item: Mapping[str, Any], where: _Where) -> Finding:
    line = item.get("StartLine")
    return Finding(
        kind="secret",
        id=_required(item, "RuleID"),
        **_severity(item),
        target=where.target,
        result_class=where.result_class,
        result_type=where.result_type,
        package=where.target,
        installed_version=f"line {line}" if isinstance(line, int) else "",
        title=_text(item.get("Title")),
    )


def _misconfiguration(item: Mapping[str, Any], where: _Where) -> Finding:
    return Finding(
        kind="misconfiguration",
        id=_text(item.get("AVDID")) or _required(item, "ID"),
        **_severity(item),
        target=where.target,
        result_class=where.result_class,
        result_type=where.result_type,
        package=where.target,
        installed_version="",
        status=_text(item.get("Status")),
        title=_text(item.get("Title")),
        description=_text(item.get("Description")),
        primary_url=_text(item.get("PrimaryURL")),
        references=tuple(_strings(item.get("References"))),
    )


class _Severity(TypedDict):
    severity: str
    raw_severity: str


def _severity(item: Mapping[str, Any]) -> _Severity:
    raw = _text(item.get("Severity")) or "UNKNOWN"
    normal = raw.upper()
    return {"severity": normal if normal in SEVERITIES else "UNKNOWN", "raw_severity": raw}


def _cvss(cvss: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    for vendor, scores in cvss.items():
        vector = _dict(scores).get("V3Vector") or _dict(scores).get("V2Vector")
        if isinstance(vector, str) and vector:
            yield str(vendor), vector


def _required(item: Mapping[str, Any], key: str) -> str:
    value = _text(item.get(key))
    if not value:
        raise ReportError(f"a finding has no {key}")
    return value


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object, key: str) -> Sequence[Any]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ReportError(f"{key} is a {type(value).__name__}, expected a list")
    return value


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, list):
        yield from (item for item in value if isinstance(item, str))
