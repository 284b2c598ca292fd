"""The OpenBao fixture behaves like the platform's Vault at the HTTP API."""

from __future__ import annotations

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.infra.vault import Vault

pytestmark = pytest.mark.vault


def _client_token(vault: Vault, *, role: str | None = None) -> str:
    response = vault.login(vault.sign_id_token(), role=role)
    assert response.status == 200, response
    token: str = response.body["auth"]["client_token"]
    return token


def test_signed_id_token_carries_gitlab_claims(vault: Vault) -> None:
    public_key = serialization.load_pem_private_key(vault.private_key_pem, None).public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)

    claims = jwt.decode(
        vault.sign_id_token(), public_key, algorithms=["RS256"], audience=vault.audience
    )

    assert claims["iss"] == vault.issuer
    assert claims["sub"] == "project_path:group/proj:ref_type:branch:ref:main"
    assert claims["nbf"] < claims["iat"] < claims["exp"]
    for name in ("namespace_path", "project_path", "ref", "ref_type", "pipeline_id", "job_id"):
        assert claims[name]


def test_login_with_id_token_reads_kv2_account(vault: Vault) -> None:
    login = vault.login(vault.sign_id_token())
    assert login.status == 200, login
    assert "nexus-read" in login.body["auth"]["policies"]

    secret = vault.api("GET", vault.kv2_path, token=login.body["auth"]["client_token"])

    assert secret.status == 200, secret
    assert secret.body["data"]["data"] == {"username": vault.username, "password": vault.password}


def test_kv1_account_reads_without_data_level(vault: Vault) -> None:
    token = _client_token(vault, role=vault.legacy_role)

    secret = vault.api("GET", vault.kv1_path, token=token)

    assert secret.status == 200, secret
    assert secret.body["data"] == {"username": vault.username, "password": vault.password}


def test_wrong_audience_is_refused(vault: Vault) -> None:
    response = vault.login(vault.sign_id_token(aud="https://gitlab.other.test"))

    assert response.status == 400
    assert "audience claim does not match" in response.errors[0]


def test_expired_token_is_refused(vault: Vault) -> None:
    # Vault accepts exp up to 150 s in the past (default leeway), so go well beyond.
    response = vault.login(vault.sign_id_token(exp_in=-600))

    assert response.status == 400
    assert "token is expired" in response.errors[0]


def test_token_signed_by_another_key_is_refused(vault: Vault) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(
        jwt.decode(vault.sign_id_token(), options={"verify_signature": False}),
        stranger,
        algorithm="RS256",
    )

    response = vault.login(forged)

    assert response.status == 400
    assert "error verifying token signature" in response.errors[0]


def test_unknown_role_is_refused(vault: Vault) -> None:
    response = vault.login(vault.sign_id_token(), role="no-such-role")

    assert response.status == 400
    assert response.errors == ['role "no-such-role" could not be found']


def test_policy_limits_reads(vault: Vault) -> None:
    token = _client_token(vault)

    forbidden = vault.api("GET", vault.forbidden_path, token=token)
    without_data_level = vault.api("GET", "secret/nexus/svc-orchestrator", token=token)

    assert forbidden.status == 403
    assert "permission denied" in forbidden.errors[0]
    assert without_data_level.status == 403


def test_kv2_path_without_data_level_is_404_for_root(vault: Vault) -> None:
    response = vault.api("GET", "secret/nexus/svc-orchestrator", token=vault.root_token)

    assert response.status == 404
    assert "Invalid path for a versioned K/V" in response.body["warnings"][0]


def test_incomplete_secret_lacks_password(vault: Vault) -> None:
    secret = vault.api("GET", vault.incomplete_path, token=_client_token(vault))

    assert secret.status == 200, secret
    assert "password" not in secret.body["data"]["data"]
    assert secret.body["data"]["data"]["username"]


def test_sealed_server_answers_503(fresh_vault: Vault) -> None:
    token = fresh_vault.sign_id_token()

    fresh_vault.seal()
    response = fresh_vault.login(token)

    assert response.status == 503
    assert response.errors == ["Vault is sealed"]
