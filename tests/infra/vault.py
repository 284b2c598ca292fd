"""A real OpenBao dev server (Vault's HTTP API) configured like the platform's Vault.

GitLab CI jobs log in with an ID token (`auth/jwt/login`, role `nexus-ci`) and read
the Nexus service account from KV v2. Here the test suite plays GitLab: it holds the
RSA key pair whose public half the JWT auth method trusts, and signs ID tokens
shaped like GitLab's with `Vault.sign_id_token`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.infra.ports import LOOPBACK, free_port, loopback_opener

ROOT_TOKEN = "ROOT"
AUDIENCE = "https://gitlab.example.test"
ISSUER = "https://gitlab.example.test"
ROLE = "nexus-ci"
LEGACY_ROLE = "gitlab-ci"
POLICY = "nexus-read"
KV2_PATH = "secret/data/nexus/svc-orchestrator"
KV1_PATH = "kv1/nexus/svc-orchestrator"
INCOMPLETE_KV2_PATH = "secret/data/nexus/svc-incomplete"
FORBIDDEN_KV2_PATH = "secret/data/nexus/svc-promoter"
DEFAULT_SUB = "project_path:group/proj:ref_type:branch:ref:main"

_START_TIMEOUT = 15.0
_POLICY_HCL = f"""
path "{KV2_PATH}" {{ capabilities = ["read"] }}
path "{INCOMPLETE_KV2_PATH}" {{ capabilities = ["read"] }}
path "{KV1_PATH}" {{ capabilities = ["read"] }}
"""


@dataclass(frozen=True)
class ApiResponse:
    """Status and decoded JSON body of one Vault HTTP API call."""

    status: int
    body: Mapping[str, Any]

    @property
    def errors(self) -> list[str]:
        """Vault's `errors` list (empty on success)."""
        return list(self.body.get("errors", []))


@dataclass(frozen=True, kw_only=True)
class Vault:
    """A running, configured OpenBao dev server and the secrets it holds.

    Paths are HTTP API paths (KV v2 paths include `data/`).
    """

    addr: str
    root_token: str
    audience: str
    issuer: str
    role: str
    legacy_role: str
    private_key_pem: bytes
    username: str
    password: str
    process: subprocess.Popen[bytes] = field(repr=False, compare=False)
    kv2_path: str = KV2_PATH
    kv1_path: str = KV1_PATH
    incomplete_path: str = INCOMPLETE_KV2_PATH
    forbidden_path: str = FORBIDDEN_KV2_PATH

    def sign_id_token(
        self,
        *,
        aud: str | None = None,
        exp_in: int = 300,
        sub: str = DEFAULT_SUB,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """An RS256 JWT with the claims of a GitLab CI `id_tokens` entry."""
        now = int(time.time())
        exp = now + exp_in
        iat = min(now, exp - 60)
        claims: dict[str, Any] = {
            **_gitlab_claims(sub),
            "iss": self.issuer,
            "aud": self.audience if aud is None else aud,
            "iat": iat,
            "nbf": iat - 5,
            "exp": exp,
            "jti": secrets.token_hex(16),
        }
        claims.update(extra_claims or {})
        return jwt.encode(claims, self.private_key_pem, algorithm="RS256")

    def api(
        self, method: str, path: str, *, token: str | None = None, body: object = None
    ) -> ApiResponse:
        """Call `/v1/<path>`; `token` defaults to none (not the root token)."""
        return api_call(self.addr, method, path, token=token, body=body)

    def login(self, token: str, *, role: str | None = None) -> ApiResponse:
        """`POST /v1/auth/jwt/login` with an ID token, as a CI job does."""
        payload = {"role": role or self.role, "jwt": token}
        return self.api("POST", "auth/jwt/login", body=payload)

    def seal(self) -> None:
        """Seal the server: every later request answers 503 until unsealed."""
        response = self.api("PUT", "sys/seal", token=self.root_token)
        assert response.status == 204, response


def api_call(
    addr: str, method: str, path: str, *, token: str | None = None, body: object = None
) -> ApiResponse:
    """One HTTP call to a Vault-compatible API; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{addr}/v1/{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("X-Vault-Token", token)
    try:
        with loopback_opener().open(request, timeout=10) as response:
            return ApiResponse(response.status, _json(response.read()))
    except urllib.error.HTTPError as error:
        return ApiResponse(error.code, _json(error.read()))


def start_vault(workdir: Path) -> Vault:
    """Start and configure a dev server; the caller must `stop_vault` it."""
    port = free_port()
    addr = f"http://{LOOPBACK}:{port}"
    log = (workdir / "bao.log").open("wb")
    process = subprocess.Popen(
        [
            "bao",
            "server",
            "-dev",
            f"-dev-root-token-id={ROOT_TOKEN}",
            f"-dev-listen-address={LOOPBACK}:{port}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "BAO_ADDR": addr},
    )
    log.close()
    try:
        _wait_healthy(addr, process, workdir / "bao.log")
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        vault = Vault(
            addr=addr,
            root_token=ROOT_TOKEN,
            audience=AUDIENCE,
            issuer=ISSUER,
            role=ROLE,
            legacy_role=LEGACY_ROLE,
            private_key_pem=_private_pem(key),
            username=f"svc-orchestrator-{secrets.token_hex(3)}",
            password=secrets.token_urlsafe(24),
            process=process,
        )
        _configure(vault, _public_pem(key))
    except BaseException:
        _stop(process)
        raise
    return vault


def stop_vault(vault: Vault) -> None:
    """Stop the server's process group by its PID."""
    _stop(vault.process)


@pytest.fixture(scope="session")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vault]:
    """One configured server for the session; tests must not change its state."""
    server = start_vault(tmp_path_factory.mktemp("vault"))
    try:
        yield server
    finally:
        stop_vault(server)


