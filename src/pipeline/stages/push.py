"""The push stage: promote the moving tags (``latest``, ``stable``) to the built digest.

It is the platform's ``push-latest`` job, done safely:

1. the immutable tag must still resolve to ``IMAGE_DIGEST`` in the push registry;
2. each moving tag is copied registry-side by digest (``skopeo copy --all
   --preserve-digests``: no layer moves, a multi-arch index stays whole), unless
   it already holds a newer commit: pipelines that finish out of order never
   move a tag backwards (git ancestry of the ``revision`` labels, creation time
   only when ancestry cannot be known);
3. the moving tag is read back and must resolve to ``IMAGE_DIGEST``;
4. the pull registry must serve ``IMAGE_DIGEST`` for the immutable tag within a
   bounded wait, so later jobs pulling from it get this image.

Transient registry failures are retried; 401, 403 and 404 fail at once with
what to fix. Under ``--dry-run`` the skopeo commands are printed, not run.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pipeline.artifact import BuildEnv
from pipeline.errors import ArtifactError, CommandError, ExternalError, PipelineError, UsageError
from pipeline.log import log
from pipeline.registry import access as registry_access
from pipeline.runtime import Runtime
from pipeline.settings import PushSettings, RegistrySettings, Settings, VaultSettings
from pipeline.shell import Result, Shell
from pipeline.tags import check_tag
from pipeline.tools import git, skopeo
from pipeline.tools.skopeo import Access, Failure, ImageInfo

SETTINGS: tuple[type[Settings], ...] = (PushSettings, VaultSettings)


def run(rt: Runtime) -> None:
    """Promote every moving tag in ``build.env`` to ``IMAGE_DIGEST``."""
    env = rt.read_build_env()
    tags = _moving_tags(env)
    if not tags:
        log.info(
            f"no moving tag for {env.IMAGE_TAG} (IMAGE_MOVING_TAGS is empty: a feature branch "
            "or a pre-release): nothing to promote"
        )
        return
    settings = rt.settings(PushSettings)
    _check_hosts(rt, env)
    with registry_access(rt) as access:
        registry = Registry(shell=rt.shell, access=access, timeout=settings.command_timeout_seconds)
        if rt.dry_run:
            _show(registry, env, tags)
            return
        _promote_all(rt, registry, env, tags)


def _promote_all(rt: Runtime, registry: Registry, env: BuildEnv, tags: tuple[str, ...]) -> None:
    settings = rt.settings(PushSettings)
    with log.step(f"verify {env.IMAGE_TAG}"):
        verify_immutable(registry, env)
    for tag in tags:
        with log.step(f"promote {tag}"):
            promote(rt, registry, env, tag)
    with log.step("wait for the pull registry"):
        wait_for_pull(registry, env, settings)


def _moving_tags(env: BuildEnv) -> tuple[str, ...]:
    for tag in env.moving_tags:
        check_tag(tag, what="moving tag (IMAGE_MOVING_TAGS)")
    clash = sorted(set(env.moving_tags) & set(env.immutable_tags))
    if clash:
        raise ArtifactError(
            f"IMAGE_MOVING_TAGS and IMAGE_IMMUTABLE_TAGS both hold {', '.join(clash)}: "
            "a moving tag would overwrite an immutable one; fix the build's tag plan"
        )
    return env.moving_tags


def _check_hosts(rt: Runtime, env: BuildEnv) -> None:
    """Credentials are written for the configured hosts: warn when build.env names others."""
    settings = rt.settings(RegistrySettings)
    for variable, repository, host in (
        ("NEXUS_REGISTRY", env.IMAGE_PUSH_REPOSITORY, settings.registry),
        ("NEXUS_REGISTRY_PULL", env.IMAGE_PULL_REPOSITORY, settings.registry_pull),
    ):
        if repository.split("/", 1)[0] != host:
            log.warn(
                f"build.env names {repository} but {variable} is {host}: "
                "credentials are written for the latter; set the same value in both jobs"
            )


# --- the registry, through skopeo ------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Registry:
    """Reads and promotes images with skopeo; turns its failures into actionable errors."""

    shell: Shell
    access: Access
    timeout: float

    def digest(self, reference: str, *, what: str) -> str | None:
        """The digest ``reference`` resolves to, or None when the registry does not have it."""
        result = self._run(skopeo.inspect_raw(reference, access=self.access), reference, what)
        return None if isinstance(result, Failure) else skopeo.raw_digest(result.stdout)

    def image(self, reference: str, *, what: str) -> ImageInfo | None:
        """Digest, labels and creation time of ``reference``; None when it does not exist."""
        argv = skopeo.inspect_image(reference, access=self.access)
        result = self._run(argv, reference, what, absent=(Failure.NOT_FOUND, Failure.NO_PLATFORM))
        if result is Failure.NO_PLATFORM:
            log.warn(f"{reference}: an index without an image for this platform; labels unread")
            found = self.digest(reference, what=what)
            return ImageInfo(digest=found) if found else None
        return None if isinstance(result, Failure) else skopeo.parse_inspect(result.stdout)

    def copy(self, source: str, destination: str) -> None:
        argv = skopeo.copy_by_digest(source=source, destination=destination, access=self.access)
        result = self._run(argv, source, f"copying {source} to {destination}", stream=True)
        if isinstance(result, Failure):
            raise ArtifactError(
                f"{source} is not in the push registry (it vanished after it was verified); "
                "run the build again"
            )

    def poll_digest(self, reference: str) -> str:
        """One look, no retries: the digest, or what the registry said instead."""
        argv = skopeo.inspect_raw(reference, access=self.access)
        try:
            result = self.shell.run(argv, stream=False, timeout=self.timeout, what=reference)
        except CommandError as exc:
            kind = skopeo.classify_failure(exc.stderr_tail)
            if kind in (Failure.UNAUTHORIZED, Failure.DENIED, Failure.TLS):
                raise explain(exc, reference, f"reading {reference}") from None
            return f"no image ({skopeo.error_message(exc.stderr_tail)})"
        return skopeo.raw_digest(result.stdout)

    def _run(
        self,
        argv: list[str],
        reference: str,
        what: str,
        *,
        stream: bool = False,
        absent: tuple[Failure, ...] = (Failure.NOT_FOUND,),
    ) -> Result | Failure:
        """Run with retries for transient failures; an ``absent`` kind of failure is returned."""
        try:
            return self.shell.run(
                argv, stream=stream, timeout=self.timeout, classify=skopeo.transient, what=what
            )
        except CommandError as exc:
            kind = skopeo.classify_failure(exc.stderr_tail)
            if kind in absent:
                return kind
            raise explain(exc, reference, what) from None


def explain(error: CommandError, reference: str, what: str) -> PipelineError:
    """One line saying what went wrong with ``reference`` and what to fix."""
    host = reference.split("/", 1)[0]
    reason = skopeo.error_message(error.stderr_tail)
    kind = skopeo.classify_failure(error.stderr_tail)
    if error.stderr_tail:
        log.info(error.stderr_tail)
    if kind is Failure.UNAUTHORIZED:
        return UsageError(
            f"{host} refused the credentials (401 unauthorized) {what}: they are missing or "
            "wrong; set NEXUS_USER/NEXUS_PASSWORD, the Vault secret or your docker login"
        )
    if kind is Failure.DENIED:
        return UsageError(
            f"{host} denied {what} (403): the registry account lacks this right on "
            f"{reference.partition('@')[0]}; grant it or use an account that has it"
        )
    if kind is Failure.TLS:
        return UsageError(
            f"TLS with {host} failed ({reason}): set PIPELINE_REGISTRY_CA_FILE to the "
            "registry's CA bundle (PIPELINE_REGISTRY_TLS_VERIFY=false only for test registries)"
        )
    if kind is Failure.UNREACHABLE:
        return ExternalError(f"{host} is unreachable ({reason}): check NEXUS_REGISTRY/_PULL")
    return ExternalError(f"{what} failed: {reason}")


# --- the steps -------------------------------------------------------------------------


def verify_immutable(registry: Registry, env: BuildEnv) -> None:
    """Refuse (exit 2) unless the immutable tag still resolves to ``IMAGE_DIGEST``."""
    reference = f"{env.IMAGE_PUSH_REPOSITORY}:{env.IMAGE_TAG}"
    found = registry.digest(reference, what=f"reading {reference}")
    if found == env.IMAGE_DIGEST:
        log.info(f"{reference} resolves to IMAGE_DIGEST {env.IMAGE_DIGEST}")
        return
    digest_there = registry.digest(env.push_ref, what=f"reading {env.push_ref}") is not None
    raise ArtifactError(_mismatch(reference, found, env.IMAGE_DIGEST, digest_there=digest_there))


def _mismatch(reference: str, found: str | None, digest: str, *, digest_there: bool) -> str:
    if found is None and not digest_there:
        return (
            f"neither {reference} nor IMAGE_DIGEST {digest} is in the push registry: the build's "
            "push did not complete, the image was deleted, or build.env is from another registry"
        )
    if found is None:
        return (
            f"{reference} is gone from the push registry (IMAGE_DIGEST {digest} is still "
            "there): the immutable tag was deleted; run the build again"
        )
    where = "is still in the registry" if digest_there else "is not in the registry"
    return (
        f"the immutable tag {reference} resolves to {found}, not to IMAGE_DIGEST {digest} "
        f"from build.env ({digest} {where}): it was overwritten; refusing to promote"
    )


def promote(rt: Runtime, registry: Registry, env: BuildEnv, tag: str) -> None:
    """Move ``tag`` to ``IMAGE_DIGEST``, unless it already holds a newer commit."""
    target = f"{env.IMAGE_PUSH_REPOSITORY}:{tag}"
    current = registry.image(target, what=f"reading {target}")
    if current is not None and current.digest == env.IMAGE_DIGEST:
        log.info(f"{target} already points at {env.IMAGE_DIGEST}: nothing to move")
        log.fact(tag, f"{env.IMAGE_DIGEST} (already there)")
        return
    if current is not None and not _may_move(rt, registry, env, tag, current):
        return
    registry.copy(env.push_ref, target)
    _read_back(registry, target, env.IMAGE_DIGEST)
    log.fact(tag, env.IMAGE_DIGEST)


def _read_back(registry: Registry, target: str, digest: str) -> None:
    found = registry.digest(target, what=f"reading back {target}")
    if found != digest:
        raise ExternalError(
            f"read back: {target} resolves to {found or 'nothing'}, expected {digest}: another "
            "pipeline moved it meanwhile (run this job again to re-decide), or the registry "
            "rewrote the manifest"
        )
    log.info(f"{target} resolves to {digest}")


def _may_move(rt: Runtime, registry: Registry, env: BuildEnv, tag: str, current: ImageInfo) -> bool:
    if rt.settings(PushSettings).force:
        log.warn(f"PIPELINE_PUSH_FORCE=true: moving {tag} without checking commit order")
        return True
    promote_it, reason = _decide(rt, registry, env, current)
    if promote_it:
        log.info(f"{tag}: {reason}: promoting")
    else:
        log.warn(f"not moving {tag}: {reason} (PIPELINE_PUSH_FORCE=true moves it anyway)")
        log.fact(tag, f"left on {current.digest} ({reason})")
    return promote_it


def _decide(rt: Runtime, registry: Registry, env: BuildEnv, current: ImageInfo) -> tuple[bool, str]:
    """(promote?, why) from the commits behind the tag and behind this build."""
    ours, theirs = env.IMAGE_COMMIT_SHA, current.revision
    if theirs is None:
        why = f"the image behind the tag has no commit SHA in its {skopeo.REVISION_LABEL} label"
        return _by_creation(registry, env, current, why)
    if theirs == ours:
        return True, f"it holds a build of the same commit {ours[:8]}"
    settings = rt.settings(PushSettings)
    ancestry = Ancestry(
        shell=rt.shell,
        cwd=rt.project_dir,
        remote=settings.git_remote,
        deepen=settings.git_deepen,
        timeout=settings.command_timeout_seconds,
    )
    relation, detail = ancestry.relation(theirs, ours)
    if relation is Relation.FORWARD:
        return True, f"it holds {theirs[:8]}, an ancestor of {ours[:8]}"
    if relation is Relation.BACKWARD:
        return False, f"it holds {theirs[:8]}, a newer commit than {ours[:8]}"
    return _by_creation(registry, env, current, detail)


def _by_creation(
    registry: Registry, env: BuildEnv, current: ImageInfo, why: str
) -> tuple[bool, str]:
    log.warn(f"{why}: ancestry cannot order the two images; comparing their creation times")
    ours = registry.image(env.push_ref, what=f"reading {env.push_ref}")
    if current.created is None or ours is None or ours.created is None:
        return True, "creation times unknown too, so the latest pipeline to finish wins"
    if current.created > ours.created:
        return (
            False,
            f"it holds an image created {current.created}, after this one ({ours.created})",
        )
    return True, f"it holds an image created {current.created}, not after this one ({ours.created})"


# --- commit order, from git -----------------------------------------------------------


class Relation(StrEnum):
    """How the commit behind a moving tag relates to the commit being promoted."""

    FORWARD = "forward"  # the tag's commit is an ancestor of ours: moving it is progress
    BACKWARD = "backward"  # ours is an ancestor of the tag's: moving it would go back
    DIVERGED = "diverged"  # neither: a rewritten branch
    UNKNOWN = "unknown"  # a commit is not in the checkout, or there is no checkout


_DECIDED = (Relation.FORWARD, Relation.BACKWARD)
_USERINFO = re.compile(r"://[^/@\s]+@")


@dataclass(frozen=True, kw_only=True)
class Ancestry:
    """Answers ordering questions from the job's checkout, widening a shallow clone."""

    shell: Shell
    cwd: Path
    remote: str
    deepen: int
    timeout: float

    def relation(self, theirs: str, ours: str) -> tuple[Relation, str]:
        """The relation of ``theirs`` (behind the tag) to ``ours``, and a sentence on it."""
        if self.shell.which("git") is None:
            return Relation.UNKNOWN, "git is not on PATH"
        probe = self._query(git.is_shallow())
        if probe.returncode != 0:
            reason = _first_line(probe.stderr)
            return Relation.UNKNOWN, f"{self.cwd} is not a git checkout git can read ({reason})"
        relation = self._compare(theirs, ours)
        widenings = self._widenings(theirs, ours)
        while relation not in _DECIDED and (argv := next(widenings, None)) is not None:
            if self._fetch(argv):
                relation = self._compare(theirs, ours)
        return relation, _detail(relation, theirs, ours)

    def _widenings(self, theirs: str, ours: str) -> Iterator[list[str]]:
        """Fetches that may tell more, cheapest first; each is decided when it is reached."""
        if self._shallow():
            yield git.deepen(self.remote, self.deepen)
        if self._shallow():
            yield git.unshallow(self.remote)
        for sha in (theirs, ours):
            if not self._has(sha):
                yield git.fetch_commit(self.remote, sha)

    def _compare(self, theirs: str, ours: str) -> Relation:
        if not (self._has(theirs) and self._has(ours)):
            return Relation.UNKNOWN
        if self._ok(git.is_ancestor(theirs, ours)):
            return Relation.FORWARD
        if self._ok(git.is_ancestor(ours, theirs)):
            return Relation.BACKWARD
        return Relation.DIVERGED

    def _shallow(self) -> bool | None:
        """Whether the checkout is shallow; None when it is no checkout git can read."""
        result = self._query(git.is_shallow())
        return result.stdout.strip() == "true" if result.returncode == 0 else None

    def _has(self, sha: str) -> bool:
        return self._ok(git.has_commit(sha))

    def _ok(self, argv: list[str]) -> bool:
        return self._query(argv).returncode == 0

    def _query(self, argv: list[str]) -> Result:
        return self.shell.run(
            argv, query=True, cwd=self.cwd, ok_codes=git.ANSWER_CODES, stream=False
        )

    def _fetch(self, argv: list[str]) -> bool:
        try:
            self.shell.run(argv, cwd=self.cwd, timeout=self.timeout, stream=False, what="git fetch")
        except (CommandError, ExternalError) as exc:
            reason = _USERINFO.sub("://", str(exc))  # a remote URL may carry a job token
            log.warn(f"{shlex.join(argv)} failed ({reason}); ordering with the history at hand")
            return False
        return True


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no output")


