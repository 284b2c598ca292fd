"""Does promotion cost grow with the image? The push stage on a 1 MB and a 500 MB image.

Both images are pushed to one loopback registry (docker-registry) by their
immutable tags; the 500 MB one is a single incompressible layer streamed to
disk by tests.infra.oci. Each round then runs the real stage
(`python -m pipeline push --execute`, a fresh moving tag per round so every run
copies) for both images, interleaved, through a FaultProxy at 0 % faults that
counts the registry requests. Prints the median of N stage runs per size, their
ratio (target <= 1.2: no layer moves) and the requests per promotion.

Run from a checkout: `python bench/push.py [N]` (N >= 5, default 5; about 1 GB of /tmp).
"""

from __future__ import annotations

import collections
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.infra.faultproxy import FaultProxy
from tests.infra.oci import ImageSpec, random_layer, write_docker_archive
from tests.infra.registry import Registry, skopeo_copy_archive, start_registry

from pipeline import artifact

MB = 1024 * 1024
SIZES = {"1 MB": 1 * MB, "500 MB": 500 * MB}
COMMIT = "b" * 40
TARGET_RATIO = 1.2


@dataclass(frozen=True, kw_only=True)
class Image:
    repo: str
    tag: str
    digest: str


@dataclass(frozen=True, kw_only=True)
class Run:
    seconds: float
    requests: collections.Counter[str]


def push_image(work: Path, registry: Registry, label: str, size: int, seed: int) -> Image:
    """Write the image as a docker-archive (streamed) and push it by its immutable tag."""
    repo = "bench-" + label.replace(" ", "").lower()
    tag = "main-bbbbbbbb"
    spec = ImageSpec(layers=[random_layer(size, seed)], labels={"size": label})
    archive = write_docker_archive(work / f"{repo}.tar", spec)
    digest = skopeo_copy_archive(archive.path, f"{repo}:{tag}", registry=registry, timeout=600)
    archive.path.unlink()
    return Image(repo=repo, tag=tag, digest=digest)


def promote(work: Path, host: str, image: Image, moving: str, proxy: FaultProxy) -> Run:
    """One run of the push stage moving ``moving`` to ``image``; its time and requests."""
    build_env = work / f"{image.repo}.env"
    repository = f"{host}/{image.repo}"
    env = artifact.make(
        image_tag=image.tag,
        digest=image.digest,
        push_repository=repository,
        pull_repository=repository,
        immutable_tags=(image.tag,),
        moving_tags=(moving,),
        commit_sha=COMMIT,
    )
    artifact.write(build_env, env)
    before = len(proxy.seen)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "push", "--execute"],
        env=job_env(work, build_env, host),
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"push stage failed ({done.returncode}):\n{done.stderr}")
    seen = proxy.seen[before:]
    return Run(seconds=seconds, requests=collections.Counter(s.method for s in seen))


def job_env(work: Path, build_env: Path, host: str) -> dict[str, str]:
    home = work / "home"
    home.mkdir(exist_ok=True)
    keep = {k: os.environ[k] for k in ("PATH", "LANG", "TMPDIR") if k in os.environ}
    return {
        **keep,
        "HOME": str(home),
        "NO_COLOR": "1",
        "CI_PROJECT_DIR": str(work),
        "PIPELINE_BUILD_ENV": str(build_env),
        "NEXUS_REGISTRY": host,
        "NEXUS_REGISTRY_PULL": host,
        "PIPELINE_REGISTRY_TLS_VERIFY": "false",
    }


def main(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-push-") as tmp:
        work = Path(tmp)
        with start_registry(work) as registry, FaultProxy(registry.host) as proxy:
            images = {}
            for seed, (label, size) in enumerate(SIZES.items()):
                start = time.perf_counter()
                images[label] = push_image(work, registry, label, size, seed)
                print(f"pushed the {label} image in {time.perf_counter() - start:.1f}s")
            results = measure(work, proxy, images, runs)
    report(results, runs)


def measure(
    work: Path, proxy: FaultProxy, images: dict[str, Image], runs: int
) -> dict[str, list[Run]]:
    """Interleaved rounds; round 0 warms up (skopeo's blob-info cache, page cache)."""
    results: dict[str, list[Run]] = {label: [] for label in images}
    for round_number in range(runs + 1):
        for label, image in images.items():
            run = promote(work, proxy.host, image, f"bench-{round_number}", proxy)
            if round_number:
                results[label].append(run)
    return results


def report(results: dict[str, list[Run]], runs: int) -> None:
    medians = {label: statistics.median(r.seconds for r in rs) for label, rs in results.items()}
    small, large = (medians[label] for label in SIZES)
    print(f"push stage, median of {runs} runs each (python -m pipeline push, whole process):")
    for label, seconds in medians.items():
        spread = ", ".join(f"{r.seconds:.2f}" for r in results[label])
        print(f"  {label:>7}: {seconds:.3f}s  ({spread})")
    ratio = large / small
    verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
    print(f"ratio 500 MB / 1 MB: {ratio:.2f} ({verdict} the target <= {TARGET_RATIO})")
    for label, rs in results.items():
        counts = {sum(r.requests.values()) for r in rs}
        methods = dict(sorted(rs[0].requests.items()))
        print(f"registry requests per promotion, {label}: {sorted(counts)} {methods}")


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    if count < 5:
        raise SystemExit("N must be at least 5")
    main(count)
