"""The tag plan: which tags an image gets, as a pure function of the context.

| trigger              | immutable tag                  | moving tag |
|----------------------|--------------------------------|------------|
| default branch       | ``{slug}-{short-sha}``         | latest     |
| any other branch     | ``branch-{slug}-{short-sha}``  | none       |
| tag ``vX.Y.Z``       | ``X.Y.Z``                      | stable     |
| tag ``vX.Y.Z-pre``   | ``X.Y.Z-pre``                  | none       |
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from pipeline.errors import UsageError

SHORT_SHA_LENGTH = 8
SLUG_LENGTH = 63
DOCKER_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
VERSION_TAG = re.compile(
    r"v(?P<version>(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-(?P<pre>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?)(?P<build>\+[0-9A-Za-z.-]*)?\Z"
)
_NOT_SLUG = re.compile(r"[^a-z0-9]")


class Trigger(StrEnum):
    DEFAULT_BRANCH = "default-branch"
    BRANCH = "branch"
    RELEASE = "release"
    PRE_RELEASE = "pre-release"


@dataclass(frozen=True, kw_only=True)
class Ref:
    """What was pushed: a branch or a tag, at a commit."""

    name: str
    is_tag: bool
    sha: str
    default_branch: str
    slug: str | None = None


@dataclass(frozen=True, kw_only=True)
class TagPlan:
    """Tags for one build: pushed by build (immutable) and moved by push (moving)."""

    trigger: Trigger
    ref_name: str
    immutable_tags: tuple[str, ...]
    moving_tags: tuple[str, ...]
    push_repository: str
    pull_repository: str

    @property
    def image_tag(self) -> str:
        """The primary immutable tag, ``IMAGE_TAG`` in ``build.env``."""
        return self.immutable_tags[0]

    def push_ref(self, tag: str) -> str:
        return f"{self.push_repository}:{tag}"

    def pull_ref(self, tag: str) -> str:
        return f"{self.pull_repository}:{tag}"


def slugify(ref_name: str) -> str:
    """GitLab's ``CI_COMMIT_REF_SLUG``: lower-case, non-alphanumerics to ``-``, 63 chars, trimmed."""
    return _NOT_SLUG.sub("-", ref_name.lower())[:SLUG_LENGTH].strip("-")


def short_sha(sha: str) -> str:
    return sha[:SHORT_SHA_LENGTH]


def check_tag(tag: str, *, what: str = "tag") -> str:
    """Return ``tag`` if Docker accepts it, else refuse naming the rule."""
    if not DOCKER_TAG.match(tag):
        raise UsageError(
            f"{what} {tag!r} is not a valid Docker tag "
            "(1-128 characters of A-Z a-z 0-9 _ . -, not starting with . or -)"
        )
    return tag


def plan_tags(ref: Ref, *, push_repository: str, pull_repository: str) -> TagPlan:
    """The tag plan for ``ref``; refuses a git tag that is not ``vX.Y.Z[-pre]``."""
    trigger, immutable, moving = _tags_for(ref)
    for tag in (*immutable, *moving):
        check_tag(tag)
    return TagPlan(
        trigger=trigger,
        ref_name=ref.name,
        immutable_tags=immutable,
        moving_tags=moving,
        push_repository=push_repository,
        pull_repository=pull_repository,
    )


def _tags_for(ref: Ref) -> tuple[Trigger, tuple[str, ...], tuple[str, ...]]:
    if ref.is_tag:
        return _release_tags(ref.name)
    slug = ref.slug if ref.slug is not None else slugify(ref.name)
    if ref.name == ref.default_branch:
        return Trigger.DEFAULT_BRANCH, (f"{slug}-{short_sha(ref.sha)}",), ("latest",)
    return Trigger.BRANCH, (f"branch-{slug}-{short_sha(ref.sha)}",), ()


def _release_tags(name: str) -> tuple[Trigger, tuple[str, ...], tuple[str, ...]]:
    match = VERSION_TAG.match(name)
    if match is None:
        raise UsageError(
            f"git tag {name!r} is not a version tag: expected v<major>.<minor>.<patch>"
            "[-<pre-release>], e.g. v1.2.3 or v1.2.3-rc.1"
        )
    if match["build"] is not None:
        raise UsageError(
            f"git tag {name!r} has build metadata ({match['build']}): Docker tags cannot "
            "hold '+'; tag the release as v<major>.<minor>.<patch>[-<pre-release>]"
        )
    version = match["version"]
    if match["pre"] is not None:
        return Trigger.PRE_RELEASE, (version,), ()
    return Trigger.RELEASE, (version,), ("stable",)
