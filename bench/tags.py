"""How much `python -m pipeline tags` costs over importing its own dependencies.

Runs both commands alternately in one process tree, median of N each, and
prints the ratio (target <= 1.2: `tags` imports lazily what it does not need).
Run from a git checkout: `python bench/tags.py [N]`.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

BASELINE = [sys.executable, "-c", "import sh, pydantic_settings, dotenv, tenacity"]
TAGS = [sys.executable, "-m", "pipeline", "tags"]


def once(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    env = {**os.environ, "NO_COLOR": "1"}
    once(TAGS, env)  # warm the file cache and bytecode once for both
    once(BASELINE, env)
    tags, base = [], []
    for _ in range(runs):
        tags.append(once(TAGS, env))
        base.append(once(BASELINE, env))
    t, b = statistics.median(tags), statistics.median(base)
    print(f"runs: {runs} each")
    print(f"import sh, pydantic_settings, dotenv, tenacity: median {b * 1000:.1f} ms")
    print(f"python -m pipeline tags:                        median {t * 1000:.1f} ms")
    print(f"ratio: {t / b:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
