"""``pipeline run``: every stage in pipeline order, in one process.

Outside GitLab CI this is a dry-run, the default: each stage prints the
commands it would run, and the later stages read the build.env the build stage
would write (its digest is a placeholder, said so in the output). A stage whose
inputs are missing on this machine (no Dockerfile, no DEV server settings)
says what the real run would stop on, and the preview goes on with the next
stage. With ``--execute`` the stages run for real, each reading what the one
before wrote, and the first failure stops the run with its exit code.

A pipeline started with ``DEPLOY_ONLY=true`` runs deploy-dev alone, as the
workflow rules of ``ci/pipeline.yml`` do.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

from pipeline import artifact
from pipeline.artifact import BuildEnv
from pipeline.cli import COMMANDS, Command
from pipeline.errors import UsageError
from pipeline.log import log
from pipeline.runtime import Runtime
from pipeline.settings import DeploySettings, Settings
from pipeline.shell import Call, Shell

#: The stages in the order the pipeline runs them.
STAGES: tuple[Command, ...] = tuple(command for command in COMMANDS if command.stage)
#: Stands in for the digest in a dry-run's planned build.env: nothing was pushed.
PLACEHOLDER_DIGEST = artifact.DRY_RUN_DIGEST
PLACEHOLDER_LABEL = artifact.DRY_RUN_DIGEST_SHOWN


#: Each stage's module (``run(rt)`` and ``SETTINGS``), by stage name.
MODULES: dict[str, ModuleType] = {c.name: importlib.import_module(c.module) for c in STAGES}
#: Every stage's settings, validated together before the first stage starts.
SETTINGS: tuple[type[Settings], ...] = tuple(
    dict.fromkeys(model for module in MODULES.values() for model in module.SETTINGS)
)


@dataclass(kw_only=True)
class StageRun:
    """One stage of the run: the commands it asked for, and why it stopped (dry-run)."""

    name: str
    calls: list[Call]
    #: Dry-run only: the input problem the real run would stop on here.
    stopped: str | None = None


def run(rt: Runtime) -> None:
    """Run the selected stages in order (a dry-run outside GitLab CI)."""
    try:
        runs = run_stages(rt, selected_stages(rt))
    finally:
        log.summary()
    if rt.dry_run:
        _report_dry_run(runs)


def selected_stages(rt: Runtime) -> tuple[Command, ...]:
    """The stages this run covers: all, deploy-dev alone for DEPLOY_ONLY, minus ``--skip``."""
    skip = set(rt.options.get("skip") or ())
    if rt.settings(DeploySettings).deploy_only:
        log.info("DEPLOY_ONLY=true: deploy-dev alone, without a build (as the pipeline does)")
        skip |= {c.name for c in STAGES if c.name != "deploy-dev"}
    return tuple(c for c in STAGES if c.name not in skip)


def run_stages(rt: Runtime, stages: Sequence[Command]) -> list[StageRun]:
    """Each stage on its own shell; under dry-run the later stages get the planned build.env."""
    runs: list[StageRun] = []
    planned: BuildEnv | None = None
    _ = rt.context  # detected once, here, and shared by every stage
    for command in stages:
        shell = Shell(dry_run=rt.dry_run, policy=rt.shell.policy, base_env=rt.shell.base_env)
        stage_rt = rt.for_stage(command.name, shell, planned_build_env=planned)
        stopped = _run_stage(stage_rt, command)
        runs.append(StageRun(name=command.name, calls=shell.history, stopped=stopped))
        if rt.dry_run and command.name == "build":
            planned = planned_build_env(rt)
            _announce(planned)
    return runs


def _run_stage(rt: Runtime, command: Command) -> str | None:
    stage: Callable[[Runtime], object] = MODULES[command.name].run
    with log.section(f"stage {command.name}"):
        try:
            stage(rt)
        except UsageError as exc:
            return _stop(rt, command, exc)
    return None


def _stop(rt: Runtime, command: Command, exc: UsageError) -> str:
    """Under --execute the error ends the run; a dry-run notes it and previews on."""
    if not rt.dry_run:
        raise exc
    reason = "; ".join(getattr(exc, "problems", None) or [str(exc)])
    log.warn(f"{command.name}: the real run would stop here: {reason}")
    return reason


def planned_build_env(rt: Runtime) -> BuildEnv:
    """The build.env the build stage would write for this context, digest unknown."""
    return artifact.from_plan(rt.plan, digest=PLACEHOLDER_DIGEST, commit_sha=rt.context.sha)


def _announce(planned: BuildEnv) -> None:
    log.warn(
        f"dry-run: the later stages read the build.env the build stage would write; its "
        f"IMAGE_DIGEST {PLACEHOLDER_DIGEST} is a placeholder (the digest exists only after "
        f"the push), shown as {PLACEHOLDER_LABEL} in the plan"
    )
    log.info(f"planned image: {planned.IMAGE_PUSH_REPOSITORY}:{planned.IMAGE_TAG}")


def _report_dry_run(runs: Sequence[StageRun]) -> None:
    actions = sum(1 for stage in runs for call in stage.calls if not call.query)
    log.info(f"dry-run: {len(runs)} stages, {actions} commands shown, nothing was run")
    for stage in runs:
        if stage.stopped:
            log.warn(f"the real run would stop at {stage.name}: {stage.stopped}")


def dry(rt: Runtime) -> Runtime:
    """``rt`` as a dry-run, whatever the mode it was started in."""
    if rt.dry_run:
        return rt
    return dataclasses.replace(
        rt,
        dry_run=True,
        shell=Shell(dry_run=True, policy=rt.shell.policy, base_env=rt.shell.base_env),
    )
