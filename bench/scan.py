"""What the trivy-image-scan stage adds to Trivy's own time.

Measures, median of N each:
- the stage's own work outside Trivy (parse the JSON, build the GitLab report,
  summarise, decide the policy) on the largest reference report and on a
  synthetic report of 10,000 findings;
- Trivy's own run (`trivy image`, offline test DB, seeded cache) on the Debian 12
  test image, pushed by digest to a loopback registry.

Prints both and the ratio. Run from a checkout: `python bench/scan.py [N]`.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.infra import oci
from tests.infra.registry import start_registry
from tests.test_trivy_image_scan import debian12

from pipeline import report
from pipeline.tools import trivy

REFERENCE = Path("/work/shared/reference")
DB_DIR = REFERENCE / "trivy-db"
IMAGE = report.ScannedImage(
    repository="127.0.0.1:5000/orchestrator-bench", tag="main-a1b2c3d4", digest="sha256:" + "a" * 64
)
SYNTHETIC_FINDINGS = 10_000


def outside_trivy(text: bytes) -> None:
    """Everything the stage does with Trivy's JSON, minus file writes."""
    parsed = trivy.load_report(text)
    document = report.gitlab_report(
        parsed, IMAGE, start_time="2026-01-01T00:00:00", end_time="2026-01-01T00:00:01"
    )
    json.dumps(document)
    report.summary_lines(report.summarise(parsed), IMAGE)
    report.breaking(parsed.findings, "HIGH")


def median_seconds(func: Callable[[], object], runs: int) -> float:
    func()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synthetic(findings: int) -> bytes:
    """The Debian sample with its vulnerabilities repeated over distinct packages."""
    data: dict[str, Any] = json.loads((REFERENCE / "trivy/debian-buster.json.golden").read_text())
    template = data["Results"][0]["Vulnerabilities"]
    vulns = []
    for n in range(findings):
        vuln = copy.deepcopy(template[n % len(template)])
        vuln["PkgName"] = f"pkg{n}"
        vulns.append(vuln)
    data["Results"][0]["Vulnerabilities"] = vulns
    return json.dumps(data).encode()


def trivy_run(work: Path, runs: int) -> tuple[float, int]:
    """Median seconds of `trivy image` on the Debian 12 test image; and its finding count."""
    with start_registry(work) as registry:
        archive = oci.write_docker_archive(work / "image.tar", debian12())
        digest = oci.push_archive_by_digest(registry, "orchestrator-bench", archive.path)
        cache = work / "cache"
        (cache / "db").mkdir(parents=True)
        for name in ("trivy.db", "metadata.json"):
            shutil.copyfile(DB_DIR / name, cache / "db" / name)
        scan = trivy.ImageScan(
            image=registry.ref("orchestrator-bench", digest),
            output=work / "out.json",
            cache_dir=cache,
            skip_db_update=True,
        )
        argv = trivy.image_argv(scan)
        seconds = median_seconds(
            lambda: subprocess.run(argv, check=True, capture_output=True), runs
        )
        return seconds, len(trivy.load_report((work / "out.json").read_bytes()).findings)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    samples = sorted((REFERENCE / "trivy").glob("*.golden"), key=lambda p: p.stat().st_size)
    largest = samples[-1]
    text = largest.read_bytes()
    big = synthetic(SYNTHETIC_FINDINGS)
    ours = median_seconds(lambda: outside_trivy(text), runs * 20)
    ours_big = median_seconds(lambda: outside_trivy(big), runs)
    with tempfile.TemporaryDirectory(prefix="bench-scan-") as tmp:
        theirs, found = trivy_run(Path(tmp), runs)
    print(f"runs: {runs} (Trivy), {runs * 20} (largest sample), {runs} (synthetic)")
    print(f"outside Trivy, {largest.name} ({len(text):,} bytes): median {ours * 1000:.2f} ms")
    print(
        f"outside Trivy, synthetic {SYNTHETIC_FINDINGS:,} findings ({len(big):,} bytes): "
        f"median {ours_big * 1000:.1f} ms"
    )
    print(f"trivy image, Debian 12 test image ({found} findings): median {theirs * 1000:.0f} ms")
    print(
        f"ratio outside/Trivy: {ours / theirs:.4f} (largest sample), {ours_big / theirs:.3f} (synthetic)"
    )


if __name__ == "__main__":
    main()
