"""The trivy-image-scan stage, end to end: real Trivy, real registries, the offline test DB.

Images are written in Python (tests.infra.oci) exactly as the test DB's README
describes, pushed to the push registry, and scanned by digest through the
pull-through pull registry, as a job would scan Nexus 8444. Every GitLab report
written is validated against GitLab's schema.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline import artifact
from pipeline.errors import CommandError
from pipeline.stages.trivy_image_scan import classify_scan_error
from pipeline.tools import trivy
from tests.clirun import base_env, error_lines, run_cli
from tests.infra import oci
from tests.infra.faultproxy import FaultProxy
from tests.infra.registry import Registry, RegistryPair, request, unique_repo
from tests.test_report import validate_gitlab_report

DB_DIR = Path("/work/shared/reference/trivy-db")
SHA = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
MISSING_DIGEST = "sha256:" + "0" * 64
SCAN_TIMEOUT = 300.0

Expected = set[tuple[str, str, str]]

DEBIAN10_PACKAGES = (
    ("openssl", "openssl", "1.1.1d-0+deb10u6"),
    ("libssl1.1", "openssl", "1.1.1d-0+deb10u6"),
    ("zlib1g", "zlib", "1:1.2.11.dfsg-1+deb10u1"),
    ("bash", "bash", "5.0-4"),
    ("sudo", "sudo", "1.8.27-1+deb10u2"),
    ("coreutils", "coreutils", "8.30-3"),
    ("apt", "apt", "1.8.2.3"),
    ("libidn2-0", "libidn2", "2.0.5-1+deb10u1"),
)
DEBIAN10_FINDINGS: Expected = {
    ("CVE-2021-3711", "libssl1.1", "CRITICAL"),
    ("CVE-2021-3711", "openssl", "CRITICAL"),
    ("CVE-2022-37434", "zlib1g", "CRITICAL"),
    ("CVE-2021-3156", "sudo", "HIGH"),
    ("CVE-2016-2781", "coreutils", "MEDIUM"),
    ("CVE-2019-18276", "bash", "LOW"),
    ("CVE-2011-3374", "apt", "LOW"),
}
DEBIAN12_PACKAGES = (
    ("libc6", "glibc", "2.36-9+deb12u1"),
    ("zlib1g", "zlib", "1:1.2.13.dfsg-1"),
    ("libssl3", "openssl", "3.0.11-1~deb12u2"),
    ("apt", "apt", "2.6.1"),
    ("coreutils", "coreutils", "9.1-1"),
)
DEBIAN12_FINDINGS: Expected = {
    ("CVE-2023-4911", "libc6", "HIGH"),
    ("CVE-2024-5535", "libssl3", "CRITICAL"),
    ("CVE-2023-45853", "zlib1g", "CRITICAL"),
    ("CVE-2011-3374", "apt", "LOW"),
    ("CVE-2016-2781", "coreutils", "MEDIUM"),
    ("CVE-2020-14343", "pyyaml", "CRITICAL"),
    ("CVE-2024-22195", "jinja2", "MEDIUM"),
    ("CVE-2021-23337", "lodash", "HIGH"),
}
ALPINE_PACKAGES = (
    ("busybox", "busybox", "1.36.1-r15"),
    ("libcrypto3", "openssl", "3.1.4-r5"),
    ("libssl3", "openssl", "3.1.4-r5"),
    ("zlib", "zlib", "1.3.1-r0"),
)
ALPINE_FINDINGS: Expected = {
    ("CVE-2023-42363", "busybox", "MEDIUM"),
    ("CVE-2024-5535", "libcrypto3", "CRITICAL"),
    ("CVE-2024-5535", "libssl3", "CRITICAL"),
}


def debian10() -> oci.ImageSpec:
    return oci.ImageSpec(layers=[oci.debian_rootfs("10.2", DEBIAN10_PACKAGES)])


def debian12() -> oci.ImageSpec:
    python = {
        **oci.python_dist("PyYAML", "5.3.1"),
        **oci.python_dist("Jinja2", "3.1.2"),
        **oci.python_dist("requests", "2.31.0"),
    }
    layers = [
        oci.debian_rootfs("12.1", DEBIAN12_PACKAGES),
        python,
        oci.npm_package("lodash", "4.17.20"),
    ]
    return oci.ImageSpec(layers=layers)


def alpine319() -> oci.ImageSpec:
    return oci.ImageSpec(layers=[oci.alpine_rootfs("3.19.1", ALPINE_PACKAGES)])


# --- helpers ---------------------------------------------------------------------------------


def push_image(pair: RegistryPair, spec: oci.ImageSpec, tmp_path: Path) -> tuple[str, str]:
    """Push ``spec`` to the push registry by digest; (repository name, digest)."""
    repo = unique_repo("orchestrator-scan")
    archive = oci.write_docker_archive(tmp_path / f"{repo}.tar", spec)
    return repo, oci.push_archive_by_digest(pair.push, repo, archive.path)


def seeded_cache(tmp_path: Path) -> Path:
    """A cache directory of its own holding a copy of the test DB (Trivy may delete it)."""
    cache = tmp_path / "trivy-cache"
    (cache / "db").mkdir(parents=True)
    for name in ("trivy.db", "metadata.json"):
        shutil.copyfile(DB_DIR / name, cache / "db" / name)
    return cache


def scan_env(
    tmp_path: Path, pair: RegistryPair, repo: str, digest: str, **extra: str
) -> dict[str, str]:
    """A job's environment and its build.env for ``repo@digest``; the project is tmp_path."""
    build = artifact.make(
        image_tag="main-a1b2c3d4",
        digest=digest,
        push_repository=f"{pair.push.host}/{repo}",
        pull_repository=f"{pair.pull.host}/{repo}",
        immutable_tags=("main-a1b2c3d4",),
        moving_tags=("latest",),
        commit_sha=SHA,
    )
    artifact.write(tmp_path / "build.env", build)
    env = base_env(
        GITLAB_CI="true",
        CI_PROJECT_DIR=str(tmp_path),
        CI_PROJECT_NAME="scan",
        CI_COMMIT_SHA=SHA,
        CI_COMMIT_BRANCH="main",
        CI_DEFAULT_BRANCH="main",
        CI_PIPELINE_ID="4242",
        NEXUS_REGISTRY=pair.push.host,
        NEXUS_REGISTRY_PULL=pair.pull.host,
        NEXUS_IMAGE_NAME=repo,
        DOCKER_CONFIG=str(tmp_path / "docker"),
        PIPELINE_RETRY_ATTEMPTS="3",
        PIPELINE_RETRY_INITIAL_SECONDS="0.2",
        PIPELINE_RETRY_MAX_SECONDS="0.5",
    )
    if "PIPELINE_SCAN_DB_REPOSITORY" not in extra:
        env.update(
            PIPELINE_SCAN_CACHE_DIR=str(seeded_cache(tmp_path)), PIPELINE_SCAN_SKIP_DB_UPDATE="true"
        )
    env.update(extra)
    return env


