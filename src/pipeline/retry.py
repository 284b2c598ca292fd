"""Transient-versus-permanent classification and the tenacity policy built on it.

Only what a classifier calls transient is retried: network resets, timeouts,
5xx and 429 answers. Authentication, authorisation, missing objects and policy
refusals fail at once, because trying again cannot change their answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from pipeline.log import log

T = TypeVar("T")

#: Returns the reason an error is worth retrying, or None when it is permanent.
Classifier = Callable[[BaseException], str | None]

_PERMANENT = re.compile(
    r"\b(401|403|404)\b|unauthori[sz]ed|authentication required|access denied|denied:"
    r"|forbidden|MANIFEST_INVALID|MANIFEST_UNKNOWN|manifest unknown|NAME_UNKNOWN"
    r"|no such host|x509:|certificate signed by unknown authority|not found",
    re.IGNORECASE,
)
_TRANSIENT: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"TOOMANYREQUESTS|\b429\b|too many requests|rate limit", re.I),
        "rate limited (429)",
    ),
    (
        re.compile(
            r"\b50[0-4]\b|bad gateway|service unavailable|gateway time-?out|internal server error",
            re.I,
        ),
        "server error (5xx)",
    ),
    (
        re.compile(r"connection reset|broken pipe|connection refused|EOF\b|unexpected EOF", re.I),
        "connection dropped",
    ),
    (
        re.compile(r"i/o timeout|timed? ?out|deadline exceeded|TLS handshake timeout", re.I),
        "timeout",
    ),
    (
        re.compile(r"temporary failure in name resolution|network is unreachable", re.I),
        "network unreachable",
    ),
)


def classify_text(text: str) -> str | None:
    """Reason the output describes a transient failure, or None; permanent signs win."""
    if _PERMANENT.search(text):
        return None
    for pattern, reason in _TRANSIENT:
        if pattern.search(text):
            return reason
    return None


def never(_: BaseException) -> str | None:
    """The classifier for commands that must never be retried."""
    return None


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How hard to try: attempts, a time budget, and exponential backoff with jitter."""

    attempts: int = 4
    budget_seconds: float = 300.0
    initial_seconds: float = 1.0
    max_seconds: float = 30.0


def call_with_retry(
    func: Callable[[], T], *, policy: RetryPolicy, classify: Classifier, what: str
) -> T:
    """Call ``func``, retrying only errors that ``classify`` calls transient."""

    def transient(error: BaseException) -> bool:
        return classify(error) is not None

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        reason = classify(error) if error else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warn(
            f"{what} failed ({reason}); retry {state.attempt_number + 1}/{policy.attempts} "
            f"in {wait:.1f}s"
        )

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts)
        | tenacity.stop_after_delay(policy.budget_seconds),
        wait=tenacity.wait_exponential(multiplier=policy.initial_seconds, max=policy.max_seconds)
        + tenacity.wait_random(0, policy.initial_seconds),
        retry=tenacity.retry_if_exception(transient),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(func)
