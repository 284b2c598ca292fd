"""Real OCI registries (Debian's docker-registry, distribution 2.8) on loopback.

`start_registry` runs one instance from a minimal config of its own (never
Debian's default config) and stops it by PID on exit. The fixtures model the
platform's Nexus: `registry` is an open push registry, `tls_registry` adds TLS
and basic auth, `registry_pair` is a push registry and a read-only pull-through
pull registry in front of it (Nexus's 8444).

The open registries are session-scoped for speed: every test must push to its
own repository name (the `repo` fixture or `unique_repo()` give one).

The HTTP helpers speak the registry API with urllib; the skopeo helpers pass
the right TLS and credential flags for the registry they talk to.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import re
import secrets
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.infra.ports import LOOPBACK, free_port, loopback_opener, wait_http

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX)
INDEX_TYPES = (DOCKER_MANIFEST_LIST, OCI_INDEX)

SKOPEO_TIMEOUT = 120.0
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_START_ATTEMPTS = 3
_HTTP_TIMEOUT = 30.0

SkopeoRole = Literal["", "src", "dest"]


@dataclass(frozen=True, kw_only=True)
class Registry:
    """One running registry: where it listens and how to authenticate to it."""

    host: str
    scheme: str
    root: Path
    username: str | None = None
    password: str | None = None
    ca_cert: Path | None = None
    certs_dir: Path | None = None
    upstream: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def creds(self) -> str | None:
        """`user:password` for skopeo's --creds flags, when the registry has auth."""
        if self.username is None or self.password is None:
            return None
        return f"{self.username}:{self.password}"

    @property
    def log(self) -> Path:
        return self.root / "registry.log"

    def ref(self, repo: str, reference: str = "latest") -> str:
        """`HOST/repo:tag`, or `HOST/repo@sha256:...` for a digest."""
        separator = "@" if reference.startswith("sha256:") else ":"
        return f"{self.host}/{repo}{separator}{reference}"

    def docker_ref(self, repo: str, reference: str = "latest") -> str:
        """The same reference in skopeo's `docker://` transport."""
        return f"docker://{self.ref(repo, reference)}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """A context trusting this registry's CA, or None for plain http."""
        if not self.tls:
            return None
        cafile = str(self.ca_cert) if self.ca_cert is not None else None
        return ssl.create_default_context(cafile=cafile)

    def skopeo_flags(self, role: SkopeoRole = "", *, creds: bool = True) -> list[str]:
        """TLS and credential flags for skopeo; role "src"/"dest" for `skopeo copy`."""
        prefix = f"--{role}-" if role else "--"
        if not self.tls:
            flags = [f"{prefix}tls-verify=false"]
        else:
            flags = [f"{prefix}tls-verify=true"]
            if self.certs_dir is not None:
                flags += [f"{prefix}cert-dir", str(self.certs_dir)]
        if creds and self.creds is not None:
            flags += [f"{prefix}creds", self.creds]
        return flags


@dataclass(frozen=True, kw_only=True)
class RegistryPair:
    """A push registry and a read-only pull-through pull registry of it."""

    push: Registry
    pull: Registry