def scan(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["trivy-image-scan", *args], env=env, cwd=tmp_path, timeout=SCAN_TIMEOUT)


def findings_of(path: Path) -> Expected:
    parsed = trivy.load_report(path.read_bytes())
    return {(f.id, f.package.lower(), f.severity) for f in parsed.findings}


def gitlab_report(tmp_path: Path) -> dict[str, object]:
    document: dict[str, object] = json.loads(
        (tmp_path / "gl-container-scanning-report.json").read_text()
    )
    validate_gitlab_report(document)
    return document


# --- real scans by digest from the pull registry ------------------------------------------------


@pytest.mark.trivy
@pytest.mark.registry
@pytest.mark.parametrize(
    ("spec", "expected"),
    [(debian10, DEBIAN10_FINDINGS), (debian12, DEBIAN12_FINDINGS), (alpine319, ALPINE_FINDINGS)],
    ids=["debian-10", "debian-12", "alpine-3.19"],
)
def test_scan_by_digest_from_pull_registry_finds_the_db_expectations(
    tmp_path: Path,
    registry_pair: RegistryPair,
    spec: Callable[[], oci.ImageSpec],
    expected: Expected,
) -> None:
    repo, digest = push_image(registry_pair, spec(), tmp_path)

    done = scan(tmp_path, scan_env(tmp_path, registry_pair, repo, digest))

    assert done.returncode == 0, done.stderr
    raw = json.loads((tmp_path / "trivy-report.json").read_text())
    assert raw["ArtifactName"] == f"{registry_pair.pull.host}/{repo}@{digest}"
    assert findings_of(tmp_path / "trivy-report.json") == expected
    document = gitlab_report(tmp_path)
    vulnerabilities = document["vulnerabilities"]
    assert isinstance(vulnerabilities, list)
    assert len(vulnerabilities) == len(expected)
    assert f"digest: {digest}" in done.stderr
    assert "policy: off (PIPELINE_SCAN_FAIL_ON=off)" in done.stderr


