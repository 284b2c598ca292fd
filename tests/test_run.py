"""commands/run.py: the stages in order; a dry-run preview by default, the real thing with --execute."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from pipeline import artifact
from pipeline.artifact import BuildEnv
from pipeline.commands.run import PLACEHOLDER_DIGEST, PLACEHOLDER_LABEL, STAGES
from pipeline.runtime import Runtime
from pipeline.shell import Shell
from tests.clirun import base_env, error_lines, run_cli
from tests.gitrepo import git, make_repo
from tests.infra.devserver import DevServer
from tests.infra.ports import free_port
from tests.infra.registry import Registry, manifest_digest

TRIVY_DB = Path("/work/shared/reference/trivy-db")
EXECUTOR = Path(__file__).parent / "standins" / "kaniko" / "executor"

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
    """The stages whose section opened (in GitLab CI the title follows a section marker)."""
    return re.findall(r"(?:^|\r\x1b\[0K)stage (\S+)$", stderr, flags=re.MULTILINE)


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
        r"warning: PIPELINE_BUILD_DOCKERFILE: .*/Dockerfile does not exist .*; "
        r"the real run stops here",
        done.stderr,
    )
    assert f"--dockerfile={repo}/Dockerfile" in done.stderr  # the build is still shown
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
    preview = done.stdout.replace(PLACEHOLDER_LABEL, PLACEHOLDER_DIGEST)

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


# --- the real thing ---------------------------------------------------------------------------


@pytest.fixture
def dev_server_registries(registry: Registry) -> Sequence[str]:
    return [registry.host]


@pytest.mark.registry
@pytest.mark.trivy
@pytest.mark.devserver
def test_execute_runs_every_stage_in_order_each_reading_what_the_build_wrote(
    tmp_path: Path, registry: Registry, repo: str, dev_server: DevServer
) -> None:
    """Build (Kaniko stand-in), promote, scan (real Trivy) and deploy (real DEV server)."""
    project = make_repo(tmp_path / "service", commits=0)
    (project / "Dockerfile").write_text("FROM scratch\nCOPY . /workspace\n")
    (project / "bin").mkdir()
    shutil.copy2("/bin/busybox", project / "bin" / "busybox")
    (project / "www").mkdir()
    (project / "www" / "health").write_text("ok\n")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "service")
    sha = git(project, "rev-parse", "HEAD")
    web_port = free_port()
    compose = dev_server.deploy_dir / "docker-compose.yml"
    httpd = [
        "/workspace/bin/busybox",
        "httpd",
        "-f",
        "-p",
        f"127.0.0.1:{web_port}",
        "-h",
        "/workspace/www",
    ]
    compose.write_text(
        f"services:\n  web:\n    image: ${{IMAGE_REF}}\n    network_mode: host\n    init: true\n"
        f"    entrypoint: {json.dumps(httpd)}\n"
    )
    shutil.chown(compose, user=dev_server.user, group=dev_server.user)
    cache = tmp_path / "trivy-cache"
    (cache / "db").mkdir(parents=True)
    for name in ("trivy.db", "metadata.json"):
        shutil.copyfile(TRIVY_DB / name, cache / "db" / name)
    env = base_env(
        GITLAB_CI="true",
        CI_COMMIT_SHA=sha,
        CI_COMMIT_BRANCH="main",
        CI_DEFAULT_BRANCH="main",
        CI_PROJECT_NAME="service",
        CI_PROJECT_DIR=str(project),
        NEXUS_REGISTRY=registry.host,
        NEXUS_REGISTRY_PULL=registry.host,
        NEXUS_IMAGE_NAME=repo,
        DOCKER_CONFIG=str(tmp_path / "docker"),
        PIPELINE_RETRY_ATTEMPTS="1",
        PIPELINE_REGISTRY_TLS_VERIFY="false",
        PIPELINE_BUILD_EXECUTOR=str(EXECUTOR),
        PIPELINE_BUILD_EXTRA_FLAGS="--insecure",
        STANDIN_PYTHON=sys.executable,
        PIPELINE_SCAN_INSECURE="true",
        PIPELINE_SCAN_CACHE_DIR=str(cache),
        PIPELINE_SCAN_SKIP_DB_UPDATE="true",
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
    (tmp_path / "docker").mkdir()

    done = run_cli(["run"], cwd=project, env=env, timeout=600)

    assert done.returncode == 0, done.stderr
    assert "pipeline run: executing (GITLAB_CI=true)" in done.stderr
    assert stages_started(done.stderr) == STAGE_NAMES
    built = artifact.read(project / "build.env", {})
    assert built.IMAGE_TAG == f"main-{sha[:8]}"
    assert manifest_digest(registry, repo, "latest") == built.IMAGE_DIGEST
    assert (project / "gl-container-scanning-report.json").is_file()
    assert dev_server.running_image("web") == built.pull_ref
    assert "placeholder" not in done.stderr


def test_with_the_dev_settings_in_an_env_file_the_preview_shows_the_deploy(
    checkout: Path, tmp_path: Path
) -> None:
    """The laptop case: a .env with the DEV server's settings; nothing is contacted."""
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
    )
    public = (tmp_path / "id_ed25519.pub").read_text().split()
    env_file = tmp_path / "dev.env"
    env_file.write_text(
        "DEV_SERVER_IP=dev.example.invalid\n"
        "SSH_USER=deployer\n"
        f'SSH_PRIVATE_KEY="{key.read_text()}"\n'
        f"SSH_KNOWN_HOSTS=dev.example.invalid {public[0]} {public[1]}\n"
        "PIPELINE_DEPLOY_DIR=/srv/app\n"
        "PIPELINE_DEPLOY_HEALTH_URL=http://127.0.0.1:8080/health\n"
    )
    done = run_cli(["run", "--env-file", str(env_file)], cwd=checkout, env=base_env())

    assert done.returncode == 0, done.stderr
    assert "would stop at deploy-dev" not in done.stderr
    ssh = [line for line in done.stderr.splitlines() if line.startswith("+ ssh ")]
    assert ssh, done.stderr
    assert all(line.endswith("# dry-run: not run") for line in ssh)
    assert any("deployer@dev.example.invalid" in line for line in ssh)
    secret_lines = [line for line in key.read_text().splitlines() if "PRIVATE KEY" not in line]
    for line in secret_lines:
        assert line not in done.stdout + done.stderr
