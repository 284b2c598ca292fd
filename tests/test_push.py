"""The push stage end to end: real registries, real skopeo, real git, the CLI in a subprocess."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from pipeline import artifact
from tests.clirun import base_env, error_lines, run_cli
from tests.gitrepo import git, make_repo
from tests.infra.faultproxy import FaultProxy
from tests.infra.oci import ImageSpec, push_multiarch_index, write_docker_archive
from tests.infra.ports import free_port
from tests.infra.registry import (
    Registry,
    RegistryPair,
    get_manifest,
    list_tags,
    manifest_digest,
    skopeo,
    skopeo_copy_archive,
)

FaultProxyFactory = Callable[..., FaultProxy]
REVISION = "org.opencontainers.image.revision"
ABSENT_DIGEST = "sha256:" + "0" * 64

pytestmark = pytest.mark.registry


@dataclass(frozen=True, kw_only=True)
class Built:
    """An image pushed by its immutable tag, as the build stage leaves it."""

    tag: str
    digest: str
    commit: str


def commits(repo: Path) -> list[str]:
    """The repository's commits, oldest first."""
    return git(repo, "rev-list", "--reverse", "HEAD").split()


def spec_for(commit: str, **options: str) -> ImageSpec:
    return ImageSpec(layers=[{"app/commit": commit.encode()}], labels={REVISION: commit}, **options)


def push_image(
    tmp_path: Path, registry: Registry, repo: str, commit: str, *, tag: str = "", created: str = ""
) -> Built:
    """Write and push an image labelled with ``commit`` (``created`` overrides its date)."""
    tag = tag or f"main-{commit[:8]}"
    archive = write_docker_archive(tmp_path / f"{repo}-{tag}.tar", spec_for(commit)).path
    if created:
        archive = dated(archive, created)
    digest = skopeo_copy_archive(archive, f"{repo}:{tag}", registry=registry)
    return Built(tag=tag, digest=digest, commit=commit)


def dated(archive: Path, created: str) -> Path:
    """A copy of a docker-archive whose config says it was created at ``created``."""
    out = archive.with_name(f"{archive.stem}-dated.tar")
    with tarfile.open(archive) as source, tarfile.open(out, "w") as target:
        manifest = json.loads(member_bytes(source, "manifest.json"))
        config = json.loads(member_bytes(source, manifest[0]["Config"]))
        skipped = {"manifest.json", manifest[0]["Config"]}
        for member in source.getmembers():
            if member.name not in skipped:
                target.addfile(member, source.extractfile(member) if member.isfile() else None)
        config_bytes = json.dumps({**config, "created": created}).encode()
        manifest[0]["Config"] = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
        add_member(target, manifest[0]["Config"], config_bytes)
        add_member(target, "manifest.json", json.dumps(manifest).encode())
    return out


def member_bytes(tar: tarfile.TarFile, name: str) -> bytes:
    stream = tar.extractfile(name)
    assert stream is not None, name
    return stream.read()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_build_env(
    path: Path, built: Built, *, push: str, pull: str, moving: Sequence[str] = ("latest",)
) -> Path:
    """build.env for ``built``; ``push``/``pull`` are the repositories (host/name)."""
    env = artifact.make(
        image_tag=built.tag,
        digest=built.digest,
        push_repository=push,
        pull_repository=pull,
        immutable_tags=(built.tag,),
        moving_tags=tuple(moving),
        commit_sha=built.commit,
    )
    artifact.write(path, env)
    return path


def job_env(
    project: Path, build_env: Path, *, push: str, pull: str, **extra: str
) -> dict[str, str]:
    """The push job's environment: registries by host, plain http, fast retries."""
    home = project.parent / "home"
    home.mkdir(exist_ok=True)
    values = {
        "HOME": str(home),
        "CI_PROJECT_DIR": str(project),
        "PIPELINE_BUILD_ENV": str(build_env),
        "NEXUS_REGISTRY": push,
        "NEXUS_REGISTRY_PULL": pull,
        "PIPELINE_REGISTRY_TLS_VERIFY": "false",
        "PIPELINE_RETRY_INITIAL_SECONDS": "0",
        "PIPELINE_RETRY_MAX_SECONDS": "0.1",
        "PIPELINE_PUSH_PULL_WAIT_INTERVAL_SECONDS": "0.2",
    }
    return base_env(**{**values, **extra})


