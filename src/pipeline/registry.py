"""How skopeo reaches the registries: credentials, the private CA and the TLS policy.

The push stage and the deploy stage's tag resolution both talk to the registries
through skopeo; this is the one place that turns the settings into its access
flags, so both trust the same CA and verify TLS (or not) alike.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline import auth
from pipeline.errors import UsageError
from pipeline.log import log
from pipeline.runtime import Runtime
from pipeline.settings import RegistrySettings
from pipeline.tools import skopeo


@contextlib.contextmanager
def access(rt: Runtime) -> Iterator[skopeo.Access]:
    """skopeo's access to both registries for the duration of a stage; cleaned up after."""
    settings = rt.settings(RegistrySettings)
    if not settings.tls_verify:
        log.warn(
            "PIPELINE_REGISTRY_TLS_VERIFY=false: registry certificates are not verified and "
            "plain http is allowed; use it for test registries only"
        )
    with auth.docker_config(rt) as config_dir, _cert_dir(settings.ca_file) as cert_dir:
        yield skopeo.Access(
            authfile=config_dir / auth.CONFIG_NAME,
            cert_dir=cert_dir,
            tls_verify=settings.tls_verify,
        )


@contextlib.contextmanager
def _cert_dir(ca_file: Path | None) -> Iterator[Path | None]:
    """A directory holding ``PIPELINE_REGISTRY_CA_FILE`` as ``ca.crt`` (skopeo's layout)."""
    if ca_file is None:
        yield None
        return
    if not ca_file.is_file():
        raise UsageError(
            f"PIPELINE_REGISTRY_CA_FILE: {ca_file} is not a file; set it to a PEM bundle"
        )
    directory = Path(tempfile.mkdtemp(prefix="pipeline-certs-"))
    try:
        shutil.copyfile(ca_file, directory / "ca.crt")
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
