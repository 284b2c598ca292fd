"""Who, what and where: the GitLab context, or the same inferred from git locally.

In a job every value comes from GitLab's ``CI_*`` variables. On a laptop each
``CI_*`` variable that is set still wins, and git fills in the rest: the commit
at HEAD, the branch (or the tag at a detached HEAD), the default branch from
``origin/HEAD`` (else ``main``), the project from the remote URL (else the
directory name).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.settings import GitLabSettings
from pipeline.shell import Shell
from pipeline.tags import VERSION_TAG, Ref, short_sha

DEFAULT_BRANCH_FALLBACK = "main"


@dataclass(frozen=True, kw_only=True)
class Context:
    """Everything the stages need to know about the commit being built."""

    in_ci: bool
    ref: Ref
    project_name: str
    project_dir: Path
    project_url: str | None = None
    pipeline_id: str | None = None
    job_url: str | None = None
    commit_timestamp: str | None = None

    @property
    def sha(self) -> str:
        return self.ref.sha

    @property
    def short_sha(self) -> str:
        return short_sha(self.ref.sha)


def detect(gitlab: GitLabSettings, shell: Shell, cwd: Path) -> Context:
    """The context from ``CI_*`` variables, falling back to git outside CI."""
    if gitlab.gitlab_ci:
        return _from_gitlab(gitlab, cwd)
    return _from_git(gitlab, _Git(shell, cwd), cwd)


def _from_gitlab(gitlab: GitLabSettings, cwd: Path) -> Context:
    if not gitlab.commit_sha:
        raise UsageError(
            "CI_COMMIT_SHA is not set: GitLab sets it in every job; is GITLAB_CI=true set by hand?"
        )
    if gitlab.commit_tag:
        name, is_tag = gitlab.commit_tag, True
    elif gitlab.commit_branch or gitlab.commit_ref_name:
        name, is_tag = (gitlab.commit_branch or gitlab.commit_ref_name or ""), False
    else:
        raise UsageError(
            "neither CI_COMMIT_BRANCH nor CI_COMMIT_TAG is set: run in a branch or tag pipeline"
        )
    project_dir = gitlab.project_dir or cwd
    ref = Ref(
        name=name,
        is_tag=is_tag,
        sha=gitlab.commit_sha,
        default_branch=gitlab.default_branch or DEFAULT_BRANCH_FALLBACK,
        slug=_given_slug(gitlab, name, is_tag=is_tag),
    )
    return _context(gitlab, ref, gitlab.project_name or project_dir.name, project_dir, in_ci=True)


def _from_git(gitlab: GitLabSettings, git: _Git, cwd: Path) -> Context:
    sha = gitlab.commit_sha or git.head()
    if gitlab.commit_tag:
        name, is_tag = gitlab.commit_tag, True
    elif gitlab.commit_branch:
        name, is_tag = gitlab.commit_branch, False
    else:
        name, is_tag = git.ref_at_head()
    ref = Ref(
        name=name,
        is_tag=is_tag,
        sha=sha,
        default_branch=gitlab.default_branch or git.default_branch(),
        slug=_given_slug(gitlab, name, is_tag=is_tag),
    )
    project_dir = gitlab.project_dir or git.toplevel() or cwd
    project = gitlab.project_name or git.project_name() or project_dir.name
    return _context(gitlab, ref, project, project_dir, in_ci=False)


def _given_slug(gitlab: GitLabSettings, name: str, *, is_tag: bool) -> str | None:
    """GitLab's slug when it describes this branch; otherwise it is computed."""
    if is_tag or gitlab.commit_ref_name not in (None, name):
        return None
    return gitlab.commit_ref_slug


def _context(
    gitlab: GitLabSettings, ref: Ref, project: str, project_dir: Path, *, in_ci: bool
) -> Context:
    return Context(
        in_ci=in_ci,
        ref=ref,
        project_name=project,
        project_dir=project_dir,
        project_url=gitlab.project_url,
        pipeline_id=gitlab.pipeline_id,
        job_url=gitlab.job_url,
        commit_timestamp=gitlab.commit_timestamp,
    )


def _release_first(tag: str) -> tuple[bool, bool, str]:
    """Order tags at one commit: a release, then a pre-release, then any other tag."""
    match = VERSION_TAG.match(tag)
    return (match is not None and match["pre"] is None, match is not None, tag)


@dataclass(frozen=True)
class _Git:
    """Read-only git queries; they run under dry-run too."""

    shell: Shell
    cwd: Path

    def _query(self, *args: str) -> str | None:
        result = self.shell.run(
            ["git", *args], query=True, cwd=self.cwd, stream=False, ok_codes=range(256)
        )
        return result.stdout.strip() if result.returncode == 0 else None

    @cached_property
    def _head(self) -> tuple[str, str, str] | None:
        """(toplevel, commit, symbolic ref or HEAD when detached) in one git call."""
        answer = self._query("rev-parse", "--show-toplevel", "HEAD", "--symbolic-full-name", "HEAD")
        lines = (answer or "").splitlines()
        return (lines[0], lines[1], lines[2]) if len(lines) == 3 else None

    def head(self) -> str:
        if self._head is None:
            raise UsageError(
                f"{self.cwd} is not a git checkout with a commit: run inside one, or set "
                "CI_COMMIT_SHA and CI_COMMIT_BRANCH (or CI_COMMIT_TAG)"
            )
        return self._head[1]

    def ref_at_head(self) -> tuple[str, bool]:
        symbolic = self._head[2] if self._head else "HEAD"
        if symbolic.startswith("refs/heads/"):
            return symbolic.removeprefix("refs/heads/"), False
        tags = (self._query("tag", "--points-at", "HEAD") or "").split()
        if tags:
            return max(tags, key=_release_first), True
        raise UsageError(
            "HEAD is detached and no tag points at it: check out a branch, or set "
            "CI_COMMIT_BRANCH or CI_COMMIT_TAG"
        )

    def default_branch(self) -> str:
        remote_head = self._query("symbolic-ref", "-q", "--short", "refs/remotes/origin/HEAD")
        if remote_head and "/" in remote_head:
            return remote_head.split("/", 1)[1]
        return DEFAULT_BRANCH_FALLBACK

    def toplevel(self) -> Path | None:
        return Path(self._head[0]) if self._head else None

    def project_name(self) -> str | None:
        url = self._query("remote", "get-url", "origin")
        if not url:
            return None
        name = url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        return name.removesuffix(".git") or None
