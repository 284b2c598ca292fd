"""The build stage: build the image with Kaniko, push it by its immutable tags, write build.env.

Kaniko runs in this job's own container and rewrites its filesystem (see the
design's "Kaniko in the same container as Python"). So the stage runs only the
fork's executor with its restore mode, imports everything it needs before the
executor starts, only relays its output while it runs (SIGTERM is forwarded by
the shell), and checks afterwards that the interpreter and this package are
still on disk before it writes anything. Outputs go under ``CI_PROJECT_DIR``.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pipeline
from pipeline import artifact, auth
from pipeline.artifact import DRY_RUN_DIGEST, DRY_RUN_DIGEST_SHOWN, BuildEnv
from pipeline.errors import ExternalError, ToolMissingError, UsageError
from pipeline.log import log
from pipeline.retry import call_with_retry
from pipeline.runtime import Runtime
from pipeline.settings import BuildSettings, RegistrySettings, Settings, VaultSettings
from pipeline.tags import TagPlan
from pipeline.tools import kaniko

T = TypeVar("T")

SETTINGS: tuple[type[Settings], ...] = (BuildSettings, VaultSettings)

KANIKO_DIR = Path("/kaniko")
DEFAULT_EXECUTOR = KANIKO_DIR / "executor"
#: Where the executor writes its digest files, under the project directory (a mount).
OUTPUT_DIR = Path(".pipeline") / "build"
#: Lines of the executor's stdout and of its stderr read to classify a failure.
TAIL_LINES = 20
#: What must still be on disk after the executor exits, noted before it starts.
SURVIVORS = (
    (Path(sys.executable), "the Python interpreter"),
    (Path(os.__file__).parent, "Python's standard library"),
    (Path(pipeline.__file__).parent, "the pipeline package"),
)


def run(rt: Runtime) -> None:
    """Build and push the image by its immutable tags, then write build.env."""
    with log.step("plan the build"):
        plan = rt.plan
        build = plan_build(rt, plan)
        _check(rt, build)
        preview = artifact.from_plan(plan, digest=DRY_RUN_DIGEST, commit_sha=rt.context.sha)
        artifact.render(preview)  # the same code writes build.env once the executor is done
    with auth.docker_config(rt) as docker_config, log.step("build and push with kaniko"):
        _execute(rt, build, docker_config)
    if rt.dry_run:
        _show_preview(rt, preview)
        return
    with log.step("write build.env"):
        digest = read_digest(build, plan)
        artifact.write(
            rt.build_env_path, artifact.from_plan(plan, digest=digest, commit_sha=rt.context.sha)
        )
    _summarise(rt, plan, digest)


# --- the plan ---------------------------------------------------------------------------


def plan_build(rt: Runtime, plan: TagPlan) -> kaniko.Build:
    """The executor run for this context: checked inputs, destinations, labels, retries."""
    settings = rt.settings(BuildSettings)
    registry = rt.settings(RegistrySettings)
    context, dockerfile = _inputs(rt.project_dir, settings, dry_run=rt.dry_run)
    outputs = rt.project_dir / OUTPUT_DIR
    cache_repo = settings.cache_repo or f"{rt.image_name}/cache"
    return kaniko.Build(
        executor=_executor(rt, settings),
        context=context,
        dockerfile=dockerfile,
        destinations=tuple(plan.push_ref(tag) for tag in plan.immutable_tags),
        digest_file=outputs / "digest",
        image_name_with_digest_file=outputs / "image-name-with-digest",
        registry_mirror=registry.registry_pull,
        labels=_labels(rt, plan),
        build_args=settings.build_args,
        cache=settings.cache,
        cache_repo=f"{registry.registry}/{cache_repo}",
        push_retry=settings.push_retry,
        image_download_retry=settings.image_download_retry,
        image_fs_extract_retry=settings.image_fs_extract_retry,
        registry_certificates=_certificates(registry),
        target=settings.target,
        extra_flags=settings.flags,
    )


def _inputs(project_dir: Path, settings: BuildSettings, *, dry_run: bool) -> tuple[Path, Path]:
    """The build context and Dockerfile, absolute, both inside the project directory.

    A dry-run shows the build even when they are missing (a laptop checkout may
    not have them yet), with a warning that the real run stops there.
    """
    project = project_dir.resolve()
    context = (project / settings.context).resolve()
    if not context.is_relative_to(project):
        raise UsageError(
            f"PIPELINE_BUILD_CONTEXT: {context} is outside the project directory {project} "
            "(CI_PROJECT_DIR); the build may only see what the job checked out"
        )
    if not context.is_dir():
        _missing(f"PIPELINE_BUILD_CONTEXT: {context} is not a directory", dry_run=dry_run)
    dockerfile = (context / settings.dockerfile).resolve()
    if not dockerfile.is_relative_to(project):
        raise UsageError(
            f"PIPELINE_BUILD_DOCKERFILE: {dockerfile} is outside the project directory {project}"
        )
    if not dockerfile.is_file():
        _missing(
            f"PIPELINE_BUILD_DOCKERFILE: {dockerfile} does not exist "
            f"(the setting is relative to the build context {context})",
            dry_run=dry_run,
        )
    return context, dockerfile


def _missing(problem: str, *, dry_run: bool) -> None:
    if not dry_run:
        raise UsageError(problem)
    log.warn(f"{problem}; the real run stops here")


def _labels(rt: Runtime, plan: TagPlan) -> tuple[tuple[str, str], ...]:
    now = datetime.datetime.now(datetime.UTC)
    return kaniko.oci_labels(
        revision=rt.context.sha,
        source=rt.context.project_url,
        created=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        version=plan.image_tag,
        ref_name=plan.ref_name,
        title=rt.context.project_name,
    )


def _warn_secret_build_args(build: kaniko.Build) -> None:
    for key in kaniko.secret_looking(build.build_args):
        log.warn(
            f"PIPELINE_BUILD_ARGS: {key} looks like a secret; build args are kept in the image's "
            "history for anyone who can pull it: pass secrets with --secret "
            "(PIPELINE_BUILD_EXTRA_FLAGS) and RUN --mount=type=secret instead"
        )


def _certificates(registry: RegistrySettings) -> tuple[tuple[str, Path], ...]:
    """``--registry-certificate`` pairs for both registries when a private CA is configured."""
    if registry.ca_file is None:
        return ()
    if not registry.ca_file.is_file():
        raise UsageError(f"PIPELINE_REGISTRY_CA_FILE: {registry.ca_file} does not exist")
    hosts = dict.fromkeys((registry.registry, registry.registry_pull))
    return tuple((host, registry.ca_file.resolve()) for host in hosts)


def _check(rt: Runtime, build: kaniko.Build) -> None:
    """Refusals and warnings, before any credentials are written or the executor runs."""
    _warn_secret_build_args(build)
    _refuse_kaniko_dir(rt)
    _refuse_credentials_in_context(rt, build)
    require_restore_mode(rt, build.executor)


# --- the executor -----------------------------------------------------------------------


def _executor(rt: Runtime, settings: BuildSettings) -> str:
    """``PIPELINE_BUILD_EXECUTOR``, else /kaniko/executor, else ``executor`` on PATH."""
    if settings.executor:
        found = rt.shell.which(settings.executor)
        if found is None and not rt.dry_run:
            raise ToolMissingError(
                f"PIPELINE_BUILD_EXECUTOR: {settings.executor} is not an executable file"
            )
        return found or settings.executor
    if DEFAULT_EXECUTOR.is_file():
        return str(DEFAULT_EXECUTOR)
    found = rt.shell.which("executor")
    if found is None and not rt.dry_run:
        raise ToolMissingError(
            f"Kaniko executor not found: neither {DEFAULT_EXECUTOR} nor executor on PATH; "
            "run in the runner image or set PIPELINE_BUILD_EXECUTOR"
        )
    return found or str(DEFAULT_EXECUTOR)


def require_restore_mode(rt: Runtime, executor: str) -> None:
    """Refuse an executor whose ``--help`` lacks the fork's restore flags, saying why."""
    if rt.shell.which(executor) is None:
        return  # dry-run without an executor: the shell warns that the real run needs one
    result = rt.shell.run(
        [executor, "--help"], query=True, stream=False, ok_codes=range(256), what="executor --help"
    )
    missing = [flag for flag in kaniko.RESTORE_FLAGS if flag not in result.stdout + result.stderr]
    if missing:
        raise ToolMissingError(
            f"{executor} has no restore mode ({', '.join(missing)} missing from its --help): "
            "upstream Kaniko unpacks the base image over this job's filesystem and never "
            "restores it, so Python and this package would be gone after the build; "
            "use the osscontainertools/kaniko fork >= 1.27.5 (PIPELINE_BUILD_EXECUTOR)"
        )


