"""commands/run.py: the stages in order; a dry-run preview by default, the real thing with --execute."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline import artifact
from pipeline.artifact import BuildEnv
from pipeline.commands.run import PLACEHOLDER_DIGEST, STAGES
from pipeline.runtime import Runtime
from pipeline.shell import Shell
from tests.clirun import base_env, error_lines, run_cli
from tests.gitrepo import git, make_repo

STAGE_NAMES = ["build", "push", "trivy-image-scan", "deploy-dev"]
DOCKERFILE = "FROM busybox\nCOPY . /app\n"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A git checkout of a service: a Dockerfile on the default branch, one commit."""
    repo = make_repo(tmp_path / "service")
    (repo / "Dockerfile").write_text(DOCKERFILE)
    git(repo, "add", "Dockerfile")
    git(repo, "commit", "-q", "-m", "add a Dockerfile")
    return repo


def stages_started(stderr: str) -> list[str]:
    return re.findall(r"^stage (\S+)$", stderr, flags=re.MULTILINE)


def test_the_stages_run_in_pipeline_order() -> None:
    assert [stage.name for stage in STAGES] == STAGE_NAMES


def test_run_in_any_checkout_on_defaults_previews_the_whole_pipeline(checkout: Path) -> None:
    done = run_cli(["run"], cwd=checkout, env=base_env())

    assert done.returncode == 0, done.stderr
    assert stages_started(done.stderr) == STAGE_NAMES
    assert "pipeline run: dry-run (outside GitLab CI" in done.stderr
    sha = git(checkout, "rev-parse", "HEAD")
    # The build shows its executor argv; the later stages act on the planned image by digest.
    assert (
        f"--destination=nexus.shared.cwiq.io:8443/orchestrator-service:main-{sha[:8]}"
        in done.stderr
    )
    pull_ref = f"nexus.shared.cwiq.io:8444/orchestrator-service@{PLACEHOLDER_DIGEST}"
    assert f"{pull_ref}  # dry-run: not run" in done.stderr
    assert "is a placeholder (the digest exists only after the push)" in done.stderr
    assert "dry-run: 4 stages" in done.stderr
    assert not (checkout / "build.env").exists()


def test_run_without_a_dockerfile_still_previews_and_says_where_the_real_run_would_stop(
    tmp_path: Path,
) -> None:
    repo = make_repo(tmp_path / "bare")
    done = run_cli(["run"], cwd=repo, env=base_env())

    assert done.returncode == 0, done.stderr
    assert stages_started(done.stderr) == STAGE_NAMES
    assert re.search(
        r"the real run would stop at build: PIPELINE_BUILD_DOCKERFILE: .*does not exist",
        done.stderr,
    )
    assert "the real run would stop at deploy-dev: DEV_SERVER_IP: not set" in done.stderr


def test_execute_stops_at_the_first_failing_stage_with_its_exit_code(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "bare")
    done = run_cli(["run", "--execute"], cwd=repo, env=base_env())

    assert done.returncode == 2
    assert stages_started(done.stderr) == ["build"]
    (line,) = error_lines(done.stderr)
    assert re.fullmatch(
        r"pipeline: error: PIPELINE_BUILD_DOCKERFILE: .*/Dockerfile does not exist .*", line
    )


def test_a_malformed_stage_setting_fails_before_any_stage_starts(checkout: Path) -> None:
    done = run_cli(["run"], cwd=checkout, env=base_env(PIPELINE_SCAN_FAIL_ON="SEVERE"))

    assert done.returncode == 2
    assert stages_started(done.stderr) == []
    (line,) = error_lines(done.stderr)
    assert line.startswith("pipeline: error: PIPELINE_SCAN_FAIL_ON: ")


def test_deploy_only_runs_deploy_dev_alone(checkout: Path) -> None:
    done = run_cli(["run"], cwd=checkout, env=base_env(DEPLOY_ONLY="true"))

    assert done.returncode == 0, done.stderr
    assert stages_started(done.stderr) == ["deploy-dev"]
    assert "DEPLOY_ONLY=true: deploy-dev alone" in done.stderr


def test_skip_leaves_stages_out(checkout: Path) -> None:
    done = run_cli(["run", "--skip", "push", "--skip", "deploy-dev"], cwd=checkout, env=base_env())

    assert done.returncode == 0, done.stderr
    assert stages_started(done.stderr) == ["build", "trivy-image-scan"]


def test_skip_refuses_an_unknown_stage(checkout: Path) -> None:
    done = run_cli(["run", "--skip", "deploy"], cwd=checkout, env=base_env())

    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert "argument --skip: invalid choice: 'deploy'" in line


def test_without_the_build_later_stages_need_a_real_build_env(checkout: Path) -> None:
    done = run_cli(["run", "--skip", "build"], cwd=checkout, env=base_env())

    assert done.returncode == 0, done.stderr
    assert "the real run would stop at push: build.env not found" in done.stderr
    assert "placeholder" not in done.stderr


def test_a_planned_build_env_is_refused_outside_a_dry_run(checkout: Path) -> None:
    planned = _planned(checkout)
    shell = Shell(dry_run=False)
    with pytest.raises(ValueError, match="for dry-runs only"):
        Runtime(
            command="push", dry_run=False, environ={}, shell=shell, cwd=checkout, loaded={},
            planned_build_env=planned,
        )  # fmt: skip


def test_the_planned_build_env_is_the_one_the_build_stage_previews(checkout: Path) -> None:
    """The build stage's own dry-run prints the build.env it would write: the same values."""
    done = run_cli(["build"], cwd=checkout, env=base_env())
    assert done.returncode == 0, done.stderr
    preview = done.stdout.replace("sha256:<unknown-until-the-executor-pushes>", PLACEHOLDER_DIGEST)

    assert preview == artifact.render(_planned(checkout))


def _planned(checkout: Path) -> BuildEnv:
    done = run_cli(["plan", "--json"], cwd=checkout, env=base_env())
    assert done.returncode == 0, done.stderr
    import json

    return BuildEnv.model_validate(json.loads(done.stdout)["planned_build_env"])


def test_the_context_is_detected_once_for_every_stage(checkout: Path) -> None:
    done = run_cli(["run"], cwd=checkout, env=base_env())

    assert done.returncode == 0, done.stderr
    assert done.stderr.count("+ git rev-parse --show-toplevel") == 1
