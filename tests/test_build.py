"""The build stage through the CLI, with the Kaniko stand-in and the real TLS + auth registry.

Every run is ``python -m pipeline build`` in a subprocess with an explicit
environment, as a GitLab job would run it. The stand-in (tests/standins/kaniko)
accepts exactly Kaniko's flags, pushes a real image with skopeo using the
config.json the stage wrote, and records each run in ``STANDIN_RECORD``.
"""

from __future__ import annotations

import base64
import io
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline import artifact
from tests.clirun import base_env, error_lines, run_cli
from tests.gitrepo import git, make_repo
from tests.infra.ports import free_port
from tests.infra.registry import (
    Registry,
    get_blob,
    get_config,
    get_manifest,
    manifest_digest,
    unique_repo,
)

STANDIN_DIR = Path(__file__).parent / "standins" / "kaniko"
EXECUTOR = STANDIN_DIR / "executor"
SHA = "a1b2c3d4" + "e" * 32
TAG = "main-a1b2c3d4"
PLACEHOLDER = artifact.DRY_RUN_DIGEST_SHOWN


@dataclass
class Job:
    """A project checkout and the environment of a build job for it."""

    project: Path
    docker_config: Path
    record: Path
    env: dict[str, str]

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return run_cli(["build", *args], env={**self.env, **extra}, cwd=self.project)

    def attempts(self) -> list[dict[str, Any]]:
        """One entry per executor run (``--help`` queries are not recorded)."""
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    @property
    def build_env(self) -> Path:
        return self.project / "build.env"

    def written(self) -> dict[str, str]:
        lines = self.build_env.read_text().splitlines()
        return dict(line.split("=", 1) for line in lines)


@pytest.fixture
def job(tmp_path: Path) -> Job:
    """A branch job on the default branch; the registry is a closed port until a test sets one."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "Dockerfile").write_text(
        "FROM scratch AS runtime\nLABEL team=platform\nCOPY . /app\n"
    )
    (project / "app.txt").write_text("hello from the build context\n")
    (project / "run.sh").write_text("#!/bin/sh\necho run\n")
    (project / "run.sh").chmod(0o750)
    docker_config = tmp_path / "docker"
    docker_config.mkdir()
    record = tmp_path / "record.jsonl"
    closed = f"127.0.0.1:{free_port()}"
    env = base_env(
        GITLAB_CI="true",
        CI_COMMIT_SHA=SHA,
        CI_COMMIT_BRANCH="main",
        CI_DEFAULT_BRANCH="main",
        CI_PROJECT_NAME="server",
        CI_PROJECT_DIR=str(project),
        CI_PROJECT_URL="https://gitlab.example/group/server",
        NEXUS_REGISTRY=closed,
        NEXUS_REGISTRY_PULL=closed,
        NEXUS_IMAGE_NAME=unique_repo("build"),
        NEXUS_USER="ci-builder",
        NEXUS_PASSWORD="not-the-real-one-4711",
        DOCKER_CONFIG=str(docker_config),
        PIPELINE_BUILD_EXECUTOR=str(EXECUTOR),
        PIPELINE_RETRY_ATTEMPTS="3",
        PIPELINE_RETRY_INITIAL_SECONDS="0",
        PIPELINE_RETRY_MAX_SECONDS="0",
        STANDIN_PYTHON=sys.executable,
        STANDIN_RECORD=str(record),
        STANDIN_STATE=str(tmp_path / "standin-state"),
    )
    return Job(project=project, docker_config=docker_config, record=record, env=env)


@pytest.fixture
def registry_job(job: Job, tls_registry: Registry) -> Job:
    """The job pushing to the real TLS + basic-auth registry with its real account."""
    assert tls_registry.username is not None
    assert tls_registry.password is not None
    assert tls_registry.ca_cert is not None
    job.env.update(
        NEXUS_REGISTRY=tls_registry.host,
        NEXUS_REGISTRY_PULL=tls_registry.host,
        NEXUS_USER=tls_registry.username,
        NEXUS_PASSWORD=tls_registry.password,
        PIPELINE_REGISTRY_CA_FILE=str(tls_registry.ca_cert),
    )
    return job


def secret_forms(user: str, password: str) -> tuple[str, ...]:
    return password, base64.b64encode(f"{user}:{password}".encode()).decode()


def assert_no_secret(
    done: subprocess.CompletedProcess[str], secrets: tuple[str, ...], *roots: Path
) -> None:
    """No secret in stdout, stderr, or any file under ``roots`` but a docker config.json."""
    output = done.stdout + done.stderr
    files = [
        p for root in roots for p in root.rglob("*") if p.is_file() and p.name != "config.json"
    ]
    for secret in secrets:
        assert secret not in output
        for path in files:
            assert secret not in path.read_text(errors="replace"), path


def only_error(done: subprocess.CompletedProcess[str]) -> str:
    errors = error_lines(done.stderr)
    assert len(errors) == 1, done.stderr
    return errors[0]


def executor_line(stderr: str) -> list[str]:
    """The flags of the echoed executor run (not its --help query)."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"+ {EXECUTOR} --context=")]
    assert len(lines) == 1, stderr
    return shlex.split(lines[0].partition("  # ")[0])[2:]


