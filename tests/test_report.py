"""report.py: GitLab's container_scanning report (schema-valid, stable ids), summary, policy."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pipeline import report
from pipeline.tools import trivy

REFERENCE = Path("/work/shared/reference")
SCHEMA = REFERENCE / "gitlab/container-scanning-report-format.json"
SAMPLES = sorted((REFERENCE / "trivy").glob("*.json.golden"))
IMAGE = report.ScannedImage(
    repository="nexus.example.test:8444/orchestrator-server",
    tag="main-a1b2c3d4",
    digest="sha256:" + "a" * 64,
)
TIMES = {"start_time": "2026-01-02T03:04:05", "end_time": "2026-01-02T03:04:09"}


@cache
def _validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())


def validate_gitlab_report(document: dict[str, Any]) -> None:
    """Fail with every schema error of ``document`` (GitLab's 15.2.1 schema)."""
    errors = sorted(_validator().iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def sample(name: str) -> trivy.Report:
    return trivy.load_report((REFERENCE / "trivy" / name).read_bytes())


def finding(**fields: Any) -> trivy.Finding:
    base: dict[str, Any] = {
        "kind": "vulnerability",
        "id": "CVE-2024-0001",
        "severity": "HIGH",
        "raw_severity": "HIGH",
        "target": "img (debian 12.1)",
        "result_class": "os-pkgs",
        "result_type": "debian",
        "package": "openssl",
        "installed_version": "3.0.11-1",
        "fixed_version": "3.0.14-1",
    }
    return trivy.Finding(**{**base, **fields})


def scan_report(*findings: trivy.Finding) -> trivy.Report:
    return trivy.Report(
        artifact_name="x",
        artifact_type="container_image",
        trivy_version="0.76.0",
        created_at=None,
        os_family="debian",
        os_name="12.1",
        results=1,
        findings=findings,
    )


# --- GitLab report ------------------------------------------------------------------------


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_reference_sample_gives_a_schema_valid_report(path: Path) -> None:
    parsed = trivy.load_report(path.read_bytes())

    document = report.gitlab_report(parsed, IMAGE, **TIMES)

    validate_gitlab_report(document)
    assert document["version"] == "15.2.1"
    assert len(document["vulnerabilities"]) == len(parsed.findings)


def test_vulnerability_fields_from_debian_sample() -> None:
    document = report.gitlab_report(sample("debian-buster.json.golden"), IMAGE, **TIMES)

    by_cve = {v["identifiers"][0]["value"]: v for v in document["vulnerabilities"]}
    bash = by_cve["CVE-2019-18276"]
    assert bash["severity"] == "Low"
    assert bash["location"]["dependency"] == {"package": {"name": "bash"}, "version": "5.0-4"}
    assert bash["location"]["operating_system"] == "debian 10.1"
    assert bash["location"]["image"] == "nexus.example.test:8444/orchestrator-server:main-a1b2c3d4"
    assert bash["solution"].startswith("No fixed version of bash")
    assert bash["identifiers"][0]["type"] == "cve"
    critical = next(v for v in document["vulnerabilities"] if v["severity"] == "Critical")
    assert critical["solution"].startswith("Upgrade ")
    assert document["scan"]["scanner"]["id"] == "trivy"
    assert document["scan"]["type"] == "container_scanning"


def test_ids_are_stable_across_runs_and_digests() -> None:
    parsed = sample("debian-buster.json.golden")
    rebuilt = report.ScannedImage(
        repository=IMAGE.repository, tag="main-ffffffff", digest="sha256:" + "b" * 64
    )

    first = [v["id"] for v in report.gitlab_report(parsed, IMAGE, **TIMES)["vulnerabilities"]]
    again = [v["id"] for v in report.gitlab_report(parsed, rebuilt, **TIMES)["vulnerabilities"]]

    assert first == again
    assert len(set(first)) == len(first)


def test_ids_differ_by_package_image_and_vulnerability() -> None:
    base = report.finding_id(IMAGE.repository, finding())
    assert report.finding_id(IMAGE.repository, finding(package="libssl3")) != base
    assert report.finding_id(IMAGE.repository, finding(id="CVE-2024-0002")) != base
    assert report.finding_id("nexus.example.test:8444/orchestrator-other", finding()) != base
    assert report.finding_id(IMAGE.repository, finding(installed_version="3.0.13-1")) == base


def test_odd_findings_still_validate() -> None:
    odd = scan_report(
        finding(severity="UNKNOWN", raw_severity="SEVERE", fixed_version=None, title="t" * 400),
        finding(
            id="GHSA-abcd-efgh-ijkl",
            package="lodash",
            pkg_path="usr/src/app/node_modules/lodash/package.json",
            primary_url="not a url",
            cvss=(("nvd", "garbage"),),
        ),
        finding(
            kind="secret", id="aws-access-key-id", package="/app/.env", installed_version="line 3"
        ),
        finding(id="CVE-2024-0009", installed_version=""),
    )

    document = report.gitlab_report(odd, IMAGE, **TIMES)

    validate_gitlab_report(document)
    severities = [v["severity"] for v in document["vulnerabilities"]]
    assert severities == ["Unknown", "High", "High"]
    assert "1 secret or misconfiguration" in document["scan"]["messages"][0]["value"]


def test_the_same_finding_twice_is_reported_once() -> None:
    document = report.gitlab_report(scan_report(finding(), finding()), IMAGE, **TIMES)
    validate_gitlab_report(document)
    assert len(document["vulnerabilities"]) == 1


def test_empty_report_is_valid() -> None:
    document = report.gitlab_report(sample("sl-micro-rancher5.4.json.golden"), IMAGE, **TIMES)
    validate_gitlab_report(document)
    assert document["vulnerabilities"] == []


def test_failed_scan_report_is_valid_and_says_why() -> None:
    document = report.failed_gitlab_report("trivy exited with 1: TOOMANYREQUESTS", **TIMES)

    validate_gitlab_report(document)
    assert document["scan"]["status"] == "failure"
    assert document["scan"]["messages"] == [
        {"level": "fatal", "value": "trivy exited with 1: TOOMANYREQUESTS"}
    ]
    assert document["vulnerabilities"] == []


# --- summary -------------------------------------------------------------------------------


def test_summary_counts_and_orders_worst_first() -> None:
    findings = (
        finding(id="CVE-1", severity="LOW", fixed_version=None),
        finding(id="CVE-2", severity="CRITICAL", fixed_version=None),
        finding(id="CVE-3", severity="CRITICAL"),
        finding(id="CVE-4", severity="MEDIUM"),
    )

    summary = report.summarise(scan_report(*findings), top=3)

    assert dict(summary.counts) == {"CRITICAL": 2, "HIGH": 0, "MEDIUM": 1, "LOW": 1, "UNKNOWN": 0}
    assert [f.id for f in summary.top] == ["CVE-3", "CVE-2", "CVE-4"]
    assert summary.total == 4
    assert summary.fixable == 2


def test_summary_lines_show_image_digest_counts_and_fixes() -> None:
    summary = report.summarise(sample("debian-buster.json.golden"))

    lines = report.summary_lines(summary, IMAGE)

    assert lines[0] == f"image: {IMAGE.repository}:{IMAGE.tag}"
    assert lines[1] == f"digest: {IMAGE.digest}"
    assert "CRITICAL=1" in lines[2]
    assert "LOW=1" in lines[2]
    assert any("CVE-2019-18276" in line and "5.0-4 → no fix" in line for line in lines)
    assert any("CRITICAL" in line and " → " in line and "no fix" not in line for line in lines[3:])


# --- policy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "threshold"),
    [
        ("", None),
        ("off", None),
        ("OFF", None),
        ("none", None),
        ("critical", "CRITICAL"),
        (" HIGH ", "HIGH"),
        ("UNKNOWN", "UNKNOWN"),
    ],
)
def test_threshold_values(value: str, threshold: str | None) -> None:
    assert report.parse_threshold(value) == threshold


def test_unknown_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match="'SEVERE' is not a severity; use one of UNKNOWN, LOW"):
        report.parse_threshold("SEVERE")


def test_breaking_findings_at_or_above_threshold() -> None:
    findings = [
        finding(id="A", severity="LOW"),
        finding(id="B", severity="HIGH"),
        finding(id="C", severity="CRITICAL"),
    ]
    assert [f.id for f in report.breaking(findings, "HIGH")] == ["B", "C"]
    assert [f.id for f in report.breaking(findings, "CRITICAL")] == ["C"]
    assert report.breaking(findings, None) == ()
    assert len(report.breaking(findings, "UNKNOWN")) == 3