@dataclass(frozen=True, kw_only=True)
class Job:
    """One push job set up against a push and a pull registry."""

    tmp_path: Path
    project: Path
    repo: str
    push_host: str
    pull_host: str

    def build_env(self, built: Built, name: str = "build.env", **options: Sequence[str]) -> Path:
        return write_build_env(
            self.tmp_path / name,
            built,
            push=f"{self.push_host}/{self.repo}",
            pull=f"{self.pull_host}/{self.repo}",
            **options,
        )

    def run(
        self,
        built: Built,
        *args: str,
        project: Path | None = None,
        variables: Mapping[str, str] | None = None,
        **extra: str,
    ) -> subprocess.CompletedProcess[str]:
        """``pipeline push`` (``--execute`` unless ``args`` say otherwise) for ``built``."""
        build_env = self.build_env(built)
        more = {**(variables or {}), **extra}
        env = job_env(
            project or self.project, build_env, push=self.push_host, pull=self.pull_host, **more
        )
        return run_cli(["push", *(args or ("--execute",))], env=env, cwd=self.tmp_path)


@pytest.fixture
def job(tmp_path: Path, registry_pair: RegistryPair, repo: str) -> Job:
    project = make_repo(tmp_path / "project", commits=2)
    return Job(
        tmp_path=tmp_path,
        project=project,
        repo=repo,
        push_host=registry_pair.push.host,
        pull_host=registry_pair.pull.host,
    )


def only_error(done: subprocess.CompletedProcess[str]) -> str:
    """The one ``pipeline: error:`` line of a failed run."""
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    return lines[0]


# --- promotion ---------------------------------------------------------------------------


def test_promotes_by_digest_and_waits_for_the_pull_registry(
    job: Job, registry_pair: RegistryPair
) -> None:
    built = push_image(job.tmp_path, registry_pair.push, job.repo, commits(job.project)[1])

    done = job.run(built)

    assert done.returncode == 0, done.stderr
    assert manifest_digest(registry_pair.push, job.repo, "latest") == built.digest
    assert manifest_digest(registry_pair.pull, job.repo, "latest") == built.digest
    assert "skopeo copy --all --preserve-digests" in done.stderr
    assert "the pull registry serves" in done.stderr
    assert f"latest: {built.digest}" in done.stderr  # the summary
    assert "PIPELINE_REGISTRY_TLS_VERIFY=false: registry certificates are not verified" in (
        done.stderr
    )


def test_every_moving_tag_is_promoted(job: Job, registry_pair: RegistryPair) -> None:
    built = push_image(
        job.tmp_path, registry_pair.push, job.repo, commits(job.project)[1], tag="1.2.3"
    )
    build_env = job.build_env(built, moving=("stable", "latest"))
    env = job_env(job.project, build_env, push=job.push_host, pull=job.pull_host)

    done = run_cli(["push", "--execute"], env=env)

    assert done.returncode == 0, done.stderr
    for tag in ("stable", "latest"):
        assert manifest_digest(registry_pair.push, job.repo, tag) == built.digest


def test_no_moving_tag_says_so_and_contacts_nothing(
    job: Job, registry: Registry, fault_proxy: FaultProxyFactory
) -> None:
    proxy = fault_proxy(registry, steady_status=503)
    built = Built(tag="branch-x-1234abcd", digest=ABSENT_DIGEST, commit=commits(job.project)[1])
    build_env = write_build_env(
        job.tmp_path / "build.env", built, push=f"{proxy.host}/r", pull=f"{proxy.host}/r", moving=()
    )
    env = job_env(job.project, build_env, push=proxy.host, pull=proxy.host)

    done = run_cli(["push", "--execute"], env=env)

    assert done.returncode == 0, done.stderr
    assert "no moving tag for branch-x-1234abcd" in done.stderr
    assert proxy.requests == 0


