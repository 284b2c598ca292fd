"""Registry credentials: sources in order, and the config.json written for both registries."""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Mapping
from pathlib import Path

import pytest

from pipeline import auth
from pipeline.auth import Credentials, docker_config, pull_credentials, registry_credentials
from pipeline.errors import SettingsError, UsageError
from pipeline.log import log
from pipeline.runtime import Runtime
from pipeline.settings import (
    GitLabSettings,
    PipelineSettings,
    RegistrySettings,
    VaultSettings,
    load,
)
from pipeline.shell import Shell

PUSH = "127.0.0.1:8443"
PULL = "127.0.0.1:8444"
PASSWORD = "env-pass-5f3a9c"


def runtime(
    tmp_path: Path, env: Mapping[str, str] | None = None, *, dry_run: bool = False
) -> Runtime:
    """A Runtime over an explicit environment, as the CLI builds it."""
    environ = {"HOME": str(tmp_path / "home"), "NEXUS_REGISTRY": PUSH, "NEXUS_REGISTRY_PULL": PULL}
    environ.update(env or {})
    models = (GitLabSettings, RegistrySettings, PipelineSettings, VaultSettings)
    return Runtime(
        command="login",
        dry_run=dry_run,
        environ=environ,
        shell=Shell(dry_run=dry_run, base_env=environ),
        cwd=tmp_path,
        loaded=load(models, environ),
    )


def env_account(**extra: str) -> dict[str, str]:
    return {"NEXUS_USER": "ci-bot", "NEXUS_PASSWORD": PASSWORD, **extra}


def docker_login(home: Path, entries: Mapping[str, tuple[str, str]], **extra: object) -> Path:
    """A developer's ~/.docker/config.json, as `docker login` writes it."""
    auths = {
        host: {"auth": base64.b64encode(f"{user}:{pw}".encode()).decode()}
        for host, (user, pw) in entries.items()
    }
    path = home / ".docker" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths, **extra}))
    return path


def auths_of(path: Path) -> dict[str, str]:
    """host -> decoded user:password of a config.json."""
    config = json.loads(path.read_text())
    return {host: base64.b64decode(e["auth"]).decode() for host, e in config["auths"].items()}


def test_credentials_hide_the_password_and_register_it() -> None:
    credentials = Credentials(username="u", password="hidden-pw-81", source="test")

    assert "hidden-pw-81" not in repr(credentials)
    assert "hidden-pw-81" in log.secrets
    assert credentials.auth in log.secrets
    assert base64.b64decode(credentials.auth) == b"u:hidden-pw-81"


def test_env_variables_win_over_every_other_source(tmp_path: Path) -> None:
    docker_login(tmp_path / "home", {PUSH: ("someone", "else")})
    rt = runtime(tmp_path, env_account(VAULT_ADDR="http://127.0.0.1:9", VAULT_ID_TOKEN="x.y.z"))

    credentials = registry_credentials(rt)

    assert credentials == Credentials(
        username="ci-bot", password=PASSWORD, source="NEXUS_USER/NEXUS_PASSWORD"
    )


def test_half_an_env_account_is_a_settings_error(tmp_path: Path) -> None:
    rt = runtime(tmp_path, {"NEXUS_USER": "ci-bot"})

    with pytest.raises(SettingsError) as info:
        registry_credentials(rt)

    assert str(info.value) == "NEXUS_PASSWORD: not set, but its partner is; set both or neither"


def test_docker_login_is_the_last_source(tmp_path: Path) -> None:
    path = docker_login(tmp_path / "home", {PUSH: ("dev", "push-pw"), PULL: ("dev", "pull-pw")})
    rt = runtime(tmp_path)

    push, pull = registry_credentials(rt), pull_credentials(rt)

    assert push == Credentials(username="dev", password="push-pw", source=f"docker config {path}")
    assert pull is not None
    assert pull.password == "pull-pw"


def test_docker_login_keys_with_scheme_and_path_are_recognised(tmp_path: Path) -> None:
    docker_login(tmp_path / "home", {f"https://{PULL}/v2/": ("dev", "only-pull")})

    credentials = registry_credentials(runtime(tmp_path))

    assert credentials is not None
    assert credentials.password == "only-pull"


