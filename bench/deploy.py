"""deploy-dev on a real DEV server: handshakes, health-notice lag, total time vs compose.

Starts the test infrastructure (a loopback registry, podman behind a private sshd
as the DEV server), pushes two healthy service versions, then runs
``python -m pipeline deploy-dev --execute`` N times per health mode, alternating
versions so every deploy really replaces the containers. For each run:

- SSH handshakes: "Accepted publickey" lines the run added to sshd's log
  (target: at most 2, one expected);
- notice lag: from the moment the new version first answers HTTP 200 (polled
  every 10 ms by this script) to the moment the stage prints that the health
  check passed (target: at most one poll interval);
- total time of the stage vs the time ``docker compose up -d`` took (from the
  remote script's marker).

    python bench/deploy.py [--runs 3] [--interval 2]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import math
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.clirun import base_env  # noqa: E402
from tests.infra.devserver import (  # noqa: E402
    DevServer,
    DevServerSession,
    ServiceImage,
    _start_session,
    open_dev_server,
    push_service_image,
)
from tests.infra.ports import free_port, loopback_opener  # noqa: E402
from tests.infra.registry import start_registry  # noqa: E402

from pipeline import artifact  # noqa: E402

COMMIT = "b" * 40
_COMPOSE = re.compile(r"@deploy up ok compose took ([0-9.]+)s")
_STEP = re.compile(r"@deploy (\S+) (begin|ok|fail)")
_NOTICED = re.compile(r"@deploy health ok|^health: HTTP 200")


@dataclass(frozen=True, kw_only=True)
class Run:
    handshakes: int
    lag: float
    total: float
    compose: float
    steps: dict[str, float]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--interval", type=float, default=2.0, help="health poll interval (s)")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp,
        _infrastructure(Path(tmp)) as (
            server,
            images,
        ),
    ):
        port = free_port()
        server.write_compose_project(web_port=port)
        for mode in ("server", "runner"):
            runs = [
                _deploy(
                    server,
                    images[i % 2],
                    port=port,
                    tmp=Path(tmp),
                    mode=mode,
                    interval=args.interval,
                )
                for i in range(args.runs)
            ]
            _report(mode, runs, args.interval)
    return 0


@contextlib.contextmanager
def _infrastructure(tmp: Path) -> Iterator[tuple[DevServer, list[ServiceImage]]]:
    base = Path(tempfile.mkdtemp(prefix="devserver-", dir="/tmp"))
    session: DevServerSession | None = None
    try:
        session = _start_session(base)
        with start_registry(tmp) as registry:
            images = [
                push_service_image(
                    registry, "bench-app", f"main-{n * 8}", version=f"v{n}", workdir=tmp
                )
                for n in ("1", "2")
            ]
            workdir = tmp / "server"
            workdir.mkdir()
            with open_dev_server(session, workdir, [registry.host]) as server:
                yield server, images
    finally:
        if session is not None:
            session.engines.close()
        shutil.rmtree(base, ignore_errors=True)


def _deploy(
    server: DevServer, image: ServiceImage, *, port: int, tmp: Path, mode: str, interval: float
) -> Run:
    _write_build_env(tmp, image)
    before = server.handshakes()
    became_healthy: list[float] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(port, image.version, became_healthy, stop))
    watcher.start()
    start = time.monotonic()
    noticed, compose, steps = _run_stage(
        _env(server, image, port=port, tmp=tmp, mode=mode, interval=interval), tmp, start
    )
    total = time.monotonic() - start
    stop.set()
    watcher.join()
    lag = noticed - became_healthy[0] if became_healthy and noticed else float("nan")
    return Run(
        handshakes=server.handshakes() - before, lag=lag, total=total, compose=compose, steps=steps
    )


def _run_stage(
    env: dict[str, str], cwd: Path, start: float
) -> tuple[float, float, dict[str, float]]:
    """Run the stage; return when it noticed health (monotonic), compose's seconds, and
    the seconds each remote step took (plus "python start": until the first output)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "deploy-dev", "--execute"],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    noticed, compose, lines = 0.0, float("nan"), []
    begun: dict[str, float] = {}
    steps: dict[str, float] = {}
    assert process.stderr is not None
    for line in process.stderr:
        now = time.monotonic()
        steps.setdefault("python start", now - start)
        lines.append(line)
        if step := _STEP.match(line):
            if step[2] == "begin":
                begun[step[1]] = now
            elif step[1] in begun:
                steps[step[1]] = now - begun.pop(step[1])
        if not noticed and _NOTICED.search(line):
            noticed = time.monotonic()
        if found := _COMPOSE.search(line):
            compose = float(found[1])
    if process.wait() != 0:
        raise SystemExit("deploy failed:\n" + "".join(lines[-40:]))
    return noticed, compose, steps