@pytest.mark.trivy
@pytest.mark.registry
def test_severity_filter_policy_and_stable_ids(tmp_path: Path, registry_pair: RegistryPair) -> None:
    repo, digest = push_image(registry_pair, debian10(), tmp_path)
    env = scan_env(
        tmp_path,
        registry_pair,
        repo,
        digest,
        PIPELINE_SCAN_SEVERITY="CRITICAL",
        PIPELINE_SCAN_FAIL_ON="critical",
    )

    done = scan(tmp_path, env)

    assert done.returncode == 5, done.stderr
    assert error_lines(done.stderr) == [
        "pipeline: error: 3 findings at or above CRITICAL (PIPELINE_SCAN_FAIL_ON), e.g. CVE-2021-3711 CRITICAL in libssl1.1"
    ]
    assert {f[2] for f in findings_of(tmp_path / "trivy-report.json")} == {"CRITICAL"}
    first = [v["id"] for v in gitlab_report(tmp_path)["vulnerabilities"]]  # type: ignore[attr-defined]

    again = scan(tmp_path, env)

    assert again.returncode == 5
    assert [v["id"] for v in gitlab_report(tmp_path)["vulnerabilities"]] == first  # type: ignore[attr-defined]


@pytest.mark.trivy
@pytest.mark.registry
def test_ignore_unfixed_and_policy_pass(tmp_path: Path, registry_pair: RegistryPair) -> None:
    repo, digest = push_image(registry_pair, debian10(), tmp_path)
    env = scan_env(
        tmp_path,
        registry_pair,
        repo,
        digest,
        PIPELINE_SCAN_IGNORE_UNFIXED="true",
        PIPELINE_SCAN_SEVERITY="LOW",
        PIPELINE_SCAN_FAIL_ON="LOW",
    )

    done = scan(tmp_path, env)

    assert done.returncode == 0, done.stderr
    assert findings_of(tmp_path / "trivy-report.json") == set()
    assert "policy: passed (no findings at or above LOW)" in done.stderr


@pytest.mark.trivy
@pytest.mark.registry
def test_trivyignore_suppresses_and_expired_entries_warn(
    tmp_path: Path, registry_pair: RegistryPair
) -> None:
    repo, digest = push_image(registry_pair, alpine319(), tmp_path)
    (tmp_path / ".trivyignore").write_text(
        "# accepted until the base image moves\nCVE-2024-5535 exp:2999-01-01\nCVE-2023-42363 exp:2001-01-01\n"
    )

    done = scan(tmp_path, scan_env(tmp_path, registry_pair, repo, digest))

    assert done.returncode == 0, done.stderr
    assert findings_of(tmp_path / "trivy-report.json") == {("CVE-2023-42363", "busybox", "MEDIUM")}
    assert "line 3: CVE-2023-42363 expired on 2001-01-01" in done.stderr


@pytest.mark.trivy
@pytest.mark.registry
def test_digest_absent_from_registry_fails_at_once_with_exit_4(
    tmp_path: Path, registry_pair: RegistryPair
) -> None:
    repo, _ = push_image(registry_pair, alpine319(), tmp_path)

    done = scan(tmp_path, scan_env(tmp_path, registry_pair, repo, MISSING_DIGEST))

    assert done.returncode == 4, done.stderr
    assert error_lines(done.stderr) == [
        f"pipeline: error: {registry_pair.pull.host}/{repo}@{MISSING_DIGEST} is not in the pull registry "
        "(manifest unknown): check IMAGE_DIGEST in build.env and that the build pushed it"
    ]
    assert "retry" not in done.stderr
    document = gitlab_report(tmp_path)
    assert document["vulnerabilities"] == []
    assert document["scan"]["status"] == "failure"  # type: ignore[index]
    assert "is not in the pull registry" in document["scan"]["messages"][0]["value"]  # type: ignore[index]


