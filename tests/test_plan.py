"""commands/plan.py: every command every stage would run, from the stages' own dry-runs.

The plan is recorded by the shell (``Shell.history``) while each stage's own
``run`` executes under dry-run. The tests at the end prove that is the real
thing: each stage run for real against real components asks the shell for
exactly the argv its dry-run listed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pipeline import artifact
from pipeline.cli import BASE_SETTINGS
from pipeline.commands.run import MODULES, PLACEHOLDER_DIGEST, PLACEHOLDER_LABEL
from pipeline.retry import RetryPolicy, classify_text
from pipeline.runtime import Runtime
from pipeline.settings import load
from pipeline.shell import Call, Shell
from tests.clirun import base_env, run_cli
from tests.gitrepo import git, make_repo
from tests.infra.devserver import DevServer, ServiceImage, push_service_image
from tests.infra.ports import free_port
from tests.infra.registry import Registry, manifest_digest

TRIVY_DB = Path("/work/shared/reference/trivy-db")

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


# --- the dry-run asks for exactly what the real run does ------------------------------------
#
# Each stage runs twice in this process on the same inputs: under dry-run, then for
# real against real components (the Kaniko stand-in, a real registry, real Trivy,
# the sshd + podman DEV server). The commands each asks the shell for must be the
# same list. Two things differ between any two runs and are renamed, nothing else:
# the fresh temporary directories of a run (by order of first appearance) and the
# build's creation time label (the clock).

TEMP_DIR = re.compile(r"/tmp/pipeline-[a-z]+-[A-Za-z0-9_]+")
CREATED = re.compile(r"(org\.opencontainers\.image\.created=)\S+")
SHA = "a1b2c3d4" + "e" * 32
EXECUTOR = Path(__file__).parent / "standins" / "kaniko" / "executor"


def normalised(calls: list[Call]) -> list[tuple[str, ...]]:
    """The commands a stage asked to run (queries left out), run-specific names renamed."""
    names: dict[str, str] = {}

    def rename(match: re.Match[str]) -> str:
        return names.setdefault(match.group(0), f"<tmp{len(names) + 1}>")

    return [
        tuple(CREATED.sub(r"\1<time>", TEMP_DIR.sub(rename, arg)) for arg in call.argv)
        for call in calls
        if not call.query
    ]


def stage_history(stage: str, env: dict[str, str], cwd: Path, *, dry_run: bool) -> list[Call]:
    """Run one stage in this process the way the command line does; its shell's history."""
    module = MODULES[stage]
    loaded = load(tuple(dict.fromkeys((*BASE_SETTINGS, *module.SETTINGS))), env)
    shell = Shell(dry_run=dry_run, policy=FAST, base_env=env)
    rt = Runtime(command=stage, dry_run=dry_run, environ=env, shell=shell, cwd=cwd, loaded=loaded)
    module.run(rt)
    return shell.history


def assert_dry_run_equals_real_run(stage: str, env: dict[str, str], cwd: Path) -> None:
    planned = normalised(stage_history(stage, env, cwd, dry_run=True))
    done = normalised(stage_history(stage, env, cwd, dry_run=False))
    assert planned, f"{stage}: the dry-run asked for no command"
    assert planned == done


def job_env(project: Path, registry: Registry, image: str, **extra: str) -> dict[str, str]:
    """A default-branch job's environment; the registry serves as push and pull registry."""
    docker_config = project.parent / "docker"
    docker_config.mkdir(exist_ok=True)
    return base_env(
        GITLAB_CI="true",
        CI_COMMIT_SHA=SHA,
        CI_COMMIT_BRANCH="main",
        CI_DEFAULT_BRANCH="main",
        CI_PROJECT_NAME="service",
        CI_PROJECT_DIR=str(project),
        NEXUS_REGISTRY=registry.host,
        NEXUS_REGISTRY_PULL=registry.host,
        NEXUS_IMAGE_NAME=image,
        DOCKER_CONFIG=str(docker_config),
        PIPELINE_RETRY_ATTEMPTS="1",
        PIPELINE_REGISTRY_TLS_VERIFY="false",
        **extra,
    )