def _execute(rt: Runtime, build: kaniko.Build, docker_config: Path) -> None:
    if not rt.dry_run:
        _warn_unless_root()
        for output in (build.digest_file, build.image_name_with_digest_file):
            output.parent.mkdir(parents=True, exist_ok=True)
            output.unlink(missing_ok=True)
    log.info(f"executor environment: DOCKER_CONFIG={docker_config}")
    _warn_unprotected(rt, docker_config, "DOCKER_CONFIG (registry credentials)")
    for _, certificate in build.registry_certificates[:1]:
        _warn_unprotected(rt, certificate, "PIPELINE_REGISTRY_CA_FILE")
    run = _ExecutorRun(rt=rt, argv=kaniko.build_argv(build), docker_config=docker_config)
    try:
        call_with_retry(
            run.attempt, policy=rt.shell.policy, classify=_transient, what="kaniko build"
        )
    except ExecutorError as exc:
        check_filesystem()
        raise ExternalError(exc.failure.message(run.attempts)) from exc
    check_filesystem()


def _refuse_credentials_in_context(rt: Runtime, build: kaniko.Build) -> None:
    """Before any credentials are written: never where a COPY would take them into the image."""
    docker_config = rt.settings(VaultSettings).docker_config
    if docker_config is not None and docker_config.resolve().is_relative_to(build.context):
        raise UsageError(
            f"DOCKER_CONFIG: {docker_config} is inside the build context {build.context}: a "
            "COPY of the context would put the registry credentials into the image; use a "
            "directory outside it (the runner image uses /kaniko/.docker)"
        )


