"""The one choke point for external commands.

Every program the pipeline runs goes through :meth:`Shell.run`: it is echoed
as ``+ cmd args`` (shell-quoted, secrets masked), looked up on PATH (exit 3
when missing), streamed live, skipped under dry-run unless it is a read-only
query, retried when a classifier calls its failure transient, and turned into
a :class:`~pipeline.errors.CommandError` carrying the command, the exit code
and the tail of stderr. Nothing else in the package imports ``sh``.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import sh

from pipeline.errors import CommandError, ExternalError, InterruptError, ToolMissingError
from pipeline.log import log
from pipeline.retry import Classifier, RetryPolicy, call_with_retry, never

STDERR_TAIL_LINES = 12
_FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True, kw_only=True)
class Result:
    """What a finished (or, under dry-run, skipped) command produced."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    ran: bool = True


@dataclass(frozen=True, kw_only=True)
class Call:
    """One command as it was asked for: what ``plan`` lists, and what tests compare."""

    argv: tuple[str, ...]
    #: A read-only local query: it runs under dry-run too.
    query: bool = False


@dataclass(kw_only=True)
class Shell:
    """Runs commands for one pipeline invocation."""

    dry_run: bool
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    base_env: Mapping[str, str] = field(default_factory=dict)
    #: Every command run, or under dry-run printed instead, in order (once per call, not
    #: per retry): a dry-run's history is exactly what the real run would ask for.
    history: list[Call] = field(default_factory=list)
    _warned_missing: set[str] = field(default_factory=set)

    def which(self, program: str, env: Mapping[str, str] | None = None) -> str | None:
        path = (env or self.base_env).get("PATH")
        return shutil.which(program, path=path)

    def require(self, program: str) -> str:
        """The absolute path of ``program``, or exit 3 naming it."""
        found = self.which(program)
        if found is None:
            raise ToolMissingError(f"{program} not found on PATH")
        return found

    def run(
        self,
        argv: Sequence[str],
        *,
        query: bool = False,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
        cwd: Path | None = None,
        timeout: float | None = None,
        ok_codes: Sequence[int] = (0,),
        stream: bool = True,
        classify: Classifier = never,
        what: str | None = None,
    ) -> Result:
        """Run ``argv``; under dry-run only print it, unless ``query`` marks it read-only.

        Args:
            query: a read-only, local command that runs even under dry-run.
            env: variables added to the base environment for this command.
            stream: relay the command's output to the log as it arrives.
            classify: decides which failures are transient and worth a retry.
        """
        args = tuple(argv)
        self.history.append(Call(argv=args, query=query))
        merged = {**self.base_env, **(env or {})}
        if self.dry_run and not query:
            log.command(args, note="dry-run: not run")
            self._warn_if_missing(args[0], merged)
            return Result(argv=args, returncode=0, stdout="", stderr="", ran=False)

        program = self.which(args[0], merged)
        if program is None:
            raise ToolMissingError(f"{args[0]} not found on PATH")

        def attempt() -> Result:
            log.command(args)
            return _run_once(
                _Invocation(
                    program=program,
                    argv=args,
                    env=merged,
                    stdin=stdin,
                    cwd=cwd,
                    timeout=timeout,
                    ok_codes=tuple(ok_codes),
                    stream=stream,
                )
            )

        return call_with_retry(attempt, policy=self.policy, classify=classify, what=what or args[0])

    def _warn_if_missing(self, program: str, env: Mapping[str, str]) -> None:
        if program not in self._warned_missing and self.which(program, env) is None:
            self._warned_missing.add(program)
            log.warn(f"{program} not found on PATH (the real run needs it)")


@dataclass(frozen=True, kw_only=True)
class _Invocation:
    program: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    stdin: str | None
    cwd: Path | None
    timeout: float | None
    ok_codes: tuple[int, ...]
    stream: bool


_Relay = Callable[[str], None] | None


def _capture(stream: bool, out: list[str], err: list[str]) -> tuple[_Relay, _Relay]:
    """Line callbacks that relay output live; none for a quiet command (sh is faster without)."""
    if not stream:
        return None, None

    def relay(into: list[str]) -> Callable[[str], None]:
        def callback(line: str) -> None:
            into.append(line)
            log.info(line.rstrip("\n"))

        return callback

    return relay(out), relay(err)


def _run_once(call: _Invocation) -> Result:
    out: list[str] = []
    err: list[str] = []

    relay_out, relay_err = _capture(call.stream, out, err)
    try:
        running = sh.Command(call.program)(
            *call.argv[1:],
            _env=dict(call.env),
            _in=call.stdin,
            _cwd=str(call.cwd) if call.cwd else None,
            _out=relay_out,
            _err=relay_err,
            _bg=True,
            _bg_exc=False,
            _tty_out=False,
            _ok_code=list(range(256)),
            _timeout=call.timeout,
            _encoding="utf-8",
            _decode_errors="replace",
        )
        forwarding = _forwarding_signals(running)
        with forwarding:
            running.wait()
        code = int(running.exit_code)
    except sh.TimeoutException as exc:
        raise ExternalError(f"{call.argv[0]} did not finish within {call.timeout:g}s") from exc
    except sh.SignalException as exc:
        code = int(exc.exit_code)
    if forwarding.received is not None:
        name = signal.Signals(forwarding.received).name
        raise InterruptError(f"interrupted by {name}; {call.argv[0]} was stopped (exit {code})")

    if not call.stream:
        out.append(running.stdout.decode("utf-8", "replace"))
        err.append(running.stderr.decode("utf-8", "replace"))
    result = Result(argv=call.argv, returncode=code, stdout="".join(out), stderr="".join(err))
    if code not in call.ok_codes:
        raise _command_error(result)
    return result


class _forwarding_signals:  # noqa: N801 - used as a statement-like context manager
    """While a child runs, pass SIGTERM and SIGINT on to it instead of dying first."""

    def __init__(self, running: sh.RunningCommand) -> None:
        self.running = running
        self.saved: dict[int, object] = {}
        #: The signal that was passed on, if any: the run is then interrupted, not failed.
        self.received: int | None = None

    def __enter__(self) -> None:
        def forward(signum: int, _frame: FrameType | None) -> None:
            self.received = signum
            self.running.process.signal(signum)

        for signum in _FORWARDED_SIGNALS:
            try:
                self.saved[signum] = signal.signal(signum, forward)
            except ValueError:  # not the main thread: signals cannot be forwarded there
                return

    def __exit__(self, *_: object) -> None:
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


def _command_error(result: Result) -> CommandError:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    tail = "\n".join(lines[-STDERR_TAIL_LINES:])
    last = lines[-1].strip() if lines else "no error output"
    if result.returncode < 0:
        reason = f"was killed by signal {-result.returncode}"
    else:
        reason = f"exited with {result.returncode}"
    return CommandError(
        f"{result.argv[0]} {reason}: {last}",
        argv=result.argv,
        returncode=result.returncode,
        stderr_tail=tail,
    )