def without_created(argv: list[str]) -> list[str]:
    return [arg for arg in argv if not arg.startswith("--label=org.opencontainers.image.created=")]


# --- a real build -----------------------------------------------------------------------


@pytest.mark.registry
def test_build_pushes_to_the_registry_and_writes_build_env(
    registry_job: Job, tls_registry: Registry
) -> None:
    job = registry_job
    name = job.env["NEXUS_IMAGE_NAME"]

    done = job.run()

    assert done.returncode == 0, done.stderr
    digest = manifest_digest(tls_registry, name, TAG)
    written = job.written()
    assert written["IMAGE_DIGEST"] == digest
    assert written["IMAGE_TAG"] == TAG
    assert written["IMAGE_PUSH_REPOSITORY"] == f"{tls_registry.host}/{name}"
    assert written["IMAGE_MOVING_TAGS"] == "latest"
    assert written["IMAGE_COMMIT_SHA"] == SHA
    assert f"pushed: {tls_registry.host}/{name}:{TAG}@{digest}" in done.stderr


@pytest.mark.registry
def test_built_image_carries_the_oci_labels(registry_job: Job, tls_registry: Registry) -> None:
    done = registry_job.run()

    assert done.returncode == 0, done.stderr
    labels = get_config(tls_registry, registry_job.env["NEXUS_IMAGE_NAME"], TAG)["config"]["Labels"]
    assert labels["org.opencontainers.image.revision"] == SHA
    assert labels["org.opencontainers.image.source"] == "https://gitlab.example/group/server"
    assert labels["org.opencontainers.image.version"] == TAG
    assert labels["org.opencontainers.image.ref.name"] == "main"
    assert labels["org.opencontainers.image.title"] == "server"
    assert labels["org.opencontainers.image.created"].endswith("Z")
    assert labels["team"] == "platform"


@pytest.mark.registry
def test_built_image_holds_the_build_context(registry_job: Job, tls_registry: Registry) -> None:
    name = registry_job.env["NEXUS_IMAGE_NAME"]

    done = registry_job.run()

    assert done.returncode == 0, done.stderr
    [layer] = get_manifest(tls_registry, name, TAG).content["layers"]
    blob = get_blob(tls_registry, name, layer["digest"])
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
        member = tar.extractfile("workspace/app.txt")
        assert member is not None
        assert member.read() == b"hello from the build context\n"
        assert tar.getmember("workspace/run.sh").mode == 0o750


@pytest.mark.registry
def test_executor_runs_in_restore_mode_with_the_stage_credentials(registry_job: Job) -> None:
    done = registry_job.run()

    assert done.returncode == 0, done.stderr
    [attempt] = registry_job.attempts()
    assert attempt["restore"] == {
        "--pre-cleanup": True,
        "--preserve-context": True,
        "--cleanup": True,
    }
    assert attempt["docker_config"] == str(registry_job.docker_config)
    assert not (registry_job.docker_config / "config.json").exists()  # removed at the end


@pytest.mark.registry
def test_no_secret_in_any_output_or_file(registry_job: Job, tmp_path: Path) -> None:
    secrets = secret_forms(registry_job.env["NEXUS_USER"], registry_job.env["NEXUS_PASSWORD"])

    done = registry_job.run()

    assert done.returncode == 0, done.stderr
    assert_no_secret(done, secrets, tmp_path)


