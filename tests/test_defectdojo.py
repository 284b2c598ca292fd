"""defectdojo.py: the import-scan request, field by field, against a loopback DefectDojo."""

from __future__ import annotations

import email.parser
import email.policy
import http.server
import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline import artifact, defectdojo
from pipeline.retry import RetryPolicy
from tests.clirun import base_env, error_lines, run_cli

REFERENCE = Path("/work/shared/reference")
SAMPLE = REFERENCE / "trivy/debian-buster.json.golden"
TOKEN = "dd-key-0f1e2d3c4b5a69788796a5b4c3d2e1f0"
SHA = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
FAST = RetryPolicy(attempts=3, budget_seconds=30, initial_seconds=0.05, max_seconds=0.1)

#: The fields of DefectDojo's ImportScanSerializer (API v2, /api/v2/import-scan/).
DOCUMENTED_FIELDS = {
    "scan_date",
    "minimum_severity",
    "active",
    "verified",
    "scan_type",
    "endpoint_to_add",
    "file",
    "product_type_name",
    "product_name",
    "engagement_name",
    "engagement_end_date",
    "source_code_management_uri",
    "test_title",
    "auto_create_context",
    "deduplication_on_engagement",
    "lead",
    "push_to_jira",
    "environment",
    "build_id",
    "branch_tag",
    "commit_hash",
    "api_scan_configuration",
    "service",
    "group_by",
    "create_finding_groups_for_all_findings",
    "tags",
    "close_old_findings",
    "close_old_findings_product_scope",
    "version",
    "apply_tags_to_findings",
    "apply_tags_to_endpoints",
    "engagement",
    "product",
    "product_type",
}
BOOLEAN_FIELDS = {
    "active",
    "verified",
    "auto_create_context",
    "close_old_findings",
    "push_to_jira",
    "deduplication_on_engagement",
}


@dataclass
class Received:
    """One request the fake DefectDojo received, decoded."""

    path: str
    headers: dict[str, str]
    fields: dict[str, str]
    files: dict[str, tuple[str, bytes]]


@dataclass
class FakeDefectDojo:
    """A loopback HTTP server speaking DefectDojo's import-scan contract."""

    url: str
    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    """Statuses to answer with, in order; 201 once they run out."""


def decode_multipart(
    content_type: str, body: bytes
) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    assert message.is_multipart(), content_type
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        payload = part.get_payload(decode=True)
        assert isinstance(name, str)
        assert isinstance(payload, bytes)
        assert name not in {**fields, **files}, f"{name} sent twice"
        if filename:
            files[name] = (filename, payload)
        else:
            fields[name] = payload.decode()
    return fields, files


@pytest.fixture
def dojo() -> Iterator[FakeDefectDojo]:
    server_ref: dict[str, FakeDefectDojo] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            fake = server_ref["fake"]
            body = self.rfile.read(int(self.headers["Content-Length"]))
            fields, files = decode_multipart(self.headers["Content-Type"], body)
            fake.received.append(Received(self.path, dict(self.headers.items()), fields, files))
            status = fake.statuses.pop(0) if fake.statuses else 201
            answer = (
                {"test": 7, "test_id": 7, "engagement_id": 3, "product_id": 2}
                if status == 201
                else {"detail": f"status {status}"}
            )
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args: Any) -> None:
            """Quiet: the test asserts on what was received."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    fake = FakeDefectDojo(url=f"http://127.0.0.1:{server.server_address[1]}")
    server_ref["fake"] = fake
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def check_documented_request(request: Received) -> None:
    """What DefectDojo's API documents for POST /api/v2/import-scan/ with auto_create_context."""
    assert request.path == defectdojo.IMPORT_PATH
    assert request.headers["Authorization"] == f"Token {TOKEN}"
    assert request.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert set(request.fields) | set(request.files) <= DOCUMENTED_FIELDS
    for name in BOOLEAN_FIELDS & set(request.fields):
        assert request.fields[name] in ("true", "false"), name
    assert request.fields["scan_type"] == "Trivy Scan"
    assert request.fields["auto_create_context"] == "true"
    for required in ("product_type_name", "product_name", "engagement_name"):
        assert request.fields[required], required
    assert set(request.files) == {"file"}


# --- the client -------------------------------------------------------------------------


def scan_fields() -> defectdojo.ImportScan:
    return defectdojo.ImportScan(
        product_name="orchestrator-server",
        product_type_name="orchestrator",
        engagement_name=defectdojo.engagement_name("main", "4242"),
        branch_tag="main",
        commit_hash=SHA,
        build_id="4242",
    )


def test_import_sends_each_documented_field(dojo: FakeDefectDojo) -> None:
    client = defectdojo.Client(url=dojo.url, token=TOKEN)

    answer = client.import_scan(scan_fields(), SAMPLE, policy=FAST)

    assert answer["test"] == 7
    (request,) = dojo.received
    check_documented_request(request)
    assert request.fields["product_name"] == "orchestrator-server"
    assert request.fields["engagement_name"] == "CI-main-4242"
    assert request.fields["branch_tag"] == "main"
    assert request.fields["commit_hash"] == SHA
    assert request.fields["build_id"] == "4242"
    assert request.files["file"] == (SAMPLE.name, SAMPLE.read_bytes())