@pytest.fixture
def fresh_vault(tmp_path: Path) -> Iterator[Vault]:
    """A server of the test's own, for tests that seal it or change its config."""
    server = start_vault(tmp_path)
    try:
        yield server
    finally:
        stop_vault(server)


def _configure(vault: Vault, public_pem: str) -> None:
    admin = vault.root_token
    steps: list[tuple[str, str, object]] = [
        ("POST", "sys/auth/jwt", {"type": "jwt"}),
        (
            "POST",
            "auth/jwt/config",
            {"jwt_validation_pubkeys": [public_pem], "bound_issuer": vault.issuer},
        ),
        ("PUT", f"sys/policies/acl/{POLICY}", {"policy": _POLICY_HCL}),
        ("POST", f"auth/jwt/role/{vault.role}", _role()),
        ("POST", f"auth/jwt/role/{vault.legacy_role}", _role()),
        ("POST", "sys/mounts/kv1", {"type": "kv", "options": {"version": "1"}}),
        ("POST", vault.kv2_path, {"data": _account(vault)}),
        ("POST", vault.kv1_path, _account(vault)),
        ("POST", vault.incomplete_path, {"data": {"username": "svc-incomplete"}}),
        ("POST", vault.forbidden_path, {"data": {"username": "x", "password": "y"}}),
    ]
    for method, path, body in steps:
        response = vault.api(method, path, token=admin, body=body)
        assert response.status in (200, 204), (method, path, response)


def _role() -> dict[str, object]:
    return {
        "role_type": "jwt",
        "bound_audiences": [AUDIENCE],
        "user_claim": "sub",
        "token_policies": [POLICY],
        "token_ttl": "120s",
        "token_max_ttl": "300s",
    }


def _account(vault: Vault) -> dict[str, str]:
    return {"username": vault.username, "password": vault.password}


def _gitlab_claims(sub: str) -> dict[str, Any]:
    """The non-time claims GitLab puts in a CI job's ID token."""
    return {
        "sub": sub,
        "namespace_id": "42",
        "namespace_path": "group",
        "project_id": "4242",
        "project_path": "group/proj",
        "user_id": "7",
        "user_login": "ci-user",
        "user_email": "ci-user@example.test",
        "user_access_level": "developer",
        "pipeline_id": "1001",
        "pipeline_source": "push",
        "job_id": "5005",
        "ref": "main",
        "ref_type": "branch",
        "ref_path": "refs/heads/main",
        "ref_protected": "true",
        "runner_id": 12,
        "runner_environment": "self-hosted",
        "sha": "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678",
        "project_visibility": "private",
        "ci_config_ref_uri": "gitlab.example.test/group/proj//.gitlab-ci.yml@refs/heads/main",
        "ci_config_sha": "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678",
    }


def _wait_healthy(addr: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bao exited with {process.returncode}:\n{log.read_text()}")
        try:
            if api_call(addr, "GET", "sys/health").status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"bao did not answer /v1/sys/health in {_START_TIMEOUT} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after 5 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(key: rsa.RSAPrivateKey) -> str:
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public.decode()


def _json(raw: bytes) -> Mapping[str, Any]:
    if not raw.strip():
        return {}
    decoded: Mapping[str, Any] = json.loads(raw)
    return decoded