@pytest.mark.registry
def test_transient_push_failure_is_retried_then_succeeds(
    registry_job: Job, tls_registry: Registry
) -> None:
    done = registry_job.run(STANDIN_FAIL="transient-once")

    assert done.returncode == 0, done.stderr
    assert len(registry_job.attempts()) == 2
    assert "connection reset by peer" in done.stderr
    assert "retry 2/3" in done.stderr
    digest = manifest_digest(tls_registry, registry_job.env["NEXUS_IMAGE_NAME"], TAG)
    assert registry_job.written()["IMAGE_DIGEST"] == digest


@pytest.mark.registry
def test_wrong_credentials_fail_at_once(registry_job: Job) -> None:
    wrong = "wrong-password-0815"

    done = registry_job.run(NEXUS_PASSWORD=wrong)

    assert done.returncode == 4
    assert only_error(done) == (
        "pipeline: error: kaniko build failed: the registry refused the credentials "
        "(401 UNAUTHORIZED) (not retried); check NEXUS_USER/NEXUS_PASSWORD or the Vault "
        "secret the job reads"
    )
    assert len(registry_job.attempts()) == 1
    assert not registry_job.build_env.exists()
    assert_no_secret(
        done, secret_forms(registry_job.env["NEXUS_USER"], wrong), registry_job.project
    )


# --- failures the stand-in imitates -----------------------------------------------------


def test_failing_run_step_is_not_retried(job: Job) -> None:
    done = job.run(STANDIN_FAIL="run:7")

    assert done.returncode == 4
    assert only_error(done) == (
        "pipeline: error: kaniko build failed: a RUN step in the Dockerfile failed with exit "
        "status 7 (not retried); fix that step (its output is above); a rebuild would fail "
        "the same way"
    )
    assert len(job.attempts()) == 1
    assert not job.build_env.exists()


def test_killed_executor_is_reported_and_not_retried(job: Job) -> None:
    done = job.run(STANDIN_FAIL="killed")

    assert done.returncode == 4
    assert only_error(done) == (
        "pipeline: error: kaniko build failed: the executor was killed by signal 9; if the "
        "runner ran out of memory, use a larger one (runner tag medium or large)"
    )
    assert len(job.attempts()) == 1
    assert not job.build_env.exists()


def test_sigterm_reaches_the_executor(job: Job) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "build"],
        env={**job.env, "STANDIN_FAIL": "hang"},
        cwd=job.project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not job.attempts() and time.monotonic() < deadline:
            time.sleep(0.05)
        [attempt] = job.attempts()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()

    assert process.returncode == 130
    assert "pipeline: error: interrupted by SIGTERM; /" in stderr
    assert "/executor was stopped (exit -15)" in stderr
    assert not Path(f"/proc/{attempt['pid']}").exists()
    assert not job.build_env.exists()


def test_manifest_invalid_is_not_retried(job: Job) -> None:
    done = job.run(STANDIN_FAIL="manifest-invalid")

    assert done.returncode == 4
    assert "MANIFEST_INVALID" in only_error(done)
    assert "(not retried)" in only_error(done)
    assert len(job.attempts()) == 1


def test_unauthorized_is_not_retried(job: Job) -> None:
    done = job.run(STANDIN_FAIL="unauthorized")

    assert done.returncode == 4
    assert "401 UNAUTHORIZED" in only_error(done)
    assert len(job.attempts()) == 1


def test_lasting_server_error_gives_up_after_the_retries(job: Job) -> None:
    done = job.run(STANDIN_FAIL="transient")

    assert done.returncode == 4
    assert only_error(done) == (
        "pipeline: error: kaniko build failed after 3 attempts: the registry answered with a "
        "server error (5xx); the registry is failing: rerun the job later, or tell the "
        "registry's operators"
    )
    assert len(job.attempts()) == 3


@pytest.mark.registry
def test_unreachable_registry_is_retried_then_exit_4(job: Job) -> None:
    done = job.run(PIPELINE_BUILD_PUSH_RETRY="0", PIPELINE_RETRY_ATTEMPTS="2")

    assert done.returncode == 4
    assert only_error(done) == (
        "pipeline: error: kaniko build failed after 2 attempts: the connection to a registry "
        "dropped or was refused; check that NEXUS_REGISTRY/NEXUS_REGISTRY_PULL are up and "
        "reachable, then rerun the job"
    )
    assert len(job.attempts()) == 2


