"""The tag plan: the platform's table, GitLab's slug, Docker's grammar, refusals."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import UsageError
from pipeline.tags import Ref, Trigger, check_tag, plan_tags, slugify

SHA = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
PUSH = "nexus.example.test:8443/orchestrator-server"
PULL = "nexus.example.test:8444/orchestrator-server"
DOCKER_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def plan(name: str, *, is_tag: bool = False, default: str = "main", slug: str | None = None):  # type: ignore[no-untyped-def]
    ref = Ref(name=name, is_tag=is_tag, sha=SHA, default_branch=default, slug=slug)
    return plan_tags(ref, push_repository=PUSH, pull_repository=PULL)


def gitlab_slug(name: str) -> str:
    """GitLab's algorithm, written out independently: downcase, replace, cut, trim."""
    out = []
    for char in name.lower():
        out.append(char if ("a" <= char <= "z" or "0" <= char <= "9") else "-")
    return "".join(out)[:63].strip("-")


@pytest.mark.parametrize(
    ("name", "is_tag", "trigger", "immutable", "moving"),
    [
        ("main", False, Trigger.DEFAULT_BRANCH, ("main-a1b2c3d4",), ("latest",)),
        ("feature/Search_API", False, Trigger.BRANCH, ("branch-feature-search-api-a1b2c3d4",), ()),
        ("v1.2.3", True, Trigger.RELEASE, ("1.2.3",), ("stable",)),
        ("v1.2.3-rc.1", True, Trigger.PRE_RELEASE, ("1.2.3-rc.1",), ()),
        ("v10.0.0-beta", True, Trigger.PRE_RELEASE, ("10.0.0-beta",), ()),
    ],
)
def test_platform_table(
    name: str, is_tag: bool, trigger: Trigger, immutable: tuple[str, ...], moving: tuple[str, ...]
) -> None:
    result = plan(name, is_tag=is_tag)
    assert result.trigger is trigger
    assert result.immutable_tags == immutable
    assert result.moving_tags == moving
    assert result.image_tag == immutable[0]
    assert result.push_ref(immutable[0]) == f"{PUSH}:{immutable[0]}"
    assert result.pull_ref(immutable[0]) == f"{PULL}:{immutable[0]}"


def test_default_branch_is_the_projects_not_main() -> None:
    assert plan("develop", default="develop").immutable_tags == ("develop-a1b2c3d4",)
    assert plan("main", default="develop").moving_tags == ()
    assert plan("main", default="develop").immutable_tags == ("branch-main-a1b2c3d4",)


def test_gitlab_slug_is_used_when_given() -> None:
    assert plan("feature/x", slug="given-slug").image_tag == "branch-given-slug-a1b2c3d4"


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("feature/Search_API", "feature-search-api"),
        ("--Lead--and--trail--", "lead--and--trail"),
        ("a" * 70, "a" * 63),
        ("x" * 62 + "/y", "x" * 62),
        ("fix/ünïcode-näme", "fix--n-code-n-me"),
        ("$(rm -rf /);`id`", "rm--rf-----id"),
    ],
)
def test_slugify_matches_gitlab(name: str, slug: str) -> None:
    assert slugify(name) == slug


@pytest.mark.parametrize("name", ["release-1", "1.2.3", "v1.2", "v1.2.3.4", "v01.2.3", "latest"])
def test_non_version_git_tag_is_refused(name: str) -> None:
    with pytest.raises(
        UsageError, match=r"is not a version tag: expected v<major>\.<minor>\.<patch>"
    ):
        plan(name, is_tag=True)


def test_build_metadata_is_refused_with_the_reason() -> None:
    with pytest.raises(UsageError, match=r"build metadata \(\+build\.5\)"):
        plan("v1.2.3+build.5", is_tag=True)


def test_overlong_version_tag_is_refused() -> None:
    with pytest.raises(UsageError, match="is not a valid Docker tag"):
        plan("v1.2.3-" + "a" * 130, is_tag=True)


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a" * 129, "a b", "a/b", "ä"])
def test_check_tag_refuses(tag: str) -> None:
    with pytest.raises(UsageError, match="is not a valid Docker tag"):
        check_tag(tag)


@given(st.text(min_size=1, max_size=300))
def test_any_branch_name_gives_a_valid_safe_tag(name: str) -> None:
    result = plan(name)
    for tag in (*result.immutable_tags, *result.moving_tags):
        assert DOCKER_TAG.fullmatch(tag)
        assert len(tag) <= 128


@given(st.text(max_size=300))
def test_slug_is_gitlabs_algorithm(name: str) -> None:
    slug = slugify(name)
    assert slug == gitlab_slug(name)
    assert re.fullmatch(r"([a-z0-9]([a-z0-9-]*[a-z0-9])?)?", slug)
    assert len(slug) <= 63


versions = st.tuples(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.one_of(
        st.none(), st.from_regex(r"[0-9A-Za-z-]{1,20}(\.[0-9A-Za-z-]{1,10}){0,3}", fullmatch=True)
    ),
)


@given(versions)
def test_version_tags_get_stable_only_when_not_pre_release(
    version: tuple[int, int, int, str | None],
) -> None:
    major, minor, patch, pre = version
    name = f"v{major}.{minor}.{patch}" + (f"-{pre}" if pre else "")
    result = plan(name, is_tag=True)
    assert result.immutable_tags == (name[1:],)
    assert result.moving_tags == (() if pre else ("stable",))
    assert all(DOCKER_TAG.fullmatch(tag) for tag in result.immutable_tags)
