"""The run of one command: its mode, its validated settings, its context, its shell.

Stages receive a :class:`Runtime` and ask it for what they need; everything
here was validated before the stage started.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.settings import GitLabSettings, PipelineSettings, RegistrySettings, Settings

if TYPE_CHECKING:
    from pipeline.artifact import BuildEnv
    from pipeline.context import Context
    from pipeline.shell import Shell
    from pipeline.tags import TagPlan

M = TypeVar("M", bound=Settings)


@dataclass(kw_only=True)
class Runtime:
    """One invocation of ``python -m pipeline <command>``."""

    command: str
    dry_run: bool
    environ: Mapping[str, str]
    shell: Shell
    cwd: Path
    loaded: dict[type[Settings], Settings]
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Dry-run only: the build.env the build stage would write, which ``plan`` and ``run``
    #: hand to the later stages of the same run (no file exists; its digest is a placeholder).
    planned_build_env: BuildEnv | None = None

    def __post_init__(self) -> None:
        if self.planned_build_env is not None and not self.dry_run:
            raise ValueError("a planned build.env is for dry-runs only; a real run reads build.env")

    def for_stage(
        self, command: str, shell: Shell, *, planned_build_env: BuildEnv | None = None
    ) -> Runtime:
        """One stage of a multi-stage run: the same inputs and context, its own shell."""
        child = dataclasses.replace(
            self, command=command, shell=shell, planned_build_env=planned_build_env
        )
        for name in ("context", "image_name", "plan"):  # computed once, for every stage alike
            if name in self.__dict__:
                child.__dict__[name] = self.__dict__[name]
        return child

    def settings(self, model: type[M]) -> M:
        """The validated instance of ``model`` (the command must have declared it)."""
        instance = self.loaded.get(model)
        if instance is None:
            raise LookupError(f"{model.__name__} was not declared by command {self.command}")
        assert isinstance(instance, model)
        return instance

    @cached_property
    def context(self) -> Context:
        from pipeline.context import detect

        return detect(self.settings(GitLabSettings), self.shell, self.cwd)

    @cached_property
    def image_name(self) -> str:
        registry = self.settings(RegistrySettings)
        name = registry.repository_name(self.context.project_name)
        registry.check_image(name)
        return name

    @cached_property
    def plan(self) -> TagPlan:
        """The tag plan for this context."""
        from pipeline.tags import plan_tags

        registry = self.settings(RegistrySettings)
        return plan_tags(
            self.context.ref,
            push_repository=f"{registry.registry}/{self.image_name}",
            pull_repository=f"{registry.registry_pull}/{self.image_name}",
        )

    @property
    def project_dir(self) -> Path:
        gitlab = self.settings(GitLabSettings)
        return gitlab.project_dir or self.cwd

    @property
    def build_env_path(self) -> Path:
        """Where ``build.env`` lives: ``PIPELINE_BUILD_ENV`` under the project directory."""
        return self.project_dir / self.settings(PipelineSettings).build_env

    def read_build_env(self, path: Path | None = None) -> BuildEnv:
        """``build.env`` (file and injected environment), or the planned one of a dry-run."""
        from pipeline.artifact import read

        if path is None and self.planned_build_env is not None:
            return self.planned_build_env
        return read(path or self.build_env_path, self.environ)
