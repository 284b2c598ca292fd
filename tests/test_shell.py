"""The process choke point, against real processes (small scripts in a temporary bin/)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.errors import CommandError, ExternalError, InterruptError, ToolMissingError
from pipeline.log import log
from pipeline.retry import RetryPolicy, classify_text
from pipeline.shell import Shell

FAST = RetryPolicy(attempts=4, budget_seconds=30, initial_seconds=0.01, max_seconds=0.02)


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    path = tmp_path / "bin"
    path.mkdir()
    return path


def script(bin_dir: Path, name: str, body: str) -> Path:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def shell(bin_dir: Path, *, dry_run: bool = False) -> Shell:
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return Shell(dry_run=dry_run, policy=FAST, base_env=env)


def by_text(error: BaseException) -> str | None:
    return classify_text(error.stderr_tail) if isinstance(error, CommandError) else None


@pytest.fixture
def captured(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    secrets = set(log.secrets)
    yield capsys
    log.secrets = secrets


def test_echoes_quoted_command_and_streams_output(
    bin_dir: Path, captured: pytest.CaptureFixture[str]
) -> None:
    script(bin_dir, "greet", 'echo "hello $1"; echo warn >&2')
    result = shell(bin_dir).run(["greet", "a b"])
    err = captured.readouterr().err
    assert "+ greet 'a b'" in err
    assert "hello a b" in err
    assert result.stdout == "hello a b\n"
    assert result.stderr == "warn\n"
    assert result.ran


def test_secrets_are_masked_in_the_echo_and_output(
    bin_dir: Path, captured: pytest.CaptureFixture[str]
) -> None:
    script(bin_dir, "leak", 'echo "token=$1"')
    log.add_secret("hunter2-secret")
    shell(bin_dir).run(["leak", "hunter2-secret"])
    err = captured.readouterr().err
    assert "hunter2-secret" not in err
    assert "token=[MASKED]" in err


def test_missing_program_is_exit_3(bin_dir: Path) -> None:
    with pytest.raises(ToolMissingError, match="^no-such-tool not found on PATH$") as info:
        shell(bin_dir).run(["no-such-tool"])
    assert info.value.exit_code == 3


def test_dry_run_prints_and_runs_nothing(
    bin_dir: Path, tmp_path: Path, captured: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    script(bin_dir, "touchit", f"touch {marker}")
    result = shell(bin_dir, dry_run=True).run(["touchit"])
    assert not marker.exists()
    assert not result.ran
    assert "+ touchit  # dry-run: not run" in captured.readouterr().err


def test_dry_run_warns_once_about_a_missing_tool(
    bin_dir: Path, captured: pytest.CaptureFixture[str]
) -> None:
    runner = shell(bin_dir, dry_run=True)
    runner.run(["absent-tool"])
    runner.run(["absent-tool"])
    assert (
        captured.readouterr().err.count("absent-tool not found on PATH (the real run needs it)")
        == 1
    )


def test_queries_run_under_dry_run(bin_dir: Path) -> None:
    script(bin_dir, "ask", "echo answer")
    assert shell(bin_dir, dry_run=True).run(["ask"], query=True).stdout == "answer\n"


def test_failure_carries_command_code_and_stderr_tail(bin_dir: Path) -> None:
    script(bin_dir, "fail", "for i in $(seq 1 20); do echo line$i >&2; done; exit 3")
    with pytest.raises(CommandError) as info:
        shell(bin_dir).run(["fail", "x"])
    error = info.value
    assert str(error) == "fail exited with 3: line20"
    assert error.returncode == 3
    assert error.argv == ("fail", "x")
    assert error.stderr_tail.splitlines() == [f"line{i}" for i in range(9, 21)]
    assert error.exit_code == 4


def test_transient_failure_is_retried_until_it_clears(
    bin_dir: Path, tmp_path: Path, captured: pytest.CaptureFixture[str]
) -> None:
    count = tmp_path / "count"
    script(
        bin_dir,
        "flaky",
        f"n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}; "
        '[ $n -ge 3 ] && { echo ok; exit 0; }; echo "503 Service Unavailable" >&2; exit 1',
    )
    result = shell(bin_dir).run(["flaky"], classify=by_text)
    assert result.stdout == "ok\n"
    assert count.read_text().strip() == "3"
    err = captured.readouterr().err
    assert err.count("flaky failed (server error (5xx)); retry") == 2


def test_permanent_failure_is_not_retried(bin_dir: Path, tmp_path: Path) -> None:
    count = tmp_path / "count"
    script(bin_dir, "denied", f'echo x >> {count}; echo "401 Unauthorized" >&2; exit 1')
    with pytest.raises(CommandError, match="401 Unauthorized"):
        shell(bin_dir).run(["denied"], classify=by_text)
    assert count.read_text().count("x") == 1


def test_retries_stop_after_the_policy(bin_dir: Path, tmp_path: Path) -> None:
    count = tmp_path / "count"
    script(bin_dir, "down", f'echo x >> {count}; echo "connection reset by peer" >&2; exit 1')
    with pytest.raises(CommandError, match="connection reset by peer"):
        shell(bin_dir).run(["down"], classify=by_text)
    assert count.read_text().count("x") == FAST.attempts


def test_ok_codes_and_stdin(bin_dir: Path) -> None:
    script(bin_dir, "readin", "cat; exit 5")
    result = shell(bin_dir).run(["readin"], stdin="from stdin", ok_codes=(0, 5), stream=False)
    assert result.stdout == "from stdin"
    assert result.returncode == 5


def test_timeout_is_an_external_error(bin_dir: Path) -> None:
    script(bin_dir, "slow", "sleep 5")
    with pytest.raises(ExternalError, match="slow did not finish within 0.3s"):
        shell(bin_dir).run(["slow"], timeout=0.3)


def test_sigterm_is_forwarded_to_the_child(bin_dir: Path, tmp_path: Path) -> None:
    got = tmp_path / "got"
    script(bin_dir, "waiter", f"trap 'echo TERM > {got}; exit 143' TERM; sleep 5 & wait")
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    started = time.monotonic()
    with pytest.raises(
        InterruptError, match=r"^interrupted by SIGTERM; waiter was stopped \(exit 143\)$"
    ) as info:
        shell(bin_dir).run(["waiter"])
    assert info.value.exit_code == 130
    timer.join()
    assert got.read_text().strip() == "TERM"
    assert time.monotonic() - started < 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or sys.platform != "linux"