def test_a_tag_already_on_the_digest_is_left_alone(job: Job, registry_pair: RegistryPair) -> None:
    built = push_image(job.tmp_path, registry_pair.push, job.repo, commits(job.project)[1])
    assert job.run(built).returncode == 0

    again = job.run(built)

    assert again.returncode == 0, again.stderr
    assert "already points at" in again.stderr
    assert "skopeo copy" not in again.stderr


def test_a_multiarch_index_is_promoted_whole(job: Job, registry_pair: RegistryPair) -> None:
    commit = commits(job.project)[1]
    archives = {
        platform: write_docker_archive(
            job.tmp_path / f"{arch}.tar", spec_for(commit, architecture=arch)
        ).path
        for platform, arch in (("linux/amd64", "amd64"), ("linux/arm64", "arm64"))
    }
    tag = f"main-{commit[:8]}"
    index = push_multiarch_index(registry_pair.push, job.repo, tag, archives)

    done = job.run(Built(tag=tag, digest=index, commit=commit))

    assert done.returncode == 0, done.stderr
    promoted = get_manifest(registry_pair.push, job.repo, "latest")
    assert promoted.digest == index
    assert promoted.is_index
    assert len(promoted.content["manifests"]) == 2


def test_dry_run_prints_the_commands_and_contacts_no_registry(
    job: Job, registry: Registry, fault_proxy: FaultProxyFactory
) -> None:
    proxy = fault_proxy(registry, steady_status=503)
    built = Built(tag="main-1234abcd", digest=ABSENT_DIGEST, commit=commits(job.project)[1])
    dry = replace(job, push_host=proxy.host, pull_host=proxy.host)

    done = dry.run(built, "--dry-run")

    assert done.returncode == 0, done.stderr
    copy = "skopeo copy --all --preserve-digests --src-tls-verify=false"
    assert copy in done.stderr
    assert (
        f"docker://{proxy.host}/{job.repo}@{ABSENT_DIGEST} docker://{proxy.host}/{job.repo}:latest"
        in done.stderr
    )
    assert "dry-run: not run" in done.stderr
    assert proxy.requests == 0


# --- faults and retries ------------------------------------------------------------------


def test_promotion_succeeds_through_30_percent_faults(
    job: Job, registry_pair: RegistryPair, fault_proxy: FaultProxyFactory
) -> None:
    built = push_image(job.tmp_path, registry_pair.push, job.repo, commits(job.project)[1])
    proxy = fault_proxy(registry_pair.push, fault_rate=0.3, seed=4)
    faulty = replace(job, push_host=proxy.host)

    done = faulty.run(built, PIPELINE_RETRY_ATTEMPTS="20")

    assert done.returncode == 0, done.stderr
    assert manifest_digest(registry_pair.push, job.repo, "latest") == built.digest
    assert proxy.faults > 0
    assert {"503", "429", "reset"} <= {seen.outcome for seen in proxy.seen}
    assert "retry" in done.stderr


def test_a_steady_401_fails_after_exactly_one_attempt(
    job: Job, registry_pair: RegistryPair, fault_proxy: FaultProxyFactory
) -> None:
    built = push_image(job.tmp_path, registry_pair.push, job.repo, commits(job.project)[1])
    proxy = fault_proxy(registry_pair.push, steady_status=401)
    one_attempt = skopeo(
        "inspect",
        "--raw",
        "--tls-verify=false",
        f"docker://{proxy.host}/{job.repo}:{built.tag}",
        check=False,
    )
    requests_per_attempt = proxy.requests
    assert one_attempt.returncode != 0
    refused = replace(job, push_host=proxy.host)

    done = refused.run(built)

    assert done.returncode == 2
    assert "refused the credentials (401 unauthorized)" in only_error(done)
    assert "NEXUS_USER/NEXUS_PASSWORD" in only_error(done)
    assert proxy.requests == 2 * requests_per_attempt
    assert "retry" not in done.stderr