def _warn_unprotected(rt: Runtime, path: Path, what: str) -> None:
    """In a job, say so when an input lives where Kaniko's --pre-cleanup may delete it."""
    kept = (KANIKO_DIR, rt.project_dir.resolve())
    if rt.context.in_ci and not any(path.resolve().is_relative_to(root) for root in kept):
        log.warn(
            f"{what} {path} is outside {KANIKO_DIR} and the project directory: Kaniko's "
            "--pre-cleanup may delete it before the build pulls base images; keep it under "
            "/kaniko (as the runner image does) or on a mount"
        )


def _warn_unless_root() -> None:
    if os.geteuid() != 0:
        log.warn(
            f"running as uid {os.geteuid()}: Kaniko unpacks images over / and needs uid 0; "
            "expect permission errors (the runner image runs as root)"
        )


def _refuse_kaniko_dir(rt: Runtime) -> None:
    if rt.environ.get("KANIKO_DIR"):
        raise UsageError(
            "KANIKO_DIR is set: Kaniko does not protect a moved directory from its own "
            "filesystem wipe (upstream issues 3098, 2211); unset it"
        )


class ExecutorError(ExternalError):
    """One executor run failed; ``failure`` says whether another run could succeed."""

    def __init__(self, failure: kaniko.Failure) -> None:
        self.failure = failure
        super().__init__(failure.message())


def _transient(error: BaseException) -> str | None:
    if isinstance(error, ExecutorError) and error.failure.transient:
        return error.failure.reason
    return None


@dataclass(kw_only=True)
class _ExecutorRun:
    """Runs the executor once per attempt; Kaniko prints its final error on stdout."""

    rt: Runtime
    argv: tuple[str, ...]
    docker_config: Path
    attempts: int = 0

    def attempt(self) -> None:
        self.attempts += 1
        result = self.rt.shell.run(
            self.argv,
            env={"DOCKER_CONFIG": str(self.docker_config)},
            ok_codes=range(-64, 256),  # a signal too: it is classified like any failure
            what="kaniko executor",
        )
        if result.returncode != 0:
            tail = _tail(result.stdout) + "\n" + _tail(result.stderr)
            raise ExecutorError(kaniko.classify_failure(result.returncode, tail))


def _tail(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-TAIL_LINES:])


def check_filesystem() -> None:
    """Fail, naming the cause, when the executor left this container without Python."""
    for path, what in SURVIVORS:
        if not path.exists():
            raise ExternalError(
                f"{path} ({what}) is gone after the executor exited: Kaniko wiped this "
                "container's filesystem and did not restore it (killed before its --cleanup, "
                "or restore mode not in effect); build.env was not written; rerun the job"
            )


# --- results ----------------------------------------------------------------------------


def read_digest(build: kaniko.Build, plan: TagPlan) -> str:
    """The pushed image's digest from the executor's digest files, cross-checked."""
    digest = _parse(build.digest_file, kaniko.parse_digest_file)
    repositories = _parse(
        build.image_name_with_digest_file,
        lambda text: kaniko.parse_image_names(text, digest=digest),
    )
    if set(repositories) != {plan.push_repository}:
        raise ExternalError(
            f"{build.image_name_with_digest_file}: the executor pushed to "
            f"{', '.join(sorted(set(repositories)))}, expected {plan.push_repository}"
        )
    return digest


def _parse(path: Path, parser: Callable[[str], T]) -> T:
    try:
        return parser(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExternalError(f"{path}: the executor succeeded but did not write it") from None
    except (OSError, UnicodeDecodeError, kaniko.OutputError) as exc:
        raise ExternalError(f"{path}: {exc}") from None


def _show_preview(rt: Runtime, preview: BuildEnv) -> None:
    log.info(
        f"build.env that would be written to {rt.build_env_path} (digest known after the push):"
    )
    for line in artifact.render(preview).splitlines():
        log.data(line.replace(DRY_RUN_DIGEST, DRY_RUN_DIGEST_SHOWN))


def _summarise(rt: Runtime, plan: TagPlan, digest: str) -> None:
    for tag in plan.immutable_tags:
        log.fact("pushed", f"{plan.push_ref(tag)}@{digest}")
    log.fact("pull by digest", f"{plan.pull_repository}@{digest}")
    log.fact("build.env", str(rt.build_env_path))