def built(project: Path, registry: Registry, image: ServiceImage) -> None:
    """The build.env the build stage would have written for ``image``."""
    artifact.write(
        project / "build.env",
        artifact.make(
            image_tag=image.tag,
            digest=image.digest,
            push_repository=f"{registry.host}/{image.repo}",
            pull_repository=f"{registry.host}/{image.repo}",
            immutable_tags=(image.tag,),
            moving_tags=("latest",),
            commit_sha=SHA,
        ),
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    (path / "Dockerfile").write_text("FROM scratch\nCOPY . /app\n")
    (path / "app.txt").write_text("hello\n")
    return path


@pytest.fixture
def service(project: Path, registry: Registry, repo: str) -> ServiceImage:
    """A healthy service image pushed as the build would have, and its build.env."""
    image = push_service_image(registry, repo, "main-a1b2c3d4", version="v1", workdir=project)
    built(project, registry, image)
    return image


@pytest.mark.registry
def test_build_dry_run_equals_its_real_run(project: Path, registry: Registry, repo: str) -> None:
    env = job_env(
        project,
        registry,
        repo,
        PIPELINE_BUILD_EXECUTOR=str(EXECUTOR),
        PIPELINE_BUILD_EXTRA_FLAGS="--insecure",
        STANDIN_PYTHON=sys.executable,
    )
    assert_dry_run_equals_real_run("build", env, project)
    assert (project / "build.env").is_file()


@pytest.mark.registry
def test_push_dry_run_equals_its_real_run(
    project: Path, registry: Registry, service: ServiceImage
) -> None:
    env = job_env(project, registry, service.repo)
    assert_dry_run_equals_real_run("push", env, project)
    assert manifest_digest(registry, service.repo, "latest") == service.digest


@pytest.mark.registry
@pytest.mark.trivy
def test_scan_dry_run_equals_its_real_run(
    project: Path, registry: Registry, service: ServiceImage
) -> None:
    cache = project.parent / "trivy-cache"
    (cache / "db").mkdir(parents=True)
    for name in ("trivy.db", "metadata.json"):
        shutil.copyfile(TRIVY_DB / name, cache / "db" / name)
    env = job_env(
        project,
        registry,
        service.repo,
        PIPELINE_SCAN_INSECURE="true",
        PIPELINE_SCAN_CACHE_DIR=str(cache),
        PIPELINE_SCAN_SKIP_DB_UPDATE="true",
    )
    assert_dry_run_equals_real_run("trivy-image-scan", env, project)
    assert (project / "gl-container-scanning-report.json").is_file()


@pytest.fixture
def dev_server_registries(registry: Registry) -> Sequence[str]:
    return [registry.host]


@pytest.mark.registry
@pytest.mark.devserver
def test_deploy_dry_run_equals_its_real_run(
    project: Path, registry: Registry, service: ServiceImage, dev_server: DevServer
) -> None:
    web_port = free_port()
    dev_server.write_compose_project(web_port=web_port)
    env = job_env(
        project,
        registry,
        service.repo,
        DEV_SERVER_IP=dev_server.host,
        SSH_PORT=str(dev_server.port),
        SSH_USER=dev_server.user,
        SSH_PRIVATE_KEY=dev_server.private_key_pem,
        SSH_KNOWN_HOSTS=dev_server.known_hosts_line,
        PIPELINE_DEPLOY_DIR=str(dev_server.deploy_dir),
        PIPELINE_DEPLOY_HEALTH_URL=f"http://127.0.0.1:{web_port}/health",
        PIPELINE_DEPLOY_HEALTH_TRIES="10",
        PIPELINE_DEPLOY_HEALTH_INTERVAL="0.5",
    )
    assert_dry_run_equals_real_run("deploy-dev", env, project)
    assert dev_server.running_image("web") == service.ref_by_digest


def test_plan_without_the_build_hands_over_no_planned_build_env(checkout: Path) -> None:
    done = run_cli(["plan", "--json", "--skip", "build"], cwd=checkout, env=base_env())

    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["planned_build_env"] is None
    assert [s["stage"] for s in data["stages"]] == STAGE_NAMES[1:]
    assert data["stages"][0]["stopped"].startswith("build.env not found")
