"""Settings: every problem at once, each naming its variable; env files; masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import SettingsError, UsageError
from pipeline.log import log
from pipeline.settings import (
    GitLabSettings,
    PipelineSettings,
    RegistrySettings,
    load,
    read_environment,
)


def test_defaults_are_the_platforms() -> None:
    loaded = load((RegistrySettings,), {})
    registry = loaded[RegistrySettings]
    assert isinstance(registry, RegistrySettings)
    assert registry.registry == "nexus.shared.cwiq.io:8443"
    assert registry.registry_pull == "nexus.shared.cwiq.io:8444"
    assert registry.repository_name("Server") == "orchestrator-server"


def test_every_problem_is_reported_at_once() -> None:
    environ = {
        "CI_COMMIT_SHA": "not-hex",
        "NEXUS_REGISTRY": "https://nexus:8443",
        "NEXUS_REGISTRY_PULL": "nexus:8444/path",
        "PIPELINE_RETRY_ATTEMPTS": "lots",
    }
    with pytest.raises(SettingsError) as info:
        load((GitLabSettings, RegistrySettings, PipelineSettings), environ)
    problems = info.value.problems
    assert [p.split(":", 1)[0] for p in problems] == [
        "CI_COMMIT_SHA",
        "NEXUS_REGISTRY",
        "NEXUS_REGISTRY_PULL",
        "PIPELINE_RETRY_ATTEMPTS",
    ]
    assert (
        problems[1]
        == "NEXUS_REGISTRY: must be host:port without a scheme or path, got 'https://nexus:8443'"
    )


def test_empty_values_count_as_unset() -> None:
    loaded = load((RegistrySettings,), {"NEXUS_REGISTRY": ""})
    assert loaded[RegistrySettings].registry == "nexus.shared.cwiq.io:8443"  # type: ignore[attr-defined]


def test_secrets_are_registered_and_masked_in_effective_settings() -> None:
    loaded = load((RegistrySettings,), {"NEXUS_USER": "ci", "NEXUS_PASSWORD": "s3cret-value"})
    shown = dict(loaded[RegistrySettings].effective())
    assert shown["NEXUS_PASSWORD"] == "[MASKED]"
    assert shown["NEXUS_USER"] == "ci"
    assert "s3cret-value" in log.secrets
    assert log.mask("pw=s3cret-value") == "pw=[MASKED]"


def test_nexus_image_must_agree() -> None:
    loaded = load((RegistrySettings,), {"NEXUS_IMAGE": "other:8443/x"})
    registry = loaded[RegistrySettings]
    assert isinstance(registry, RegistrySettings)
    with pytest.raises(SettingsError, match="NEXUS_IMAGE: is 'other:8443/x' but"):
        registry.check_image("orchestrator-server")


def test_env_file_values_yield_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("NEXUS_IMAGE_NAME=from-file\nPIPELINE_TEST_ONLY_KEY=file\n")
    monkeypatch.setenv("PIPELINE_TEST_ONLY_KEY", "env")
    environ = read_environment(env_file)
    assert environ["NEXUS_IMAGE_NAME"] == "from-file"
    assert environ["PIPELINE_TEST_ONLY_KEY"] == "env"


def test_unreadable_env_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(
        UsageError, match=r"^--env-file .*missing.env: cannot read it: No such file or directory$"
    ):
        read_environment(tmp_path / "missing.env")