def test_a_steady_503_is_retried_then_fails_with_exit_4(
    job: Job, registry_pair: RegistryPair, fault_proxy: FaultProxyFactory
) -> None:
    built = push_image(job.tmp_path, registry_pair.push, job.repo, commits(job.project)[1])
    proxy = fault_proxy(registry_pair.push, steady_status=503)
    skopeo(
        "inspect",
        "--raw",
        "--tls-verify=false",
        f"docker://{proxy.host}/{job.repo}:{built.tag}",
        check=False,
    )
    requests_per_attempt = proxy.requests

    done = replace(job, push_host=proxy.host).run(built, PIPELINE_RETRY_ATTEMPTS="3")

    assert done.returncode == 4
    assert "503 (Service Unavailable)" in only_error(done)
    assert "retry 3/3" in done.stderr
    assert proxy.requests == (1 + 3) * requests_per_attempt


def test_a_steady_403_names_the_missing_right(
    job: Job, registry_pair: RegistryPair, fault_proxy: FaultProxyFactory
) -> None:
    built = push_image(job.tmp_path, registry_pair.push, job.repo, commits(job.project)[1])
    proxy = fault_proxy(registry_pair.push, steady_status=403)

    done = replace(job, push_host=proxy.host).run(built)

    assert done.returncode == 2
    assert "denied" in only_error(done)
    assert "lacks this right" in only_error(done)


# --- commit order ------------------------------------------------------------------------


def test_out_of_order_pipelines_never_move_the_tag_backwards(
    job: Job, registry_pair: RegistryPair
) -> None:
    older_commit, newer_commit = commits(job.project)
    older = push_image(job.tmp_path, registry_pair.push, job.repo, older_commit)
    newer = push_image(job.tmp_path, registry_pair.push, job.repo, newer_commit)

    first = job.run(newer)
    late = job.run(older)

    assert first.returncode == 0, first.stderr
    assert late.returncode == 0, late.stderr
    assert manifest_digest(registry_pair.push, job.repo, "latest") == newer.digest
    warning = f"pipeline: warning: not moving latest: it holds {newer_commit[:8]}, a newer commit"
    assert warning in late.stderr
    assert "skopeo copy" not in late.stderr


def test_a_newer_commit_moves_the_tag_forward(job: Job, registry_pair: RegistryPair) -> None:
    older_commit, newer_commit = commits(job.project)
    older = push_image(job.tmp_path, registry_pair.push, job.repo, older_commit)
    newer = push_image(job.tmp_path, registry_pair.push, job.repo, newer_commit)

    assert job.run(older).returncode == 0
    done = job.run(newer)

    assert done.returncode == 0, done.stderr
    assert manifest_digest(registry_pair.push, job.repo, "latest") == newer.digest
    assert f"it holds {older_commit[:8]}, an ancestor of {newer_commit[:8]}" in done.stderr


def test_force_moves_the_tag_backwards_on_purpose(job: Job, registry_pair: RegistryPair) -> None:
    older_commit, newer_commit = commits(job.project)
    older = push_image(job.tmp_path, registry_pair.push, job.repo, older_commit)
    newer = push_image(job.tmp_path, registry_pair.push, job.repo, newer_commit)
    assert job.run(newer).returncode == 0

    done = job.run(older, PIPELINE_PUSH_FORCE="true")

    assert done.returncode == 0, done.stderr
    assert manifest_digest(registry_pair.push, job.repo, "latest") == older.digest
    assert "PIPELINE_PUSH_FORCE=true: moving latest without checking commit order" in done.stderr


