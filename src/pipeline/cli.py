"""The command line: one sub-command per stage, plus tags, artifact, login, plan, run.

``main`` is the only place that decides how the process exits: a
:class:`~pipeline.errors.PipelineError` becomes ``pipeline: error: <message>``
and its exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import NoReturn

from pipeline import __version__
from pipeline.errors import InterruptError, NotBuiltError, PipelineError, SettingsError
from pipeline.log import log, use_colour
from pipeline.retry import RetryPolicy
from pipeline.runtime import Runtime
from pipeline.settings import (
    GitLabSettings,
    OutputSettings,
    PipelineSettings,
    RegistrySettings,
    Settings,
    load,
    read_environment,
)
from pipeline.shell import Shell

BASE_SETTINGS: tuple[type[Settings], ...] = (
    OutputSettings,
    GitLabSettings,
    RegistrySettings,
    PipelineSettings,
)


@dataclass(frozen=True, kw_only=True)
class Command:
    """A sub-command: its help, and the module whose ``run(rt)`` implements it."""

    name: str
    help: str
    module: str
    stage: bool = False


COMMANDS = (
    Command(
        name="build",
        help="build the image with Kaniko and write build.env",
        module="pipeline.stages.build",
        stage=True,
    ),
    Command(
        name="push",
        help="promote the moving tags to the built digest",
        module="pipeline.stages.push",
        stage=True,
    ),
    Command(
        name="trivy-image-scan",
        help="scan the built image with Trivy",
        module="pipeline.stages.trivy_image_scan",
        stage=True,
    ),
    Command(
        name="deploy-dev",
        help="deploy the built image to the DEV server",
        module="pipeline.stages.deploy_dev",
        stage=True,
    ),
    Command(
        name="tags",
        help="print the tag plan for the current context",
        module="pipeline.commands.tags",
    ),
    Command(name="artifact", help="check or show a build.env", module="pipeline.commands.artifact"),
    Command(
        name="login",
        help="write registry credentials to a docker config.json",
        module="pipeline.commands.login",
    ),
    Command(
        name="plan",
        help="print every command every stage would run",
        module="pipeline.commands.plan",
    ),
    Command(name="run", help="run the stages in order", module="pipeline.commands.run"),
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"pipeline: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    mode = common.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run",
        dest="dry_run",
        action="store_true",
        default=None,
        help="print what would run, run nothing (default outside GitLab CI)",
    )
    mode.add_argument(
        "--execute",
        dest="dry_run",
        action="store_false",
        help="really run (default inside GitLab CI)",
    )
    common.add_argument(
        "--env-file",
        type=Path,
        metavar="FILE",
        help="load variables from a .env file (the environment wins)",
    )

    parser = _Parser(prog="pipeline", description="Container stages of a GitLab CI pipeline.")
    parser.add_argument(
        "--version", action="version", version=f"orchestrator-pipeline {__version__}"
    )
    sub = parser.add_subparsers(
        dest="command", metavar="<command>", title="stages and commands", parser_class=_Parser
    )
    sub.required = True
    parsers = {
        command.name: sub.add_parser(command.name, help=command.help, parents=[common])
        for command in COMMANDS
    }

    for name in ("tags", "plan"):
        parsers[name].add_argument("--json", action="store_true", help="print JSON")
    for name in ("plan", "run"):
        parsers[name].add_argument(
            "--skip",
            action="append",
            choices=[command.name for command in COMMANDS if command.stage],
            metavar="STAGE",
            help="leave this stage out (repeatable)",
        )
    artifact = parsers["artifact"]
    artifact.add_argument("action", choices=("check", "show"))
    artifact.add_argument(
        "file", nargs="?", type=Path, help="the build.env to read (default: PIPELINE_BUILD_ENV)"
    )
    artifact.add_argument("--json", action="store_true", help="print JSON (show)")
    parsers["trivy-image-scan"].add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="do not run Trivy: report on this Trivy JSON file instead",
    )
    parsers["deploy-dev"].add_argument(
        "--image-tag",
        metavar="TAG",
        help="deploy this tag from the pull registry (no build needed)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code."""
    args = build_parser().parse_args(argv)
    command = next(c for c in COMMANDS if c.name == args.command)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        return _run(command, args)
    except PipelineError as exc:
        _report(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return InterruptError.exit_code
    except Exception:  # noqa: BLE001 - an unexpected error is a bug: show everything
        log.info(log.mask(traceback.format_exc()))
        log.error("unexpected error (a bug in orchestrator-pipeline; the traceback is above)")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupted(_signum: int, _frame: FrameType | None) -> None:
    raise InterruptError("terminated by SIGTERM")


def _report(exc: PipelineError) -> None:
    if isinstance(exc, SettingsError):
        for problem in exc.problems:
            log.error(problem)
    else:
        log.error(str(exc))


def _run(command: Command, args: argparse.Namespace) -> int:
    module = _import(command)
    environ = read_environment(args.env_file)
    models = BASE_SETTINGS + tuple(getattr(module, "SETTINGS", ()))
    loaded = load(tuple(dict.fromkeys(models)), environ)

    output = loaded[OutputSettings]
    assert isinstance(output, OutputSettings)
    isatty = sys.stderr.isatty()
    log.configure(
        colour=use_colour(
            no_color=bool(output.no_color), force_color=bool(output.force_color), isatty=isatty
        ),
        gitlab_sections=output.gitlab_ci,
    )
    dry_run = (not output.gitlab_ci) if args.dry_run is None else bool(args.dry_run)
    log.info(
        _banner(
            command.name, dry_run=dry_run, explicit=args.dry_run is not None, in_ci=output.gitlab_ci
        )
    )
    _print_settings(loaded)

    pipeline = loaded[PipelineSettings]
    assert isinstance(pipeline, PipelineSettings)
    shell = Shell(dry_run=dry_run, policy=_policy(pipeline), base_env=environ)
    rt = Runtime(
        command=command.name,
        dry_run=dry_run,
        environ=environ,
        shell=shell,
        cwd=Path.cwd(),
        loaded=loaded,
        options={
            k: v for k, v in vars(args).items() if k not in {"command", "dry_run", "env_file"}
        },
    )
    run: Callable[[Runtime], int | None] = module.run
    code = run(rt) or 0
    if command.stage:
        log.summary()
    return code


def _import(command: Command) -> ModuleType:
    if importlib.util.find_spec(command.module) is None:
        kind = "stage" if command.stage else "command"
        raise NotBuiltError(
            f"{kind} {command.name!r} is not built yet in orchestrator-pipeline {__version__}"
        )
    return importlib.import_module(command.module)


def _banner(name: str, *, dry_run: bool, explicit: bool, in_ci: bool) -> str:
    if dry_run:
        why = "--dry-run" if explicit else "outside GitLab CI; --execute runs for real"
        return f"pipeline {name}: dry-run ({why})"
    why = "--execute" if explicit else "GITLAB_CI=true"
    return f"pipeline {name}: executing ({why})"


def _print_settings(loaded: dict[type[Settings], Settings]) -> None:
    with log.section("effective settings", collapsed=True):
        for model, instance in loaded.items():
            if model is OutputSettings:
                continue
            shown = " ".join(
                f"{var}={value}" for var, value in instance.effective() if value != "(unset)"
            )
            log.info(f"  {model.title}: {shown or '(defaults)'}")


def _policy(settings: PipelineSettings) -> RetryPolicy:
    return RetryPolicy(
        attempts=settings.retry_attempts,
        budget_seconds=settings.retry_budget_seconds,
        initial_seconds=settings.retry_initial_seconds,
        max_seconds=settings.retry_max_seconds,
    )


def print_json(data: object) -> None:
    """Data output for ``--json``: stdout, stable key order."""
    log.data(json.dumps(data, indent=2, sort_keys=False))
