"""The command line: help, mode banner, tags in each platform case, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import Command, _import
from pipeline.errors import NotBuiltError
from tests.clirun import base_env, error_lines, run_cli
from tests.gitrepo import make_repo

SHA = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"


def ci_env(**extra: str) -> dict[str, str]:
    return base_env(
        GITLAB_CI="true",
        CI_COMMIT_SHA=SHA,
        CI_DEFAULT_BRANCH="main",
        CI_PROJECT_NAME="server",
        NEXUS_REGISTRY="nexus.example.test:8443",
        NEXUS_REGISTRY_PULL="nexus.example.test:8444",
        **extra,
    )


def tags_json(env: dict[str, str], cwd: Path) -> dict[str, object]:
    done = run_cli(["tags", "--json"], env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    data: dict[str, object] = json.loads(done.stdout)
    return data


def test_help_lists_stages_and_commands() -> None:
    done = run_cli(["--help"])
    assert done.returncode == 0
    for name in (
        "build",
        "push",
        "trivy-image-scan",
        "deploy-dev",
        "tags",
        "artifact",
        "login",
        "plan",
        "run",
    ):
        assert f"    {name}" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["deploy"], "argument <command>: invalid choice: 'deploy'"),
        (["tags", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (
            ["tags", "--dry-run", "--execute"],
            "argument --execute: not allowed with argument --dry-run",
        ),
    ],
)
def test_usage_errors_are_one_line_exit_2(args: list[str], message: str) -> None:
    done = run_cli(args)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("pipeline: error: ")
    assert message in lines[0]


def test_a_command_not_built_yet_is_exit_2() -> None:
    with pytest.raises(NotBuiltError, match="^stage 'x' is not built yet") as info:
        _import(Command(name="x", help="", module="pipeline.stages.not_there", stage=True))
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("extra", "image_tag", "moving"),
    [
        (
            {
                "CI_COMMIT_BRANCH": "main",
                "CI_COMMIT_REF_NAME": "main",
                "CI_COMMIT_REF_SLUG": "main",
            },
            "main-a1b2c3d4",
            ["latest"],
        ),
        (
            {"CI_COMMIT_BRANCH": "feature/Search_API", "CI_COMMIT_REF_NAME": "feature/Search_API"},
            "branch-feature-search-api-a1b2c3d4",
            [],
        ),
        ({"CI_COMMIT_TAG": "v1.4.0", "CI_COMMIT_REF_NAME": "v1.4.0"}, "1.4.0", ["stable"]),
        ({"CI_COMMIT_TAG": "v1.4.0-rc.2", "CI_COMMIT_REF_NAME": "v1.4.0-rc.2"}, "1.4.0-rc.2", []),
    ],
)
def test_tags_in_ci(
    extra: dict[str, str], image_tag: str, moving: list[str], tmp_path: Path
) -> None:
    data = tags_json(ci_env(**extra), tmp_path)
    assert data["image_tag"] == image_tag
    assert data["moving_tags"] == moving
    assert data["push_refs"] == [f"nexus.example.test:8443/orchestrator-server:{image_tag}"]
    assert data["pull_repository"] == "nexus.example.test:8444/orchestrator-server"


def test_banner_is_the_first_line(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    local = run_cli(["tags"], cwd=repo)
    assert (
        local.stderr.splitlines()[0]
        == "pipeline tags: dry-run (outside GitLab CI; --execute runs for real)"
    )
    forced = run_cli(["tags", "--execute"], cwd=repo)
    assert forced.stderr.splitlines()[0] == "pipeline tags: executing (--execute)"
    in_ci = run_cli(["tags"], env=ci_env(CI_COMMIT_BRANCH="main"), cwd=tmp_path)
    assert in_ci.stderr.splitlines()[0] == "pipeline tags: executing (GITLAB_CI=true)"
    dry_in_ci = run_cli(["tags", "--dry-run"], env=ci_env(CI_COMMIT_BRANCH="main"), cwd=tmp_path)
    assert "pipeline tags: dry-run (--dry-run)" in dry_in_ci.stderr.splitlines()[0]


def test_local_tags_from_git(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "svc", branch="main")
    data = tags_json(base_env(), repo)
    assert data["trigger"] == "default-branch"
    assert data["push_repository"] == "nexus.shared.cwiq.io:8443/orchestrator-svc"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GITLAB_CI": "true", "CI_COMMIT_BRANCH": "main"}, "CI_COMMIT_SHA is not set"),
        (
            {"CI_COMMIT_SHA": "xyz", "CI_COMMIT_BRANCH": "main"},
            "CI_COMMIT_SHA: must be a full hexadecimal commit SHA, got 'xyz'",
        ),
        (
            {"CI_COMMIT_SHA": SHA, "CI_COMMIT_TAG": "release-7"},
            "git tag 'release-7' is not a version tag",
        ),
        (
            {
                "NEXUS_REGISTRY": "https://nexus:8443/x",
                "CI_COMMIT_SHA": SHA,
                "CI_COMMIT_BRANCH": "m",
            },
            "NEXUS_REGISTRY: must be host:port without a scheme or path",
        ),
    ],
)
def test_bad_context_is_one_line_exit_2(env: dict[str, str], message: str, tmp_path: Path) -> None:
    done = run_cli(["tags"], env=base_env(**env), cwd=tmp_path)
    assert done.returncode == 2
    errors = error_lines(done.stderr)
    assert len(errors) == 1
    assert message in errors[0]
    assert "Traceback" not in done.stderr


def test_every_bad_setting_is_reported_together(tmp_path: Path) -> None:
    env = base_env(CI_COMMIT_SHA="nothex", NEXUS_REGISTRY_PULL="a/b", PIPELINE_RETRY_ATTEMPTS="0")
    done = run_cli(["tags"], env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert [line.split(":")[2].strip() for line in error_lines(done.stderr)] == [
        "CI_COMMIT_SHA",
        "NEXUS_REGISTRY_PULL",
        "PIPELINE_RETRY_ATTEMPTS",
    ]


def test_detached_head_locally(tmp_path: Path) -> None:
    from tests.gitrepo import git

    repo = make_repo(tmp_path / "r", commits=2)
    git(repo, "checkout", "-q", "HEAD~1")
    done = run_cli(["tags"], cwd=repo)
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        "pipeline: error: HEAD is detached and no tag points at it: check out a branch, or set "
        "CI_COMMIT_BRANCH or CI_COMMIT_TAG"
    ]


@pytest.mark.parametrize("branch", ['feat/$(touch pwned);`id`|"x"', "fix/ünïcödé-名前", "a" * 200])
def test_hostile_branch_names_give_safe_tags(branch: str, tmp_path: Path) -> None:
    data = tags_json(ci_env(CI_COMMIT_BRANCH=branch), tmp_path)
    tag = str(data["image_tag"])
    assert tag.startswith("branch-")
    assert tag.endswith("-a1b2c3d4")
    assert all(c.isascii() and (c.isalnum() or c in "-.") for c in tag)
    assert len(tag) <= 128
    assert not (tmp_path / "pwned").exists()


def test_unreadable_env_file(tmp_path: Path) -> None:
    done = run_cli(["tags", "--env-file", str(tmp_path / "nope.env")], cwd=tmp_path)
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        f"pipeline: error: --env-file {tmp_path / 'nope.env'}: cannot read it: No such file or directory"
    ]


def test_env_file_feeds_settings_and_secrets_are_masked(tmp_path: Path) -> None:
    env_file = tmp_path / "local.env"
    env_file.write_text(
        f"CI_COMMIT_SHA={SHA}\nCI_COMMIT_BRANCH=main\nNEXUS_USER=me\nNEXUS_PASSWORD=pa55-word-xyz\n"
    )
    done = run_cli(["tags", "--env-file", str(env_file)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "pa55-word-xyz" not in done.stderr + done.stdout
    assert "NEXUS_PASSWORD=[MASKED]" in done.stderr
    assert "main-a1b2c3d4" in done.stdout


def test_gitlab_sections_in_ci(tmp_path: Path) -> None:
    done = run_cli(["tags"], env=ci_env(CI_COMMIT_BRANCH="main"), cwd=tmp_path)
    assert "\x1b[0Ksection_start:" in done.stderr
    assert ":effective_settings[collapsed=true]\r" in done.stderr
