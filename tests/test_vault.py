"""Registry credentials from a real Vault-compatible server (OpenBao), through the CLI.

Each test runs ``python -m pipeline login --execute`` as a job would, then checks
the exit code, the one error line, the config.json written, and that no secret
(password, ID token, auth string) appears in any output or any other file.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pipeline.auth import pull_credentials
from tests.clirun import base_env, error_lines, run_cli
from tests.infra.ports import free_port, wait_http
from tests.infra.vault import Vault, start_vault, stop_vault
from tests.test_auth import PULL, PUSH, runtime

pytestmark = pytest.mark.vault

FAST_RETRIES = {
    "PIPELINE_RETRY_ATTEMPTS": "3",
    "PIPELINE_RETRY_INITIAL_SECONDS": "0",
    "PIPELINE_RETRY_MAX_SECONDS": "0.05",
}


def job_env(vault: Vault, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A CI job's environment: Vault address, a fresh ID token, both registries."""
    job = {
        "VAULT_ADDR": vault.addr,
        "VAULT_ID_TOKEN": vault.sign_id_token(),
        "NEXUS_REGISTRY": PUSH,
        "NEXUS_REGISTRY_PULL": PULL,
        "DOCKER_CONFIG": str(tmp_path / "docker"),
        "HOME": str(tmp_path / "home"),
    }
    return base_env(**{**job, **extra})


def login(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(["login", "--execute"], env=env, cwd=tmp_path)


def assert_no_secrets(
    result: subprocess.CompletedProcess[str], tmp_path: Path, secrets: Iterable[str]
) -> None:
    """No secret in stdout/stderr, nor in any file under tmp_path but config.json."""
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "config.json"]
    for secret in secrets:
        assert secret not in result.stdout
        assert secret not in result.stderr
        for path in files:
            assert secret.encode() not in path.read_bytes(), path


def vault_secrets(vault: Vault, env: dict[str, str]) -> list[str]:
    account = f"{vault.username}:{vault.password}"
    tokens = [env[k] for k in ("VAULT_ID_TOKEN", "CI_JOB_JWT_V2") if k in env]
    return [vault.password, base64.b64encode(account.encode()).decode(), *tokens]


def refused(vault: Vault, tmp_path: Path, **extra: str) -> str:
    """Log in expecting exit 4 with exactly one error line; return it."""
    env = job_env(vault, tmp_path, **extra)
    result = login(env, tmp_path)
    assert result.returncode == 4, result.stderr
    assert_no_secrets(result, tmp_path, vault_secrets(vault, env))
    assert not (tmp_path / "docker").exists()
    (line,) = error_lines(result.stderr)
    return line.removeprefix("pipeline: error: ")


def test_id_token_login_reads_kv2_account_into_config(vault: Vault, tmp_path: Path) -> None:
    env = job_env(vault, tmp_path)

    result = login(env, tmp_path)

    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "docker" / "config.json").read_text())
    expected = base64.b64encode(f"{vault.username}:{vault.password}".encode()).decode()
    assert config == {"auths": {PUSH: {"auth": expected}, PULL: {"auth": expected}}}
    assert f"registry credentials: vault {vault.kv2_path} (user {vault.username})" in result.stderr
    assert result.stdout == f"export DOCKER_CONFIG={tmp_path / 'docker'}\n"
    assert_no_secrets(result, tmp_path, vault_secrets(vault, env))


def test_login_token_is_revoked_after_reading(fresh_vault: Vault, tmp_path: Path) -> None:
    def tokens() -> int:
        listed = fresh_vault.api("LIST", "auth/token/accessors", token=fresh_vault.root_token)
        return len(listed.body["data"]["keys"])

    before = tokens()
    ok = login(job_env(fresh_vault, tmp_path), tmp_path)
    denied = login(job_env(fresh_vault, tmp_path, PIPELINE_VAULT_SECRET_PATH="secret/x"), tmp_path)

    assert (ok.returncode, denied.returncode) == (0, 4)
    assert tokens() == before


