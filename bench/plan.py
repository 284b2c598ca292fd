"""What `python -m pipeline plan` costs against each stage's own dry-run, one process each.

`plan` runs every stage's dry-run in one process (settings validated and the
context detected once); the alternative is four `python -m pipeline <stage>`
processes. Median of N each, in a scratch git checkout with a Dockerfile.
Prints both and the ratio (plan / sum of the four; below 1 means plan is cheaper).
Run: `python bench/plan.py [N]`.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("build", "push", "trivy-image-scan", "deploy-dev")


def once(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, check=False, capture_output=True)
    return time.perf_counter() - start


def checkout(root: Path) -> Path:
    repo = root / "service"
    repo.mkdir()
    (repo / "Dockerfile").write_text("FROM busybox\n")
    git = ["git", "-C", str(repo), "-c", "user.name=b", "-c", "user.email=b@example.invalid"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "Dockerfile"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "bench"], check=True)
    return repo


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CI_", "GITLAB_"))}
    env["NO_COLOR"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        repo = checkout(Path(tmp))
        plan = [sys.executable, "-m", "pipeline", "plan"]
        stages = [[sys.executable, "-m", "pipeline", stage] for stage in STAGES]
        once(plan, env, repo)  # warm the file cache and bytecode
        planned, separate = [], []
        for _ in range(runs):
            planned.append(once(plan, env, repo))
            separate.append(sum(once(argv, env, repo) for argv in stages))
    p, s = statistics.median(planned), statistics.median(separate)
    print(f"runs: {runs} each")
    print(f"python -m pipeline plan (4 stages, 1 process): median {p * 1000:.0f} ms")
    print(f"4 x python -m pipeline <stage> (dry-run):      median {s * 1000:.0f} ms")
    print(f"ratio plan / separate: {p / s:.2f}")


if __name__ == "__main__":
    main()
