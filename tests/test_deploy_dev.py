"""deploy-dev against a real DEV server: sshd + podman + compose, images from a real registry."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import artifact
from tests.clirun import base_env, error_lines, run_cli
from tests.infra.devserver import DevServer, ServiceImage, push_service_image
from tests.infra.ports import free_port
from tests.infra.registry import Registry

COMMIT = "a1b2c3d4" + "0" * 32
WORKER = "worker"


@dataclass(frozen=True, kw_only=True)
class Setup:
    """A deploy directory, a web port and the environment a job would have."""

    server: DevServer
    registry: Registry
    repo: str
    web_port: int
    workdir: Path

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}/health"

    def env(self, **extra: str) -> dict[str, str]:
        values = {
            "DEV_SERVER_IP": "127.0.0.1",
            "SSH_PORT": str(self.server.port),
            "SSH_USER": self.server.user,
            "SSH_PRIVATE_KEY": self.server.private_key_pem,
            "SSH_KNOWN_HOSTS": self.server.known_hosts_line,
            "NEXUS_REGISTRY": self.registry.host,
            "NEXUS_REGISTRY_PULL": self.registry.host,
            "NEXUS_IMAGE_NAME": self.repo,
            "CI_PROJECT_DIR": str(self.workdir),
            "CI_PROJECT_NAME": "app",
            "PIPELINE_DEPLOY_DIR": str(self.server.deploy_dir),
            "PIPELINE_DEPLOY_HEALTH_URL": self.health_url,
            "PIPELINE_DEPLOY_HEALTH_TRIES": "6",
            "PIPELINE_DEPLOY_HEALTH_INTERVAL": "0.5",
            "PIPELINE_DEPLOY_HEALTH_TIMEOUT": "2",
            "PIPELINE_DEPLOY_WORKER_SERVICES": WORKER,
            "PIPELINE_RETRY_ATTEMPTS": "1",
        }
        if self.registry.username and self.registry.password:
            values |= {"NEXUS_USER": self.registry.username, "NEXUS_PASSWORD": self.registry.password}
        return base_env(**(values | extra))

    def push(self, tag: str, version: str, kind: str = "healthy") -> ServiceImage:
        return push_service_image(
            self.registry, self.repo, tag, version=version, workdir=self.workdir, kind=kind  # type: ignore[arg-type]
        )

    def write_build_env(self, image: ServiceImage) -> Path:
        env = artifact.make(
            image_tag=image.tag,
            digest=image.digest,
            push_repository=f"{self.registry.host}/{self.repo}",
            pull_repository=f"{self.registry.host}/{self.repo}",
            immutable_tags=(image.tag,),
            moving_tags=(),
            commit_sha=COMMIT,
        )
        path = self.workdir / "build.env"
        artifact.write(path, env)
        return path

    def deploy(self, image: ServiceImage | None = None, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        if image is not None:
            self.write_build_env(image)
        return run_cli(["deploy-dev", "--execute", *args], env=self.env(**extra), cwd=self.workdir, timeout=300)

    def remote_files(self) -> dict[str, str]:
        """The deploy directory's state files (the test runs as root and reads them directly)."""
        names = (".env", ".env.rollback", ".deploy-pending")
        found = {n: (self.server.deploy_dir / n).read_text() for n in names if (self.server.deploy_dir / n).exists()}
        if (self.server.deploy_dir / ".deploy.lock").exists():
            found[".deploy.lock"] = "held"
        return found

    def version(self) -> str | None:
        return _http_text(f"http://127.0.0.1:{self.web_port}/version")


def _http_text(url: str) -> str | None:
    from tests.infra.ports import loopback_opener

    try:
        with loopback_opener().open(url, timeout=2) as response:
            return str(response.read().decode().strip())
    except OSError:
        return None


@pytest.fixture
def dev_server_registries(registry: Registry) -> Sequence[str]:
    return [registry.host]


@pytest.fixture
def setup(dev_server: DevServer, registry: Registry, repo: str, tmp_path: Path) -> Setup:
    port = free_port()
    dev_server.write_compose_project(web_port=port)
    return Setup(server=dev_server, registry=registry, repo=repo, web_port=port, workdir=tmp_path)


@pytest.mark.devserver
def test_healthy_deploy(setup: Setup) -> None:
    image = setup.push("main-a1b2c3d4", "v1")

    done = setup.deploy(image)

    assert done.returncode == 0, done.stderr
    assert setup.version() == "v1"
    assert setup.server.running_image("web") == image.ref_by_digest
    files = setup.remote_files()
    assert f"IMAGE_REF={image.ref_by_digest}\n" in files[".env"]
    assert f"IMAGE_TAG={image.tag}\n" in files[".env"]
    assert ".deploy.lock" not in files
    assert ".deploy-pending" not in files
    assert setup.server.handshakes() == 1