def test_vault_down_is_retried_then_exit_4(job: Job) -> None:
    addr = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in job.env.items() if k not in ("NEXUS_USER", "NEXUS_PASSWORD")}

    done = run_cli(
        ["build"],
        env={**env, "VAULT_ADDR": addr, "VAULT_ID_TOKEN": "header.payload.signature"},
        cwd=job.project,
    )

    assert done.returncode == 4
    assert f"VAULT_ADDR={addr}" in only_error(done)
    assert job.attempts() == []


def test_interpreter_or_package_gone_after_the_executor_fails_the_stage(
    job: Job, tmp_path: Path
) -> None:
    copy = tmp_path / "site" / "pipeline"
    shutil.copytree(Path(__file__).parents[1] / "src" / "pipeline", copy)

    done = job.run(STANDIN_INSTANT="1", STANDIN_WIPE=str(copy), PYTHONPATH=str(copy.parent))

    assert done.returncode == 4
    assert only_error(done) == (
        f"pipeline: error: {copy} (the pipeline package) is gone after the executor exited: "
        "Kaniko wiped this container's filesystem and did not restore it (killed before its "
        "--cleanup, or restore mode not in effect); build.env was not written; rerun the job"
    )
    assert not job.build_env.exists()


# --- dry-run ----------------------------------------------------------------------------


def test_dry_run_prints_argv_and_build_env_and_writes_nothing(job: Job) -> None:
    done = job.run("--dry-run")

    assert done.returncode == 0, done.stderr
    argv = executor_line(done.stderr)
    assert f"--destination={job.env['NEXUS_REGISTRY']}/{job.env['NEXUS_IMAGE_NAME']}:{TAG}" in argv
    assert "# dry-run: not run" in done.stderr
    shown = dict(line.split("=", 1) for line in done.stdout.splitlines())
    assert shown["IMAGE_DIGEST"] == PLACEHOLDER
    assert shown["IMAGE_TAG"] == TAG
    assert shown["IMAGE_PULL_REF"].endswith(f"@{PLACEHOLDER}")
    assert job.attempts() == []
    assert not job.build_env.exists()
    assert not (job.project / ".pipeline").exists()
    assert list(job.docker_config.iterdir()) == []
    assert_no_secret(done, secret_forms("ci-builder", "not-the-real-one-4711"), job.project)


def test_dry_run_shows_the_argv_the_real_run_uses(job: Job) -> None:
    shown = executor_line(job.run("--dry-run").stderr)

    done = job.run(STANDIN_INSTANT="1")

    assert done.returncode == 0, done.stderr
    [attempt] = job.attempts()
    assert without_created(attempt["argv"]) == without_created(shown)
    assert without_created(executor_line(done.stderr)) == without_created(shown)


def test_release_tag_builds_the_version(job: Job) -> None:
    env = {k: v for k, v in job.env.items() if k != "CI_COMMIT_BRANCH"}
    env.update(CI_COMMIT_TAG="v1.4.2", STANDIN_INSTANT="1")

    done = run_cli(["build"], env=env, cwd=job.project)

    assert done.returncode == 0, done.stderr
    argv = executor_line(done.stderr)
    repository = f"{job.env['NEXUS_REGISTRY']}/{job.env['NEXUS_IMAGE_NAME']}"
    assert [a for a in argv if a.startswith("--destination=")] == [
        f"--destination={repository}:1.4.2"
    ]
    assert "--label=org.opencontainers.image.version=1.4.2" in argv
    assert "--label=org.opencontainers.image.ref.name=v1.4.2" in argv
    written = job.written()
    assert (written["IMAGE_TAG"], written["IMAGE_MOVING_TAGS"]) == ("1.4.2", "stable")


