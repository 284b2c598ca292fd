"""``pipeline plan [--json]``: every command every stage would run, for this context.

The plan is not described separately from the stages: each stage's own
``run`` is called under dry-run and its shell records what it asks for, so the
plan lists exactly the argv a real run would build (the same argv builders).
Stage output goes to the log (stderr); the plan itself is data on stdout.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Iterator
from typing import Any

from pipeline.cli import print_json
from pipeline.commands.run import (
    PLACEHOLDER_DIGEST,
    PLACEHOLDER_LABEL,
    SETTINGS,
    StageRun,
    dry,
    planned_build_env,
    run_stages,
    selected_stages,
)
from pipeline.log import log
from pipeline.runtime import Runtime

__all__ = ["SETTINGS", "run"]


def run(rt: Runtime) -> None:
    """Dry-run every stage and print the commands each asked for."""
    if not rt.dry_run:
        log.info("plan: always a dry-run; nothing is run (use run --execute to run the stages)")
    rt = dry(rt)
    with _stage_data_to_log():
        runs = run_stages(rt, selected_stages(rt))
    if rt.options.get("json"):
        print_json(plan_data(rt, runs))
    else:
        _print_text(runs)


@contextlib.contextmanager
def _stage_data_to_log() -> Iterator[None]:
    """While the stages run, their data output (a build.env preview) joins the log:
    stdout is the plan's alone."""
    saved = log.out
    log.out = log.err or sys.stderr
    try:
        yield
    finally:
        log.out = saved


def plan_data(rt: Runtime, runs: list[StageRun]) -> dict[str, Any]:
    """The plan as data: the tag plan, the planned build.env, each stage's commands."""
    plan = rt.plan
    builds = any(stage.name == "build" for stage in runs)
    return {
        "ref": plan.ref_name,
        "commit_sha": rt.context.sha,
        "trigger": plan.trigger.value,
        "image_tag": plan.image_tag,
        # What the later stages were handed: the build's would-be build.env (no build, none).
        "planned_build_env": planned_build_env(rt).model_dump() if builds else None,
        "placeholder_digest": PLACEHOLDER_DIGEST if builds else None,
        "stages": [
            {
                "stage": stage.name,
                "commands": [{"argv": list(c.argv), "query": c.query} for c in stage.calls],
                "stopped": stage.stopped,
            }
            for stage in runs
        ],
    }


def _print_text(runs: list[StageRun]) -> None:
    for stage in runs:
        log.data(stage.name)
        for call in stage.calls:
            shown = shlex.join(call.argv).replace(PLACEHOLDER_DIGEST, PLACEHOLDER_LABEL)
            log.data(f"  {'?' if call.query else '+'} {shown}")
        if stage.stopped:
            log.data(f"  ! the real run would stop here: {stage.stopped}")
        elif not any(not call.query for call in stage.calls):
            log.data("  (no command: nothing to do in this context)")
    log.data(
        f"(+ would run; ? read-only query, run to make the plan; {PLACEHOLDER_LABEL} is a placeholder)"
    )
