"""What the build stage adds around the Kaniko executor: wall time and peak memory.

Runs ``python -m pipeline build --execute`` with the test stand-in executor told
to exit at once (``STANDIN_INSTANT=1``: flags checked, digest files written),
and the stand-in alone with the very argv the stage gave it. Each is run N times,
interleaved; the medians are compared. Memory is the peak of the summed RSS of
the process tree (the stage's Python stays alive beside the executor), sampled
from /proc every few milliseconds.

Target (issue 3): the stage adds < 150 ms and < 60 MB.

    python bench/build_overhead.py [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "standins" / "kaniko"
TARGET_MS = 150.0
TARGET_MB = 60.0
_SAMPLE_SECONDS = 0.002


@dataclass(frozen=True)
class Sample:
    seconds: float
    cpu_seconds: float
    peak_mb: float


def tree_rss_kb(pid: int) -> int:
    """Summed VmRSS of ``pid`` and its descendants (0 for processes already gone)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
        pending += [int(child) for child in children]
    return total


def measure(argv: list[str], env: dict[str, str], cwd: Path) -> Sample:
    """Wall time, CPU time (user + sys of the tree) and peak tree RSS of one run."""
    start = time.perf_counter()
    process = subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    peak = 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, tree_rss_kb(process.pid))
        time.sleep(_SAMPLE_SECONDS)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{argv[:4]} exited {process.returncode}:\n{stderr}")
    cpu = usage.ru_utime + usage.ru_stime
    return Sample(seconds=seconds, cpu_seconds=cpu, peak_mb=max(peak, usage.ru_maxrss) / 1024)


def job_env(project: Path, record: Path) -> dict[str, str]:
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return {
        **keep,
        "NO_COLOR": "1",
        "GITLAB_CI": "true",
        "CI_COMMIT_SHA": "a1b2c3d4" + "e" * 32,
        "CI_COMMIT_BRANCH": "main",
        "CI_DEFAULT_BRANCH": "main",
        "CI_PROJECT_NAME": "server",
        "CI_PROJECT_DIR": str(project),
        "NEXUS_REGISTRY": "127.0.0.1:9",
        "NEXUS_REGISTRY_PULL": "127.0.0.1:9",
        "NEXUS_USER": "bench",
        "NEXUS_PASSWORD": "bench-password",
        "DOCKER_CONFIG": str(project.parent / "docker"),
        "PIPELINE_BUILD_EXECUTOR": str(STANDIN / "executor"),
        "STANDIN_PYTHON": sys.executable,
        "STANDIN_INSTANT": "1",
        "STANDIN_RECORD": str(record),
    }


def prepare(root: Path) -> tuple[Path, dict[str, str], list[str]]:
    """A project, the job environment, and the executor argv the stage produces for it."""
    project = root / "project"
    project.mkdir()
    (project / "Dockerfile").write_text("FROM scratch\nCOPY . /app\n")
    (root / "docker").mkdir()
    record = root / "record.jsonl"
    env = job_env(project, record)
    measure([sys.executable, "-m", "pipeline", "build", "--execute"], env, project)
    argv: list[str] = json.loads(record.read_text().splitlines()[0])["argv"]
    return project, env, argv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each (median of N, N >= 10)")
    runs = max(10, parser.parse_args().runs)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    stage_argv = [sys.executable, "-m", "pipeline", "build", "--execute"]
    imports = [sys.executable, "-c", "import pipeline.cli, pipeline.stages.build"]
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        project, env, argv = prepare(Path(tmp))
        direct_argv = [sys.executable, str(STANDIN / "standin.py"), *argv]
        probe = [sys.executable, str(STANDIN / "standin.py"), "--help"]
        samples: dict[str, list[Sample]] = {"stage": [], "direct": [], "imports": [], "probe": []}
        for _ in range(runs):
            for name, command in (
                ("stage", stage_argv),
                ("direct", direct_argv),
                ("imports", imports),
                ("probe", probe),
            ):
                samples[name].append(measure(command, env, project))
    print(f"load average after:  {os.getloadavg()[0]:.2f}")
    report(samples, runs)


def _median(samples: list[Sample], field: str) -> float:
    return statistics.median(float(getattr(s, field)) for s in samples)


def report(samples: dict[str, list[Sample]], runs: int) -> None:
    stage, direct = samples["stage"], samples["direct"]
    wall = _median(stage, "seconds"), _median(direct, "seconds")
    cpu = _median(stage, "cpu_seconds"), _median(direct, "cpu_seconds")
    rss = _median(stage, "peak_mb"), _median(direct, "peak_mb")
    added_ms, added_cpu_ms, added_mb = (
        (wall[0] - wall[1]) * 1000,
        (cpu[0] - cpu[1]) * 1000,
        rss[0] - rss[1],
    )
    print(f"median of {runs} runs each")
    print(
        f"  pipeline build --execute: {wall[0] * 1000:7.1f} ms wall {cpu[0] * 1000:7.1f} ms CPU  peak RSS {rss[0]:6.1f} MB"
    )
    print(
        f"  stand-in executor alone:  {wall[1] * 1000:7.1f} ms wall {cpu[1] * 1000:7.1f} ms CPU  peak RSS {rss[1]:6.1f} MB"
    )
    print(
        f"  added by the stage:       {added_ms:7.1f} ms wall (ratio {wall[0] / wall[1]:.2f}x; target < {TARGET_MS:.0f} ms) {'ok' if added_ms < TARGET_MS else 'OVER'}"
    )
    print(f"                            {added_cpu_ms:7.1f} ms CPU  (ratio {cpu[0] / cpu[1]:.2f}x)")
    print(
        f"  added by the stage:       {added_mb:7.1f} MB     (ratio {rss[0] / rss[1]:.2f}x; target < {TARGET_MB:.0f} MB) {'ok' if added_mb < TARGET_MB else 'OVER'}"
    )
    print("  of which:")
    print(
        f"    interpreter + imports (python -c 'import pipeline.cli, pipeline.stages.build'): {_median(samples['imports'], 'seconds') * 1000:7.1f} ms wall {_median(samples['imports'], 'cpu_seconds') * 1000:7.1f} ms CPU"
    )
    print(
        f"    restore-mode probe (stand-in --help; the real Go executor starts in ~10 ms):   {_median(samples['probe'], 'seconds') * 1000:7.1f} ms wall {_median(samples['probe'], 'cpu_seconds') * 1000:7.1f} ms CPU"
    )


if __name__ == "__main__":
    main()
