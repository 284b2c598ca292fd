"""The error tree: one class per kind of failure, the exit code on the class.

The core raises; only ``cli.main`` decides how to exit. Messages are one line a
user can act on: what is wrong and what to set or fix.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error the pipeline expects; never shown with a traceback."""

    exit_code = 1


class UsageError(PipelineError):
    """Bad command line, settings or artifact: fix the input and run again."""

    exit_code = 2


class SettingsError(UsageError):
    """One or more settings are missing or malformed; ``problems`` lists each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class ArtifactError(UsageError):
    """``build.env`` is missing, malformed or contradicts the environment."""


class NotBuiltError(UsageError):
    """A command exists in the interface but is not implemented yet."""


class ToolMissingError(PipelineError):
    """A required program is not on PATH."""

    exit_code = 3


class ExternalError(PipelineError):
    """An external step failed (after its retries, when it was transient)."""

    exit_code = 4


class CommandError(ExternalError):
    """An external command exited non-zero; carries what is needed to explain it."""

    def __init__(
        self, message: str, *, argv: tuple[str, ...], returncode: int, stderr_tail: str
    ) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        super().__init__(message)


class PolicyError(PipelineError):
    """The scan ran and its findings break the configured policy."""

    exit_code = 5


class RolledBackError(PipelineError):
    """The deploy failed and the previous version was restored and is healthy."""

    exit_code = 6


class RollbackFailedError(PipelineError):
    """The deploy failed and restoring the previous version failed too."""

    exit_code = 7


class InterruptError(PipelineError):
    """The run was interrupted (SIGINT or SIGTERM)."""

    exit_code = 130