# --- the DB from a mirror in the registry ---------------------------------------------------------

DB_LAYER = "application/vnd.aquasec.trivy.db.layer.v1.tar+gzip"
DB_CONFIG = "application/vnd.aquasec.trivy.config.v1+json"


def db_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("trivy.db", "metadata.json"):
            tar.add(DB_DIR / name, arcname=name)
    return buffer.getvalue()


def upload_blob(registry: Registry, repo: str, data: bytes) -> str:
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    started = request(registry, "POST", f"/v2/{repo}/blobs/uploads/")
    assert started.status == 202, started
    location = started.headers["Location"]
    location = location if "://" in location else f"{registry.url}{location}"
    separator = "&" if "?" in location else "?"
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
    done = request(
        registry, "PUT", f"{location}{separator}digest={digest}", headers=headers, body=data
    )
    assert done.status == 201, done
    return digest


def push_db_artifact(registry: Registry) -> str:
    """Push the test DB as Trivy's OCI artifact (tag 2); return the repository name."""
    repo = f"{unique_repo('mirror')}/trivy-db"
    layer, config = db_archive(), b"{}"
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": DB_CONFIG,
            "digest": upload_blob(registry, repo, config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": DB_LAYER,
                "digest": upload_blob(registry, repo, layer),
                "size": len(layer),
                "annotations": {"org.opencontainers.image.title": "db.tar.gz"},
            }
        ],
    }
    body = json.dumps(manifest).encode()
    headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
    put = request(registry, "PUT", f"/v2/{repo}/manifests/2", headers=headers, body=body)
    assert put.status == 201, put
    return repo


@pytest.fixture
def db_mirror(registry_pair: RegistryPair) -> str:
    """The DB artifact pushed to the push registry; its repository name."""
    return push_db_artifact(registry_pair.push)


@pytest.mark.trivy
@pytest.mark.registry
def test_db_downloaded_from_mirror_through_pull_registry(
    tmp_path: Path, registry_pair: RegistryPair, db_mirror: str
) -> None:
    repo, digest = push_image(registry_pair, debian10(), tmp_path)
    cache = tmp_path / "empty-cache"
    env = scan_env(
        tmp_path,
        registry_pair,
        repo,
        digest,
        PIPELINE_SCAN_DB_REPOSITORY=f"{registry_pair.pull.host}/{db_mirror}:2",
        PIPELINE_SCAN_CACHE_DIR=str(cache),
    )

    done = scan(tmp_path, env)

    assert done.returncode == 0, done.stderr
    assert (cache / "db" / "trivy.db").is_file()
    assert findings_of(tmp_path / "trivy-report.json") == DEBIAN10_FINDINGS


def run_flipping(env: dict[str, str], cwd: Path, proxy: FaultProxy) -> tuple[int, str]:
    """Run the stage; once it announces its first retry, let the proxy forward again."""
    argv = [sys.executable, "-m", "pipeline", "trivy-image-scan"]
    lines: list[str] = []
    with subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stderr is not None
        timer = threading.Timer(SCAN_TIMEOUT, process.kill)
        timer.start()
        try:
            for line in process.stderr:
                lines.append(line)
                if "retry 2/" in line:
                    proxy.steady_status = None
            return process.wait(), "".join(lines)
        finally:
            timer.cancel()


@pytest.mark.trivy
@pytest.mark.registry
def test_db_mirror_answering_429_is_retried(
    tmp_path: Path,
    registry_pair: RegistryPair,
    db_mirror: str,
    fault_proxy: Callable[..., FaultProxy],
) -> None:
    repo, digest = push_image(registry_pair, debian10(), tmp_path)
    proxy = fault_proxy(registry_pair.pull, steady_status=429)
    env = scan_env(
        tmp_path,
        registry_pair,
        repo,
        digest,
        PIPELINE_SCAN_DB_REPOSITORY=f"{proxy.host}/{db_mirror}:2",
        PIPELINE_SCAN_CACHE_DIR=str(tmp_path / "empty-cache"),
    )

    code, stderr = run_flipping(env, tmp_path, proxy)

    assert code == 0, stderr
    assert "trivy image failed (rate limited (429)); retry 2/3" in stderr
    assert proxy.faults >= 1
    assert findings_of(tmp_path / "trivy-report.json") == DEBIAN10_FINDINGS


