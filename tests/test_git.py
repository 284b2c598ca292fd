"""git argv builders (pure); their behaviour against real repositories is in test_push."""

from __future__ import annotations

from pipeline.tools import git


def test_git_builders() -> None:
    assert git.is_ancestor("a", "b") == ["git", "merge-base", "--is-ancestor", "a", "b"]
    assert git.has_commit("abc") == ["git", "cat-file", "-e", "abc^{commit}"]
    assert git.deepen("origin", 50)[-2:] == ["--deepen=50", "origin"]
    assert git.unshallow("origin")[-2:] == ["--unshallow", "origin"]
    assert git.fetch_commit("origin", "abc")[-2:] == ["origin", "abc"]
    assert git.is_shallow() == ["git", "rev-parse", "--is-shallow-repository"]