def test_settings_shape_the_argv(job: Job) -> None:
    (job.project / "docker").mkdir()
    (job.project / "docker" / "Dockerfile.prod").write_text("FROM scratch AS web\n")

    done = job.run(
        "--dry-run",
        PIPELINE_BUILD_CONTEXT="docker",
        PIPELINE_BUILD_DOCKERFILE="Dockerfile.prod",
        PIPELINE_BUILD_ARGS="PYTHON=3.12\nGREETING=hello world",
        PIPELINE_BUILD_TARGET="web",
        PIPELINE_BUILD_CACHE="false",
        PIPELINE_BUILD_EXTRA_FLAGS="--reproducible --verbosity warn",
    )
    cached = job.run("--dry-run", PIPELINE_BUILD_CACHE_REPO="shared/layer-cache")

    assert done.returncode == 0, done.stderr
    argv = executor_line(done.stderr)
    assert f"--context={job.project / 'docker'}" in argv
    assert f"--dockerfile={job.project / 'docker' / 'Dockerfile.prod'}" in argv
    assert ["--build-arg=PYTHON=3.12", "--build-arg=GREETING=hello world"] == [
        a for a in argv if a.startswith("--build-arg=")
    ]
    assert "--target=web" in argv
    assert "--cache=false" in argv
    assert argv[-2:] == ["--reproducible=true", "--verbosity=warn"]
    cache_flags = [a for a in executor_line(cached.stderr) if a.startswith("--cache")]
    assert cache_flags == [
        "--cache=true",
        f"--cache-repo={job.env['NEXUS_REGISTRY']}/shared/layer-cache",
    ]


def test_secret_looking_build_arg_is_warned_about(job: Job) -> None:
    done = job.run("--dry-run", PIPELINE_BUILD_ARGS="VERSION=1 NPM_TOKEN=abc123")

    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "looks like a secret" in line]
    assert warnings == [
        "pipeline: warning: PIPELINE_BUILD_ARGS: NPM_TOKEN looks like a secret; build args are "
        "kept in the image's history for anyone who can pull it: pass secrets with --secret "
        "(PIPELINE_BUILD_EXTRA_FLAGS) and RUN --mount=type=secret instead"
    ]