@pytest.mark.trivy
@pytest.mark.registry
def test_db_mirror_refusing_for_good_exits_4(
    tmp_path: Path,
    registry_pair: RegistryPair,
    db_mirror: str,
    fault_proxy: Callable[..., FaultProxy],
) -> None:
    repo, digest = push_image(registry_pair, debian10(), tmp_path)
    proxy = fault_proxy(registry_pair.pull, steady_status=429)
    env = scan_env(
        tmp_path,
        registry_pair,
        repo,
        digest,
        PIPELINE_SCAN_DB_REPOSITORY=f"{proxy.host}/{db_mirror}:2",
        PIPELINE_SCAN_CACHE_DIR=str(tmp_path / "empty-cache"),
        PIPELINE_RETRY_ATTEMPTS="2",
    )

    done = scan(tmp_path, env)

    assert done.returncode == 4, done.stderr
    assert "retry 2/2" in done.stderr
    (line,) = error_lines(done.stderr)
    assert line.startswith("pipeline: error: trivy exited with 1: ")
    assert "TOOMANYREQUESTS" in line or "429" in line


# --- bad input and dry-run (no Trivy run) ---------------------------------------------------------


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    build = artifact.make(
        image_tag="main-a1b2c3d4",
        digest="sha256:" + "c" * 64,
        push_repository="nexus.example.test:8443/orchestrator-server",
        pull_repository="nexus.example.test:8444/orchestrator-server",
        immutable_tags=("main-a1b2c3d4",),
        moving_tags=("latest",),
        commit_sha=SHA,
    )
    artifact.write(tmp_path / "build.env", build)
    return base_env(
        CI_PROJECT_DIR=str(tmp_path),
        CI_PROJECT_NAME="server",
        CI_COMMIT_SHA=SHA,
        CI_COMMIT_BRANCH="main",
        NEXUS_REGISTRY="nexus.example.test:8443",
        NEXUS_REGISTRY_PULL="nexus.example.test:8444",
        DOCKER_CONFIG=str(tmp_path / "docker"),
        **extra,
    )


def test_missing_build_env_is_exit_2(tmp_path: Path) -> None:
    env = offline_env(tmp_path)
    (tmp_path / "build.env").unlink()

    done = run_cli(["trivy-image-scan", "--execute"], env=env, cwd=tmp_path)

    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert line.startswith(
        f"pipeline: error: build.env not found ({tmp_path / 'build.env'} does not exist)"
    )


def test_unknown_fail_on_severity_is_exit_2(tmp_path: Path) -> None:
    done = run_cli(
        ["trivy-image-scan", "--execute"],
        env=offline_env(tmp_path, PIPELINE_SCAN_FAIL_ON="SEVERE"),
        cwd=tmp_path,
    )

    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        "pipeline: error: PIPELINE_SCAN_FAIL_ON: 'SEVERE' is not a severity; use one of UNKNOWN, LOW, MEDIUM, HIGH, CRITICAL or off"
    ]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "PIPELINE_SCAN_SEVERITY",
            "HIGH,SEVERE",
            "PIPELINE_SCAN_SEVERITY: 'HIGH,SEVERE': use a comma-separated list of UNKNOWN,LOW,MEDIUM,HIGH,CRITICAL",
        ),
        (
            "PIPELINE_SCAN_SCANNERS",
            "vuln,viruses",
            "PIPELINE_SCAN_SCANNERS: 'vuln,viruses': use a comma-separated list of vuln,secret,misconfig,license",
        ),
        (
            "PIPELINE_SCAN_TIMEOUT",
            "15 minutes",
            "PIPELINE_SCAN_TIMEOUT: must be a Go duration like 15m or 1h30m, got '15 minutes'",
        ),
    ],
)
def test_bad_scan_settings_are_exit_2(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    done = run_cli(
        ["trivy-image-scan", "--execute"],
        env=offline_env(tmp_path, **{variable: value}),
        cwd=tmp_path,
    )

    assert done.returncode == 2
    assert error_lines(done.stderr) == [f"pipeline: error: {message}"]


def test_ignore_file_syntax_error_is_exit_2_naming_file_and_line(tmp_path: Path) -> None:
    (tmp_path / ".trivyignore").write_text("CVE-2021-3711\nCVE-2022-37434 exp:2025-02-30\n")

    done = run_cli(["trivy-image-scan", "--execute"], env=offline_env(tmp_path), cwd=tmp_path)

    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        f"pipeline: error: {tmp_path / '.trivyignore'} line 2: 'exp:2025-02-30' is not a date like exp:2025-12-31"
    ]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b'{"SchemaVersion": 1}', "SchemaVersion is 1, expected 2"),
    ],
)
def test_unreadable_or_non_json_report_is_one_line(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    report = tmp_path / "trivy-report.json"
    report.write_bytes(content)

    done = run_cli(
        ["trivy-image-scan", "--execute", "--from-json", str(report)],
        env=offline_env(tmp_path),
        cwd=tmp_path,
    )

    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert line.startswith(f"pipeline: error: Trivy report {report}: {reason}")


def test_missing_report_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"

    done = run_cli(
        ["trivy-image-scan", "--execute", "--from-json", str(missing)],
        env=offline_env(tmp_path),
        cwd=tmp_path,
    )

    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        f"pipeline: error: Trivy report {missing}: cannot read it: No such file or directory"
    ]


