"""git: argv builders for the questions the pipeline asks a checkout.

Pure: nothing here runs git. Exit codes the caller must read are documented on
each builder (``git merge-base --is-ancestor`` answers with its exit code).
"""

from __future__ import annotations

#: Exit codes that answer a question rather than fail: 0 yes, 1 no, 128 unknown object
#: or not a repository.
ANSWER_CODES = (0, 1, 128)


def is_ancestor(ancestor: str, descendant: str) -> list[str]:
    """Whether ``ancestor`` is reachable from ``descendant``: exit 0 yes, 1 no, 128 unknown."""
    return ["git", "merge-base", "--is-ancestor", ancestor, descendant]


def has_commit(sha: str) -> list[str]:
    """Exit 0 when the commit object is in the local repository."""
    return ["git", "cat-file", "-e", f"{sha}^{{commit}}"]


def is_shallow() -> list[str]:
    """Prints ``true`` in a shallow clone, ``false`` otherwise."""
    return ["git", "rev-parse", "--is-shallow-repository"]


def deepen(remote: str, commits: int) -> list[str]:
    """Fetch ``commits`` more commits of history below the shallow boundary."""
    return ["git", "fetch", "--no-tags", "--quiet", f"--deepen={commits}", remote]


def unshallow(remote: str) -> list[str]:
    """Fetch the whole history of a shallow clone."""
    return ["git", "fetch", "--no-tags", "--quiet", "--unshallow", remote]


def fetch_commit(remote: str, sha: str) -> list[str]:
    """Fetch one commit by name (a newer commit the job's clone never saw)."""
    return ["git", "fetch", "--no-tags", "--quiet", remote, sha]
