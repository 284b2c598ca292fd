"""Registry credentials from Vault: a GitLab ID token -> ``auth/<mount>/login`` -> a KV secret.

Talks to Vault with hvac. A sealed (503), overloaded (429, 5xx) or unreachable
server is retried with the pipeline's retry policy, then fails with exit 4
naming ``VAULT_ADDR``. A refusal (bad audience, expired token, unknown role,
denied or missing path, missing fields) fails at once, also with exit 4 — Vault
answered and said no, so the fix is in Vault's role, policy or secret, or in
the job's ``id_tokens`` — with one line naming what to change. Exit 2 is kept
for what is wrong before Vault is asked (a malformed or half-set variable).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests

from pipeline.auth import Credentials
from pipeline.errors import ExternalError
from pipeline.log import log
from pipeline.retry import call_with_retry
from pipeline.runtime import Runtime
from pipeline.settings import VaultSettings

T = TypeVar("T")
_LEGACY_WARNING = (
    "CI_JOB_JWT_V2 is deprecated and was removed in GitLab 17.0: declare "
    "id_tokens: VAULT_ID_TOKEN: aud: <audience> in the job instead"
)
#: Vault's error text -> what to fix. First match wins; {role}/{mount} filled in.
_LOGIN_HINTS: tuple[tuple[str, str], ...] = (
    (
        "audience claim does not match",
        "audience mismatch: the job's id_tokens aud must be in the role's bound_audiences",
    ),
    (
        "token is expired",
        "the ID token has expired: re-run the job (an ID token lives as long as its job)",
    ),
    ("not valid yet", "the ID token is not valid yet: check the clocks of GitLab and Vault"),
    ("could not be found", "no such role: set PIPELINE_VAULT_ROLE to a role of auth/{mount}"),
    (
        "compact jws format",
        "the ID token is not a JWT: the variable must hold the job's id_tokens value",
    ),
    ("issuer", "issuer mismatch: the auth/{mount} config's bound_issuer must be this GitLab's URL"),
    (
        "signature",
        "the signature does not verify: auth/{mount}/config must trust this GitLab's keys (jwks_url)",
    ),
    ("bound claim", "the role's bound_claims do not match this job (project, ref or ref_type)"),
)
_cache: dict[tuple[str, ...], Credentials] = {}
_MISSING = (hvac.exceptions.InvalidPath, hvac.exceptions.Forbidden)


def read_credentials(rt: Runtime, path: str) -> Credentials:
    """Log in with the job's ID token and read ``path``.

    Under dry-run Vault is not contacted: the login is printed and the result is a
    placeholder (``placeholder=True``) so that callers print the commands they would run.
    """
    settings = rt.settings(VaultSettings)
    if rt.dry_run:
        log.info(_plan(settings, path))
        return _placeholder(settings, path)
    jwt = _jwt(settings)
    key = (settings.addr or "", settings.namespace or "", settings.auth_path, settings.role, path)
    if (*key, jwt) not in _cache:
        with log.step(f"registry credentials from Vault ({path})"):
            _cache[(*key, jwt)] = _read(rt, settings, path, jwt)
    return _cache[(*key, jwt)]


def _placeholder(settings: VaultSettings, path: str) -> Credentials:
    return Credentials(
        username=f"<{settings.username_field} from vault>",
        password=f"<{settings.password_field} from vault>",
        source=f"vault {path}",
        placeholder=True,
    )


def _plan(settings: VaultSettings, path: str) -> str:
    namespace = f" (namespace {settings.namespace})" if settings.namespace else ""
    return (
        f"would log in to {settings.addr}/v1/auth/{settings.auth_path}/login{namespace} "
        f"as role {settings.role} and read {path} "
        f"(fields {settings.username_field}, {settings.password_field})"
    )


def _jwt(settings: VaultSettings) -> str:
    if settings.id_token is not None:
        return settings.id_token.get_secret_value()
    assert settings.legacy_jwt is not None
    log.warn(_LEGACY_WARNING)
    return settings.legacy_jwt.get_secret_value()


def _read(rt: Runtime, settings: VaultSettings, path: str, jwt: str) -> Credentials:
    client = hvac.Client(
        url=settings.addr,
        namespace=settings.namespace,
        verify=_trust(rt, settings),
        timeout=settings.timeout_seconds,
    )
    login = _call(
        rt,
        settings,
        lambda: client.auth.jwt.jwt_login(role=settings.role, jwt=jwt, path=settings.auth_path),
        _login_failure,
    )
    log.add_secret(client.token)
    policies = ", ".join(login.get("auth", {}).get("policies", [])) or "none"
    explain = _read_failure(client, path, policies)
    try:
        response = _call(rt, settings, lambda: client.adapter.get(f"/v1/{path}"), explain)
    finally:
        _revoke(client)
    return _credentials(settings, path, _secret_data(path, response))


def _revoke(client: Any) -> None:
    """Revoke the login token at once rather than leave it valid for its TTL (best effort)."""
    try:
        client.auth.token.revoke_self()
    except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as exc:
        log.info(f"could not revoke the Vault token (it expires with its TTL): {_first_line(exc)}")


def _trust(rt: Runtime, settings: VaultSettings) -> str | bool:
    """The CA bundle to verify Vault with: VAULT_CACERT, else the system's, as the vault CLI.

    requests on its own trusts only certifi's bundle, which lacks a company CA that the
    runner image (SSL_CERT_DIR) or the host has installed.
    """
    if settings.cacert is not None:
        return str(settings.cacert)
    cert_dir = rt.environ.get("SSL_CERT_DIR", "")
    candidates = (
        rt.environ.get("REQUESTS_CA_BUNDLE"),
        rt.environ.get("SSL_CERT_FILE"),
        str(Path(cert_dir, "ca-certificates.crt")) if cert_dir else None,
        ssl.get_default_verify_paths().cafile,
    )
    return next((c for c in candidates if c and Path(c).is_file()), True)


def _call(
    rt: Runtime,
    settings: VaultSettings,
    func: Callable[[], T],
    refused: Callable[[VaultSettings, hvac.exceptions.VaultError], str],
) -> T:
    """Run one Vault request with retries; turn any failure into a one-line ExternalError."""
    try:
        return call_with_retry(
            func, policy=rt.shell.policy, classify=classify, what=f"Vault at {settings.addr}"
        )
    except hvac.exceptions.VaultError as exc:
        if classify(exc) is not None:
            raise ExternalError(_unavailable(rt, settings, exc)) from None
        raise ExternalError(refused(settings, exc)) from None
    except requests.exceptions.SSLError as exc:
        raise ExternalError(
            f"VAULT_ADDR={settings.addr}: TLS verification failed ({_tls_reason(exc)}); "
            "set VAULT_CACERT to the CA bundle that signed Vault's certificate"
        ) from None
    except requests.exceptions.RequestException as exc:
        raise ExternalError(_unavailable(rt, settings, exc)) from None


def classify(error: BaseException) -> str | None:
    """Transient Vault failures: sealed or down, overloaded, unreachable, slow."""
    transient: tuple[tuple[type[BaseException], str], ...] = (
        (hvac.exceptions.VaultDown, "sealed or unavailable (503)"),
        (hvac.exceptions.BadGateway, "bad gateway (502)"),
        (hvac.exceptions.InternalServerError, "server error (500)"),
        (hvac.exceptions.RateLimitExceeded, "rate limited (429)"),
        (requests.exceptions.SSLError, ""),
        (requests.exceptions.Timeout, "timed out"),
        (requests.exceptions.ConnectionError, "unreachable"),
    )
    for kind, reason in transient:
        if isinstance(error, kind):
            return reason or None
    return None


def _unavailable(rt: Runtime, settings: VaultSettings, exc: BaseException) -> str:
    reason = classify(exc) or type(exc).__name__
    said = _vault_text(exc) if isinstance(exc, hvac.exceptions.VaultError) else ""
    detail = f": {said}" if said and said != type(exc).__name__ else ""
    return (
        f"Vault at VAULT_ADDR={settings.addr} failed after {rt.shell.policy.attempts} "
        f"attempts ({reason}{detail}); "
        "check VAULT_ADDR and that Vault is unsealed and reachable from the runner"
    )


def _login_failure(settings: VaultSettings, exc: hvac.exceptions.VaultError) -> str:
    text = _vault_text(exc)
    where = f"auth/{settings.auth_path}"
    if (
        isinstance(exc, hvac.exceptions.Forbidden | hvac.exceptions.InvalidPath)
        and "role" not in text
    ):
        return (
            f"Vault has no JWT auth method at {where} ({text}): set PIPELINE_VAULT_AUTH_PATH "
            "to the mount of the JWT auth method (the path in auth/<mount>/login)"
        )
    for needle, hint in _LOGIN_HINTS:
        if needle in text.lower():
            what = hint.format(role=settings.role, mount=settings.auth_path)
            return f"Vault refused the JWT login for role {settings.role} at {where}: {what}"
    return f"Vault refused the JWT login for role {settings.role} at {where}: {text}"


def _read_failure(
    client: Any, path: str, policies: str
) -> Callable[[VaultSettings, hvac.exceptions.VaultError], str]:
    def explain(settings: VaultSettings, exc: hvac.exceptions.VaultError) -> str:
        hint = _kv_hint(client, path) if isinstance(exc, _MISSING) else ""
        if isinstance(exc, hvac.exceptions.InvalidPath) and _deleted(exc):
            return (
                f"Vault secret {path}: its latest version was {_deleted(exc)}; "
                "undelete it (vault kv undelete) or write it again"
            )
        if isinstance(exc, hvac.exceptions.InvalidPath):
            fix = hint or "check PIPELINE_VAULT_SECRET_PATH and that the secret is written there"
            return f"Vault has no secret at {path}: {fix}"
        if isinstance(exc, hvac.exceptions.Forbidden):
            fix = hint or f"grant read on {path} to a policy of role {settings.role}"
            return (
                f"Vault denied reading {path} to role {settings.role} (policies: {policies}): {fix}"
            )
        return f"Vault refused reading {path}: {_vault_text(exc)}"

    return explain


def _deleted(exc: hvac.exceptions.VaultError) -> str:
    """'deleted at <time>' / 'destroyed' when a KV v2 404 is a deleted latest version."""
    metadata = _dig(exc.json, "data", "metadata")
    if metadata.get("destroyed"):
        return "destroyed"
    return f"deleted at {metadata['deletion_time']}" if metadata.get("deletion_time") else ""


def _dig(value: object, *keys: str) -> Mapping[str, Any]:
    """``value[k1][k2]...`` when every level is a mapping, else empty."""
    for key in keys:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _kv_hint(client: Any, path: str) -> str:
    """The usual mistake, from the mount's KV version: ``data/`` missing (v2) or extra (v1).

    ``sys/internal/ui/mounts/<path>`` is what the vault CLI asks too; CI tokens can read
    it for their own paths. Without it, guess from the path alone.
    """
    mount, version = _mount(client, path)
    rest = path.removeprefix(f"{mount}/")
    if version == "2" and not rest.startswith("data/"):
        return f"KV v2 paths need data/: try {mount}/data/{rest} (PIPELINE_VAULT_SECRET_PATH)"
    if version == "1" and rest.startswith("data/"):
        fixed = rest.removeprefix("data/")
        return f"{mount} is a KV v1 mount, its paths have no data/: try {mount}/{fixed}"
    return ""


def _mount(client: Any, path: str) -> tuple[str, str]:
    """(mount path, KV version) of ``path``; a guess (first segment, v2) if Vault won't say."""
    guess = (path.partition("/")[0], "2" if "/data/" not in f"/{path}" else "")
    try:
        answer = client.adapter.get(f"/v1/sys/internal/ui/mounts/{path}")
    except (hvac.exceptions.VaultError, requests.exceptions.RequestException):
        return guess
    mount = _dig(answer, "data")
    if mount.get("type") not in ("kv", "generic"):
        return guess
    version = str(_dig(mount, "options").get("version") or "1")
    return str(mount.get("path", "")).rstrip("/") or guess[0], version


