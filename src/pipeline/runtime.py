"""The run of one command: its mode, its validated settings, its context, its shell.

Stages receive a :class:`Runtime` and ask it for what they need; everything
here was validated before the stage started.
"""

from __future__ import annotations

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
        from pipeline.artifact import read

        return read(path or self.build_env_path, self.environ)
