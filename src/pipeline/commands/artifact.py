"""``pipeline artifact check|show [FILE]``: validate and print a ``build.env``."""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import print_json
from pipeline.log import log
from pipeline.runtime import Runtime


def run(rt: Runtime) -> None:
    """Read ``build.env`` (file and injected environment) and check or print it."""
    path: Path | None = rt.options.get("file")
    env = rt.read_build_env(path)
    if rt.options.get("action") == "check":
        log.info(
            f"build.env is valid: {env.IMAGE_PUSH_REPOSITORY}:{env.IMAGE_TAG}@{env.IMAGE_DIGEST}"
        )
        return
    values = env.model_dump()
    if rt.options.get("json"):
        print_json(values)
        return
    for key, value in values.items():
        log.data(f"{key}={value}")