def test_legacy_jwt_reads_kv1_mount_with_a_warning(vault: Vault, tmp_path: Path) -> None:
    env = job_env(
        vault,
        tmp_path,
        CI_JOB_JWT_V2=vault.sign_id_token(),
        PIPELINE_VAULT_ROLE=vault.legacy_role,
        PIPELINE_VAULT_SECRET_PATH=vault.kv1_path,
    )
    del env["VAULT_ID_TOKEN"]

    result = login(env, tmp_path)

    assert result.returncode == 0, result.stderr
    assert "pipeline: warning: CI_JOB_JWT_V2 is deprecated" in result.stderr
    auths = json.loads((tmp_path / "docker" / "config.json").read_text())["auths"]
    assert base64.b64decode(auths[PUSH]["auth"]).decode() == f"{vault.username}:{vault.password}"
    assert_no_secrets(result, tmp_path, vault_secrets(vault, env))


def test_wrong_audience_names_bound_audiences(vault: Vault, tmp_path: Path) -> None:
    token = vault.sign_id_token(aud="https://gitlab.other.test")

    line = refused(vault, tmp_path, VAULT_ID_TOKEN=token)

    assert line == (
        "Vault refused the JWT login for role nexus-ci at auth/jwt: audience mismatch: "
        "the job's id_tokens aud must be in the role's bound_audiences"
    )


def test_expired_token_says_to_rerun(vault: Vault, tmp_path: Path) -> None:
    line = refused(vault, tmp_path, VAULT_ID_TOKEN=vault.sign_id_token(exp_in=-600))

    assert line.startswith("Vault refused the JWT login for role nexus-ci at auth/jwt: ")
    assert line.endswith(
        "the ID token has expired: re-run the job (an ID token lives as long as its job)"
    )


def test_unknown_role_names_the_setting(vault: Vault, tmp_path: Path) -> None:
    line = refused(vault, tmp_path, PIPELINE_VAULT_ROLE="nexus-cj")

    assert line == (
        "Vault refused the JWT login for role nexus-cj at auth/jwt: "
        "no such role: set PIPELINE_VAULT_ROLE to a role of auth/jwt"
    )


def test_unknown_auth_mount_names_the_setting(vault: Vault, tmp_path: Path) -> None:
    line = refused(vault, tmp_path, PIPELINE_VAULT_AUTH_PATH="gitlab")

    assert line.startswith("Vault has no JWT auth method at auth/gitlab (permission denied): ")
    assert "set PIPELINE_VAULT_AUTH_PATH" in line


def test_garbage_token_is_refused_at_once(vault: Vault, tmp_path: Path) -> None:
    line = refused(vault, tmp_path, VAULT_ID_TOKEN="not-a-jwt", **FAST_RETRIES)

    assert line == (
        "Vault refused the JWT login for role nexus-ci at auth/jwt: "
        "the ID token is not a JWT: the variable must hold the job's id_tokens value"
    )


def test_token_from_another_issuer_key_names_the_trust_config(vault: Vault, tmp_path: Path) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = jwt.decode(vault.sign_id_token(), options={"verify_signature": False})
    forged = jwt.encode(claims, stranger, algorithm="RS256")

    line = refused(vault, tmp_path, VAULT_ID_TOKEN=forged)

    assert line == (
        "Vault refused the JWT login for role nexus-ci at auth/jwt: the signature does not "
        "verify: auth/jwt/config must trust this GitLab's keys (jwks_url)"
    )


def test_kv2_path_without_data_says_where_data_goes(vault: Vault, tmp_path: Path) -> None:
    line = refused(vault, tmp_path, PIPELINE_VAULT_SECRET_PATH="secret/nexus/svc-orchestrator")

    assert line == (
        "Vault denied reading secret/nexus/svc-orchestrator to role nexus-ci "
        "(policies: default, nexus-read): KV v2 paths need data/: "
        "try secret/data/nexus/svc-orchestrator (PIPELINE_VAULT_SECRET_PATH)"
    )


@pytest.fixture(scope="module")
def wide_vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vault]:
    """A server whose role ``wide`` may read all of ``secret/``: a missing path is a 404."""
    server = start_vault(tmp_path_factory.mktemp("wide-vault"))
    try:
        admin = server.root_token
        policy = {"policy": 'path "secret/*" { capabilities = ["read"] }'}
        assert server.api("PUT", "sys/policies/acl/wide", token=admin, body=policy).status == 204
        role = {"role_type": "jwt", "bound_audiences": [server.audience], "user_claim": "sub"}
        role["token_policies"] = ["wide"]
        assert server.api("POST", "auth/jwt/role/wide", token=admin, body=role).status == 204
        yield server
    finally:
        stop_vault(server)