@pytest.mark.parametrize(
    ("deepen", "fetches"),
    [
        ("200", ["--deepen=200 origin"]),
        ("1", ["--deepen=1 origin", "--unshallow origin"]),
    ],
)
def test_a_shallow_clone_is_deepened_to_order_the_commits(
    job: Job, registry_pair: RegistryPair, deepen: str, fetches: list[str]
) -> None:
    origin = make_repo(job.tmp_path / "origin", commits=4)
    first, *_, last = commits(origin)
    clone = job.tmp_path / "clone"
    git(job.tmp_path, "clone", "-q", "--depth", "1", f"file://{origin}", str(clone))
    assert git(clone, "rev-parse", "--is-shallow-repository") == "true"
    old = push_image(job.tmp_path, registry_pair.push, job.repo, first)
    new = push_image(job.tmp_path, registry_pair.push, job.repo, last)
    assert job.run(old, project=origin).returncode == 0

    done = job.run(new, project=clone, PIPELINE_PUSH_GIT_DEEPEN=deepen)

    assert done.returncode == 0, done.stderr
    ran = [line.removeprefix("+ git fetch --no-tags --quiet ") for line in done.stderr.splitlines()]
    assert [line for line in ran if line.startswith("--")] == fetches
    assert f"it holds {first[:8]}, an ancestor of {last[:8]}" in done.stderr
    assert manifest_digest(registry_pair.push, job.repo, "latest") == new.digest


def test_without_a_checkout_creation_time_decides_and_says_so(
    job: Job, registry_pair: RegistryPair
) -> None:
    elsewhere = job.tmp_path / "no-checkout"
    elsewhere.mkdir()
    first = push_image(job.tmp_path, registry_pair.push, job.repo, "a" * 40)
    second = push_image(job.tmp_path, registry_pair.push, job.repo, "b" * 40)
    assert job.run(first, project=elsewhere).returncode == 0

    done = job.run(second, project=elsewhere)

    assert done.returncode == 0, done.stderr
    assert f"{elsewhere} is not a git checkout" in done.stderr
    assert "ancestry cannot order the two images; comparing their creation times" in done.stderr
    # tests.infra.oci gives every image the same creation time: not after, so it moves.
    assert manifest_digest(registry_pair.push, job.repo, "latest") == second.digest


def test_creation_time_keeps_a_newer_image_when_ancestry_is_unknown(
    job: Job, registry_pair: RegistryPair
) -> None:
    elsewhere = job.tmp_path / "no-checkout"
    elsewhere.mkdir()
    newer = push_image(
        job.tmp_path, registry_pair.push, job.repo, "a" * 40, created="2030-01-01T00:00:00Z"
    )
    older = push_image(job.tmp_path, registry_pair.push, job.repo, "b" * 40)
    assert job.run(newer, project=elsewhere).returncode == 0

    done = job.run(older, project=elsewhere)

    assert done.returncode == 0, done.stderr
    assert "comparing their creation times" in done.stderr
    assert "not moving latest: it holds an image created 2030-01-01 00:00:00+00:00, after" in (
        done.stderr
    )
    assert manifest_digest(registry_pair.push, job.repo, "latest") == newer.digest


def test_an_unknown_commit_falls_back_after_trying_to_fetch_it(
    job: Job, registry_pair: RegistryPair
) -> None:
    token = "job-token-5f3a9c"  # a made-up CI_JOB_TOKEN
    closed = f"127.0.0.1:{free_port()}"
    git(job.project, "remote", "add", "origin", f"http://gitlab-ci-token:{token}@{closed}/g/p.git")
    stranger = push_image(job.tmp_path, registry_pair.push, job.repo, "c" * 40)
    ours = push_image(job.tmp_path, registry_pair.push, job.repo, commits(job.project)[1])
    assert job.run(stranger).returncode == 0

    done = job.run(ours)

    assert done.returncode == 0, done.stderr
    assert f"git fetch --no-tags --quiet origin {'c' * 40}" in done.stderr
    assert "is not in the checkout, even after fetching" in done.stderr
    assert manifest_digest(registry_pair.push, job.repo, "latest") == ours.digest
    assert token not in done.stderr + done.stdout