@pytest.mark.parametrize(
    "sample", sorted(Path("/work/shared/reference/trivy").glob("*.golden")), ids=lambda p: p.name
)
def test_every_reference_sample_through_the_stage(tmp_path: Path, sample: Path) -> None:
    done = run_cli(
        ["trivy-image-scan", "--execute", "--from-json", str(sample)],
        env=offline_env(tmp_path),
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr
    gitlab_report(tmp_path)
    assert "digest: sha256:" + "c" * 64 in done.stderr


def test_dry_run_prints_the_argv_and_writes_nothing(tmp_path: Path) -> None:
    env = offline_env(
        tmp_path,
        PIPELINE_SCAN_DB_REPOSITORY="nexus.example.test:8444/aquasec/trivy-db:2",
        PIPELINE_SCAN_FAIL_ON="HIGH",
    )
    before = sorted(p.name for p in tmp_path.iterdir())

    done = run_cli(["trivy-image-scan", "--dry-run"], env=env, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    command = next(line for line in done.stderr.splitlines() if line.startswith("+ trivy image"))
    assert "--db-repository nexus.example.test:8444/aquasec/trivy-db:2" in command
    assert command.split("  #")[0].endswith(
        "nexus.example.test:8444/orchestrator-server@sha256:" + "c" * 64
    )
    assert f"would write {tmp_path / 'trivy-report.json'}" in done.stderr
    assert "would apply the policy PIPELINE_SCAN_FAIL_ON=HIGH" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- TLS, basic auth, credentials ---------------------------------------------------------------


def tls_env(
    tmp_path: Path, registry: Registry, repo: str, digest: str, **extra: str
) -> dict[str, str]:
    """The same job against one TLS registry with basic auth as both push and pull registry."""
    pair = RegistryPair(push=registry, pull=registry)
    assert registry.ca_cert is not None
    assert registry.username is not None
    assert registry.password is not None
    return scan_env(
        tmp_path,
        pair,
        repo,
        digest,
        NEXUS_USER=registry.username,
        NEXUS_PASSWORD=registry.password,
        PIPELINE_REGISTRY_CA_FILE=str(registry.ca_cert),
        **extra,
    )


def everything_written(tmp_path: Path, done: subprocess.CompletedProcess[str]) -> str:
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "trivy-cache" not in p.parts]
    return done.stdout + done.stderr + "".join(p.read_text(errors="replace") for p in files)


@pytest.mark.trivy
@pytest.mark.registry
def test_tls_registry_with_credentials_and_ca_never_shows_the_password(
    tmp_path: Path, tls_registry: Registry
) -> None:
    repo = unique_repo("orchestrator-tls")
    archive = oci.write_docker_archive(tmp_path / "image.tar", alpine319())
    digest = oci.push_archive_by_digest(tls_registry, repo, archive.path)
    archive.path.unlink()

    done = scan(tmp_path, tls_env(tmp_path, tls_registry, repo, digest))

    assert done.returncode == 0, done.stderr
    assert findings_of(tmp_path / "trivy-report.json") == ALPINE_FINDINGS
    assert tls_registry.password is not None
    assert tls_registry.password not in everything_written(tmp_path, done)
    assert "--password" not in done.stderr
    assert not (tmp_path / "docker" / "config.json").exists()


@pytest.mark.trivy
@pytest.mark.registry
def test_tls_registry_without_credentials_is_refused_at_once(
    tmp_path: Path, tls_registry: Registry
) -> None:
    repo = unique_repo("orchestrator-tls")
    archive = oci.write_docker_archive(tmp_path / "image.tar", alpine319())
    digest = oci.push_archive_by_digest(tls_registry, repo, archive.path)
    env = tls_env(tmp_path, tls_registry, repo, digest)
    del env["NEXUS_USER"], env["NEXUS_PASSWORD"]

    done = scan(tmp_path, env)

    assert done.returncode == 4, done.stderr
    assert "retry" not in done.stderr
    (line,) = error_lines(done.stderr)
    assert line.startswith("pipeline: error: trivy exited with 1: ")


def test_dry_run_from_json_summarises_and_applies_policy_but_writes_nothing(tmp_path: Path) -> None:
    sample = Path("/work/shared/reference/trivy/debian-buster.json.golden")
    env = offline_env(
        tmp_path,
        PIPELINE_SCAN_FAIL_ON="CRITICAL",
        DEFECTDOJO_URL="http://127.0.0.1:9",
        DEFECTDOJO_TOKEN="dd-token-never-used",
    )
    before = sorted(p.name for p in tmp_path.iterdir())

    done = run_cli(
        ["trivy-image-scan", "--dry-run", "--from-json", str(sample)], env=env, cwd=tmp_path
    )

    assert done.returncode == 5, done.stderr
    assert f"would write {tmp_path / 'gl-container-scanning-report.json'}" in done.stderr
    assert (
        "would import into DefectDojo: POST http://127.0.0.1:9/api/v2/import-scan/" in done.stderr
    )
    assert "CVE-2019-18276" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("stderr", "reason"),
    [
        (
            "FATAL\trun error: init error: DB error: failed to download vulnerability DB: GET http://h/v2/: TOOMANYREQUESTS: slow down",
            "rate limited (429)",
        ),
        (
            "FATAL\tremote error: GET http://h/v2/x/manifests/sha256:1: unexpected status code 503 Service Unavailable",
            "server error (5xx)",
        ),
        ("FATAL\tscan error: context deadline exceeded", "timeout"),
        (
            'FATAL\tunable to find the specified image "h/x@sha256:0" in ["remote"]: MANIFEST_UNKNOWN: manifest unknown',
            None,
        ),
        (
            "FATAL\tremote error: GET http://h/v2/x/manifests/sha256:1: UNAUTHORIZED: authentication required",
            None,
        ),
        ("FATAL\tfilesystem scan error: no space left on device", None),
    ],
)
def test_scan_errors_classified(stderr: str, reason: str | None) -> None:
    error = CommandError("trivy exited with 1", argv=("trivy",), returncode=1, stderr_tail=stderr)
    assert classify_scan_error(error) == reason