def test_kv2_path_without_data_is_a_404_with_the_fix(wide_vault: Vault, tmp_path: Path) -> None:
    line = refused(
        wide_vault,
        tmp_path,
        PIPELINE_VAULT_ROLE="wide",
        PIPELINE_VAULT_SECRET_PATH="secret/nexus/svc-orchestrator",
    )

    assert line == (
        "Vault has no secret at secret/nexus/svc-orchestrator: KV v2 paths need data/: "
        "try secret/data/nexus/svc-orchestrator (PIPELINE_VAULT_SECRET_PATH)"
    )


def test_missing_secret_names_the_setting(wide_vault: Vault, tmp_path: Path) -> None:
    line = refused(
        wide_vault,
        tmp_path,
        PIPELINE_VAULT_ROLE="wide",
        PIPELINE_VAULT_SECRET_PATH="secret/data/nexus/svc-orchestrato",
    )

    assert line == (
        "Vault has no secret at secret/data/nexus/svc-orchestrato: "
        "check PIPELINE_VAULT_SECRET_PATH and that the secret is written there"
    )


def test_kv1_path_with_data_says_to_drop_it(vault: Vault, tmp_path: Path) -> None:
    line = refused(vault, tmp_path, PIPELINE_VAULT_SECRET_PATH="kv1/data/nexus/svc-orchestrator")

    assert line.endswith(
        "kv1 is a KV v1 mount, its paths have no data/: try kv1/nexus/svc-orchestrator"
    )


def test_path_outside_the_policy_says_what_to_grant(vault: Vault, tmp_path: Path) -> None:
    line = refused(vault, tmp_path, PIPELINE_VAULT_SECRET_PATH=vault.forbidden_path)

    assert line == (
        f"Vault denied reading {vault.forbidden_path} to role nexus-ci "
        f"(policies: default, nexus-read): grant read on {vault.forbidden_path} "
        "to a policy of role nexus-ci"
    )


def test_deleted_secret_says_so(fresh_vault: Vault, tmp_path: Path) -> None:
    deleted = fresh_vault.api("DELETE", fresh_vault.kv2_path, token=fresh_vault.root_token)
    assert deleted.status == 204, deleted

    line = refused(fresh_vault, tmp_path)

    assert line.startswith(
        f"Vault secret {fresh_vault.kv2_path}: its latest version was deleted at 20"
    )
    assert line.endswith("; undelete it (vault kv undelete) or write it again")


def test_missing_password_field_lists_what_is_there(vault: Vault, tmp_path: Path) -> None:
    line = refused(vault, tmp_path, PIPELINE_VAULT_SECRET_PATH=vault.incomplete_path)

    assert line == (
        f"Vault secret {vault.incomplete_path} has no 'password' field (it has: username): "
        "add it to the secret or set PIPELINE_VAULT_PASSWORD_FIELD"
    )


def test_renamed_fields_are_configurable(vault: Vault, tmp_path: Path) -> None:
    line = refused(
        vault, tmp_path, PIPELINE_VAULT_USERNAME_FIELD="user", PIPELINE_VAULT_PASSWORD_FIELD="pw"
    )

    assert line == (
        f"Vault secret {vault.kv2_path} has no 'user' and 'pw' field (it has: password, username): "
        "add it to the secret or set PIPELINE_VAULT_USERNAME_FIELD / PIPELINE_VAULT_PASSWORD_FIELD"
    )


def test_sealed_vault_is_retried_then_exit_4(fresh_vault: Vault, tmp_path: Path) -> None:
    env = job_env(fresh_vault, tmp_path, **FAST_RETRIES)
    fresh_vault.seal()

    result = login(env, tmp_path)

    assert result.returncode == 4, result.stderr
    assert "failed (sealed or unavailable (503)); retry 3/3" in result.stderr
    assert error_lines(result.stderr) == [
        f"pipeline: error: Vault at VAULT_ADDR={fresh_vault.addr} failed after 3 attempts "
        "(sealed or unavailable (503): Vault is sealed); check VAULT_ADDR and that Vault is "
        "unsealed and reachable from the runner"
    ]
    assert_no_secrets(result, tmp_path, vault_secrets(fresh_vault, env))