def _secret_data(path: str, response: Any) -> Mapping[str, Any]:
    """The key/value pairs of a KV v2 (``data.data`` + ``data.metadata``) or KV v1 answer."""
    data = response.get("data") if isinstance(response, Mapping) else None
    if not isinstance(data, Mapping):
        raise ExternalError(f"Vault answered {path} without a data object: is it a KV secret?")
    inner = data.get("data")
    if "/data/" in f"/{path}" and isinstance(inner, Mapping) and "metadata" in data:
        return inner
    return data


def _credentials(settings: VaultSettings, path: str, data: Mapping[str, Any]) -> Credentials:
    wanted = (settings.username_field, settings.password_field)
    missing = [name for name in wanted if not isinstance(data.get(name), str) or not data[name]]
    if missing:
        variables = {
            settings.username_field: "PIPELINE_VAULT_USERNAME_FIELD",
            settings.password_field: "PIPELINE_VAULT_PASSWORD_FIELD",
        }
        has = ", ".join(sorted(data)) or "nothing"
        return _missing_fields(path, missing, has, variables)
    return Credentials(username=data[wanted[0]], password=data[wanted[1]], source=f"vault {path}")


def _missing_fields(
    path: str, missing: list[str], has: str, variables: Mapping[str, str]
) -> Credentials:
    names = " and ".join(repr(name) for name in missing)
    settings = " / ".join(variables[name] for name in missing)
    raise ExternalError(
        f"Vault secret {path} has no {names} field (it has: {has}): add it to the secret or set {settings}"
    )


def _vault_text(exc: hvac.exceptions.VaultError) -> str:
    """Vault's error list as one line (it wraps errors in "1 error occurred: * ...")."""
    errors = " ".join(str(error) for error in exc.errors or [] if error)
    text = errors or str(exc.args[0] if exc.args else type(exc).__name__)
    text = re.sub(r"\d+ errors? occurred:|^\s*\*\s*", " ", text, flags=re.M)
    return " ".join(text.split()) or type(exc).__name__


def _tls_reason(exc: BaseException) -> str:
    """``certificate verify failed: ...`` out of urllib3's nested repr."""
    found = re.search(r"\] ([^'\"]+?)(?: \(_ssl\.c:\d+\))?['\"]", str(exc))
    return found.group(1) if found else _first_line(exc)


def _first_line(value: object) -> str:
    return str(value).strip().splitlines()[0] if str(value).strip() else ""
