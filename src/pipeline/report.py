"""What a scan report becomes: GitLab's container_scanning report, a summary, a verdict.

Pure functions over :class:`pipeline.tools.trivy.Report`. The GitLab report
follows schema 15.2.1 (container-scanning-report-format.json) and gives each
vulnerability an id that stays the same across pipelines: a UUID derived from
the image's repository (no tag, no digest), the package, its path and the
vulnerability ID, so GitLab tracks one finding instead of a new one per run.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import __version__
from pipeline.tools.trivy import SEVERITIES, Finding, Report

SCHEMA_VERSION = "15.2.1"
#: The namespace of the stable finding ids (a fixed, arbitrary UUID: never change it).
FINDING_NAMESPACE = uuid.UUID("5b0c6f43-8c8e-4d0e-9b7a-6a1f3d2e9c41")
TOP_FINDINGS = 10
_GITLAB_SEVERITY = {
    "UNKNOWN": "Unknown",
    "LOW": "Low",
    "MEDIUM": "Medium",
    "HIGH": "High",
    "CRITICAL": "Critical",
}
_URL_SCHEMES = ("http://", "https://", "ftp://")
_CVSS_VECTOR = re.compile(r"(CVSS:3[.][01]/)?[A-Za-z]{1,3}:[A-Za-z]+(/[A-Za-z]{1,3}:[A-Za-z]+)+")
_MAX_NAME = 255
_MAX_SOLUTION = 7000


@dataclass(frozen=True, kw_only=True)
class ScannedImage:
    """What was scanned: the repository (no tag, no digest), the tag and the digest."""

    repository: str
    tag: str
    digest: str

    @property
    def ref(self) -> str:
        return f"{self.repository}@{self.digest}"


@dataclass(frozen=True, kw_only=True)
class Summary:
    """Counts per severity and the worst findings, for the log and the policy."""

    counts: tuple[tuple[str, int], ...]
    total: int
    top: tuple[Finding, ...]
    fixable: int


# --- policy -------------------------------------------------------------------------------


def parse_threshold(value: str) -> str | None:
    """``PIPELINE_SCAN_FAIL_ON``'s value: a severity, or None for off; ValueError if unknown."""
    normal = value.strip().upper()
    if normal in ("", "OFF", "NONE", "NEVER"):
        return None
    if normal not in SEVERITIES:
        raise ValueError(f"{value!r} is not a severity; use one of {', '.join(SEVERITIES)} or off")
    return normal


def breaking(findings: Iterable[Finding], threshold: str | None) -> tuple[Finding, ...]:
    """The findings at or above ``threshold`` (none when the policy is off)."""
    if threshold is None:
        return ()
    limit = SEVERITIES.index(threshold)
    return tuple(finding for finding in findings if finding.rank >= limit)


# --- summary ------------------------------------------------------------------------------


def summarise(report: Report, *, top: int = TOP_FINDINGS) -> Summary:
    """Counts per severity (worst first) and the ``top`` worst findings."""
    counter = Counter(finding.severity for finding in report.findings)
    ordered = sorted(report.findings, key=_worst_first)
    return Summary(
        counts=tuple((severity, counter[severity]) for severity in reversed(SEVERITIES)),
        total=len(report.findings),
        top=tuple(ordered[:top]),
        fixable=sum(1 for finding in report.findings if finding.fixed_version),
    )


def _worst_first(finding: Finding) -> tuple[int, int, str, str]:
    return (-finding.rank, 0 if finding.fixed_version else 1, finding.id, finding.package)


def summary_lines(summary: Summary, image: ScannedImage) -> list[str]:
    """The summary as log lines: image and digest, counts, then the top findings."""
    counts = " ".join(f"{severity}={count}" for severity, count in summary.counts)
    lines = [
        f"image: {image.repository}:{image.tag}",
        f"digest: {image.digest}",
        f"findings: {summary.total} ({counts}); {summary.fixable} with a fixed version",
    ]
    if summary.top:
        lines.append(f"top {len(summary.top)}:")
        lines += [f"  {_finding_line(finding)}" for finding in summary.top]
    return lines


def _finding_line(finding: Finding) -> str:
    status = f" ({finding.status})" if finding.status else ""
    fixed = finding.fixed_version or f"no fix{status}"
    where = f" ({finding.pkg_path})" if finding.pkg_path else ""
    return (
        f"{finding.severity:<8} {finding.id:<20} {finding.package}{where} "
        f"{finding.installed_version} → {fixed}"
    )


# --- GitLab container_scanning report -----------------------------------------------------


def finding_id(repository: str, finding: Finding) -> str:
    """The stable id of a finding: the same image, package and ID give the same UUID."""
    key = "|".join((repository, finding.kind, finding.package, finding.pkg_path or "", finding.id))
    return str(uuid.uuid5(FINDING_NAMESPACE, key))