def test_unreachable_vault_is_retried_then_exit_4(vault: Vault, tmp_path: Path) -> None:
    addr = f"http://127.0.0.1:{free_port()}"
    env = job_env(vault, tmp_path, VAULT_ADDR=addr, **FAST_RETRIES)

    result = login(env, tmp_path)

    assert result.returncode == 4, result.stderr
    assert "failed (unreachable); retry 2/3" in result.stderr
    assert error_lines(result.stderr) == [
        f"pipeline: error: Vault at VAULT_ADDR={addr} failed after 3 attempts (unreachable); "
        "check VAULT_ADDR and that Vault is unsealed and reachable from the runner"
    ]


def test_silent_vault_times_out_and_is_retried(vault: Vault, tmp_path: Path) -> None:
    # A socket that listens but never answers: connections open, no reply ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        addr = f"http://127.0.0.1:{silent.getsockname()[1]}"
        env = job_env(
            vault, tmp_path, VAULT_ADDR=addr, PIPELINE_VAULT_TIMEOUT_SECONDS="0.3", **FAST_RETRIES
        )

        result = login(env, tmp_path)

    assert result.returncode == 4, result.stderr
    assert "failed (timed out); retry 3/3" in result.stderr
    assert error_lines(result.stderr) == [
        f"pipeline: error: Vault at VAULT_ADDR={addr} failed after 3 attempts (timed out); "
        "check VAULT_ADDR and that Vault is unsealed and reachable from the runner"
    ]


def test_bad_vault_settings_exit_2_before_any_contact(vault: Vault, tmp_path: Path) -> None:
    env = job_env(
        vault,
        tmp_path,
        VAULT_ADDR=f"{vault.addr}/v1",
        VAULT_CACERT=str(tmp_path / "missing-ca.pem"),
        PIPELINE_VAULT_SECRET_PATH="secret//x",
    )

    result = login(env, tmp_path)

    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        f"pipeline: error: VAULT_ADDR: must be http(s)://host[:port] without a path, got '{vault.addr}/v1'",
        f"pipeline: error: VAULT_CACERT: must be a CA bundle file (PEM), '{tmp_path / 'missing-ca.pem'}' is not a file",
        "pipeline: error: PIPELINE_VAULT_SECRET_PATH: must be a Vault API path like secret/data/nexus/x, got 'secret//x'",
    ]


