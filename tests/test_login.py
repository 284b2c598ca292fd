"""``pipeline login``: writes the config.json for both registries, keeps it, says what to export."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

from tests.clirun import base_env, error_lines, run_cli
from tests.test_auth import PULL, PUSH, docker_login

PASSWORD = "login-pw-0e4d27"


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return base_env(
        HOME=str(tmp_path / "home"), NEXUS_REGISTRY=PUSH, NEXUS_REGISTRY_PULL=PULL, **extra
    )


def test_login_keeps_a_private_config_and_prints_the_export(tmp_path: Path) -> None:
    env = env_for(tmp_path, NEXUS_USER="ci-bot", NEXUS_PASSWORD=PASSWORD)

    result = run_cli(["login", "--execute"], env=env, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    directory = Path(result.stdout.strip().removeprefix("export DOCKER_CONFIG="))
    try:
        path = directory / "config.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        auth = base64.b64encode(f"ci-bot:{PASSWORD}".encode()).decode()
        assert json.loads(path.read_text()) == {
            "auths": {PUSH: {"auth": auth}, PULL: {"auth": auth}}
        }
        for secret in (PASSWORD, auth):
            assert secret not in result.stdout + result.stderr
    finally:
        (directory / "config.json").unlink()
        directory.rmdir()


def test_login_into_docker_config_merges_with_the_users_file(tmp_path: Path) -> None:
    users = docker_login(tmp_path / "cfg", {"other.example:5000": ("me", "mine")})
    env = env_for(
        tmp_path, NEXUS_USER="ci-bot", NEXUS_PASSWORD=PASSWORD, DOCKER_CONFIG=str(users.parent)
    )

    result = run_cli(["login", "--execute"], env=env, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"export DOCKER_CONFIG={users.parent}\n"
    assert sorted(json.loads(users.read_text())["auths"]) == [
        "127.0.0.1:8443",
        "127.0.0.1:8444",
        "other.example:5000",
    ]


def test_login_without_any_source_exits_2(tmp_path: Path) -> None:
    result = run_cli(["login", "--execute"], env=env_for(tmp_path), cwd=tmp_path)

    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "pipeline: error: no registry credentials: set NEXUS_USER/NEXUS_PASSWORD, or VAULT_ADDR "
        f"with VAULT_ID_TOKEN, or docker login to {PUSH} and {PULL} "
        f"(looked in {tmp_path / 'home' / '.docker' / 'config.json'})"
    ]
    assert result.stdout == ""


def test_login_with_half_an_account_exits_2(tmp_path: Path) -> None:
    result = run_cli(
        ["login", "--execute"], env=env_for(tmp_path, NEXUS_PASSWORD=PASSWORD), cwd=tmp_path
    )

    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "pipeline: error: NEXUS_USER: not set, but its partner is; set both or neither"
    ]
    assert PASSWORD not in result.stderr


def test_login_is_a_dry_run_by_default_outside_ci(tmp_path: Path) -> None:
    env = env_for(
        tmp_path, NEXUS_USER="ci-bot", NEXUS_PASSWORD=PASSWORD, DOCKER_CONFIG=str(tmp_path / "d")
    )

    result = run_cli(["login"], env=env, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert (
        f"would write auths for {PUSH} and {PULL} (NEXUS_USER/NEXUS_PASSWORD) to {tmp_path / 'd'}/config.json"
        in result.stderr
    )
    assert not (tmp_path / "d").exists()