def gitlab_report(
    report: Report, image: ScannedImage, *, start_time: str, end_time: str
) -> dict[str, Any]:
    """The ``gl-container-scanning-report.json`` document for ``report``.

    Times are UTC ``YYYY-MM-DDTHH:MM:SS``. Only vulnerabilities in packages go in
    (the schema has no place for secrets or misconfigurations); they are counted
    in a message instead.
    """
    vulnerabilities = _unique(
        _vulnerability(report, image, f) for f in report.findings if f.is_vulnerability
    )
    return {
        "version": SCHEMA_VERSION,
        "scan": _scan(report, start_time, end_time),
        "vulnerabilities": vulnerabilities,
        "remediations": [],
    }


def failed_gitlab_report(reason: str, *, start_time: str, end_time: str) -> dict[str, Any]:
    """A report saying the scan could not run, so GitLab shows a failed scan, not a clean one."""
    scan = _scan_section("unknown", start_time, end_time, status="failure")
    scan["messages"] = [{"level": "fatal", "value": reason or "the scan failed"}]
    return {"version": SCHEMA_VERSION, "scan": scan, "vulnerabilities": [], "remediations": []}


def _scan(report: Report, start_time: str, end_time: str) -> dict[str, Any]:
    scan = _scan_section(report.trivy_version, start_time, end_time, status="success")
    others = sum(1 for finding in report.findings if not finding.is_vulnerability)
    if others:
        scan["messages"] = [
            {
                "level": "warn",
                "value": f"{others} secret or misconfiguration findings are only in Trivy's JSON report",
            }
        ]
    return scan


def _scan_section(
    trivy_version: str, start_time: str, end_time: str, *, status: str
) -> dict[str, Any]:
    vendor = {"name": "Aqua Security"}
    return {
        "analyzer": {
            "id": "orchestrator-pipeline",
            "name": "orchestrator-pipeline",
            "version": __version__,
            "vendor": {"name": "orchestrator-pipeline"},
        },
        "scanner": {
            "id": "trivy",
            "name": "Trivy",
            "version": trivy_version or "unknown",
            "vendor": vendor,
            "url": "https://github.com/aquasecurity/trivy",
        },
        "type": "container_scanning",
        "start_time": start_time,
        "end_time": end_time,
        "status": status,
    }


def _unique(vulnerabilities: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop repeats of one id (the same package found twice at one path): GitLab wants one."""
    seen: dict[str, dict[str, Any]] = {}
    for vulnerability in vulnerabilities:
        seen.setdefault(vulnerability["id"], vulnerability)
    return list(seen.values())


def _vulnerability(report: Report, image: ScannedImage, finding: Finding) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": finding_id(image.repository, finding),
        "name": _name(finding),
        "description": finding.description or finding.title or finding.id,
        "severity": _GITLAB_SEVERITY[finding.severity],
        "solution": _solution(finding),
        "identifiers": [_identifier(finding)],
        "links": _links(finding),
        "location": {
            "dependency": {
                "package": {"name": finding.package},
                "version": finding.installed_version,
            },
            "operating_system": report.operating_system,
            "image": f"{image.repository}:{image.tag}",
        },
    }
    vectors = [
        {"vendor": v, "vector": vec} for v, vec in finding.cvss if _CVSS_VECTOR.fullmatch(vec)
    ]
    if vectors:
        entry["cvss_vectors"] = vectors[:10]
    return entry


def _name(finding: Finding) -> str:
    name = f"{finding.id} in {finding.package}"
    if finding.title:
        name = f"{name}: {finding.title}"
    return name[:_MAX_NAME]


def _solution(finding: Finding) -> str:
    if finding.fixed_version:
        text = (
            f"Upgrade {finding.package} from {finding.installed_version} to {finding.fixed_version}"
        )
    else:
        status = f" (status: {finding.status})" if finding.status else ""
        text = f"No fixed version of {finding.package} is known yet{status}"
    return text[:_MAX_SOLUTION]


def _identifier(finding: Finding) -> dict[str, str]:
    kind = finding.id.split("-", 1)[0].lower() if "-" in finding.id else "trivy"
    identifier = {"type": kind, "name": finding.id, "value": finding.id}
    if finding.primary_url and _is_url(finding.primary_url):
        identifier["url"] = finding.primary_url
    return identifier


def _links(finding: Finding) -> list[dict[str, str]]:
    urls: Sequence[str] = (
        (finding.primary_url,) if finding.primary_url else ()
    ) + finding.references
    return [{"url": url} for url in dict.fromkeys(urls) if _is_url(url)]


def _is_url(text: str) -> bool:
    """What the schema's ``^(https?|ftp)://.+`` accepts (a scheme and something after it)."""
    return text.startswith(_URL_SCHEMES) and not text.endswith("://") and "\n" not in text
