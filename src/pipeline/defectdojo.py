"""DefectDojo import: ``POST /api/v2/import-scan/`` with Trivy's JSON.

The request is ``multipart/form-data`` built here by hand (the standard
library has no encoder), authenticated with ``Authorization: Token <key>`` as
DefectDojo's API v2 documents. A 5xx, a 429 or a dropped connection is retried
with the pipeline's retry policy; a 4xx fails at once. The token is never put
in a message: errors quote DefectDojo's answer, masked by the logger.
"""

from __future__ import annotations

import json
import secrets
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ExternalError
from pipeline.retry import RetryPolicy, call_with_retry

IMPORT_PATH = "/api/v2/import-scan/"
SCAN_TYPE = "Trivy Scan"
TIMEOUT_SECONDS = 120.0
_BODY_EXCERPT = 300


@dataclass(frozen=True, kw_only=True)
class ImportScan:
    """The fields of one import: where the findings go in DefectDojo."""

    product_name: str
    product_type_name: str
    engagement_name: str
    branch_tag: str | None = None
    commit_hash: str | None = None
    build_id: str | None = None
    source_code_management_uri: str | None = None

    def fields(self) -> list[tuple[str, str]]:
        """The form fields in DefectDojo's names (the file goes separately)."""
        fields = [
            ("scan_type", SCAN_TYPE),
            ("product_type_name", self.product_type_name),
            ("product_name", self.product_name),
            ("engagement_name", self.engagement_name),
            ("auto_create_context", "true"),
            ("active", "true"),
            ("verified", "false"),
            ("close_old_findings", "false"),
        ]
        optional = {
            "branch_tag": self.branch_tag,
            "commit_hash": self.commit_hash,
            "build_id": self.build_id,
            "source_code_management_uri": self.source_code_management_uri,
        }
        return fields + [(name, value) for name, value in optional.items() if value]


def engagement_name(branch: str, pipeline_id: str) -> str:
    """``CI-{branch}-{pipeline_id}``, the platform's engagement name."""
    return f"CI-{branch}-{pipeline_id}"


def multipart(
    fields: Sequence[tuple[str, str]], *, file_field: str, filename: str, content: bytes
) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body and its Content-Type (RFC 7578)."""
    boundary = f"pipeline-{secrets.token_hex(16)}"
    parts: list[bytes] = []
    for name, value in fields:
        parts.append(_part_head(boundary, f'name="{_quote(name)}"') + value.encode() + b"\r\n")
    disposition = f'name="{_quote(file_field)}"; filename="{_quote(filename)}"'
    head = _part_head(boundary, disposition, "Content-Type: application/json\r\n")
    parts.append(head + content + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _part_head(boundary: str, disposition: str, extra: str = "") -> bytes:
    return f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n{extra}\r\n".encode()


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


@dataclass(frozen=True, kw_only=True)
class Client:
    """A DefectDojo API v2 endpoint and its key."""

    url: str
    token: str
    ca_file: Path | None = None
    timeout: float = TIMEOUT_SECONDS

    def import_scan(
        self, scan: ImportScan, report: Path, *, policy: RetryPolicy
    ) -> Mapping[str, object]:
        """Upload ``report``; return DefectDojo's JSON answer (test, engagement ids)."""
        body, content_type = multipart(
            scan.fields(), file_field="file", filename=report.name, content=report.read_bytes()
        )
        request = urllib.request.Request(  # noqa: S310 - the URL is http(s) by validation
            f"{self.url.rstrip('/')}{IMPORT_PATH}",
            data=body,
            method="POST",
            headers={
                "Authorization": f"Token {self.token}",
                "Content-Type": content_type,
                "Accept": "application/json",
            },
        )
        return call_with_retry(
            lambda: self._send(request), policy=policy, classify=classify, what="DefectDojo import"
        )

    def _send(self, request: urllib.request.Request) -> Mapping[str, object]:
        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=context) as answer:  # noqa: S310 - the URL is http(s) by validation
                return _json(answer.read())
        except urllib.error.HTTPError as exc:
            raise DefectDojoError(exc.code, _excerpt(exc.read())) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DefectDojoError(None, f"{self.url} unreachable: {reason}") from None


class DefectDojoError(ExternalError):
    """DefectDojo refused the import or could not be reached."""

    def __init__(self, status: int | None, detail: str) -> None:
        self.status = status
        prefix = f"HTTP {status}: " if status else ""
        super().__init__(f"DefectDojo import-scan failed: {prefix}{detail}")


def classify(error: BaseException) -> str | None:
    """Retry 5xx, 429 and connection failures; a 4xx answer is final."""
    if not isinstance(error, DefectDojoError):
        return None
    if error.status is None:
        return "connection failed"
    if error.status == 429:
        return "rate limited (429)"
    return "server error (5xx)" if error.status >= 500 else None


def _json(raw: bytes) -> Mapping[str, object]:
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _excerpt(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").replace("\n", " ").strip()
    return text[:_BODY_EXCERPT] or "(empty answer)"
