"""The DEV server fixture: real sshd, real podman, real compose, real HTTP health."""

from __future__ import annotations

import shlex
import time
import urllib.error
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.infra.devserver import DevServer, push_service_image
from tests.infra.ports import free_port, loopback_opener
from tests.infra.registry import Registry

pytestmark = pytest.mark.devserver


@pytest.fixture
def dev_server_registries(registry: Registry) -> Sequence[str]:
    return [registry.host]


def _http_status(url: str) -> int | None:
    """The HTTP status at `url`, or None when nothing answers."""
    try:
        with loopback_opener().open(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _wait_status(url: str, wanted: int | None, timeout: float = 15.0) -> int | None:
    deadline = time.monotonic() + timeout
    status = _http_status(url)
    while status != wanted and time.monotonic() < deadline:
        time.sleep(0.1)
        status = _http_status(url)
    return status


def _compose(server: DevServer, *args: str) -> str:
    return f"cd {shlex.quote(str(server.deploy_dir))} && docker compose {shlex.join(args)}"


def test_remote_session_has_docker_and_compose(dev_server: DevServer) -> None:
    done = dev_server.ssh_run('id -un; echo "$DOCKER_HOST"; docker compose version; docker ps')

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [dev_server.user, dev_server.docker_host]
    assert "docker-compose version 1.29" in done.stdout
    assert lines[-1].startswith("CONTAINER ID")
    assert dev_server.handshakes() == 1


def test_changed_host_key_is_refused(dev_server: DevServer) -> None:
    done = dev_server.ssh_run("true", known_hosts_line=dev_server.wrong_known_hosts_line)

    assert done.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in done.stderr
    assert dev_server.handshakes() == 0


def test_unknown_host_key_is_refused(dev_server: DevServer) -> None:
    done = dev_server.ssh_run("true", known_hosts_line="")

    assert done.returncode == 255
    assert "Host key verification failed" in done.stderr
    assert dev_server.handshakes() == 0


def test_compose_deploys_image_from_registry(
    dev_server: DevServer, registry: Registry, repo: str, tmp_path: Path
) -> None:
    image = push_service_image(registry, repo, "main-a1b2c3d4", version="v1", workdir=tmp_path)
    port = free_port()
    dev_server.write_compose_project(web_port=port, image_ref=image.ref_by_digest)

    up = dev_server.ssh_run(
        _compose(dev_server, "pull") + " && " + _compose(dev_server, "up", "-d")
    )

    assert up.returncode == 0, up.stderr
    assert _wait_status(f"http://127.0.0.1:{port}/health", 200) == 200
    with loopback_opener().open(f"http://127.0.0.1:{port}/version", timeout=5) as response:
        assert response.read() == b"v1\n"
    assert dev_server.running_image("web") == image.ref_by_digest
    assert dev_server.running_image("worker") == image.ref_by_digest

    down = dev_server.ssh_run(_compose(dev_server, "down"))

    assert down.returncode == 0, down.stderr
    assert dev_server.running_image("web") is None
    assert _http_status(f"http://127.0.0.1:{port}/health") is None
    assert dev_server.handshakes() == 2


def test_broken_images_fail_health(
    dev_server: DevServer, registry: Registry, repo: str, tmp_path: Path
) -> None:
    no_health = push_service_image(
        registry, repo, "no-health", version="v2", workdir=tmp_path, kind="no-health"
    )
    crash = push_service_image(
        registry, repo, "crash", version="v3", workdir=tmp_path, kind="crash"
    )
    port = free_port()
    health = f"http://127.0.0.1:{port}/health"

    dev_server.write_compose_project(web_port=port, image_ref=no_health.ref)
    assert dev_server.ssh_run(_compose(dev_server, "up", "-d")).returncode == 0
    assert _wait_status(health, 404) == 404

    dev_server.write_compose_project(web_port=port, image_ref=crash.ref)
    assert dev_server.ssh_run(_compose(dev_server, "up", "-d")).returncode == 0
    assert _wait_status(health, None) is None
    deadline = time.monotonic() + 10
    while dev_server.running_image("web") is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dev_server.running_image("web") is None
    assert dev_server.running_image("worker") == crash.ref


def test_failed_pull_shows_in_docker_pull_and_up_not_compose_pull(
    dev_server: DevServer, registry: Registry, repo: str
) -> None:
    # docker-compose 1.29 on podman's API reports a failed pull as done (exit 0); a
    # deploy must not trust `compose pull` alone. `docker pull` and `up -d` do fail.
    missing = f"{registry.host}/{repo}:missing"
    dev_server.write_compose_project(web_port=free_port(), image_ref=missing)

    compose_pull = dev_server.ssh_run(_compose(dev_server, "pull"))
    docker_pull = dev_server.ssh_run(f"docker pull {missing}")
    up = dev_server.ssh_run(_compose(dev_server, "up", "-d"))

    assert compose_pull.returncode == 0
    assert docker_pull.returncode == 1
    assert "manifest unknown" in docker_pull.stderr
    assert up.returncode == 1
    assert "no such image" in up.stderr
