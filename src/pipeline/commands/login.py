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


def run(rt: Runtime) -> int:
    """Write ``config.json`` with auths for both registries; print where it is."""
    written = write_docker_config(rt)
    if rt.dry_run:
        return 0
    if not written.wrote and not written.path.exists():
        written.undo()
        return 1
    log.info(f"docker config: {written.path} (mode 0600); use it with:")
    log.data(f"export DOCKER_CONFIG={shlex.quote(str(written.directory))}")
    return 0