def test_dry_run_does_not_log_in(fresh_vault: Vault, tmp_path: Path) -> None:
    env = job_env(fresh_vault, tmp_path)
    fresh_vault.seal()  # a contact attempt would fail

    result = run_cli(["login", "--dry-run"], env=env, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert f"would log in to {fresh_vault.addr}/v1/auth/jwt/login as role nexus-ci" in result.stderr
    assert f"to {tmp_path / 'docker'}/config.json, mode 0600" in result.stderr
    assert not (tmp_path / "docker").exists()


def test_pull_credentials_read_their_own_path(vault: Vault, tmp_path: Path) -> None:
    env = job_env(vault, tmp_path, PIPELINE_VAULT_PULL_SECRET_PATH=vault.kv1_path)

    credentials = pull_credentials(runtime(tmp_path, env))

    assert credentials is not None
    assert credentials.source == f"vault {vault.kv1_path}"
    assert (credentials.username, credentials.password) == (vault.username, vault.password)


# --- VAULT_CACERT and VAULT_NAMESPACE ------------------------------------------------


@pytest.fixture
def tls_vault(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(address, CA file) of an OpenBao dev server on HTTPS with its own generated CA."""
    port, certs = free_port(), tmp_path / "tls"
    certs.mkdir()
    argv = ["bao", "server", "-dev", "-dev-tls", f"-dev-tls-cert-dir={certs}"]
    argv.append(f"-dev-listen-address=127.0.0.1:{port}")
    with (tmp_path / "bao-tls.log").open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        # The CA exists only once the server runs: wait without verifying, then use it.
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        wait_http(
            f"https://127.0.0.1:{port}/v1/sys/health", ssl_context=unverified, process=process
        )
        yield f"https://127.0.0.1:{port}", certs / "vault-ca.pem"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


def test_vault_cacert_and_system_bundle_are_honoured(
    tls_vault: tuple[str, Path], tmp_path: Path
) -> None:
    addr, ca = tls_vault
    env = base_env(
        VAULT_ADDR=addr,
        VAULT_ID_TOKEN="a.b.c",
        NEXUS_REGISTRY=PUSH,
        NEXUS_REGISTRY_PULL=PULL,
        DOCKER_CONFIG=str(tmp_path / "docker"),
        **FAST_RETRIES,
    )

    untrusted = login(env, tmp_path)
    trusted = login({**env, "VAULT_CACERT": str(ca)}, tmp_path)
    system = login({**env, "SSL_CERT_FILE": str(ca)}, tmp_path)

    assert untrusted.returncode == 4
    (line,) = error_lines(untrusted.stderr)
    assert line == (
        f"pipeline: error: VAULT_ADDR={addr}: TLS verification failed (certificate verify "
        "failed: unable to get local issuer certificate); set VAULT_CACERT to the CA bundle "
        "that signed Vault's certificate"
    )
    assert "retry" not in untrusted.stderr
    # Past TLS (VAULT_CACERT, or the system's bundle): no JWT auth method here, and it says so.
    for past_tls in (trusted, system):
        assert past_tls.returncode == 4
        assert error_lines(past_tls.stderr)[0].startswith(
            "pipeline: error: Vault has no JWT auth method at auth/jwt"
        )


@pytest.fixture
def namespaced(fresh_vault: Vault) -> Vault:
    """``fresh_vault`` plus namespace ``team`` with its own JWT role and KV v2 secret."""
    public = serialization.load_pem_private_key(fresh_vault.private_key_pem, None).public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    role = {"role_type": "jwt", "bound_audiences": [fresh_vault.audience], "user_claim": "sub"}
    steps: list[tuple[str, str, object]] = [
        ("POST", "sys/namespaces/team", None),
        ("POST", "team/sys/auth/jwt", {"type": "jwt"}),
        ("POST", "team/auth/jwt/config", {"jwt_validation_pubkeys": [pem]}),
        ("PUT", "team/sys/policies/acl/team-read", {"policy": TEAM_POLICY}),
        ("POST", "team/auth/jwt/role/team-ci", {**role, "token_policies": ["team-read"]}),
        ("POST", "team/sys/mounts/kv", {"type": "kv", "options": {"version": "2"}}),
        (
            "POST",
            "team/kv/data/nexus/svc-team",
            {"data": {"username": "team", "password": TEAM_PW}},
        ),
    ]
    for method, path, body in steps:
        response = fresh_vault.api(method, path, token=fresh_vault.root_token, body=body)
        assert response.status in (200, 204), (path, response)
    return fresh_vault


TEAM_PW = "team-pw-7c1e0b"
TEAM_POLICY = 'path "kv/data/nexus/svc-team" { capabilities = ["read"] }'


def test_vault_namespace_is_honoured(namespaced: Vault, tmp_path: Path) -> None:
    env = job_env(
        namespaced,
        tmp_path,
        PIPELINE_VAULT_ROLE="team-ci",
        PIPELINE_VAULT_SECRET_PATH="kv/data/nexus/svc-team",
    )

    outside = login(env, tmp_path)
    inside = login({**env, "VAULT_NAMESPACE": "team"}, tmp_path)

    assert outside.returncode == 4
    assert "no such role: set PIPELINE_VAULT_ROLE" in error_lines(outside.stderr)[0]
    assert inside.returncode == 0, inside.stderr
    auths = json.loads((tmp_path / "docker" / "config.json").read_text())["auths"]
    assert base64.b64decode(auths[PULL]["auth"]).decode() == f"team:{TEAM_PW}"
    assert_no_secrets(inside, tmp_path, [TEAM_PW, env["VAULT_ID_TOKEN"]])