def test_docker_config_variable_locates_the_users_login(tmp_path: Path) -> None:
    elsewhere = docker_login(tmp_path / "other", {PUSH: ("dev", "pw-elsewhere")})

    credentials = registry_credentials(runtime(tmp_path, {"DOCKER_CONFIG": str(elsewhere.parent)}))

    assert credentials is not None
    assert credentials.source == f"docker config {elsewhere}"


def test_credential_helper_logins_are_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "home" / ".docker" / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"auths": {PUSH: {}}, "credsStore": "desktop"}))

    assert registry_credentials(runtime(tmp_path)) is None
    assert f"the login for {PUSH} has no user:password" in capsys.readouterr().err


def test_unreadable_docker_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "home" / ".docker" / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")

    with pytest.raises(SettingsError, match=r"config\.json: not a readable docker config\.json"):
        registry_credentials(runtime(tmp_path))


def test_no_source_gives_none(tmp_path: Path) -> None:
    assert registry_credentials(runtime(tmp_path)) is None


def test_vault_address_without_id_token_in_ci_is_a_settings_error(tmp_path: Path) -> None:
    rt = runtime(tmp_path, {"GITLAB_CI": "true", "VAULT_ADDR": "http://127.0.0.1:9"})

    with pytest.raises(SettingsError, match=r"^VAULT_ID_TOKEN: not set, but VAULT_ADDR is"):
        registry_credentials(rt)


def test_id_token_without_vault_address_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^VAULT_ADDR: not set, but VAULT_ID_TOKEN is"):
        registry_credentials(runtime(tmp_path, {"VAULT_ID_TOKEN": "a.b.c"}))


def test_legacy_jwt_alone_does_not_select_vault(tmp_path: Path) -> None:
    # GitLab before 17.0 sets CI_JOB_JWT_V2 in every job, Vault or not.
    docker_login(tmp_path / "home", {PUSH: ("dev", "pw")})
    rt = runtime(tmp_path, {"GITLAB_CI": "true", "CI_JOB_JWT_V2": "a.b.c"})

    credentials = registry_credentials(rt)

    assert credentials is not None
    assert credentials.source.startswith("docker config ")


def test_vault_address_without_id_token_outside_ci_falls_through(tmp_path: Path) -> None:
    docker_login(tmp_path / "home", {PUSH: ("dev", "pw")})
    rt = runtime(tmp_path, {"GITLAB_CI": "false", "VAULT_ADDR": "http://127.0.0.1:9"})

    credentials = registry_credentials(rt)

    assert credentials is not None
    assert credentials.source.startswith("docker config ")


def test_config_has_both_registries_private_and_is_removed(tmp_path: Path) -> None:
    target = tmp_path / "dockercfg"
    rt = runtime(tmp_path, env_account(DOCKER_CONFIG=str(target)))

    with docker_config(rt) as directory:
        path = directory / "config.json"
        assert directory == target
        assert auths_of(path) == {PUSH: f"ci-bot:{PASSWORD}", PULL: f"ci-bot:{PASSWORD}"}
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700

    assert not target.exists()


def test_private_temporary_directory_when_nothing_is_configured(tmp_path: Path) -> None:
    rt = runtime(tmp_path, env_account())

    with docker_config(rt) as directory:
        assert directory.name.startswith("pipeline-docker-")
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert (directory / "config.json").is_file()

    assert not directory.exists()


def test_merge_keeps_other_entries_and_restores_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "dockercfg"
    target.mkdir()
    path = target / "config.json"
    previous = json.dumps(
        {
            "auths": {
                "other.example:5000": {"auth": "b3RoZXI6b25l"},
                PUSH: {"auth": "b2xkOm9sZA=="},
            },
            "HttpHeaders": {"X": "1"},
        }
    )
    path.write_text(previous)
    path.chmod(0o644)
    rt = runtime(tmp_path, env_account(DOCKER_CONFIG=str(target)))

    with docker_config(rt):
        merged = json.loads(path.read_text())
        assert merged["HttpHeaders"] == {"X": "1"}
        assert auths_of(path) == {
            "other.example:5000": "other:one",
            PUSH: f"ci-bot:{PASSWORD}",
            PULL: f"ci-bot:{PASSWORD}",
        }
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    assert path.read_text() == previous
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]