def test_diverged_histories_fall_back_to_creation_time(
    job: Job, registry_pair: RegistryPair
) -> None:
    base, ours_commit = commits(job.project)
    git(job.project, "switch", "-q", "-c", "rewritten", base)
    git(job.project, "commit", "-q", "--allow-empty", "-m", "rewritten history")
    theirs_commit = git(job.project, "rev-parse", "HEAD")
    theirs = push_image(job.tmp_path, registry_pair.push, job.repo, theirs_commit)
    ours = push_image(job.tmp_path, registry_pair.push, job.repo, ours_commit)
    assert job.run(theirs).returncode == 0

    done = job.run(ours)

    assert done.returncode == 0, done.stderr
    diverged = f"{theirs_commit[:8]} and {ours_commit[:8]} are on diverged histories"
    assert f"{diverged} (a rewritten branch?): ancestry cannot order the two images" in done.stderr
    assert manifest_digest(registry_pair.push, job.repo, "latest") == ours.digest


def test_a_tag_on_an_index_without_this_platform_is_still_ordered(
    job: Job, registry_pair: RegistryPair
) -> None:
    older_commit, newer_commit = commits(job.project)
    arm_only = {
        "linux/arm64": write_docker_archive(
            job.tmp_path / "arm64.tar", spec_for(older_commit, architecture="arm64")
        ).path
    }
    index = push_multiarch_index(registry_pair.push, job.repo, "latest", arm_only)
    ours = push_image(job.tmp_path, registry_pair.push, job.repo, newer_commit)

    done = job.run(ours)

    assert done.returncode == 0, done.stderr
    assert "an index without an image for this platform; labels unread" in done.stderr
    assert f"latest: {ours.digest}" in done.stderr
    assert manifest_digest(registry_pair.push, job.repo, "latest") != index


# --- the pull registry -------------------------------------------------------------------


def test_the_wait_for_the_pull_registry_is_bounded(
    job: Job, registry_pair: RegistryPair, registry: Registry
) -> None:
    built = push_image(job.tmp_path, registry_pair.push, job.repo, commits(job.project)[1])
    unrelated_pull = replace(job, pull_host=registry.host)

    done = unrelated_pull.run(built, PIPELINE_PUSH_PULL_WAIT_SECONDS="0.5")

    assert done.returncode == 4
    line = only_error(done)
    assert f"the pull registry gave no image (reading manifest {built.tag} in" in line
    assert f"after waiting 0.5s, not IMAGE_DIGEST {built.digest}" in line
    assert "PIPELINE_PUSH_PULL_WAIT_SECONDS" in line


# --- credentials and TLS -----------------------------------------------------------------


@pytest.fixture
def tls_job(tmp_path: Path, tls_registry: Registry, repo: str) -> Job:
    """A push job against the TLS + basic auth registry (it is its own pull registry)."""
    project = make_repo(tmp_path / "project", commits=2)
    host = tls_registry.host
    return Job(tmp_path=tmp_path, project=project, repo=repo, push_host=host, pull_host=host)


def tls_env(tls_registry: Registry, docker_config: Path, **extra: str) -> dict[str, str]:
    """TLS verified against the test CA, credentials in the job's variables."""
    assert tls_registry.ca_cert is not None
    assert tls_registry.username is not None
    values = {
        "PIPELINE_REGISTRY_TLS_VERIFY": "true",
        "PIPELINE_REGISTRY_CA_FILE": str(tls_registry.ca_cert),
        "NEXUS_USER": tls_registry.username,
        "NEXUS_PASSWORD": tls_registry.password or "",
        "DOCKER_CONFIG": str(docker_config),
    }
    return {**values, **extra}


def assert_nowhere(
    secrets: Sequence[str], done: subprocess.CompletedProcess[str], root: Path
) -> None:
    """No secret in the output, nor in any file under ``root``."""
    for secret in secrets:
        assert secret not in done.stdout + done.stderr
        for path in root.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