@pytest.mark.trivy
@pytest.mark.registry
def test_insecure_skips_tls_verification_with_a_warning(
    tmp_path: Path, tls_registry: Registry
) -> None:
    repo = unique_repo("orchestrator-tls")
    archive = oci.write_docker_archive(tmp_path / "image.tar", alpine319())
    digest = oci.push_archive_by_digest(tls_registry, repo, archive.path)
    env = tls_env(tmp_path, tls_registry, repo, digest, PIPELINE_SCAN_INSECURE="true")
    del env["PIPELINE_REGISTRY_CA_FILE"]

    done = scan(tmp_path, env)

    assert done.returncode == 0, done.stderr
    assert "PIPELINE_SCAN_INSECURE=true: Trivy skips TLS verification" in done.stderr
    assert findings_of(tmp_path / "trivy-report.json") == ALPINE_FINDINGS


@pytest.mark.trivy
@pytest.mark.registry
def test_unknown_ca_without_insecure_fails_at_once(tmp_path: Path, tls_registry: Registry) -> None:
    repo = unique_repo("orchestrator-tls")
    archive = oci.write_docker_archive(tmp_path / "image.tar", alpine319())
    digest = oci.push_archive_by_digest(tls_registry, repo, archive.path)
    env = tls_env(tmp_path, tls_registry, repo, digest)
    del env["PIPELINE_REGISTRY_CA_FILE"]

    done = scan(tmp_path, env)

    assert done.returncode == 4, done.stderr
    assert "retry" not in done.stderr
    assert "x509" in error_lines(done.stderr)[0]


