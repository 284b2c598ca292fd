"""tools/trivy.py: the argv against Trivy's flag reference, the ignore file, the JSON parser."""

from __future__ import annotations

import copy
import datetime
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.tools import trivy

REFERENCE = Path("/work/shared/reference")
FLAGS_TSV = REFERENCE / "trivy-image-flags.tsv"
SAMPLES = sorted((REFERENCE / "trivy").glob("*.json.golden"))
IMAGE = "nexus.example.test:8444/orchestrator-server@sha256:" + "a" * 64


def known_flags() -> set[str]:
    flags: set[str] = set()
    for line in FLAGS_TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        for name in line.split("\t")[0].split(" / "):
            flags.add(name.strip())
    return flags


def full_scan(tmp_path: Path) -> trivy.ImageScan:
    return trivy.ImageScan(
        image=IMAGE,
        output=tmp_path / "trivy-report.json",
        cache_dir=tmp_path / "cache",
        severities=("HIGH", "CRITICAL"),
        scanners=("vuln", "secret"),
        ignore_unfixed=True,
        ignorefile=tmp_path / ".trivyignore",
        timeout="20m",
        db_repository="nexus.example.test:8444/aquasec/trivy-db:2",
        java_db_repository="nexus.example.test:8444/aquasec/trivy-java-db:1",
        skip_db_update=True,
        insecure=True,
        platform="linux/arm64",
    )


def value_after(argv: tuple[str, ...], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# --- argv -------------------------------------------------------------------------------


def test_every_flag_emitted_exists_in_trivy_reference(tmp_path: Path) -> None:
    reference = known_flags()
    for scan in (
        full_scan(tmp_path),
        trivy.ImageScan(image=IMAGE, output=tmp_path / "o", cache_dir=tmp_path),
    ):
        emitted = {arg for arg in trivy.image_argv(scan) if arg.startswith("-")}
        assert emitted, "no flags at all"
        assert emitted <= reference, emitted - reference


def test_argv_scans_the_image_last_and_never_lets_trivy_gate(tmp_path: Path) -> None:
    argv = trivy.image_argv(full_scan(tmp_path))

    assert argv[:2] == ("trivy", "image")
    assert argv[-1] == IMAGE
    assert value_after(argv, "--exit-code") == "0"
    assert value_after(argv, "--format") == "json"
    assert value_after(argv, "--output") == str(tmp_path / "trivy-report.json")
    assert {"--skip-version-check", "--disable-telemetry"} <= set(argv)
    assert value_after(argv, "--image-src") == "remote"


def test_argv_carries_each_option(tmp_path: Path) -> None:
    argv = trivy.image_argv(full_scan(tmp_path))

    assert value_after(argv, "--severity") == "HIGH,CRITICAL"
    assert value_after(argv, "--scanners") == "vuln,secret"
    assert value_after(argv, "--timeout") == "20m"
    assert value_after(argv, "--cache-dir") == str(tmp_path / "cache")
    assert value_after(argv, "--ignorefile") == str(tmp_path / ".trivyignore")
    assert value_after(argv, "--db-repository").endswith("/aquasec/trivy-db:2")
    assert value_after(argv, "--java-db-repository").endswith("/aquasec/trivy-java-db:1")
    assert value_after(argv, "--platform") == "linux/arm64"
    assert {"--ignore-unfixed", "--skip-db-update", "--skip-java-db-update", "--insecure"} <= set(
        argv
    )


def test_defaults_leave_optional_flags_out(tmp_path: Path) -> None:
    argv = trivy.image_argv(trivy.ImageScan(image=IMAGE, output=tmp_path / "o", cache_dir=tmp_path))

    for flag in (
        "--ignore-unfixed",
        "--db-repository",
        "--java-db-repository",
        "--insecure",
        "--skip-db-update",
        "--platform",
    ):
        assert flag not in argv
    assert value_after(argv, "--timeout") == "15m"
    assert value_after(argv, "--scanners") == "vuln"
    assert value_after(argv, "--severity") == "UNKNOWN,LOW,MEDIUM,HIGH,CRITICAL"
    # an empty --ignorefile stops Trivy reading ./.trivyignore behind our back
    assert value_after(argv, "--ignorefile") == ""


def test_argv_never_carries_credentials(tmp_path: Path) -> None:
    argv = trivy.image_argv(full_scan(tmp_path))
    assert not {"--username", "--password", "--registry-token", "--password-stdin"} & set(argv)


# --- .trivyignore -------------------------------------------------------------------------


def test_ignorefile_entries_comments_and_expiry() -> None:
    text = "# accepted risks\n\nCVE-2021-3711\nGHSA-xxxx-yyyy-zzzz exp:2030-01-31  # until the rebuild\n  AVD-DS-0002\n"

    entries = trivy.parse_ignorefile(text)

    assert [(e.line, e.id) for e in entries] == [
        (3, "CVE-2021-3711"),
        (4, "GHSA-xxxx-yyyy-zzzz"),
        (5, "AVD-DS-0002"),
    ]
    assert entries[1].expires == datetime.date(2030, 1, 31)
    assert entries[0].expires is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("CVE-2021-3711\nCVE-2022-1 exp:2030-13-01\n", "line 2: 'exp:2030-13-01' is not a date"),
        ("CVE-2021-3711 until-friday\n", "line 1: unexpected 'until-friday' after CVE-2021-3711"),
        ("\n\n'CVE-2021-3711'\n", "line 3: \"'CVE-2021-3711'\" is not a vulnerability"),
    ],
)
def test_ignorefile_syntax_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="line") as caught:
        trivy.parse_ignorefile(text)
    assert str(caught.value).startswith(message)


