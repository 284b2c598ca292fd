"""The shipped CI templates end to end, run by gitlab-ci-local as GitLab would run them.

A scratch project includes ``ci/pipeline.yml`` exactly as a service would; every
job runs ``python -m pipeline <stage>`` in the shell (gitlab-ci-local's shell
executor, this package on PATH) against real components on loopback:

- a push registry and a pull-through pull registry (Nexus 8443 / 8444), skopeo;
- a real OpenBao holding the Nexus account, reached with the ID token the
  template's ``id_tokens`` declares (the test plays GitLab and signs it for the
  audience the template names; the Vault role is bound to that audience);
- the Kaniko stand-in (tests/standins/kaniko) as the executor;
- real Trivy with the offline test DB;
- the real sshd + podman DEV server, running the image the pipeline deployed.

The tests share one project, registry pair, Vault and DEV server, and run in file
order: the default-branch pipeline deploys first, the failing health check last.

gitlab-ci-local quirks handled here (not in the templates): its shell executor
points ``CI_PROJECT_DIR`` at a Docker path, so the project's ``default:
before_script`` sets it to the job's directory; it sets ``GITLAB_CI=false`` and
creates no ID tokens, so both come as ``--variable``; a tag pipeline calls the
detached HEAD a branch ``HEAD``, so ``CI_COMMIT_BRANCH`` is unset for tags.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import jsonschema
import pytest
import yaml

from tests.gitrepo import git, make_repo
from tests.infra.devserver import USER, DevServer, DevServerSession, open_dev_server
from tests.infra.ports import free_port, loopback_opener
from tests.infra.registry import (
    Registry,
    RegistryPair,
    get_config,
    list_tags,
    manifest_digest,
    start_registry,
    unique_repo,
)
from tests.infra.vault import POLICY, Vault, api_call, start_vault, stop_vault

pytestmark = [pytest.mark.gitlab, pytest.mark.registry]
#: The scenarios use every component; the project's own build job needs only a registry.
SCENARIO = (pytest.mark.vault, pytest.mark.trivy, pytest.mark.devserver)

ROOT = Path(__file__).resolve().parents[1]
GITLAB_CI_LOCAL = ROOT / ".tools/node_modules/.bin/gitlab-ci-local"
EXECUTOR = ROOT / "tests/standins/kaniko/executor"
TRIVY_DB = Path("/work/shared/reference/trivy-db")
REPORT_SCHEMA = Path("/work/shared/reference/gitlab/container-scanning-report-format.json")
PIPELINE_TIMEOUT = 600
CERTS_D = Path("/etc/containers/certs.d")
ALL_JOBS = (
    "build-push", "push-latest", "push-stable", "trivy-image-scan", "deploy-dev",
    "deploy-dev-standalone",
)  # fmt: skip

PROJECT_CI = """\
include:
  - local: /ci/pipeline.yml

default:
  before_script:
    # gitlab-ci-local's shell executor sets CI_PROJECT_DIR to a Docker path; GitLab
    # sets it to the checkout, which is where the job runs.
    - export CI_PROJECT_DIR="$PWD"
    # What the test asserts: the build.env values (dotenv report) this job was given.
    - env | grep -E '^(BUILD_ENV_SCHEMA|IMAGE_[A-Z_]+)=' | sort > dotenv-seen.txt || true