def test_inputs_kaniko_may_delete_are_warned_about(job: Job, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("CA\n")

    done = job.run("--dry-run", PIPELINE_REGISTRY_CA_FILE=str(ca))

    assert done.returncode == 0, done.stderr
    for what, path in (
        ("DOCKER_CONFIG (registry credentials)", job.docker_config),
        ("PIPELINE_REGISTRY_CA_FILE", ca),
    ):
        assert (
            f"pipeline: warning: {what} {path} is outside /kaniko and the project directory: "
            "Kaniko's --pre-cleanup may delete it before the build pulls base images; keep it "
            "under /kaniko (as the runner image does) or on a mount"
        ) in done.stderr.splitlines()


def test_inputs_under_the_project_are_not_warned_about(job: Job) -> None:
    (job.project / "image").mkdir()
    (job.project / "image" / "Dockerfile").write_text("FROM scratch\n")
    outside_context = job.project / ".docker"
    outside_context.mkdir()

    done = job.run("--dry-run", DOCKER_CONFIG=str(outside_context), PIPELINE_BUILD_CONTEXT="image")

    assert done.returncode == 0, done.stderr
    assert "--pre-cleanup may delete it" not in done.stderr


def test_credentials_inside_the_build_context_are_refused(job: Job) -> None:
    inside = job.project / ".docker"
    inside.mkdir()

    done = job.run(DOCKER_CONFIG=str(inside))

    assert done.returncode == 2
    assert only_error(done) == (
        f"pipeline: error: DOCKER_CONFIG: {inside} is inside the build context "
        f"{job.project.resolve()}: a COPY of the context would put the registry credentials "
        "into the image; use a directory outside it (the runner image uses /kaniko/.docker)"
    )
    assert job.attempts() == []
    assert not (inside / "config.json").exists()


def test_real_run_accepts_every_flag_the_stage_can_emit(job: Job, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked before the push\n")

    done = job.run(
        STANDIN_INSTANT="1",
        PIPELINE_BUILD_ARGS="A=1",
        PIPELINE_BUILD_TARGET="runtime",
        PIPELINE_REGISTRY_CA_FILE=str(ca),
        PIPELINE_BUILD_EXTRA_FLAGS="--reproducible --snapshot-mode redo --label a=b",
    )

    assert done.returncode == 0, done.stderr
    assert job.written()["IMAGE_DIGEST"].startswith("sha256:")


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        ({"PIPELINE_BUILD_DOCKERFILE": "nope/Dockerfile"}, 2, "PIPELINE_BUILD_DOCKERFILE: {project}/nope/Dockerfile does not exist (the setting is relative to the build context {project})"),
        ({"PIPELINE_BUILD_CONTEXT": "missing"}, 2, "PIPELINE_BUILD_CONTEXT: {project}/missing is not a directory"),
        ({"PIPELINE_BUILD_CONTEXT": ".."}, 2, "PIPELINE_BUILD_CONTEXT: {parent} is outside the project directory {project} (CI_PROJECT_DIR); the build may only see what the job checked out"),
        ({"PIPELINE_BUILD_DOCKERFILE": "../Dockerfile"}, 2, "PIPELINE_BUILD_DOCKERFILE: {parent}/Dockerfile is outside the project directory {project}"),
        ({"PIPELINE_BUILD_ARGS": "VERSION=1 TOKEN"}, 2, "PIPELINE_BUILD_ARGS: 'TOKEN' is not KEY=VALUE (KEY: letters, digits, _; a bare KEY would read the value from the job's environment, which the build refuses)"),
        ({"PIPELINE_BUILD_EXTRA_FLAGS": "--squash"}, 2, "PIPELINE_BUILD_EXTRA_FLAGS: '--squash' is not a Kaniko executor flag (osscontainertools/kaniko v1.28.3); check its spelling in the executor's --help"),
        ({"PIPELINE_BUILD_EXTRA_FLAGS": "--destination=evil/x:y"}, 2, "PIPELINE_BUILD_EXTRA_FLAGS: --destination is set by the build stage; use the tag plan (NEXUS_REGISTRY, NEXUS_IMAGE_NAME)"),
        ({"PIPELINE_BUILD_CACHE_REPO": "nexus:8443/cache"}, 2, "PIPELINE_BUILD_CACHE_REPO: must be a repository name in the push registry like orchestrator-server/cache, without a host, got 'nexus:8443/cache'"),
        ({"PIPELINE_BUILD_PUSH_RETRY": "many"}, 2, "PIPELINE_BUILD_PUSH_RETRY: Input should be a valid integer, unable to parse string as an integer"),
        ({"NEXUS_REGISTRY": "https://nexus.example:8443"}, 2, "NEXUS_REGISTRY: must be host:port without a scheme or path, got 'https://nexus.example:8443'"),
        ({"NEXUS_REGISTRY": "nexus.example:8443/orchestrator"}, 2, "NEXUS_REGISTRY: must be host:port without a scheme or path, got 'nexus.example:8443/orchestrator'"),
        ({"PIPELINE_REGISTRY_CA_FILE": "/nonexistent/ca.pem"}, 2, "PIPELINE_REGISTRY_CA_FILE: /nonexistent/ca.pem does not exist"),
        ({"KANIKO_DIR": "/tmp/kaniko"}, 2, "KANIKO_DIR is set: Kaniko does not protect a moved directory from its own filesystem wipe (upstream issues 3098, 2211); unset it"),
        ({"PIPELINE_BUILD_EXECUTOR": "/nonexistent/executor"}, 3, "PIPELINE_BUILD_EXECUTOR: /nonexistent/executor is not an executable file"),
        ({"STANDIN_FLAVOR": "upstream"}, 3, "{executor} has no restore mode (--pre-cleanup, --preserve-context missing from its --help): upstream Kaniko unpacks the base image over this job's filesystem and never restores it, so Python and this package would be gone after the build; use the osscontainertools/kaniko fork >= 1.27.5 (PIPELINE_BUILD_EXECUTOR)"),
    ],
)  # fmt: skip
def test_bad_input(job: Job, extra: dict[str, str], code: int, message: str) -> None:
    project = job.project.resolve()
    expected = message.format(project=project, parent=project.parent, executor=EXECUTOR)

    done = job.run(**extra)

    assert done.returncode == code, done.stderr
    assert only_error(done) == f"pipeline: error: {expected}"
    assert job.attempts() == []
    assert not job.build_env.exists()
    assert_no_secret(done, secret_forms("ci-builder", "not-the-real-one-4711"), job.project)