def _watch(port: int, version: str, found: list[float], stop: threading.Event) -> None:
    """Record when the new version first answers 200 on /health."""
    opener = loopback_opener()
    while not stop.is_set() and not found:
        with contextlib.suppress(OSError, http.client.HTTPException):
            with opener.open(f"http://127.0.0.1:{port}/version", timeout=1) as answer:
                current = answer.read().decode().strip()
            with opener.open(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                if current == version and answer.status == 200:
                    found.append(time.monotonic())
        time.sleep(0.01)


def _write_build_env(tmp: Path, image: ServiceImage) -> None:
    repository = f"{image.registry_host}/{image.repo}"
    env = artifact.make(
        image_tag=image.tag,
        digest=image.digest,
        push_repository=repository,
        pull_repository=repository,
        immutable_tags=(image.tag,),
        moving_tags=(),
        commit_sha=COMMIT,
    )
    artifact.write(tmp / "build.env", env)


def _env(
    server: DevServer, image: ServiceImage, *, port: int, tmp: Path, mode: str, interval: float
) -> dict[str, str]:
    return base_env(
        DEV_SERVER_IP="127.0.0.1",
        SSH_PORT=str(server.port),
        SSH_USER=server.user,
        SSH_PRIVATE_KEY=server.private_key_pem,
        SSH_KNOWN_HOSTS=server.known_hosts_line,
        NEXUS_REGISTRY=image.registry_host,
        NEXUS_REGISTRY_PULL=image.registry_host,
        NEXUS_IMAGE_NAME=image.repo,
        CI_PROJECT_DIR=str(tmp),
        CI_PROJECT_NAME="bench",
        PIPELINE_DEPLOY_DIR=str(server.deploy_dir),
        PIPELINE_DEPLOY_HEALTH_URL=f"http://127.0.0.1:{port}/health",
        PIPELINE_DEPLOY_HEALTH_FROM=mode,
        PIPELINE_DEPLOY_HEALTH_INTERVAL=str(interval),
        PIPELINE_DEPLOY_WORKER_SERVICES="worker",
    )


def _report(mode: str, runs: list[Run], interval: float) -> None:
    handshakes = max(run.handshakes for run in runs)
    lags = [run.lag for run in runs if not math.isnan(run.lag)]
    lag = statistics.median(lags) if lags else float("nan")
    total = statistics.median(run.total for run in runs)
    compose = statistics.median(run.compose for run in runs)
    print(f"health from {mode} ({len(runs)} runs, medians):")
    print(f"  SSH handshakes per deploy: {handshakes} (target <= 2)")
    print(
        f"  200 -> stage noticed: {lag * 1000:.0f} ms = {lag / interval:.2f} poll intervals "
        f"of {interval:g} s (target <= 1)"
    )
    print(f"  total {total:.2f} s vs compose up -d {compose:.2f} s: {total / compose:.2f}x")
    names = dict.fromkeys(name for run in runs for name in run.steps)
    spent = (
        f"{name} {statistics.median(run.steps.get(name, 0.0) for run in runs):.2f}"
        for name in names
    )
    print(f"  where the time goes (s): {', '.join(spent)}")


if __name__ == "__main__":
    raise SystemExit(main())
