"""commands/plan.py: every command every stage would run, from the stages' own dry-runs.

The plan is recorded by the shell (``Shell.history``) while each stage's own
``run`` executes under dry-run. The tests at the end prove that is the real
thing: each stage run for real against real components asks the shell for
exactly the argv its dry-run listed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pipeline import artifact
from pipeline.commands.run import PLACEHOLDER_DIGEST, PLACEHOLDER_LABEL
from pipeline.retry import RetryPolicy, classify_text
from pipeline.shell import Call, Shell
from tests.clirun import base_env, run_cli
from tests.gitrepo import git, make_repo

STAGE_NAMES = ["build", "push", "trivy-image-scan", "deploy-dev"]
FAST = RetryPolicy(attempts=3, budget_seconds=30, initial_seconds=0.01, max_seconds=0.02)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    repo = make_repo(tmp_path / "service")
    (repo / "Dockerfile").write_text("FROM busybox\n")
    git(repo, "add", "Dockerfile")
    git(repo, "commit", "-q", "-m", "add a Dockerfile")
    return repo


def plan_json(cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    done = run_cli(["plan", "--json"], cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)  # stdout is the plan alone
    assert isinstance(data, dict)
    return data


def actions(data: dict[str, Any], stage: str) -> list[list[str]]:
    (entry,) = [s for s in data["stages"] if s["stage"] == stage]
    return [c["argv"] for c in entry["commands"] if not c["query"]]


# --- the shell records what it runs or would run -------------------------------------------


def _script(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_shell_history_records_dry_run_commands_and_queries_in_order(tmp_path: Path) -> None:
    _script(tmp_path, "probe", f"touch {tmp_path}/ran")
    shell = Shell(dry_run=True, base_env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    shell.run(["probe", "--change", "a b"])
    shell.run(["true", "--read"], query=True)

    assert shell.history == [
        Call(argv=("probe", "--change", "a b")),
        Call(argv=("true", "--read"), query=True),
    ]
    assert not (tmp_path / "ran").exists()


def test_shell_history_records_a_retried_command_once(tmp_path: Path) -> None:
    count = tmp_path / "count"
    _script(
        tmp_path,
        "flaky",
        f'echo x >> {count}; [ "$(wc -l < {count})" -ge 2 ] || {{ echo "503 Service Unavailable" >&2; exit 1; }}',
    )
    shell = Shell(dry_run=False, policy=FAST, base_env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    shell.run(["flaky"], classify=lambda e: classify_text(getattr(e, "stderr_tail", "")))

    assert len(count.read_text().splitlines()) == 2
    assert shell.history == [Call(argv=("flaky",))]


# --- the plan ------------------------------------------------------------------------------


def test_plan_json_lists_every_stage_in_order_with_its_commands(checkout: Path) -> None:
    data = plan_json(checkout, base_env())
    sha = git(checkout, "rev-parse", "HEAD")

    assert [s["stage"] for s in data["stages"]] == STAGE_NAMES
    assert data["commit_sha"] == sha
    assert data["image_tag"] == f"main-{sha[:8]}"
    (executor,) = actions(data, "build")
    assert (
        f"--destination=nexus.shared.cwiq.io:8443/orchestrator-service:main-{sha[:8]}" in executor
    )
    scan = actions(data, "trivy-image-scan")
    assert scan[-1][-1] == f"nexus.shared.cwiq.io:8444/orchestrator-service@{PLACEHOLDER_DIGEST}"
    assert any(argv[:2] == ["skopeo", "copy"] for argv in actions(data, "push"))
    (deploy,) = [s for s in data["stages"] if s["stage"] == "deploy-dev"]
    assert deploy["stopped"].startswith("DEV_SERVER_IP: not set")


def test_plan_hands_later_stages_a_valid_build_env_marked_as_planned(checkout: Path) -> None:
    data = plan_json(checkout, base_env())
    planned = artifact.make(
        image_tag=data["planned_build_env"]["IMAGE_TAG"],
        digest=data["placeholder_digest"],
        push_repository=data["planned_build_env"]["IMAGE_PUSH_REPOSITORY"],
        pull_repository=data["planned_build_env"]["IMAGE_PULL_REPOSITORY"],
        immutable_tags=tuple(data["planned_build_env"]["IMAGE_IMMUTABLE_TAGS"].split(",")),
        moving_tags=("latest",),
        commit_sha=data["commit_sha"],
    )
    assert planned.model_dump() == data["planned_build_env"]
    assert data["placeholder_digest"] == PLACEHOLDER_DIGEST
    assert not (checkout / "build.env").exists()


def test_plan_text_labels_the_placeholder_digest(checkout: Path) -> None:
    done = run_cli(["plan"], cwd=checkout, env=base_env())

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line for line in lines if not line.startswith(" ")][:4] == STAGE_NAMES
    assert PLACEHOLDER_DIGEST not in done.stdout
    assert f"@{PLACEHOLDER_LABEL}" in done.stdout
    assert any(line.startswith("  + /kaniko/executor ") for line in lines)
    assert any(line.startswith("  ! the real run would stop here: DEV_SERVER_IP") for line in lines)
    assert "is a placeholder" in done.stderr


def test_plan_in_gitlab_ci_is_still_a_dry_run_and_runs_nothing(
    tmp_path: Path, checkout: Path
) -> None:
    """Stand-ins on PATH record every call: only the executor's --help query may run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for tool in ("executor", "skopeo", "trivy", "ssh"):
        help_text = "--pre-cleanup --preserve-context --cleanup" if tool == "executor" else ""
        _script(bin_dir, tool, f'echo "{tool} $*" >> {calls}; echo "{help_text}"')
    sha = git(checkout, "rev-parse", "HEAD")
    env = base_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        GITLAB_CI="true",
        CI_COMMIT_SHA=sha,
        CI_COMMIT_BRANCH="feature/x",
        CI_DEFAULT_BRANCH="main",
        CI_PROJECT_DIR=str(checkout),
        CI_PROJECT_NAME="service",
        PIPELINE_BUILD_EXECUTOR=str(bin_dir / "executor"),
        NEXUS_USER="ci",
        NEXUS_PASSWORD="s3cret-pa55",
    )
    done = run_cli(["plan", "--json"], cwd=checkout, env=env)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)

    assert calls.read_text().splitlines() == ["executor --help"]
    (executor,) = actions(data, "build")
    assert executor[0] == str(bin_dir / "executor")
    assert (
        f"--destination=nexus.shared.cwiq.io:8443/orchestrator-service:branch-feature-x-{sha[:8]}"
        in executor
    )
    assert actions(data, "push") == []  # a feature branch has no moving tag
    assert "s3cret-pa55" not in done.stdout + done.stderr