def test_executor_not_found_anywhere(job: Job) -> None:
    env = {k: v for k, v in job.env.items() if k != "PIPELINE_BUILD_EXECUTOR"}
    env["PATH"] = "/usr/bin:/bin"

    done = run_cli(["build"], env=env, cwd=job.project)

    if Path("/kaniko/executor").exists():
        pytest.skip("this machine has a real /kaniko/executor")
    assert done.returncode == 3
    assert only_error(done) == (
        "pipeline: error: Kaniko executor not found: neither /kaniko/executor nor executor on "
        "PATH; run in the runner image or set PIPELINE_BUILD_EXECUTOR"
    )


def test_detached_head_without_tags_has_no_tag_plan(job: Job) -> None:
    make_repo(job.project, commits=2)
    git(job.project, "checkout", "-q", "--detach", "HEAD~1")
    env = {k: v for k, v in job.env.items() if not k.startswith("CI_") and k != "GITLAB_CI"}

    done = run_cli(["build", "--execute"], env=env, cwd=job.project)

    assert done.returncode == 2
    assert only_error(done) == (
        "pipeline: error: HEAD is detached and no tag points at it: check out a branch, or set "
        "CI_COMMIT_BRANCH or CI_COMMIT_TAG"
    )
    assert job.attempts() == []


# --- the stand-in itself ----------------------------------------------------------------


def standin(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(STANDIN_DIR / "standin.py"), *args],
        capture_output=True,
        text=True,
        env=base_env(**env),
        timeout=60,
        check=False,
    )


def tsv_rows(flavor: str) -> Iterator[tuple[str, str]]:
    for line in (STANDIN_DIR / f"flags-{flavor}.tsv").read_text().splitlines():
        if line.startswith("--"):
            names, type_ = line.split("\t")[:2]
            yield names.partition(" / ")[0], type_


def sample_args(flavor: str, *, separate: bool) -> list[str]:
    args: list[str] = []
    for flag, type_ in tsv_rows(flavor):
        value = "1" if type_ == "int" else "x=y"
        if type_ == "bool":
            args.append(flag)
        elif separate:
            args += [flag, value]
        else:
            args.append(f"{flag}={value}")
    return args


@pytest.mark.parametrize("flavor", ["fork", "upstream"])
@pytest.mark.parametrize("separate", [False, True])
def test_standin_accepts_every_listed_flag(flavor: str, separate: bool) -> None:
    done = standin(*sample_args(flavor, separate=separate), "--help", STANDIN_FLAVOR=flavor)

    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("args", "flavor", "error"),
    [
        (["--squash"], "fork", "Error: unknown flag: --squash"),
        (["--pre-cleanup"], "upstream", "Error: unknown flag: --pre-cleanup"),
        (["-x"], "fork", "Error: unknown shorthand flag: 'x' in -x"),
        (["--context"], "fork", "Error: flag needs an argument: --context"),
        (["--cache=maybe"], "fork", 'Error: invalid argument "maybe" for "--cache" flag: strconv.ParseBool: parsing "maybe": invalid syntax'),
        (["--context=/"], "fork", "Error: you must provide --destination, or use --no-push"),
        (["build"], "fork", 'Error: unknown command "build" for "executor"'),
    ],
)  # fmt: skip
def test_standin_refuses_like_cobra(args: list[str], flavor: str, error: str) -> None:
    done = standin(*args, STANDIN_FLAVOR=flavor)

    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == error


def test_standin_help_lists_restore_mode_only_in_the_fork() -> None:
    fork = standin("--help").stdout
    upstream = standin("--help", STANDIN_FLAVOR="upstream").stdout

    assert all(flag in fork for flag in ("--pre-cleanup", "--preserve-context", "--cleanup"))
    assert "--pre-cleanup" not in upstream
    assert "--preserve-context" not in upstream


def test_standin_refuses_a_missing_dockerfile(tmp_path: Path) -> None:
    done = standin(f"--context={tmp_path}", "--destination=127.0.0.1:1/x:y")

    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == (
        "Error: error resolving dockerfile path: please provide a valid path to a Dockerfile "
        "within the build context with --dockerfile"
    )


def test_standin_refuses_an_unknown_target(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch AS runtime\n")

    done = standin(f"--context={tmp_path}", "--destination=127.0.0.1:1/x:y", "--target=web")

    assert done.returncode == 1
    assert done.stdout.strip() == (
        "error building image: Error finding target stage: web is not a valid target build stage"
    )