class Headers(Mapping[str, str]):
    """Response headers, looked up case-insensitively (Go writes `Www-Authenticate`)."""

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._items = {name.lower(): value for name, value in items}

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True, kw_only=True)
class HttpResponse:
    """Status, headers and body of one registry API call."""

    status: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A manifest (or index) as the registry serves it."""

    media_type: str
    digest: str
    raw: bytes

    @property
    def content(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.raw)
        return parsed

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


# --- starting and stopping -------------------------------------------------------------


@contextlib.contextmanager
def start_registry(
    tmp_path: Path,
    *,
    tls: bool = False,
    auth: tuple[str, str] | None = None,
    proxy_of: Registry | None = None,
) -> Iterator[Registry]:
    """Run a registry under a fresh directory of `tmp_path` until the block ends.

    `auth` is (user, password) for bcrypt htpasswd basic auth; `proxy_of` makes
    it a read-only pull-through cache of that (open) upstream registry.
    """
    if proxy_of is not None and proxy_of.creds is not None:
        raise ValueError(
            "distribution 2.8 forwards credentials only to token-auth upstreams: "
            "a pull-through registry needs an open upstream"
        )
    root = Path(tempfile.mkdtemp(prefix="registry-", dir=tmp_path))
    registry, config = _prepare(root, tls=tls, auth=auth, proxy_of=proxy_of)
    env = _process_env(proxy_of)
    running = _spawn(registry, config, env)
    try:
        yield running
    finally:
        _stop(running.process)


def _spawn(registry: Registry, config: dict[str, Any], env: Mapping[str, str]) -> Registry:
    """Start the process on a free port, retrying when another one took the port."""
    for attempt in range(1, _START_ATTEMPTS + 1):
        host = f"{LOOPBACK}:{free_port()}"
        config["http"]["addr"] = host
        config_path = registry.root / "config.yml"
        # YAML is a superset of JSON: the config needs no YAML writer.
        config_path.write_text(json.dumps(config, indent=2))
        running = replace(registry, host=host, process=_popen(config_path, registry.log, env))
        try:
            wait_http(
                f"{running.url}/v2/", _START_TIMEOUT, running.ssl_context(), process=running.process
            )
        except (RuntimeError, TimeoutError) as error:
            _stop(running.process)
            if attempt == _START_ATTEMPTS:
                raise RuntimeError(f"{error}\n{_log_tail(registry.log)}") from error
            continue
        return running
    raise AssertionError("unreachable")


def _popen(config: Path, log: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as log_file:
        return subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(env),
        )


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=_STOP_TIMEOUT)


def _log_tail(log: Path, lines: int = 20) -> str:
    if not log.exists():
        return "(no registry log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _process_env(proxy_of: Registry | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env.update(NO_PROXY=LOOPBACK, no_proxy=LOOPBACK)
    if proxy_of is not None and proxy_of.ca_cert is not None:
        # Go reads extra roots from SSL_CERT_FILE: the proxy then trusts the upstream's CA.
        env["SSL_CERT_FILE"] = str(proxy_of.ca_cert)
    return env


def _prepare(
    root: Path, *, tls: bool, auth: tuple[str, str] | None, proxy_of: Registry | None
) -> tuple[Registry, dict[str, Any]]:
    """The Registry record (port still unknown) and the config dict to serve it."""
    (root / "storage").mkdir()
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "storage")},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": "", "secret": secrets.token_hex(16)},
    }
    fields: dict[str, Any] = {"root": root, "scheme": "https" if tls else "http", "host": ""}
    if tls:
        ca, cert, key = _write_tls(root / "tls")
        certs_dir = root / "certs"
        certs_dir.mkdir()
        (certs_dir / "ca.crt").write_bytes(ca.read_bytes())
        config["http"]["tls"] = {"certificate": str(cert), "key": str(key)}
        fields.update(ca_cert=ca, certs_dir=certs_dir)
    if auth is not None:
        htpasswd = _write_htpasswd(root / "htpasswd", *auth)
        config["auth"] = {"htpasswd": {"realm": "registry", "path": str(htpasswd)}}
        fields.update(username=auth[0], password=auth[1])
    if proxy_of is not None:
        config["proxy"] = {"remoteurl": proxy_of.url}
        fields.update(upstream=proxy_of.url)
    return Registry(**fields), config


def _write_htpasswd(path: Path, user: str, password: str) -> Path:
    line = subprocess.run(
        ["htpasswd", "-Bbn", user, password],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    path.write_text(line + "\n")
    return path


def _write_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signs for 127.0.0.1 and localhost."""
    directory.mkdir()
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tests registry CA")])
    ca = (
        _certificate(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    alt_names = [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)])
    cert = (
        _certificate(server_name, ca_name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pkcs8, no_password = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, pkcs8, no_password))
    return paths


def _certificate(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
    )


# --- registry HTTP API -----------------------------------------------------------------


def request(
    registry: Registry,
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | IO[bytes] | None = None,
    auth: bool = True,
) -> HttpResponse:
    """One call to the registry API; error statuses are returned, not raised.

    `path` is absolute (`/v2/...`) or a full URL (an upload `Location`). A file
    `body` is streamed; give its `Content-Length` in `headers`.
    """
    url = path if "://" in path else f"{registry.url}{path}"
    all_headers = dict(headers or {})
    if auth and registry.creds is not None:
        token = base64.b64encode(registry.creds.encode()).decode()
        all_headers.setdefault("Authorization", f"Basic {token}")
    req = urllib.request.Request(url, data=body, headers=all_headers, method=method)
    opener = loopback_opener(registry.ssl_context())
    try:
        with opener.open(req, timeout=_HTTP_TIMEOUT) as response:
            return HttpResponse(
                status=response.status,
                headers=Headers(response.headers.items()),
                body=response.read(),
            )
    except urllib.error.HTTPError as error:
        return HttpResponse(
            status=error.code, headers=Headers(error.headers.items()), body=error.read()
        )


def get_manifest(registry: Registry, repo: str, reference: str) -> Manifest:
    """GET a manifest or index by tag or digest, accepting every manifest type."""
    response = _expect(
        request(registry, "GET", f"/v2/{repo}/manifests/{reference}", headers=_ACCEPT_ALL),
        200,
        f"GET manifest {repo}:{reference}",
    )
    return Manifest(
        media_type=response.headers.get("Content-Type", "").split(";")[0],
        digest=response.headers["Docker-Content-Digest"],
        raw=response.body,
    )


def manifest_digest(registry: Registry, repo: str, reference: str) -> str:
    """The `Docker-Content-Digest` a HEAD of the manifest answers with."""
    response = _expect(
        request(registry, "HEAD", f"/v2/{repo}/manifests/{reference}", headers=_ACCEPT_ALL),
        200,
        f"HEAD manifest {repo}:{reference}",
    )
    return response.headers["Docker-Content-Digest"]


