"""What fetching registry credentials from Vault costs, against taking them from variables.

Starts a real OpenBao dev server (tests.infra.vault, configured like the platform's
Vault), then runs ``python -m pipeline login --execute`` N times per source,
interleaved: NEXUS_USER/NEXUS_PASSWORD, and a Vault JWT login + KV v2 read (hvac,
token revoked after). Prints the median wall time of each, their difference (the
price of Vault, paid once by every stage that needs credentials) and how much of it
is importing hvac and requests.

    python bench/login.py [--runs 11]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.clirun import base_env  # noqa: E402
from tests.infra.vault import Vault, start_vault, stop_vault  # noqa: E402


def timed_login(env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "login", "--execute"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"login failed ({done.returncode}):\n{done.stderr}")
    return seconds


def timed_python(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def environments(vault: Vault, work: Path) -> dict[str, dict[str, str]]:
    common = {"NEXUS_REGISTRY": "127.0.0.1:8443", "NEXUS_REGISTRY_PULL": "127.0.0.1:8444"}
    return {
        "variables": base_env(
            **common, NEXUS_USER="u", NEXUS_PASSWORD="bench-pw", DOCKER_CONFIG=str(work / "a")
        ),
        "vault": base_env(
            **common,
            VAULT_ADDR=vault.addr,
            VAULT_ID_TOKEN=vault.sign_id_token(exp_in=3600),
            DOCKER_CONFIG=str(work / "b"),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory(prefix="bench-login-") as work:
        vault = start_vault(Path(work))
        try:
            envs = environments(vault, Path(work))
            samples: dict[str, list[float]] = {name: [] for name in (*envs, "hvac", "bare")}
            for _ in range(runs):
                for name, env in envs.items():
                    samples[name].append(timed_login(env))
                samples["hvac"].append(timed_python("import hvac"))
                samples["bare"].append(timed_python("pass"))
        finally:
            stop_vault(vault)
    medians = {name: statistics.median(values) * 1000 for name, values in samples.items()}
    for name in envs:
        print(f"login from {name:<9} median {medians[name]:7.1f} ms over {runs} runs")
    extra = medians["vault"] - medians["variables"]
    print(f"Vault adds {extra:.1f} ms per job ({medians['vault'] / medians['variables']:.2f}x)")
    print(f"of which importing hvac (+requests): {medians['hvac'] - medians['bare']:.1f} ms")


if __name__ == "__main__":
    main()
