"""Transient-versus-permanent classification and the retry loop."""

from __future__ import annotations

import pytest

from pipeline.retry import RetryPolicy, call_with_retry, classify_text, never

FAST = RetryPolicy(attempts=3, budget_seconds=10, initial_seconds=0.001, max_seconds=0.002)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("error: received unexpected HTTP status: 503 Service Unavailable", "server error (5xx)"),
        ("502 Bad Gateway", "server error (5xx)"),
        ("TOOMANYREQUESTS: retry-after: 20s", "rate limited (429)"),
        ("read tcp 10.0.0.1:443: read: connection reset by peer", "connection dropped"),
        ("Get https://x/v2/: unexpected EOF", "connection dropped"),
        ("dial tcp: i/o timeout", "timeout"),
        ("net/http: TLS handshake timeout", "timeout"),
        ("UNAUTHORIZED: authentication required", None),
        ("403 Forbidden", None),
        ("MANIFEST_INVALID: manifest invalid; tag is immutable", None),
        ("manifest unknown", None),
        ("x509: certificate signed by unknown authority", None),
        ("dial tcp: lookup nexus: no such host", None),
        ("503 then 401 unauthorized", None),
        ("some other failure", None),
    ],
)
def test_classify_text(text: str, reason: str | None) -> None:
    assert classify_text(text) == reason


def test_call_with_retry_retries_transient_then_returns() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("503")
        return "done"

    assert (
        call_with_retry(flaky, policy=FAST, classify=lambda e: classify_text(str(e)), what="x")
        == "done"
    )
    assert len(calls) == 3


def test_call_with_retry_reraises_permanent_at_once() -> None:
    calls: list[int] = []

    def denied() -> None:
        calls.append(1)
        raise PermissionError("401")

    with pytest.raises(PermissionError):
        call_with_retry(denied, policy=FAST, classify=never, what="x")
    assert len(calls) == 1