def test_config_is_removed_even_when_the_body_fails(tmp_path: Path) -> None:
    target = tmp_path / "dockercfg"
    rt = runtime(tmp_path, env_account(DOCKER_CONFIG=str(target)))

    with pytest.raises(RuntimeError), docker_config(rt):
        raise RuntimeError("the build failed")

    assert not target.exists()


def test_users_docker_login_is_copied_not_touched(tmp_path: Path) -> None:
    users = docker_login(tmp_path / "home", {PUSH: ("dev", "dev-pw")}, credsStore="")
    before = users.read_bytes()
    rt = runtime(tmp_path)

    with docker_config(rt) as directory:
        assert directory != users.parent
        assert auths_of(directory / "config.json") == {PUSH: "dev:dev-pw"}

    assert users.read_bytes() == before


def test_login_already_in_the_target_is_left_alone(tmp_path: Path) -> None:
    users = docker_login(tmp_path / "home", {PUSH: ("dev", "a"), PULL: ("dev", "b")})
    before = (users.read_bytes(), users.stat().st_mtime_ns)
    rt = runtime(tmp_path, {"DOCKER_CONFIG": str(users.parent)})

    with docker_config(rt) as directory:
        assert directory == users.parent

    assert (users.read_bytes(), users.stat().st_mtime_ns) == before


def test_without_credentials_the_directory_has_no_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with docker_config(runtime(tmp_path)) as directory:
        assert not (directory / "config.json").exists()

    assert not directory.exists()
    assert "no registry credentials: set NEXUS_USER/NEXUS_PASSWORD" in capsys.readouterr().err


def test_required_credentials_missing_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(
        UsageError, match=r"^no registry credentials: .* \(looked in .*config\.json\)$"
    ):
        auth.write_docker_config(runtime(tmp_path), required=True)


def test_dry_run_writes_nothing_and_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "dockercfg"
    rt = runtime(tmp_path, env_account(DOCKER_CONFIG=str(target)), dry_run=True)

    with docker_config(rt) as directory:
        assert directory == target
        assert not target.exists()

    err = capsys.readouterr().err
    assert f"would write auths for {PUSH} and {PULL} (NEXUS_USER/NEXUS_PASSWORD)" in err
    assert f"to {target}/config.json, mode 0600" in err


def test_dry_run_does_not_contact_vault(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on port 9: a contact attempt would fail, a plan does not.
    rt = runtime(
        tmp_path, {"VAULT_ADDR": "http://127.0.0.1:9", "VAULT_ID_TOKEN": "a.b.c"}, dry_run=True
    )

    with docker_config(rt):
        credentials = registry_credentials(rt)

    assert credentials is not None
    assert credentials.placeholder
    assert credentials.username == "<username from vault>"
    assert credentials.source == "vault secret/data/nexus/svc-orchestrator"
    err = capsys.readouterr().err
    assert "would log in to http://127.0.0.1:9/v1/auth/jwt/login as role nexus-ci" in err
    assert "(vault secret/data/nexus/svc-orchestrator)" in err
    assert "a private temporary directory" in err


def test_merging_under_a_credential_helper_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "dockercfg"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"auths": {}, "credsStore": "desktop"}))

    with docker_config(runtime(tmp_path, env_account(DOCKER_CONFIG=str(target)))):
        pass

    err = capsys.readouterr().err
    assert "names a credential helper (credsStore/credHelpers) that tools ask before" in err
    assert json.loads((target / "config.json").read_text()) == {
        "auths": {},
        "credsStore": "desktop",
    }


def test_runner_image_directory_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kaniko = tmp_path / "kaniko" / ".docker"
    kaniko.mkdir(parents=True)
    monkeypatch.setattr(auth, "KANIKO_DOCKER_DIR", kaniko)

    with docker_config(runtime(tmp_path, env_account())) as directory:
        assert directory == kaniko
        assert (kaniko / "config.json").is_file()

    assert kaniko.is_dir()
    assert list(kaniko.iterdir()) == []