@pytest.mark.trivy
@pytest.mark.registry
def test_secret_scanner_findings_are_summarised_and_kept_out_of_the_gitlab_report(
    tmp_path: Path, registry_pair: RegistryPair
) -> None:
    token = "ghp_" + "Zq3T8b1xW4kP9mN2cV7rL5sD0fG6hJ1aY8uE"
    spec = oci.ImageSpec(
        layers=[*alpine319().layers, {"app/deploy.sh": f"export GITHUB_TOKEN={token}\n".encode()}]
    )
    repo, digest = push_image(registry_pair, spec, tmp_path)
    env = scan_env(
        tmp_path,
        registry_pair,
        repo,
        digest,
        PIPELINE_SCAN_SCANNERS="vuln,secret",
        PIPELINE_SCAN_FAIL_ON="CRITICAL",
    )

    done = scan(tmp_path, env)

    assert done.returncode == 5, done.stderr
    parsed = trivy.load_report((tmp_path / "trivy-report.json").read_bytes())
    secrets = [f for f in parsed.findings if f.kind == "secret"]
    assert [(f.id, f.package) for f in secrets] == [("github-pat", "/app/deploy.sh")]
    document = gitlab_report(tmp_path)
    assert len(document["vulnerabilities"]) == len(ALPINE_FINDINGS)  # type: ignore[arg-type]
    assert "1 secret or misconfiguration findings" in json.dumps(document["scan"])


def test_explicit_ignore_file_that_does_not_exist_is_exit_2(tmp_path: Path) -> None:
    env = offline_env(tmp_path, PIPELINE_SCAN_IGNORE_FILE="security/trivyignore")

    done = run_cli(["trivy-image-scan", "--execute"], env=env, cwd=tmp_path)

    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        f"pipeline: error: PIPELINE_SCAN_IGNORE_FILE: {tmp_path / 'security/trivyignore'} does not exist"
    ]


@pytest.mark.trivy
@pytest.mark.registry
@pytest.mark.parametrize(
    ("platform", "expected"), [("linux/amd64", DEBIAN10_FINDINGS), ("linux/arm64", ALPINE_FINDINGS)]
)
def test_multiarch_index_digest_scans_the_chosen_platform(
    tmp_path: Path, registry_pair: RegistryPair, platform: str, expected: Expected
) -> None:
    repo = unique_repo("orchestrator-multiarch")
    amd64 = oci.write_docker_archive(tmp_path / "amd64.tar", debian10())
    arm64_spec = oci.ImageSpec(
        layers=[oci.alpine_rootfs("3.19.1", ALPINE_PACKAGES, architecture="aarch64")],
        architecture="arm64",
    )
    arm64 = oci.write_docker_archive(tmp_path / "arm64.tar", arm64_spec)
    digest = oci.push_multiarch_index(
        registry_pair.push,
        repo,
        "main-a1b2c3d4",
        {"linux/amd64": amd64.path, "linux/arm64": arm64.path},
    )
    env = scan_env(tmp_path, registry_pair, repo, digest, PIPELINE_SCAN_PLATFORM=platform)

    done = scan(tmp_path, env)

    assert done.returncode == 0, done.stderr
    assert findings_of(tmp_path / "trivy-report.json") == expected


def test_bad_platform_is_exit_2(tmp_path: Path) -> None:
    env = offline_env(tmp_path, PIPELINE_SCAN_PLATFORM="arm64")

    done = run_cli(["trivy-image-scan", "--execute"], env=env, cwd=tmp_path)

    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        "pipeline: error: PIPELINE_SCAN_PLATFORM: must be os/architecture[/variant] like linux/arm64, got 'arm64'"
    ]


def test_non_json_output_of_trivy_itself_is_an_external_failure(tmp_path: Path) -> None:
    from pipeline.errors import ExternalError
    from pipeline.stages.trivy_image_scan import _load

    output = tmp_path / "trivy-report.json"
    output.write_bytes(b"panic: runtime error\n")

    with pytest.raises(ExternalError, match=f"Trivy report {output}: not JSON") as caught:
        _load(output, from_trivy=True)

    assert caught.value.exit_code == 4