def _detail(relation: Relation, theirs: str, ours: str) -> str:
    if relation is Relation.DIVERGED:
        return f"{theirs[:8]} and {ours[:8]} are on diverged histories (a rewritten branch?)"
    return f"commit {theirs[:8]} or {ours[:8]} is not in the checkout, even after fetching"


def wait_for_pull(registry: Registry, env: BuildEnv, settings: PushSettings) -> float:
    """Wait, bounded, until the pull registry serves ``IMAGE_DIGEST``; return the seconds."""
    reference = f"{env.IMAGE_PULL_REPOSITORY}:{env.IMAGE_TAG}"
    start = time.monotonic()
    deadline = start + settings.pull_wait_seconds
    while (seen := registry.poll_digest(reference)) != env.IMAGE_DIGEST:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ExternalError(
                f"the pull registry gave {seen} for {reference} after waiting "
                f"{settings.pull_wait_seconds:g}s, not IMAGE_DIGEST {env.IMAGE_DIGEST}: it lags or "
                "does not include the push repository; raise PIPELINE_PUSH_PULL_WAIT_SECONDS"
            )
        log.info(f"{reference}: {seen}; looking again in {settings.pull_wait_interval_seconds:g}s")
        time.sleep(min(settings.pull_wait_interval_seconds, remaining))
    waited = time.monotonic() - start
    log.info(f"the pull registry serves {env.IMAGE_DIGEST} for {reference} after {waited:.1f}s")
    log.fact("pull registry", f"{env.pull_ref} served after {waited:.1f}s")
    return waited


def _show(registry: Registry, env: BuildEnv, tags: tuple[str, ...]) -> None:
    """Dry-run: print the commands a real run would start with; contact nothing."""
    access, shell = registry.access, registry.shell
    shell.run(skopeo.inspect_raw(f"{env.IMAGE_PUSH_REPOSITORY}:{env.IMAGE_TAG}", access=access))
    for tag in tags:
        target = f"{env.IMAGE_PUSH_REPOSITORY}:{tag}"
        shell.run(skopeo.inspect_image(target, access=access))
        log.info(f"  (then, unless {tag} holds a newer commit than {env.IMAGE_COMMIT_SHA[:8]}:)")
        shell.run(skopeo.copy_by_digest(source=env.push_ref, destination=target, access=access))
        shell.run(skopeo.inspect_raw(target, access=access))
    pull = f"{env.IMAGE_PULL_REPOSITORY}:{env.IMAGE_TAG}"
    shell.run(skopeo.inspect_raw(pull, access=access))
    log.info(f"  (repeated until it resolves to {env.IMAGE_DIGEST})")
