"""The one owner of output: steps, commands, warnings, the final summary.

Logs go to stderr, data (``--json``, tables a user may pipe) to stdout. Colour
and GitLab section markers are decided once, in :meth:`Logger.configure`, and
kept as data so call sites never branch on them. Every line passes through the
secret mask, so a value registered with :meth:`Logger.add_secret` can never be
printed, whatever prints it.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TextIO

MASK = "[MASKED]"
_SECTION_NAME = re.compile(r"[^a-z0-9_]+")


@dataclass(frozen=True, kw_only=True)
class Style:
    """Escape sequences for one colour policy; empty strings when colour is off."""

    bold: str = ""
    red: str = ""
    green: str = ""
    yellow: str = ""
    dim: str = ""
    reset: str = ""

    @classmethod
    def coloured(cls) -> Style:
        return cls(
            bold="\033[1m",
            red="\033[31m",
            green="\033[32m",
            yellow="\033[33m",
            dim="\033[2m",
            reset="\033[0m",
        )


@dataclass(frozen=True, kw_only=True)
class StepResult:
    name: str
    ok: bool
    seconds: float


def use_colour(*, no_color: bool, force_color: bool, isatty: bool) -> bool:
    """The colour policy: NO_COLOR wins, then FORCE_COLOR, then whether stderr is a tty."""
    if no_color:
        return False
    return force_color or isatty


@dataclass
class Logger:
    """Writes every line the pipeline prints."""

    err: TextIO | None = None
    out: TextIO | None = None
    style: Style = field(default_factory=Style)
    gitlab_sections: bool = False
    secrets: set[str] = field(default_factory=set)
    steps: list[StepResult] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)

    def configure(self, *, colour: bool, gitlab_sections: bool) -> None:
        self.style = Style.coloured() if colour else Style()
        self.gitlab_sections = gitlab_sections

    def add_secret(self, value: str | None) -> None:
        """Register a value that must never be printed (ignores empty and tiny values)."""
        if value and len(value) >= 3:
            self.secrets.add(value)

    def mask(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, MASK)
        return text

    def _emit(self, text: str, stream: TextIO | None = None) -> None:
        target = stream or self.err or sys.stderr
        print(self.mask(text), file=target, flush=True)

    def info(self, text: str) -> None:
        self._emit(text)

    def warn(self, text: str) -> None:
        s = self.style
        self._emit(f"{s.yellow}pipeline: warning:{s.reset} {text}")

    def error(self, text: str) -> None:
        s = self.style
        self._emit(f"{s.red}pipeline: error:{s.reset} {text}")

    def data(self, text: str) -> None:
        """Output a user may pipe: stdout, still masked."""
        self._emit(text, self.out or sys.stdout)

    def command(self, argv: Sequence[str], *, note: str = "") -> None:
        s = self.style
        suffix = f"  {s.dim}# {note}{s.reset}" if note else ""
        self._emit(f"{s.dim}+{s.reset} {shlex.join(argv)}{suffix}")

    def fact(self, key: str, value: str) -> None:
        """Remember a key fact (a digest, a reference) for the final summary."""
        self.facts.append((key, value))

    @contextlib.contextmanager
    def section(self, title: str, *, collapsed: bool = False) -> Iterator[None]:
        """A plain group of lines: collapsible in GitLab, a heading elsewhere; no ✓ or time."""
        name = _SECTION_NAME.sub("_", title.lower()).strip("_") or "section"
        s = self.style
        if self.gitlab_sections:
            option = "[collapsed=true]" if collapsed else ""
            self._emit(
                f"\033[0Ksection_start:{int(time.time())}:{name}{option}\r\033[0K{s.bold}{title}{s.reset}"
            )
        else:
            self._emit(f"{s.bold}{title}{s.reset}")
        try:
            yield
        finally:
            if self.gitlab_sections:
                self._emit(f"\033[0Ksection_end:{int(time.time())}:{name}\r\033[0K")

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        """A named step: a GitLab collapsible section in CI, then ✓ or ✕ and its duration."""
        name = _SECTION_NAME.sub("_", title.lower()).strip("_") or "step"
        start = time.monotonic()
        s = self.style
        if self.gitlab_sections:
            self._emit(
                f"\033[0Ksection_start:{int(time.time())}:{name}\r\033[0K{s.bold}{title}{s.reset}"
            )
        else:
            self._emit(f"{s.bold}▸ {title}{s.reset}")
        ok = False
        try:
            yield
            ok = True
        finally:
            seconds = time.monotonic() - start
            self.steps.append(StepResult(name=title, ok=ok, seconds=seconds))
            mark = f"{s.green}✓{s.reset}" if ok else f"{s.red}✕{s.reset}"
            self._emit(f"{mark} {title} ({seconds:.2f}s)")
            if self.gitlab_sections:
                self._emit(f"\033[0Ksection_end:{int(time.time())}:{name}\r\033[0K")

    def summary(self) -> None:
        """The closing table: each step, its status and time, then the key facts."""
        if not self.steps and not self.facts:
            return
        s = self.style
        self._emit(f"{s.bold}Summary{s.reset}")
        for result in self.steps:
            mark = f"{s.green}✓{s.reset}" if result.ok else f"{s.red}✕{s.reset}"
            self._emit(f"  {mark} {result.name:<40} {result.seconds:7.2f}s")
        for key, value in self.facts:
            self._emit(f"  {key}: {value}")


log = Logger()
