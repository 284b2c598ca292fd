"""The context: from GitLab's variables in CI, inferred from git outside."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.context import detect
from pipeline.errors import UsageError
from pipeline.settings import GitLabSettings, load
from pipeline.shell import Shell
from tests.gitrepo import git, make_repo

SHA = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"


def context_of(environ: dict[str, str], cwd: Path):  # type: ignore[no-untyped-def]
    gitlab = load((GitLabSettings,), environ)[GitLabSettings]
    assert isinstance(gitlab, GitLabSettings)
    shell = Shell(dry_run=True, base_env={"PATH": os.environ["PATH"]})
    return detect(gitlab, shell, cwd)


def test_gitlab_branch_pipeline(tmp_path: Path) -> None:
    ctx = context_of(
        {
            "GITLAB_CI": "true",
            "CI_COMMIT_SHA": SHA,
            "CI_COMMIT_BRANCH": "feature/x",
            "CI_COMMIT_REF_NAME": "feature/x",
            "CI_COMMIT_REF_SLUG": "feature-x",
            "CI_DEFAULT_BRANCH": "main",
            "CI_PROJECT_NAME": "server",
            "CI_PROJECT_DIR": str(tmp_path),
        },
        tmp_path,
    )
    assert ctx.in_ci
    assert (ctx.ref.name, ctx.ref.is_tag, ctx.ref.slug) == ("feature/x", False, "feature-x")
    assert ctx.project_name == "server"
    assert ctx.short_sha == "a1b2c3d4"


def test_gitlab_tag_pipeline(tmp_path: Path) -> None:
    ctx = context_of(
        {
            "GITLAB_CI": "true",
            "CI_COMMIT_SHA": SHA,
            "CI_COMMIT_TAG": "v1.0.0",
            "CI_COMMIT_REF_NAME": "v1.0.0",
        },
        tmp_path,
    )
    assert (ctx.ref.name, ctx.ref.is_tag) == ("v1.0.0", True)


def test_missing_commit_sha_in_ci(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="^CI_COMMIT_SHA is not set"):
        context_of({"GITLAB_CI": "true", "CI_COMMIT_BRANCH": "main"}, tmp_path)


def test_local_branch_default_branch_and_project_from_git(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "checkout", branch="feature/Local")
    git(repo, "remote", "add", "origin", "git@gitlab.example.test:group/my-service.git")
    git(repo, "update-ref", "refs/remotes/origin/develop", "HEAD")
    git(repo, "symbolic-ref", "refs/remotes/origin/HEAD", "refs/remotes/origin/develop")
    ctx = context_of({}, repo)
    assert not ctx.in_ci
    assert (ctx.ref.name, ctx.ref.is_tag) == ("feature/Local", False)
    assert ctx.ref.default_branch == "develop"
    assert ctx.ref.sha == git(repo, "rev-parse", "HEAD")
    assert ctx.project_name == "my-service"
    assert ctx.project_dir == repo


def test_local_defaults_without_remote(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "plain-dir")
    ctx = context_of({}, repo)
    assert ctx.ref.default_branch == "main"
    assert ctx.project_name == "plain-dir"


def test_local_detached_head_at_a_release_tag(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    git(repo, "tag", "v2.0.0-rc.1")
    git(repo, "tag", "v2.0.0")
    git(repo, "checkout", "-q", "--detach")
    ctx = context_of({}, repo)
    assert (ctx.ref.name, ctx.ref.is_tag) == ("v2.0.0", True)


def test_local_detached_head_without_tag_is_refused(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", commits=2)
    git(repo, "checkout", "-q", "HEAD~1")
    with pytest.raises(
        UsageError, match="^HEAD is detached and no tag points at it: check out a branch"
    ):
        context_of({}, repo)


def test_ci_variables_win_over_git_locally(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    ctx = context_of({"CI_COMMIT_SHA": SHA, "CI_COMMIT_BRANCH": "other"}, repo)
    assert (ctx.ref.sha, ctx.ref.name) == (SHA, "other")


def test_outside_git_without_variables(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a git checkout with a commit"):
        context_of({}, tmp_path)