# --- the JSON report ----------------------------------------------------------------------


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_every_reference_report_parses(sample: Path) -> None:
    report = trivy.load_report(sample.read_bytes())
    raw = json.loads(sample.read_text())
    expected = sum(len(r.get("Vulnerabilities") or []) for r in raw.get("Results") or [])

    assert len(report.findings) == expected
    assert report.results == len(raw.get("Results") or [])
    assert all(f.severity in trivy.SEVERITIES for f in report.findings)


def test_debian_buster_sample_fields() -> None:
    report = trivy.load_report((REFERENCE / "trivy/debian-buster.json.golden").read_bytes())

    assert report.operating_system == "debian 10.1"
    assert report.trivy_version == "dev"
    by_id = {f.id: f for f in report.findings}
    assert by_id["CVE-2019-18276"].fixed_version is None
    assert by_id["CVE-2019-18276"].severity == "LOW"
    assert by_id["CVE-2019-18276"].package == "bash"
    critical = [f for f in report.findings if f.severity == "CRITICAL"]
    assert len(critical) == 1
    assert critical[0].fixed_version
    assert ("nvd", "CVSS:3.1/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:H/A:H") in by_id["CVE-2019-18276"].cvss


def test_report_without_vulnerabilities_key_has_no_findings() -> None:
    report = trivy.load_report((REFERENCE / "trivy/sl-micro-rancher5.4.json.golden").read_bytes())
    assert report.findings == ()
    assert report.results >= 1


def test_spring4shell_lang_and_custom_results() -> None:
    report = trivy.load_report((REFERENCE / "trivy/spring4shell-jre11.json.golden").read_bytes())
    assert [(f.id, f.result_class, f.severity) for f in report.findings] == [
        ("CVE-2022-22965", "lang-pkgs", "CRITICAL")
    ]


def minimal(results: Any) -> dict[str, Any]:
    return {"SchemaVersion": 2, "ArtifactName": "x", "Results": results}


def vuln(**fields: Any) -> dict[str, Any]:
    base = {
        "VulnerabilityID": "CVE-2024-0001",
        "PkgName": "pkg",
        "InstalledVersion": "1.0",
        "Severity": "HIGH",
    }
    return {**base, **fields}


def test_null_results_and_null_lists_are_empty() -> None:
    assert trivy.parse_report(minimal(None)).findings == ()
    assert trivy.parse_report({"SchemaVersion": 2}).findings == ()
    report = trivy.parse_report(
        minimal([{"Target": "t", "Class": "os-pkgs", "Vulnerabilities": None}])
    )
    assert report.findings == ()
    assert report.results == 1
    assert trivy.parse_report(minimal([None])).findings == ()


def test_unknown_severity_is_kept_as_unknown_with_the_raw_value() -> None:
    report = trivy.parse_report(
        minimal([{"Vulnerabilities": [vuln(Severity="SEVERE"), vuln(Severity="low")]}])
    )
    assert [(f.severity, f.raw_severity) for f in report.findings] == [
        ("UNKNOWN", "SEVERE"),
        ("LOW", "low"),
    ]
    missing = copy.deepcopy(vuln())
    del missing["Severity"]
    assert (
        trivy.parse_report(minimal([{"Vulnerabilities": [missing]}])).findings[0].severity
        == "UNKNOWN"
    )


def test_secret_and_config_results() -> None:
    results = [
        {
            "Target": "/app/.env",
            "Class": "secret",
            "Secrets": [
                {
                    "RuleID": "aws-access-key-id",
                    "Severity": "CRITICAL",
                    "Title": "AWS Access Key ID",
                    "StartLine": 3,
                }
            ],
        },
        {
            "Target": "Dockerfile",
            "Class": "config",
            "Misconfigurations": [
                {"ID": "DS002", "AVDID": "AVD-DS-0002", "Severity": "HIGH", "Status": "FAIL"}
            ],
        },
        {"Target": "", "Class": "custom", "CustomResources": [{"Type": "x"}]},
    ]
    findings = trivy.parse_report(minimal(results)).findings
    assert [(f.kind, f.id, f.package, f.installed_version) for f in findings] == [
        ("secret", "aws-access-key-id", "/app/.env", "line 3"),
        ("misconfiguration", "AVD-DS-0002", "Dockerfile", ""),
    ]
    assert not any(f.is_vulnerability for f in findings)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe garbage", "not JSON"),
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        (b"[]", "expected a JSON object, got list"),
        (b'{"SchemaVersion": 1}', "SchemaVersion is 1, expected 2"),
        (b'{"SchemaVersion": 2, "Results": {"a": 1}}', "Results is a dict, expected a list"),
        (
            b'{"SchemaVersion": 2, "Results": [{"Vulnerabilities": [{"PkgName": "x"}]}]}',
            "a finding has no VulnerabilityID",
        ),
    ],
)
def test_malformed_reports_are_refused_with_a_reason(text: bytes, message: str) -> None:
    with pytest.raises(trivy.ReportError, match=message):
        trivy.load_report(text)