"""
DOCKERFILE = "FROM scratch\nCOPY . /workspace\n"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static


def _template_audience() -> str:
    build = yaml.safe_load((ROOT / "stages/build.yml").read_text())
    audience = build[".pipeline-build"]["id_tokens"]["VAULT_ID_TOKEN"]["aud"]
    assert isinstance(audience, str)
    return audience


def _compose(web_port: int) -> str:
    """The scratch project's service: the built image's busybox httpd serving its /workspace/www.

    The Kaniko stand-in's image holds the build context under /workspace (with the
    files' modes), so the static busybox the project carries is its program.
    """
    command = ["/workspace/bin/busybox", "httpd", "-f", "-p", f"127.0.0.1:{web_port}"]
    command += ["-h", "/workspace/www"]
    return (
        "services:\n"
        "  web:\n"
        "    image: ${IMAGE_REF}\n"
        "    network_mode: host\n"
        "    init: true\n"
        f"    entrypoint: {json.dumps(command)}\n"
    )


@dataclass(kw_only=True)
class Outcome:
    """One gitlab-ci-local pipeline: its exit code, log, and what each job left."""

    returncode: int
    output: str
    state: Path

    def status(self) -> dict[str, str]:
        """PASS, WARN (failed, allowed to) or FAIL for each job that ran, from the summary."""
        found = re.findall(r"^\s*(PASS|WARN|FAIL)\s+(\S+)\s*$", self.output, flags=re.MULTILINE)
        return {job: status for status, job in found}

    def exit_code(self, job: str) -> int | None:
        """The exit code of a failed job, as gitlab-ci-local reports it."""
        found = re.findall(
            rf"^{re.escape(job)}\s+finished in .* FAIL (\d+)", self.output, re.MULTILINE
        )
        return int(found[-1]) if found else None

    def ran(self) -> set[str]:
        return {p.stem for p in (self.state / "output").glob("*.log")}

    def log(self, job: str) -> str:
        return (self.state / "output" / f"{job}.log").read_text(errors="replace")

    def artifact(self, job: str, name: str) -> Path:
        return self.state / "artifacts" / job / name

    def dotenv_seen(self, job: str) -> dict[str, str]:
        text = (self.state / "builds" / job / "dotenv-seen.txt").read_text()
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def build_env(self) -> dict[str, str]:
        lines = self.artifact("build-push", "build.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines)


@dataclass(kw_only=True)
class Project:
    """The scratch service project, its infrastructure, and how to run its pipelines."""

    repo: Path
    pair: RegistryPair
    image: str
    vault: Vault
    server: DevServer
    web_port: int
    trivy_cache: Path
    #: The ID tokens this test signed for the jobs (secrets: never in a log).
    id_tokens: list[str] = field(default_factory=list)

    def commit(self, message: str, *, health: bool = True, version: str = "v1") -> str:
        www = self.repo / "www"
        www.mkdir(exist_ok=True)
        (www / "version").write_text(f"{version}\n")
        if health:
            (www / "health").write_text("ok\n")
        else:
            (www / "health").unlink(missing_ok=True)
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-q", "-m", message)
        return git(self.repo, "rev-parse", "HEAD")

    def pipeline(self, ref: str, **variables: str) -> Outcome:
        """Check out ``ref`` and run its whole pipeline; a tag is checked out detached."""
        git(self.repo, "checkout", "-q", ref)
        state = self.repo / ".gitlab-ci-local"
        shutil.rmtree(state, ignore_errors=True)  # it would reuse earlier artifacts
        done = subprocess.run(
            [str(GITLAB_CI_LOCAL), *self.options(ref, variables)],
            cwd=self.repo,
            env=self.process_env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=PIPELINE_TIMEOUT,
        )
        return Outcome(returncode=done.returncode, output=done.stdout + done.stderr, state=state)

    def options(self, ref: str, extra: dict[str, str]) -> list[str]:
        variables = {**self._variables(), **extra}
        options = ["--force-shell-executor", "--shell-isolation", "--no-artifacts-to-source"]
        options += [f"--variable={key}={value}" for key, value in variables.items()]
        if ref.startswith("v"):
            options += [f"--variable=CI_COMMIT_TAG={ref}", "--unset-variable=CI_COMMIT_BRANCH"]
        return options

    def _variables(self) -> dict[str, str]:
        """What the project's CI/CD settings and GitLab would give every job."""
        return {
            "GITLAB_CI": "true",
            "VAULT_ID_TOKEN": self._id_token(),
            "VAULT_ADDR": self.vault.addr,
            "NEXUS_REGISTRY": self.pair.push.host,
            "NEXUS_REGISTRY_PULL": self.pair.pull.host,
            "NEXUS_IMAGE_NAME": self.image,
            "NEXUS_IMAGE": f"{self.pair.push.host}/{self.image}",
            "PIPELINE_BUILD_EXECUTOR": str(EXECUTOR),
            "PIPELINE_BUILD_EXTRA_FLAGS": "--insecure --insecure-pull",
            "PIPELINE_REGISTRY_TLS_VERIFY": "false",
            "PIPELINE_SCAN_INSECURE": "true",
            "PIPELINE_SCAN_CACHE_DIR": str(self.trivy_cache),
            "PIPELINE_SCAN_SKIP_DB_UPDATE": "true",
            "PIPELINE_RETRY_ATTEMPTS": "2",
            "PIPELINE_RETRY_INITIAL_SECONDS": "0.2",
            "PIPELINE_RETRY_MAX_SECONDS": "0.5",
            "DEV_SERVER_IP": self.server.host,
            "SSH_PORT": str(self.server.port),
            "SSH_USER": self.server.user,
            "SSH_KNOWN_HOSTS": self.server.known_hosts_line,
            "PIPELINE_DEPLOY_DIR": str(self.server.deploy_dir),
            "PIPELINE_DEPLOY_HEALTH_URL": f"http://127.0.0.1:{self.web_port}/health",
            "PIPELINE_DEPLOY_HEALTH_TRIES": "6",
            "PIPELINE_DEPLOY_HEALTH_INTERVAL": "0.5",
            "PIPELINE_DEPLOY_HEALTH_TIMEOUT": "2",
            "PIPELINE_DEV_URL": f"http://127.0.0.1:{self.web_port}",
        }

    def _id_token(self) -> str:
        """What GitLab gives a job for its ``id_tokens`` entry, for the template's audience."""
        self.id_tokens.append(self.vault.sign_id_token(aud=_template_audience()))
        return self.id_tokens[-1]

    def process_env(self) -> dict[str, str]:
        """The runner's environment: this package first on PATH, the multi-line key."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CI_", "GITLAB_"))}
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        env["STANDIN_PYTHON"] = sys.executable
        env["SSH_PRIVATE_KEY"] = self.server.private_key_pem
        env["NO_COLOR"] = "1"
        return env

    def version_served(self) -> str | None:
        try:
            with loopback_opener().open(
                f"http://127.0.0.1:{self.web_port}/version", timeout=2
            ) as r:
                return str(r.read().decode().strip())
        except OSError:
            return None

    def digest(self, registry: str, tag: str) -> str:
        target = self.pair.push if registry == "push" else self.pair.pull
        return manifest_digest(target, self.image, tag)


@pytest.fixture(scope="module")
def e2e_registries(
    tmp_path_factory: pytest.TempPathFactory, e2e_vault: Vault
) -> Iterator[RegistryPair]:
    """An open push registry and a pull-through pull registry of it (Nexus 8443 / 8444).

    The pull registry speaks TLS and asks for the Nexus account Vault holds, as
    Nexus does: the DEV server logs in to it before it pulls.
    """
    root = tmp_path_factory.mktemp("e2e-registries")
    account = (e2e_vault.username, e2e_vault.password)
    with (
        start_registry(root) as push,
        start_registry(root, tls=True, auth=account, proxy_of=push) as pull,
    ):
        yield RegistryPair(push=push, pull=pull)


@pytest.fixture(scope="module")
def e2e_vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vault]:
    """A Vault of this module's own whose nexus-ci role trusts the template's audience."""
    server = start_vault(tmp_path_factory.mktemp("e2e-vault"))
    try:
        role = {
            "role_type": "jwt",
            "bound_audiences": [_template_audience()],
            "user_claim": "sub",
            "token_policies": [POLICY],
            "token_ttl": "120s",
        }
        path = f"auth/jwt/role/{server.role}"
        updated = api_call(server.addr, "POST", path, token=server.root_token, body=role)
        assert updated.status in (200, 204), updated
        yield server
    finally:
        stop_vault(server)


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory,
    e2e_registries: RegistryPair,
    e2e_vault: Vault,
    dev_server_session: DevServerSession,
) -> Iterator[Project]:
    base = tmp_path_factory.mktemp("e2e")
    repo = make_repo(base / "service", commits=0)
    for folder in ("stages", "ci"):
        shutil.copytree(ROOT / folder, repo / folder)
    (repo / ".gitlab-ci.yml").write_text(PROJECT_CI)
    (repo / "Dockerfile").write_text(DOCKERFILE)
    (repo / "bin").mkdir()
    shutil.copy2(BUSYBOX, repo / "bin" / "busybox")
    (repo / ".gitignore").write_text(".gitlab-ci-local/\n")
    git(repo, "remote", "add", "origin", "https://gitlab.example.test/group/service.git")
    trivy_cache = base / "trivy-cache"
    (trivy_cache / "db").mkdir(parents=True)
    for name in ("trivy.db", "metadata.json"):
        shutil.copyfile(TRIVY_DB / name, trivy_cache / "db" / name)
    workdir = base / "dev-server"
    workdir.mkdir()
    with (
        _engine_trusts(e2e_registries.pull),
        open_dev_server(dev_server_session, workdir, [e2e_registries.pull.host]) as server,
    ):
        web_port = free_port()
        compose = server.deploy_dir / "docker-compose.yml"
        compose.write_text(_compose(web_port))
        shutil.chown(compose, user=USER, group=USER)
        built = Project(
            repo=repo,
            pair=e2e_registries,
            image=unique_repo("e2e"),
            vault=e2e_vault,
            server=server,
            web_port=web_port,
            trivy_cache=trivy_cache,
        )
        built.commit("the service, version 1")
        git(repo, "update-ref", "refs/remotes/origin/main", "HEAD")
        git(repo, "symbolic-ref", "refs/remotes/origin/HEAD", "refs/remotes/origin/main")
        yield built


@contextlib.contextmanager
def _engine_trusts(registry: Registry) -> Iterator[None]:
    """The DEV server's podman trusts ``registry``'s CA while the block runs.

    podman's Docker API logs in over verified https whatever registries.conf says
    (``insecure`` covers pulls only), so the CA goes where containers/image looks
    for it: /etc/containers/certs.d/<host:port>/ca.crt, a directory for this
    registry's port alone, removed afterwards.
    """
    assert registry.ca_cert is not None
    directory = CERTS_D / registry.host
    directory.mkdir(parents=True)
    try:
        shutil.copyfile(registry.ca_cert, directory / "ca.crt")
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def assert_no_secret(
    project: Project, outcome: Outcome, *, vault_jobs: set[str] | None = None
) -> None:
    """Neither the Nexus password from Vault nor an ID token is in any log or artifact,
    and every job that ran took its registry credentials from Vault."""
    for secret in (project.vault.password, *project.id_tokens):
        assert secret not in outcome.output
        for path in (outcome.state / "output").glob("*.log"):
            assert secret not in path.read_text(errors="replace"), path
        for path in (outcome.state / "artifacts").rglob("*"):
            if path.is_file():
                assert secret not in path.read_text(errors="replace"), path
    for job in outcome.ran() if vault_jobs is None else vault_jobs:
        assert "✓ registry credentials from Vault" in outcome.log(job), job


# --- the scenarios, in order ------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., None])


def scenario(test: F) -> F:
    for mark in SCENARIO:
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def default_pipeline(project: Project) -> Outcome:
    """The first pipeline: a push to the default branch, version v1 of the service."""
    return project.pipeline("main")


@scenario
def test_default_branch_builds_promotes_latest_and_scans(
    project: Project, default_pipeline: Outcome
) -> None:
    outcome = default_pipeline
    sha = git(project.repo, "rev-parse", "main")

    assert outcome.ran() == {"build-push", "push-latest", "trivy-image-scan", "deploy-dev"}
    for job in ("build-push", "push-latest", "trivy-image-scan"):
        assert outcome.status()[job] == "PASS", outcome.log(job)
    built = outcome.build_env()
    digest = built["IMAGE_DIGEST"]
    assert built["IMAGE_TAG"] == f"main-{sha[:8]}"
    assert built["IMAGE_MOVING_TAGS"] == "latest"
    assert built["IMAGE_COMMIT_SHA"] == sha
    for job in ("push-latest", "trivy-image-scan", "deploy-dev"):
        assert outcome.dotenv_seen(job) == built, job  # the dotenv report reached every job
    assert outcome.dotenv_seen("build-push") == {}

    assert list_tags(project.pair.push, project.image) == ["latest", f"main-{sha[:8]}"]
    assert project.digest("push", "latest") == digest
    assert project.digest("pull", f"main-{sha[:8]}") == digest

    gitlab_report = outcome.artifact("trivy-image-scan", "gl-container-scanning-report.json")
    schema = json.loads(REPORT_SCHEMA.read_text())
    jsonschema.Draft7Validator(schema).validate(json.loads(gitlab_report.read_text()))
    trivy_json = json.loads(outcome.artifact("trivy-image-scan", "trivy-report.json").read_text())
    assert trivy_json["ArtifactName"] == f"{project.pair.pull.host}/{project.image}@{digest}"
    assert_no_secret(project, outcome)


@scenario
def test_default_branch_deploys_the_built_image_to_dev(
    project: Project, default_pipeline: Outcome
) -> None:
    outcome = default_pipeline
    digest = outcome.build_env()["IMAGE_DIGEST"]

    assert outcome.status()["deploy-dev"] == "PASS", outcome.log("deploy-dev")
    assert outcome.returncode == 0
    assert (
        project.server.running_image("web") == f"{project.pair.pull.host}/{project.image}@{digest}"
    )
    assert project.version_served() == "v1"


@scenario
def test_feature_branch_builds_only_and_offers_a_manual_deploy(
    project: Project, default_pipeline: Outcome
) -> None:
    git(project.repo, "checkout", "-q", "-b", "feature/Search_API", "main")
    sha = project.commit("a feature", version="feature")
    latest = project.digest("push", "latest")
    running = project.server.running_image("web")
    outcome = project.pipeline("feature/Search_API")

    assert outcome.returncode == 0, outcome.output
    assert outcome.ran() == {"build-push"}
    assert _listed(project, "feature/Search_API")["deploy-dev-standalone"] == "manual"
    built = outcome.build_env()
    tag = f"branch-feature-search-api-{sha[:8]}"
    assert built["IMAGE_TAG"] == tag
    assert built["IMAGE_MOVING_TAGS"] == ""
    assert project.digest("push", tag) == built["IMAGE_DIGEST"]
    assert project.digest("push", "latest") == latest  # nothing promoted
    assert project.server.running_image("web") == running  # nothing deployed
    assert_no_secret(project, outcome)


@scenario
def test_version_tag_pushes_the_version_and_promotes_stable(project: Project) -> None:
    git(project.repo, "checkout", "-q", "main")
    git(project.repo, "tag", "v1.2.3")
    outcome = project.pipeline("v1.2.3")

    assert outcome.returncode == 0, outcome.output
    assert outcome.ran() == {"build-push", "push-stable"}
    built = outcome.build_env()
    assert built["IMAGE_TAG"] == "1.2.3"
    assert built["IMAGE_MOVING_TAGS"] == "stable"
    assert outcome.dotenv_seen("push-stable") == built
    assert project.digest("push", "1.2.3") == built["IMAGE_DIGEST"]
    assert project.digest("push", "stable") == built["IMAGE_DIGEST"]
    assert_no_secret(project, outcome)


@scenario
def test_pre_release_tag_pushes_its_version_but_never_stable(project: Project) -> None:
    stable = project.digest("push", "stable")
    git(project.repo, "checkout", "-q", "main")
    project.commit("release candidate", version="rc")
    git(project.repo, "tag", "v1.3.0-rc.1")
    outcome = project.pipeline("v1.3.0-rc.1")

    assert outcome.returncode == 0, outcome.output
    assert outcome.ran() == {"build-push", "push-stable"}
    built = outcome.build_env()
    assert built["IMAGE_TAG"] == "1.3.0-rc.1"
    assert built["IMAGE_MOVING_TAGS"] == ""
    assert project.digest("push", "1.3.0-rc.1") == built["IMAGE_DIGEST"]
    assert project.digest("push", "stable") == stable
    assert "no moving tag" in outcome.log("push-stable").lower()
    assert_no_secret(project, outcome, vault_jobs={"build-push"})  # nothing to promote: no login


@scenario
def test_deploy_only_redeploys_latest_without_building(
    project: Project, default_pipeline: Outcome
) -> None:
    git(project.repo, "checkout", "-q", "main")
    latest = project.digest("pull", "latest")
    _remove_service_containers(project.server)  # so that only a deploy can bring it back
    assert project.server.running_image("web") is None
    outcome = project.pipeline("main", DEPLOY_ONLY="true")

    assert outcome.returncode == 0, outcome.output
    assert outcome.ran() == {"deploy-dev"}
    assert outcome.dotenv_seen("deploy-dev") == {}
    running = project.server.running_image("web")
    assert running == f"{project.pair.pull.host}/{project.image}@{latest}"
    assert project.version_served() == "v1"
    assert_no_secret(project, outcome)


@scenario
def test_failing_health_check_rolls_back_and_fails_the_pipeline(
    project: Project, default_pipeline: Outcome
) -> None:
    git(project.repo, "checkout", "-q", "main")
    before = project.server.running_image("web")
    assert before is not None
    project.commit("a broken release: no /health", health=False, version="v2")
    outcome = project.pipeline("main")

    assert outcome.returncode == 1, outcome.output
    assert outcome.ran() == {"build-push", "push-latest", "trivy-image-scan", "deploy-dev"}
    assert outcome.status()["deploy-dev"] == "FAIL"
    assert outcome.exit_code("deploy-dev") == 6  # deploy failed, previous version restored
    assert "rolled back" in outcome.log("deploy-dev").lower()
    assert project.server.running_image("web") == before
    assert project.version_served() == "v1"
    # As the platform orders its jobs, push-latest does not wait for the DEV deploy:
    # `latest` now names the image that failed its health check.
    assert project.digest("push", "latest") == outcome.build_env()["IMAGE_DIGEST"]
    assert_no_secret(project, outcome)


def _remove_service_containers(server: DevServer) -> None:
    """Remove the deploy directory's containers; runc's kill can race a container's exit,
    so a refused removal is tried again."""
    label = f"label=com.docker.compose.project.working_dir={server.deploy_dir}"
    for _ in range(5):
        containers = server.docker("ps", "--all", "--quiet", "--filter", label).stdout.split()
        if (
            not containers
            or server.docker("rm", "--force", *containers, check=False).returncode == 0
        ):
            return
        time.sleep(1)


def _listed(project: Project, ref: str) -> dict[str, str]:
    done = subprocess.run(
        [str(GITLAB_CI_LOCAL), "--list-csv", *project.options(ref, {})],
        cwd=project.repo,
        env=project.process_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    rows = [line.split(";") for line in done.stdout.splitlines() if ";" in line]
    return {row[0]: row[2] for row in rows[1:]}


# --- this project's own pipeline -----------------------------------------------------------


def test_projects_own_build_job_builds_the_runner_image(tmp_path: Path, registry: Registry) -> None:
    """.gitlab-ci.yml's build-push, as it is: ci/Dockerfile, the pull registry as build arg."""
    repo = make_repo(tmp_path / "orchestrator-pipeline", commits=0)
    for name in (".gitlab-ci.yml", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, repo / name)
    for folder in ("ci", "stages", "src"):
        shutil.copytree(
            ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "the runner image")
    sha = git(repo, "rev-parse", "HEAD")
    record = tmp_path / "executor.jsonl"
    variables = {
        "GITLAB_CI": "true",
        # gitlab-ci-local's shell executor points CI_PROJECT_DIR at a Docker path.
        "CI_PROJECT_DIR": str(repo / ".gitlab-ci-local/builds/build-push"),
        "NEXUS_REGISTRY": registry.host,
        "NEXUS_REGISTRY_PULL": registry.host,
        "NEXUS_USER": "ci-builder",
        "NEXUS_PASSWORD": "not-a-real-password-1",
        "PIPELINE_BUILD_EXECUTOR": str(EXECUTOR),
        "PIPELINE_BUILD_EXTRA_FLAGS": "--insecure",
        "PIPELINE_RETRY_ATTEMPTS": "1",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CI_", "GITLAB_"))}
    env |= {
        "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
        "STANDIN_PYTHON": sys.executable,
        "STANDIN_RECORD": str(record),
        "NO_COLOR": "1",
    }
    options = ["--force-shell-executor", "--shell-isolation", "--no-artifacts-to-source"]
    options += [f"--variable={key}={value}" for key, value in variables.items()]
    done = subprocess.run(
        [str(GITLAB_CI_LOCAL), *options, "build-push"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=PIPELINE_TIMEOUT,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    (run,) = [json.loads(line) for line in record.read_text().splitlines()]
    workdir = repo / ".gitlab-ci-local/builds/build-push"
    assert f"--dockerfile={workdir}/ci/Dockerfile" in run["argv"]
    assert f"--build-arg=PULL_REGISTRY={registry.host}" in run["argv"]
    assert run["restore"] == dict.fromkeys(
        ("--pre-cleanup", "--preserve-context", "--cleanup"), True
    )
    tag = f"main-{sha[:8]}"
    assert list_tags(registry, "orchestrator-pipeline") == [tag]
    labels = get_config(registry, "orchestrator-pipeline", tag)["config"]["Labels"]
    assert labels["org.opencontainers.image.revision"] == sha
    assert labels["org.opencontainers.image.version"] == tag
