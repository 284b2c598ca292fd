"""``pipeline login``: write registry credentials to a docker config.json and keep it.

For local use: the same sources and the same file the stages use, but the file
stays after the command exits, and the command prints what to export.
"""

from __future__ import annotations

import shlex

from pipeline.auth import write_docker_config
from pipeline.log import log
from pipeline.runtime import Runtime
from pipeline.settings import Settings, VaultSettings

SETTINGS: tuple[type[Settings], ...] = (VaultSettings,)


def run(rt: Runtime) -> None:
    """Write ``config.json`` with auths for both registries; print where it is."""
    written = write_docker_config(rt, required=True)
    if rt.dry_run:
        return
    log.info(f"kept {written.path} (mode 0600); point docker, skopeo and Kaniko at it with:")
    log.data(f"export DOCKER_CONFIG={shlex.quote(str(written.directory))}")