def test_server_errors_are_retried(dojo: FakeDefectDojo) -> None:
    dojo.statuses = [502, 503]
    client = defectdojo.Client(url=dojo.url, token=TOKEN)

    client.import_scan(scan_fields(), SAMPLE, policy=FAST)

    assert len(dojo.received) == 3


def test_client_errors_fail_at_once(dojo: FakeDefectDojo) -> None:
    dojo.statuses = [400]
    client = defectdojo.Client(url=dojo.url, token=TOKEN)

    with pytest.raises(defectdojo.DefectDojoError, match="HTTP 400") as caught:
        client.import_scan(scan_fields(), SAMPLE, policy=FAST)

    assert caught.value.exit_code == 4
    assert len(dojo.received) == 1
    assert TOKEN not in str(caught.value)


def test_multipart_quotes_field_names_and_survives_binary_content() -> None:
    content = bytes(range(256)) * 4
    body, content_type = defectdojo.multipart(
        [("engagement_name", 'CI-feat"x-1'), ("tags", "a\r\nb")],
        file_field="file",
        filename="r.json",
        content=content,
    )
    fields, files = decode_multipart(content_type, body)
    assert fields["engagement_name"] == 'CI-feat"x-1'
    assert files["file"] == ("r.json", content)


def test_classify_only_retries_transient_answers() -> None:
    assert defectdojo.classify(defectdojo.DefectDojoError(500, "x")) is not None
    assert defectdojo.classify(defectdojo.DefectDojoError(429, "x")) is not None
    assert defectdojo.classify(defectdojo.DefectDojoError(None, "refused")) is not None
    assert defectdojo.classify(defectdojo.DefectDojoError(403, "x")) is None
    assert defectdojo.classify(ValueError("x")) is None


# --- through the stage (no Trivy: --from-json) --------------------------------------------


def stage_env(tmp_path: Path, **extra: str) -> dict[str, str]:
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
        GITLAB_CI="true",
        CI_PROJECT_DIR=str(tmp_path),
        CI_PROJECT_NAME="server",
        CI_COMMIT_SHA=SHA,
        CI_COMMIT_BRANCH="main",
        CI_DEFAULT_BRANCH="main",
        CI_PIPELINE_ID="4242",
        NEXUS_REGISTRY="nexus.example.test:8443",
        NEXUS_REGISTRY_PULL="nexus.example.test:8444",
        PIPELINE_RETRY_INITIAL_SECONDS="0.05",
        PIPELINE_RETRY_MAX_SECONDS="0.1",
        **extra,
    )


def all_output(tmp_path: Path, done: subprocess.CompletedProcess[str]) -> str:
    files = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    return done.stdout + done.stderr + files


def test_stage_imports_into_defectdojo_and_never_prints_the_token(
    tmp_path: Path, dojo: FakeDefectDojo
) -> None:
    dojo.statuses = [503]
    env = stage_env(tmp_path, DEFECTDOJO_URL=dojo.url, DEFECTDOJO_TOKEN=TOKEN)

    done = run_cli(["trivy-image-scan", "--from-json", str(SAMPLE)], env=env, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert len(dojo.received) == 2
    check_documented_request(dojo.received[-1])
    assert dojo.received[-1].fields["product_name"] == "orchestrator-server"
    assert dojo.received[-1].fields["engagement_name"] == "CI-main-4242"
    assert dojo.received[-1].fields["commit_hash"] == SHA
    assert f"{dojo.url}/test/7" in done.stderr
    assert TOKEN not in all_output(tmp_path, done)


def test_stage_accepts_the_api_key_name_too(tmp_path: Path, dojo: FakeDefectDojo) -> None:
    env = stage_env(tmp_path, DEFECTDOJO_URL=dojo.url, DEFECTDOJO_API_KEY=TOKEN)

    done = run_cli(["trivy-image-scan", "--from-json", str(SAMPLE)], env=env, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert dojo.received[0].headers["Authorization"] == f"Token {TOKEN}"


def test_stage_refused_import_is_one_line_and_exit_4(tmp_path: Path, dojo: FakeDefectDojo) -> None:
    dojo.statuses = [403]
    env = stage_env(tmp_path, DEFECTDOJO_URL=dojo.url, DEFECTDOJO_TOKEN=TOKEN)

    done = run_cli(["trivy-image-scan", "--from-json", str(SAMPLE)], env=env, cwd=tmp_path)

    assert done.returncode == 4
    assert error_lines(done.stderr) == [
        'pipeline: error: DefectDojo import-scan failed: HTTP 403: {"detail": "status 403"}'
    ]
    assert len(dojo.received) == 1
    assert TOKEN not in all_output(tmp_path, done)


def test_stage_without_defectdojo_settings_does_not_import(
    tmp_path: Path, dojo: FakeDefectDojo
) -> None:
    env = stage_env(tmp_path, DEFECTDOJO_URL=dojo.url)

    done = run_cli(["trivy-image-scan", "--from-json", str(SAMPLE)], env=env, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert dojo.received == []


def test_bad_defectdojo_url_is_a_settings_error(tmp_path: Path) -> None:
    env = stage_env(tmp_path, DEFECTDOJO_URL="dojo.example.test", DEFECTDOJO_TOKEN=TOKEN)

    done = run_cli(["trivy-image-scan", "--from-json", str(SAMPLE)], env=env, cwd=tmp_path)

    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        "pipeline: error: DEFECTDOJO_URL: must be http(s)://host[:port][/path], got 'dojo.example.test'"
    ]
