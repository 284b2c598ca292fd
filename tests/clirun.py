"""Run the command line in a subprocess, as a job would, with an explicit environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

#: Variables every test run keeps from the host: enough to find programs and Python.
_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")


def base_env(**extra: str) -> dict[str, str]:
    """A minimal environment without CI variables, plus ``extra``."""
    env = {key: os.environ[key] for key in _KEEP if key in os.environ}
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


def run_cli(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline ARGS``; the finished process with its output decoded as is.

    Output is decoded by hand, not in text mode, so a ``\\r`` (GitLab's section
    markers use it) stays a ``\\r``.
    """
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env=dict(env) if env is not None else base_env(),
        cwd=cwd,
        capture_output=True,
        timeout=timeout,
        input=stdin.encode() if stdin is not None else None,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def error_lines(stderr: str) -> list[str]:
    """The ``pipeline: error:`` lines of an output."""
    return [line for line in stderr.splitlines() if line.startswith("pipeline: error:")]