def list_tags(registry: Registry, repo: str) -> list[str]:
    """The repository's tags, sorted (empty when the repository does not exist)."""
    response = request(registry, "GET", f"/v2/{repo}/tags/list")
    if response.status == 404:
        return []
    tags: list[str] | None = _expect(response, 200, f"tags of {repo}").json().get("tags")
    return sorted(tags or [])


def get_blob(registry: Registry, repo: str, digest: str) -> bytes:
    """A blob's bytes, read whole (meant for configs and small layers)."""
    return _expect(
        request(registry, "GET", f"/v2/{repo}/blobs/{digest}"), 200, f"blob {digest}"
    ).body


def get_config(
    registry: Registry, repo: str, reference: str, *, platform: str | None = None
) -> dict[str, Any]:
    """The image config JSON (architecture, os, config.Labels, rootfs...).

    For an index, `platform` ("linux/arm64") picks the image.
    """
    manifest = get_manifest(registry, repo, reference)
    if manifest.is_index:
        manifest = get_manifest(registry, repo, _platform_digest(manifest, platform))
    config: dict[str, Any] = json.loads(
        get_blob(registry, repo, manifest.content["config"]["digest"])
    )
    return config


def _platform_digest(index: Manifest, platform: str | None) -> str:
    entries: dict[str, str] = {
        _platform_name(m.get("platform", {})): m["digest"] for m in index.content["manifests"]
    }
    if platform not in entries:
        raise ValueError(f"index {index.digest}: pick a platform among {sorted(entries)}")
    return entries[platform]


def _platform_name(platform: Mapping[str, str]) -> str:
    parts = [platform.get("os", ""), platform.get("architecture", ""), platform.get("variant", "")]
    return "/".join(part for part in parts if part)


def _expect(response: HttpResponse, status: int, what: str) -> HttpResponse:
    if response.status != status:
        raise AssertionError(
            f"{what}: HTTP {response.status}, expected {status}: {response.body[:500]!r}"
        )
    return response


_ACCEPT_ALL = {"Accept": ", ".join(MANIFEST_TYPES)}


# --- skopeo ----------------------------------------------------------------------------


def skopeo(
    *args: str, timeout: float = SKOPEO_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run skopeo; with `check`, a failure raises AssertionError carrying its stderr."""
    argv = ["skopeo", *args]
    env = {**os.environ, "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr}")
    return done


def skopeo_copy_archive(
    tar_path: Path,
    ref: str,
    *,
    registry: Registry,
    extra_args: Sequence[str] = (),
    timeout: float = SKOPEO_TIMEOUT,
) -> str:
    """Push a docker-archive tarball to `registry` as `ref` ("repo:tag"); return the digest."""
    digest_file = Path(tempfile.mkdtemp(prefix="skopeo-")) / "digest"
    repo, reference = split_ref(ref)
    try:
        skopeo(
            "copy",
            *registry.skopeo_flags("dest"),
            "--digestfile",
            str(digest_file),
            *extra_args,
            f"docker-archive:{tar_path}",
            registry.docker_ref(repo, reference),
            timeout=timeout,
        )
        return digest_file.read_text().strip()
    finally:
        digest_file.unlink(missing_ok=True)
        digest_file.parent.rmdir()


def split_ref(ref: str) -> tuple[str, str]:
    """("repo", "tag" or "sha256:...") from "repo:tag", "repo@sha256:..." or "repo"."""
    if "@" in ref:
        repo, _, digest = ref.partition("@")
        return repo, digest
    repo, colon, tag = ref.rpartition(":")
    return (repo, tag) if colon and "/" not in tag else (ref, "latest")


def skopeo_inspect_digest(registry: Registry, repo: str, reference: str, *extra: str) -> str:
    """`skopeo inspect --format '{{.Digest}}'` of `repo:reference`."""
    done = skopeo(
        "inspect",
        *registry.skopeo_flags(),
        *extra,
        "--format",
        "{{.Digest}}",
        registry.docker_ref(repo, reference),
    )
    return done.stdout.strip()


# --- repository names and fixtures -----------------------------------------------------


def unique_repo(prefix: str = "test") -> str:
    """A repository name no other test uses (the shared registries need one per test)."""
    return f"{_slug(prefix)}-{uuid.uuid4().hex[:10]}"


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:40].strip("-") or "test"


@pytest.fixture
def repo(request: pytest.FixtureRequest) -> str:
    """A unique repository name derived from the test's name."""
    return unique_repo(request.node.name)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An open plain-http registry, shared by the session: use unique repository names."""
    with start_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A TLS registry with basic auth; user and password are random per session."""
    auth = (f"ci-{secrets.token_hex(4)}", secrets.token_urlsafe(18))
    with start_registry(tmp_path_factory.mktemp("tls-registry"), tls=True, auth=auth) as running:
        yield running


@pytest.fixture(scope="session")
def registry_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryPair]:
    """An open push registry and a pull-through pull registry of it (Nexus 8443/8444)."""
    root = tmp_path_factory.mktemp("registry-pair")
    with start_registry(root) as push, start_registry(root, proxy_of=push) as pull:
        yield RegistryPair(push=push, pull=pull)