def test_tls_registry_with_credentials_and_a_private_ca(
    tls_job: Job, tls_registry: Registry
) -> None:
    built = push_image(tls_job.tmp_path, tls_registry, tls_job.repo, commits(tls_job.project)[1])
    docker_config = tls_job.tmp_path / "docker"

    done = tls_job.run(built, variables=tls_env(tls_registry, docker_config))

    assert done.returncode == 0, done.stderr
    assert manifest_digest(tls_registry, tls_job.repo, "latest") == built.digest
    assert "--cert-dir" in done.stderr
    assert "--dest-authfile" in done.stderr
    assert not (docker_config / "config.json").exists()
    password = tls_registry.password or ""
    auth = base64.b64encode(f"{tls_registry.username}:{password}".encode()).decode()
    assert_nowhere([password, auth], done, tls_job.tmp_path)


def test_wrong_credentials_fail_with_one_line_and_no_secret(
    tls_job: Job, tls_registry: Registry
) -> None:
    built = push_image(tls_job.tmp_path, tls_registry, tls_job.repo, commits(tls_job.project)[1])
    wrong = "wrong-" + (tls_registry.password or "")[:8]
    env = tls_env(tls_registry, tls_job.tmp_path / "docker", NEXUS_PASSWORD=wrong)

    done = tls_job.run(built, variables=env)

    assert done.returncode == 2
    line = only_error(done)
    assert f"{tls_registry.host} refused the credentials (401 unauthorized)" in line
    assert "retry" not in done.stderr
    assert_nowhere([wrong, tls_registry.password or ""], done, tls_job.tmp_path)


def test_a_registry_certificate_from_an_unknown_ca_names_the_setting(
    tls_job: Job, tls_registry: Registry
) -> None:
    built = push_image(tls_job.tmp_path, tls_registry, tls_job.repo, commits(tls_job.project)[1])
    env = tls_env(tls_registry, tls_job.tmp_path / "docker")
    del env["PIPELINE_REGISTRY_CA_FILE"]

    done = tls_job.run(built, variables=env)

    assert done.returncode == 2
    line = only_error(done)
    assert f"TLS with {tls_registry.host} failed" in line
    assert "x509" in line
    assert "set PIPELINE_REGISTRY_CA_FILE" in line


def test_a_missing_ca_file_is_a_settings_error(tls_job: Job, tls_registry: Registry) -> None:
    built = Built(tag="main-1234abcd", digest=ABSENT_DIGEST, commit=commits(tls_job.project)[1])
    env = tls_env(tls_registry, tls_job.tmp_path / "docker")
    env["PIPELINE_REGISTRY_CA_FILE"] = str(tls_job.tmp_path / "absent.pem")

    done = tls_job.run(built, variables=env)

    assert done.returncode == 2
    assert "PIPELINE_REGISTRY_CA_FILE" in only_error(done)
    assert "is not a file" in only_error(done)


# --- bad input ---------------------------------------------------------------------------


def test_missing_build_env(job: Job) -> None:
    env = job_env(job.project, job.tmp_path / "absent.env", push=job.push_host, pull=job.pull_host)

    done = run_cli(["push", "--execute"], env=env)

    assert done.returncode == 2
    assert "build.env not found" in only_error(done)
    assert "absent.env does not exist" in only_error(done)


def test_malformed_build_env(job: Job) -> None:
    build_env = job.tmp_path / "build.env"
    build_env.write_text("IMAGE_TAG main-1234abcd\n")
    env = job_env(job.project, build_env, push=job.push_host, pull=job.pull_host)

    done = run_cli(["push", "--execute"], env=env)

    assert done.returncode == 2
    assert "line 1 has no '='" in only_error(done)


