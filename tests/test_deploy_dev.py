"""deploy-dev against a real DEV server: sshd + podman + compose, images from a real registry."""

from __future__ import annotations

import base64
import os
import pwd
import re
import shutil
import subprocess
import sys
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
            "CI_COMMIT_SHA": COMMIT,
            "CI_COMMIT_BRANCH": "main",
            "CI_DEFAULT_BRANCH": "main",
            "PIPELINE_DEPLOY_DIR": str(self.server.deploy_dir),
            "PIPELINE_DEPLOY_HEALTH_URL": self.health_url,
            "PIPELINE_DEPLOY_HEALTH_TRIES": "6",
            "PIPELINE_DEPLOY_HEALTH_INTERVAL": "0.5",
            "PIPELINE_DEPLOY_HEALTH_TIMEOUT": "2",
            "PIPELINE_DEPLOY_WORKER_SERVICES": WORKER,
            "PIPELINE_RETRY_ATTEMPTS": "1",
            "PIPELINE_DEPLOY_LOCK_WAIT_SECONDS": "120",
        }
        if self.registry.username and self.registry.password:
            values |= {
                "NEXUS_USER": self.registry.username,
                "NEXUS_PASSWORD": self.registry.password,
            }
        return base_env(**(values | extra))

    def push(self, tag: str, version: str, kind: str = "healthy") -> ServiceImage:
        return push_service_image(
            self.registry,
            self.repo,
            tag,
            version=version,
            workdir=self.workdir,
            kind=kind,  # type: ignore[arg-type]
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

    def deploy(
        self, image: ServiceImage | None = None, *args: str, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        if image is not None:
            self.write_build_env(image)
        return run_cli(
            ["deploy-dev", "--execute", *args], env=self.env(**extra), cwd=self.workdir, timeout=300
        )

    def remote_files(self) -> dict[str, str]:
        """The deploy directory's state files (the test runs as root and reads them directly)."""
        names = (".env", ".env.rollback", ".deploy-pending", ".deploy-last")
        found = {
            n: (self.server.deploy_dir / n).read_text()
            for n in names
            if (self.server.deploy_dir / n).exists()
        }
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
def dev_server_registries(registry: Registry, tls_registry: Registry) -> Sequence[str]:
    return [registry.host, tls_registry.host]


def _setup(server: DevServer, registry: Registry, repo: str, workdir: Path) -> Setup:
    port = free_port()
    server.write_compose_project(web_port=port)
    return Setup(server=server, registry=registry, repo=repo, web_port=port, workdir=workdir)


@pytest.fixture
def setup(dev_server: DevServer, registry: Registry, repo: str, tmp_path: Path) -> Setup:
    return _setup(dev_server, registry, repo, tmp_path)


def _healthy_v1(setup: Setup) -> ServiceImage:
    """Deploy a healthy v1 and return it: the version a failed deploy rolls back to."""
    v1 = setup.push("main-11111111", "v1")
    done = setup.deploy(v1)
    assert done.returncode == 0, done.stderr
    return v1


def _env_ref(text: str) -> str:
    return next(
        line.split("=", 1)[1] for line in text.splitlines() if line.startswith("IMAGE_REF=")
    )


# --- deploys ----------------------------------------------------------------------------


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
    assert f"IMAGE_DIGEST={image.digest}\n" in files[".env"]
    assert ".deploy.lock" not in files
    assert ".deploy-pending" not in files
    assert ".env.rollback" not in files
    assert "@deploy workers ok" in done.stderr
    assert setup.server.handshakes() == 1


@pytest.mark.devserver
def test_compose_v1_command(setup: Setup) -> None:
    image = setup.push("main-a1b2c3d4", "v1")

    done = setup.deploy(
        image,
        PIPELINE_DEPLOY_COMPOSE_COMMAND="docker-compose",
        PIPELINE_DEPLOY_SERVICES="web,worker",
    )

    assert done.returncode == 0, done.stderr
    assert setup.server.running_image("web") == image.ref_by_digest
    assert setup.server.running_image("worker") == image.ref_by_digest
    assert "@deploy workers ok" in done.stderr


@pytest.mark.devserver
def test_second_deploy_saves_the_running_version_and_keeps_other_env_lines(setup: Setup) -> None:
    v1 = _healthy_v1(setup)
    env_file = setup.server.deploy_dir / ".env"
    env_file.write_text(env_file.read_text() + "DATABASE_URL=postgres://db/app\n")
    v2 = setup.push("main-22222222", "v2")

    done = setup.deploy(v2)

    assert done.returncode == 0, done.stderr
    files = setup.remote_files()
    assert _env_ref(files[".env.rollback"]) == v1.ref_by_digest
    assert _env_ref(files[".env"]) == v2.ref_by_digest
    assert "DATABASE_URL=postgres://db/app\n" in files[".env"]
    assert setup.version() == "v2"


@pytest.mark.devserver
@pytest.mark.parametrize("health_from", ["server", "runner"])
def test_unhealthy_deploy_is_rolled_back(setup: Setup, health_from: str) -> None:
    v1 = _healthy_v1(setup)
    v2 = setup.push("main-22222222", "v2", kind="no-health")

    done = setup.deploy(
        v2, PIPELINE_DEPLOY_HEALTH_FROM=health_from, PIPELINE_DEPLOY_HEALTH_TRIES="3"
    )

    assert done.returncode == 6, done.stderr
    [line] = error_lines(done.stderr)
    assert f"deploy of {v2.ref_by_digest} failed (health: no HTTP 200" in line
    assert f"running now: {setup.server.deploy_dir.name}_web_1 {v1.ref_by_digest} running" in line
    assert setup.server.running_image("web") == v1.ref_by_digest
    assert setup.version() == "v1"
    files = setup.remote_files()
    assert _env_ref(files[".env"]) == v1.ref_by_digest
    assert ".deploy.lock" not in files
    assert ".deploy-pending" not in files
    assert setup.server.handshakes() == 2  # v1's deploy and this one: one each


@pytest.mark.devserver
def test_rollback_that_fails_exits_7(setup: Setup) -> None:
    broken = setup.push("main-00000000", "v0", kind="crash")
    setup.server.write_compose_project(web_port=setup.web_port, image_ref=broken.ref_by_digest)
    v2 = setup.push("main-22222222", "v2", kind="no-health")

    done = setup.deploy(v2, PIPELINE_DEPLOY_HEALTH_TRIES="2")

    assert done.returncode == 7, done.stderr
    [line] = error_lines(done.stderr)
    assert "failed and so did the roll back (health: no HTTP 200" in line
    assert "rollback-health: no HTTP 200" in line
    assert f"@deploy running warn {setup.server.deploy_dir.name}_web_1 is exited" in done.stderr
    files = setup.remote_files()
    assert _env_ref(files[".env"]) == broken.ref_by_digest
    assert ".deploy.lock" not in files
    assert ".deploy-pending" in files  # what is in place has not passed a health check


@pytest.mark.devserver
def test_first_deploy_with_nothing_to_roll_back_to(setup: Setup) -> None:
    v1 = setup.push("main-11111111", "v1", kind="no-health")

    done = setup.deploy(v1, PIPELINE_DEPLOY_HEALTH_TRIES="2")

    assert done.returncode == 7, done.stderr
    [line] = error_lines(done.stderr)
    assert "nothing to roll back to (first deploy): the failed version is left as it is" in line
    assert f"running now: {setup.server.deploy_dir.name}_web_1 {v1.ref_by_digest} running" in line
    files = setup.remote_files()
    assert ".deploy.lock" not in files
    assert ".deploy-pending" in files
    assert ".env.rollback" not in files


@pytest.mark.devserver
def test_health_checked_from_the_runner(setup: Setup) -> None:
    image = setup.push("main-a1b2c3d4", "v1")

    done = setup.deploy(image, PIPELINE_DEPLOY_HEALTH_FROM="runner")

    assert done.returncode == 0, done.stderr
    assert "health: HTTP 200 on try" in done.stderr
    assert setup.server.running_image("web") == image.ref_by_digest
    assert ".deploy.lock" not in setup.remote_files()
    assert setup.server.handshakes() == 1


@pytest.mark.devserver
def test_image_tag_is_resolved_to_a_digest_and_deployed_by_digest(setup: Setup) -> None:
    image = setup.push("main-33333333", "v3")

    done = setup.deploy(None, "--image-tag", image.tag, PIPELINE_REGISTRY_TLS_VERIFY="false")

    assert done.returncode == 0, done.stderr
    assert f"{setup.registry.host}/{setup.repo}:{image.tag} is {image.digest}" in done.stderr
    assert setup.server.running_image("web") == image.ref_by_digest


@pytest.mark.devserver
def test_deploy_only_redeploys_latest(setup: Setup) -> None:
    image = setup.push("latest", "v4")

    done = setup.deploy(None, DEPLOY_ONLY="true", PIPELINE_REGISTRY_TLS_VERIFY="false")

    assert done.returncode == 0, done.stderr
    assert setup.server.running_image("web") == image.ref_by_digest


# --- the connection -----------------------------------------------------------------------


@pytest.mark.devserver
def test_wrong_host_key_is_refused_before_anything_runs(setup: Setup) -> None:
    image = setup.push("main-a1b2c3d4", "v1")

    done = setup.deploy(image, SSH_KNOWN_HOSTS=setup.server.wrong_known_hosts_line)

    assert done.returncode == 4, done.stderr
    assert error_lines(done.stderr) == [
        f"pipeline: error: ssh to {setup.server.user}@127.0.0.1 port {setup.server.port}: the "
        "server's host key does not match SSH_KNOWN_HOSTS; nothing was run (update "
        "SSH_KNOWN_HOSTS if the server was rebuilt)"
    ]
    assert setup.server.handshakes() == 0
    assert setup.remote_files() == {}


@pytest.mark.devserver
def test_trust_on_first_use_accepts_a_new_key_with_a_warning_but_never_a_changed_one(
    setup: Setup,
) -> None:
    image = setup.push("main-a1b2c3d4", "v1")

    done = setup.deploy(image, SSH_KNOWN_HOSTS="", PIPELINE_DEPLOY_TRUST_ON_FIRST_USE="true")
    changed = setup.deploy(
        image,
        SSH_KNOWN_HOSTS=setup.server.wrong_known_hosts_line,
        PIPELINE_DEPLOY_TRUST_ON_FIRST_USE="true",
    )

    assert done.returncode == 0, done.stderr
    assert (
        "pipeline: warning: PIPELINE_DEPLOY_TRUST_ON_FIRST_USE=true: an unknown DEV server host key is accepted unverified"
        in done.stderr
    )
    assert changed.returncode == 4, changed.stderr
    assert "host key does not match SSH_KNOWN_HOSTS" in error_lines(changed.stderr)[0]
    assert setup.server.handshakes() == 1


@pytest.mark.devserver
def test_key_and_known_hosts_from_gitlab_file_variables(setup: Setup) -> None:
    image = setup.push("main-a1b2c3d4", "v1")
    key = setup.workdir / "SSH_PRIVATE_KEY"
    key.write_text(setup.server.private_key_pem)
    key.chmod(0o600)
    known_hosts = setup.workdir / "SSH_KNOWN_HOSTS"
    known_hosts.write_text(setup.server.known_hosts_line + "\n")

    done = setup.deploy(image, SSH_PRIVATE_KEY=str(key), SSH_KNOWN_HOSTS=str(known_hosts))

    assert done.returncode == 0, done.stderr
    assert setup.server.running_image("web") == image.ref_by_digest
    assert "OPENSSH PRIVATE KEY" not in done.stderr + done.stdout
    [key_file] = set(re.findall(r" -i (\S+/id) ", done.stderr))
    assert not Path(key_file).parent.exists()  # the private key file and its directory are gone


def _kill_connections(server: DevServer) -> int:
    """SIGKILL the sshd processes serving this test's connections (not the listener, and
    not the user's processes they started): the network drops, the server stays up."""
    listener = int((server.sshd_log.parent / "sshd.pid").read_text())
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree = {listener}
    for _ in range(4):
        tree |= {pid for pid, parent in parents.items() if parent in tree}
    sshd = [pid for pid in tree - {listener} if _comm(pid) == "sshd"]
    for pid in sshd:
        subprocess.run(["kill", "-KILL", str(pid)], check=False)
    return len(sshd)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _deploy_and_drop_the_connection(setup: Setup, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start a deploy, and kill its SSH connections once its new .env is pending."""
    deploy = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "deploy-dev", "--execute"],
        env=env,
        cwd=setup.workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(setup.server.deploy_dir / ".deploy-pending")
    assert _kill_connections(setup.server) >= 1
    return deploy


@pytest.mark.devserver
def test_connection_dropped_mid_deploy_and_the_next_deploy_recovers(setup: Setup) -> None:
    v1 = _healthy_v1(setup)
    v2 = setup.push("main-22222222", "v2")
    setup.write_build_env(v2)
    env = setup.env(PIPELINE_DEPLOY_HEALTH_TRIES="10")
    first = _deploy_and_drop_the_connection(setup, env)
    _, stderr = first.communicate(timeout=120)

    assert first.returncode == 0, stderr
    assert "the SSH connection dropped during" in stderr
    assert "@deploy follow ok the deploy script finished on the server with status 0" in stderr
    assert setup.server.handshakes() == 3  # v1's deploy, then this one's two
    assert setup.server.running_image("web") == v2.ref_by_digest
    v3 = setup.push("main-33333333", "v3")
    again = setup.deploy(v3)
    assert again.returncode == 0, again.stderr
    files = setup.remote_files()
    assert _env_ref(files[".env"]) == v3.ref_by_digest
    assert _env_ref(files[".env.rollback"]) in (v1.ref_by_digest, v2.ref_by_digest)
    assert ".deploy.lock" not in files
    assert ".deploy-pending" not in files
    assert setup.server.running_image("web") == v3.ref_by_digest


@pytest.mark.devserver
def test_connection_dropped_with_runner_health_reconnects_and_rolls_back(setup: Setup) -> None:
    v1 = _healthy_v1(setup)
    v2 = setup.push("main-22222222", "v2")
    setup.write_build_env(v2)
    env = setup.env(PIPELINE_DEPLOY_HEALTH_FROM="runner")
    first = _deploy_and_drop_the_connection(setup, env)
    _, stderr = first.communicate(timeout=180)

    assert first.returncode == 6, stderr
    assert "connecting again to roll back" in stderr
    [line] = error_lines(stderr)
    assert "the previous version is healthy" in line
    assert setup.server.running_image("web") == v1.ref_by_digest
    files = setup.remote_files()
    assert _env_ref(files[".env"]) == v1.ref_by_digest
    assert ".deploy.lock" not in files
    assert ".deploy-pending" not in files
    assert setup.server.handshakes() == 3  # v1's deploy, then this one's two


@pytest.mark.devserver
def test_two_deploys_at_once_are_serialised(setup: Setup, tmp_path: Path) -> None:
    images = [setup.push(f"main-{n}{n}{n}{n}{n}{n}{n}{n}", f"v{n}") for n in (1, 2)]
    runs = []
    for image in images:
        workdir = tmp_path / image.version
        workdir.mkdir()
        mine = Setup(
            server=setup.server,
            registry=setup.registry,
            repo=setup.repo,
            web_port=setup.web_port,
            workdir=workdir,
        )
        mine.write_build_env(image)
        runs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pipeline", "deploy-dev", "--execute"],
                env=mine.env(),
                cwd=workdir,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [run.communicate(timeout=300)[1] for run in runs]

    assert [run.returncode for run in runs] == [0, 0], outputs
    waited = [out for out in outputs if "waiting: another deploy holds the lock" in out]
    assert len(waited) == 1
    files = setup.remote_files()
    assert ".deploy.lock" not in files
    refs = {_env_ref(files[".env"]), _env_ref(files[".env.rollback"])}
    assert refs == {image.ref_by_digest for image in images}
    assert setup.server.running_image("web") == _env_ref(files[".env"])


@pytest.mark.devserver
def test_a_stale_lock_is_broken_with_a_warning(setup: Setup) -> None:
    lock = setup.server.deploy_dir / ".deploy.lock"
    lock.mkdir()
    (lock / "owner").write_text("token=0123456789abcdef\nowner=dead-runner pid 1\n")
    for path in (lock, lock / "owner"):
        shutil.chown(path, user=setup.server.user, group=setup.server.user)
    old = time.time() - 3600
    os.utime(lock, (old, old))
    image = setup.push("main-a1b2c3d4", "v1")

    done = setup.deploy(image, PIPELINE_DEPLOY_LOCK_STALE_SECONDS="60")

    assert done.returncode == 0, done.stderr
    assert "breaking a stale deploy lock (no heartbeat for" in done.stderr
    assert "owner=dead-runner pid 1" in done.stderr
    assert ".deploy.lock" not in setup.remote_files()


@pytest.mark.devserver
def test_a_stale_lock_that_cannot_be_removed_fails_the_deploy(setup: Setup) -> None:
    lock = setup.server.deploy_dir / ".deploy.lock"
    lock.mkdir()
    (lock / "owner").write_text("token=0123456789abcdef\nowner=root by hand\n")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    image = setup.push("main-a1b2c3d4", "v1")

    done = setup.deploy(image, PIPELINE_DEPLOY_LOCK_STALE_SECONDS="60")

    assert done.returncode == 4, done.stderr
    assert error_lines(done.stderr) == [
        f"pipeline: error: deploy lock: lock: cannot remove the stale lock "
        f"{setup.server.deploy_dir}/.deploy.lock as {setup.server.user}: remove it by hand"
    ]
    assert ".env" not in setup.remote_files()


@pytest.mark.devserver
def test_a_live_lock_makes_the_deploy_wait_then_fail(setup: Setup) -> None:
    lock = setup.server.deploy_dir / ".deploy.lock"
    lock.mkdir()
    image = setup.push("main-a1b2c3d4", "v1")

    done = setup.deploy(image, PIPELINE_DEPLOY_LOCK_WAIT_SECONDS="2")

    assert done.returncode == 4, done.stderr
    assert "deploy lock: lock: another deploy held the lock for 2s" in error_lines(done.stderr)[0]
    assert ".env" not in setup.remote_files()


# --- credentials ----------------------------------------------------------------------------


@pytest.fixture
def engine_trusts_tls_registry(tls_registry: Registry) -> Iterator[None]:
    """podman's login endpoint ignores `insecure` in registries.conf: give it the CA."""
    assert tls_registry.ca_cert is not None
    certs = Path("/etc/containers/certs.d") / tls_registry.host
    certs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tls_registry.ca_cert, certs / "ca.crt")
    try:
        yield
    finally:
        shutil.rmtree(certs, ignore_errors=True)


@pytest.mark.devserver
@pytest.mark.usefixtures("engine_trusts_tls_registry")
def test_registry_credentials_never_in_ps_or_output(
    dev_server: DevServer, tls_registry: Registry, repo: str, tmp_path: Path
) -> None:
    setup = _setup(dev_server, tls_registry, repo, tmp_path)
    image = setup.push("main-a1b2c3d4", "v1")
    assert tls_registry.password
    samples: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(
                subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
            )
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        done = setup.deploy(image)
    finally:
        stop.set()
        sampler.join()

    assert done.returncode == 0, done.stderr
    assert len(samples) > 10
    assert any("sh -s" in s for s in samples)  # the samples did see the deploy
    secret = tls_registry.password
    assert not [s for s in samples if secret in s]
    assert secret not in done.stdout + done.stderr
    encoded = base64.b64encode(f"{tls_registry.username}:{secret}".encode())
    remote_docker_config = setup.server.deploy_dir.parent.parent / "docker-remote"
    home = Path(pwd.getpwnam(setup.server.user).pw_dir)
    places = [setup.server.deploy_dir, tmp_path, remote_docker_config, home]
    places += Path("/tmp").glob("tmp.*")  # what mktemp -d on the server would have left
    for path in (p for place in places for p in _files_under(place)):
        content = _small_file(path)
        assert secret.encode() not in content, path
        assert encoded not in content, path
    assert setup.server.running_image("web") == image.ref_by_digest


def _small_file(path: Path) -> bytes:
    """The bytes of a small regular file; b"" for anything else or what vanished meanwhile."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1_000_000:
            return b""
        return path.read_bytes()
    except OSError:
        return b""


# --- bad input: one line, exit 2, nothing changed on the server -------------------------------

BAD_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nbm90IGEga2V5\n-----END OPENSSH PRIVATE KEY-----\n"


@pytest.mark.devserver
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"DEV_SERVER_IP": ""}, "DEV_SERVER_IP: not set; set it (or DEV_SERVER_HOST)"),
        ({"SSH_USER": ""}, "SSH_USER: not set"),
        ({"SSH_PRIVATE_KEY": ""}, "SSH_PRIVATE_KEY: not set"),
        ({"SSH_KNOWN_HOSTS": ""}, "SSH_KNOWN_HOSTS: not set"),
        ({"SSH_PRIVATE_KEY": "hunter2"}, "SSH_PRIVATE_KEY: is neither a private key"),
        (
            {"SSH_PRIVATE_KEY": "-----BEGIN OPENSSH PRIVATE KEY-----\nabc"},
            "SSH_PRIVATE_KEY: is not a PEM/OpenSSH private key",
        ),
        ({"SSH_PRIVATE_KEY": BAD_KEY}, "SSH_PRIVATE_KEY: ssh-keygen cannot use the key"),
        (
            {"SSH_KNOWN_HOSTS": "127.0.0.1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA"},
            "SSH_KNOWN_HOSTS: has no host key for [127.0.0.1]:",
        ),
        ({"SSH_KNOWN_HOSTS": "garbage"}, "SSH_KNOWN_HOSTS: 'garbage' is not a known_hosts line"),
        ({"PIPELINE_DEPLOY_DIR": "srv/app"}, "PIPELINE_DEPLOY_DIR: must be an absolute path"),
        (
            {"PIPELINE_DEPLOY_SERVICES": "web;rm -rf /"},
            "PIPELINE_DEPLOY_SERVICES: 'web;rm -rf /' is not a compose service name",
        ),
        (
            {"PIPELINE_DEPLOY_HEALTH_URL": "localhost:8080/health"},
            "PIPELINE_DEPLOY_HEALTH_URL: must be an http(s)://",
        ),
        (
            {"PIPELINE_DEPLOY_HEALTH_URL": "http://x/$(id)"},
            "PIPELINE_DEPLOY_HEALTH_URL: must be an http(s)://",
        ),
        (
            {"PIPELINE_DEPLOY_HEALTH_FROM": "laptop"},
            "PIPELINE_DEPLOY_HEALTH_FROM: must be 'runner' or 'server'",
        ),
        (
            {"PIPELINE_DEPLOY_ENV_TAG_VAR": "IMAGE-TAG"},
            "PIPELINE_DEPLOY_ENV_TAG_VAR: must be a variable name",
        ),
        ({"IMAGE_DIGEST": "sha256:" + "f" * 64}, "IMAGE_DIGEST is 'sha256:"),
        ({"PIPELINE_BUILD_ENV": "missing.env"}, "build.env not found ("),
        (
            {"PIPELINE_DEPLOY_SERVICES": "web,nosuch"},
            "refused the deploy before any change: preflight: service nosuch is not in the compose file (it defines: web worker)",
        ),
        (
            {"PIPELINE_DEPLOY_COMPOSE_FILE": "prod.yml"},
            "refused the deploy before any change: preflight: no prod.yml in ",
        ),
    ],
    ids=lambda value: next(iter(value)) if isinstance(value, dict) else None,
)
def test_bad_input_is_refused_before_any_remote_change(
    setup: Setup, overrides: dict[str, str], expected: str
) -> None:
    image = setup.push("main-a1b2c3d4", "v1")
    before = sorted(p.name for p in setup.server.deploy_dir.iterdir())

    done = setup.deploy(image, **overrides)

    assert done.returncode == 2, done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert expected in lines[0]
    assert sorted(p.name for p in setup.server.deploy_dir.iterdir()) == before
    assert setup.server.running_image("web") is None
    if "refused the deploy" not in expected:
        assert setup.server.handshakes() == 0


@pytest.mark.devserver
def test_deploy_dir_without_a_compose_file_is_refused(setup: Setup) -> None:
    image = setup.push("main-a1b2c3d4", "v1")
    (setup.server.deploy_dir / "docker-compose.yml").unlink()

    done = setup.deploy(image)

    assert done.returncode == 2, done.stderr
    assert error_lines(done.stderr) == [
        "pipeline: error: the DEV server refused the deploy before any change: preflight: no "
        f"compose file (compose.yaml or docker-compose.yml) in {setup.server.deploy_dir} "
        "(PIPELINE_DEPLOY_DIR)"
    ]
    assert list(setup.server.deploy_dir.iterdir()) == []


def test_bad_image_tag_is_refused(tmp_path: Path) -> None:
    done = run_cli(
        ["deploy-dev", "--execute", "--image-tag", "bad tag!"],
        env=_offline_env(tmp_path),
        cwd=tmp_path,
    )

    assert done.returncode == 2, done.stderr
    [line] = error_lines(done.stderr)
    assert line.startswith("pipeline: error: --image-tag: ")


# --- dry-run ---------------------------------------------------------------------------------


def _offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A complete environment for a DEV server nobody listens on (dry-run, local checks)."""
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    port = free_port()
    host_key = (tmp_path / "key.pub").read_text().split()[:2]
    return base_env(
        DEV_SERVER_IP="127.0.0.1",
        SSH_PORT=str(port),
        SSH_USER="deployer",
        SSH_PRIVATE_KEY=key.read_text(),
        SSH_KNOWN_HOSTS=f"[127.0.0.1]:{port} {' '.join(host_key)}",
        PIPELINE_DEPLOY_DIR="/srv/app",
        PIPELINE_DEPLOY_HEALTH_URL="http://127.0.0.1:8080/health",
        NEXUS_REGISTRY="127.0.0.1:5000",
        NEXUS_REGISTRY_PULL="127.0.0.1:5001",
        NEXUS_USER="svc-deployer",
        NEXUS_PASSWORD="s3cret-Pa55word-xyz",
        CI_PROJECT_DIR=str(tmp_path),
        CI_PROJECT_NAME="app",
        CI_COMMIT_SHA=COMMIT,
        CI_COMMIT_BRANCH="main",
        CI_DEFAULT_BRANCH="main",
        **extra,
    )


def test_dry_run_prints_the_ssh_command_and_the_script_with_secrets_masked(tmp_path: Path) -> None:
    env = artifact.make(
        image_tag="main-a1b2c3d4",
        digest="sha256:" + "a" * 64,
        push_repository="127.0.0.1:5000/orchestrator-app",
        pull_repository="127.0.0.1:5001/orchestrator-app",
        immutable_tags=("main-a1b2c3d4",),
        moving_tags=("latest",),
        commit_sha=COMMIT,
    )
    artifact.write(tmp_path / "build.env", env)

    job = "https://gitlab.example.com/group/app/-/jobs/77"
    done = run_cli(
        ["deploy-dev", "--dry-run"], env=_offline_env(tmp_path, CI_JOB_URL=job), cwd=tmp_path
    )

    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "s3cret-Pa55word-xyz" not in output
    assert "OPENSSH PRIVATE KEY" not in output
    assert "-o ControlMaster=yes" in output
    assert "-o StrictHostKeyChecking=yes" in output
    assert "'sh -s'  # dry-run: not run" in output
    assert "--password-stdin" in output
    assert "[MASKED]" in output
    assert "IMAGE_REF=127.0.0.1:5001/orchestrator-app@sha256:" + "a" * 64 in output
    assert "main deploy_all" in output
    assert re.search(rf"^OWNER='\S+ pid [0-9]+ {re.escape(job)}'$", output, re.MULTILINE)
    assert not list(tmp_path.glob("pipeline-ssh-*"))


def _files_under(top: Path) -> Iterator[Path]:
    """Every file below ``top``, skipping what disappears or cannot be read meanwhile."""
    for root, _dirs, files in os.walk(top, onerror=lambda _error: None):
        for name in files:
            yield Path(root) / name