@pytest.mark.parametrize("moving", ["-latest", "lat:est"])
def test_invalid_moving_tag_name(job: Job, moving: str) -> None:
    built = Built(tag="main-1234abcd", digest=ABSENT_DIGEST, commit=commits(job.project)[1])
    build_env = job.build_env(built)
    text = build_env.read_text().replace("IMAGE_MOVING_TAGS=latest", f"IMAGE_MOVING_TAGS={moving}")
    build_env.write_text(text)
    env = job_env(job.project, build_env, push=job.push_host, pull=job.pull_host)

    done = run_cli(["push", "--execute"], env=env)

    assert done.returncode == 2
    assert f"IMAGE_MOVING_TAGS {moving!r} is not a valid Docker tag" in only_error(done)


def test_a_moving_tag_that_is_also_immutable(job: Job) -> None:
    built = Built(tag="main-1234abcd", digest=ABSENT_DIGEST, commit=commits(job.project)[1])

    build_env = job.build_env(built, moving=("main-1234abcd",))
    env = job_env(job.project, build_env, push=job.push_host, pull=job.pull_host)

    done = run_cli(["push", "--execute"], env=env)

    assert done.returncode == 2
    assert "would overwrite an immutable one" in only_error(done)


def test_digest_not_in_the_registry(job: Job) -> None:
    built = Built(tag="main-1234abcd", digest=ABSENT_DIGEST, commit=commits(job.project)[1])

    done = job.run(built)

    assert done.returncode == 2
    line = only_error(done)
    assert (
        f"neither {job.push_host}/{job.repo}:main-1234abcd nor IMAGE_DIGEST {ABSENT_DIGEST}" in line
    )
    assert "retry" not in done.stderr  # a 404 is permanent


def test_an_immutable_tag_moved_to_another_digest(job: Job, registry_pair: RegistryPair) -> None:
    commit = commits(job.project)[1]
    built = push_image(job.tmp_path, registry_pair.push, job.repo, commit)
    intruder = push_image(job.tmp_path, registry_pair.push, job.repo, "d" * 40, tag=built.tag)

    done = job.run(built)

    assert done.returncode == 2
    line = only_error(done)
    assert f"resolves to {intruder.digest}, not to IMAGE_DIGEST {built.digest}" in line
    assert "is still in the registry" in line
    assert "latest" not in list_tags(registry_pair.push, job.repo)


def test_an_unreachable_registry(job: Job) -> None:
    built = Built(tag="main-1234abcd", digest=ABSENT_DIGEST, commit=commits(job.project)[1])
    closed = f"127.0.0.1:{free_port()}"

    done = replace(job, push_host=closed).run(built, PIPELINE_RETRY_ATTEMPTS="2")

    assert done.returncode == 4
    line = only_error(done)
    assert f"{closed} is unreachable" in line
    assert "connection refused" in line
    assert "retry 2/2" in done.stderr


def test_a_lagging_pull_registry_is_polled_until_it_serves_the_digest(
    job: Job, registry_pair: RegistryPair, fault_proxy: FaultProxyFactory
) -> None:
    built = push_image(job.tmp_path, registry_pair.push, job.repo, commits(job.project)[1])
    # Seed 1 answers the first look at the pull registry with a 503: it lags.
    lagging = fault_proxy(registry_pair.pull, fault_rate=0.5, faults=("503",), seed=1)

    done = replace(job, pull_host=lagging.host).run(built)

    assert done.returncode == 0, done.stderr
    assert lagging.seen[0].outcome == "503"
    assert "looking again in 0.2s" in done.stderr
    assert f"the pull registry serves {built.digest}" in done.stderr


def test_a_git_remote_that_looks_like_an_option_is_refused(job: Job) -> None:
    built = Built(tag="main-1234abcd", digest=ABSENT_DIGEST, commit=commits(job.project)[1])

    done = job.run(built, PIPELINE_PUSH_GIT_REMOTE="--upload-pack=touch /tmp/x")

    assert done.returncode == 2
    assert only_error(done).startswith("pipeline: error: PIPELINE_PUSH_GIT_REMOTE:")
