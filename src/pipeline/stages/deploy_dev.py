"""deploy-dev: deploy ``pull-registry/name@digest`` to the DEV server over one SSH connection.

The image comes from ``build.env`` (or, for a redeploy, ``--image-tag`` /
``DEPLOY_ONLY`` resolved to a digest in the pull registry first). Everything is
checked locally before the first connection; then one ControlMaster connection
carries the remote script (:mod:`pipeline.tools.ssh`, ``deploy.sh``): lock,
pull, rollback file, ``.env``, ``docker compose up -d``, health check, workers,
or the roll back. The health check runs on the server (the whole deploy is then
one script in one session) or from the runner between sessions.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import NoReturn

from pipeline import auth, sshsession
from pipeline.errors import (
    ExternalError,
    PipelineError,
    RollbackFailedError,
    RolledBackError,
    SettingsError,
    UsageError,
)
from pipeline.log import log
from pipeline.registry import access as registry_access
from pipeline.runtime import Runtime
from pipeline.settings import (
    DeploySettings,
    GitLabSettings,
    RegistrySettings,
    Settings,
    VaultSettings,
)
from pipeline.tags import check_tag
from pipeline.tools import skopeo, ssh
from pipeline.tools.ssh import Marker, Phase, RemoteExit

SETTINGS: tuple[type[Settings], ...] = (DeploySettings, VaultSettings)
DEFAULT_REDEPLOY_TAG = "latest"
DRY_RUN_DIGEST = "sha256:" + "0" * 64
_NOT_OWNER = re.compile(r"[^A-Za-z0-9_.:/@+=,-]")
_FAILED_ROLLBACK = (RemoteExit.ROLLBACK_FAILED, RemoteExit.NO_ROLLBACK, RemoteExit.CONNECTION)


@dataclass(frozen=True, kw_only=True)
class Image:
    """The image to deploy, by digest, with the tag it was built (or asked) as."""

    repository: str
    tag: str
    digest: str

    @property
    def ref(self) -> str:
        return f"{self.repository}@{self.digest}"


@dataclass(frozen=True, kw_only=True)
class Session:
    """One run of the remote script: its exit code and the markers it printed."""

    code: int
    markers: list[Marker]

    def failure(self) -> str:
        """``step: text`` of the first failed step, or the last step begun."""
        failed = [f"{m.step}: {m.text}" for m in self.markers if m.status == "fail"]
        if failed:
            return "; then ".join(failed)
        return f"{ssh.last_step(self.markers) or 'connect'}: did not finish"

    def running(self) -> str:
        lines = [m.text for m in self.markers if m.step == "running" and m.status == "info"]
        return "; ".join(lines[-_running_count(self.markers) :]) or "unknown"


def _running_count(markers: list[Marker]) -> int:
    """How many of the trailing ``running`` markers belong to the last report."""
    count = 0
    for marker in reversed(markers):
        if marker.step != "running":
            if count:
                break
            continue
        count += marker.status == "info"
    return count


def run(rt: Runtime) -> None:
    """Deploy the built image to the DEV server; roll back when it is unhealthy."""
    settings = rt.settings(DeploySettings)
    _check_required(settings)
    with sshsession.private_dir() as private:
        conn = sshsession.connection(rt, settings, private)
        image = _image(rt, settings)
        plan = _plan(rt, settings, image)
        deploy = Deploy(rt=rt, conn=conn, plan=plan, image=image, settings=settings)
        with sshsession.connected(rt, conn):
            if settings.health_from == "server":
                _deploy_server_health(deploy)
            else:
                _deploy_runner_health(deploy)


# --- checks before anything remote ------------------------------------------------------


def _check_required(settings: DeploySettings) -> None:
    problems = []
    if not settings.server:
        problems.append(
            "DEV_SERVER_IP: not set; set it (or DEV_SERVER_HOST) to the DEV server's address"
        )
    if not settings.ssh_user:
        problems.append(
            "SSH_USER: not set; set it to the account that deploys on the DEV server (a group variable)"
        )
    if settings.ssh_private_key is None:
        problems.append(
            "SSH_PRIVATE_KEY: not set; set it to the deploy key (a masked or File variable)"
        )
    if not settings.ssh_known_hosts and not settings.trust_on_first_use:
        problems.append(
            "SSH_KNOWN_HOSTS: not set; set it to the DEV server's known_hosts line (ssh-keyscan -p PORT HOST)"
        )
    if not settings.dir:
        problems.append(
            "PIPELINE_DEPLOY_DIR: not set; set it to the directory on the DEV server holding the compose file"
        )
    if not settings.health_url:
        problems.append(
            "PIPELINE_DEPLOY_HEALTH_URL: not set; set it to the URL that answers 200 when the service is healthy"
        )
    if problems:
        raise SettingsError(problems)


def _image(rt: Runtime, settings: DeploySettings) -> Image:
    tag = rt.options.get("image_tag")
    if tag is None and not settings.deploy_only:
        return _image_from_build_env(rt)
    return _resolve_tag(rt, settings, tag or DEFAULT_REDEPLOY_TAG)


def _image_from_build_env(rt: Runtime) -> Image:
    env = rt.read_build_env()
    pull = rt.settings(RegistrySettings).registry_pull
    if env.IMAGE_PULL_REPOSITORY.split("/", 1)[0] != pull:
        raise UsageError(
            f"build.env: IMAGE_PULL_REPOSITORY {env.IMAGE_PULL_REPOSITORY!r} is not on "
            f"NEXUS_REGISTRY_PULL {pull!r}: the build ran with other registry settings; rebuild or align them"
        )
    log.info(f"image from build.env: {env.pull_ref} ({env.IMAGE_TAG})")
    return Image(repository=env.IMAGE_PULL_REPOSITORY, tag=env.IMAGE_TAG, digest=env.IMAGE_DIGEST)


def _resolve_tag(rt: Runtime, settings: DeploySettings, tag: str) -> Image:
    """A redeploy: the tag's digest in the pull registry, read once, then used throughout."""
    try:
        check_tag(tag)
    except PipelineError as exc:
        raise UsageError(f"--image-tag: {exc}") from None
    registry = rt.settings(RegistrySettings)
    repository = f"{registry.registry_pull}/{rt.image_name}"
    with (
        log.step(f"resolve {repository}:{tag} to a digest"),
        registry_access(rt) as access,
    ):
        result = rt.shell.run(
            skopeo.inspect_raw(f"{repository}:{tag}", access=access),
            stream=False,
            classify=skopeo.transient,
            what="skopeo inspect",
        )
    digest = skopeo.raw_digest(result.stdout) if result.ran else DRY_RUN_DIGEST
    log.info(f"{repository}:{tag} is {digest}" + ("" if result.ran else " (dry-run: not resolved)"))
    return Image(repository=repository, tag=tag, digest=digest)


# --- the remote flow ---------------------------------------------------------------------


def _plan(rt: Runtime, settings: DeploySettings, image: Image) -> ssh.RemotePlan:
    credentials = auth.pull_credentials(rt)
    if credentials is None:
        log.warn(f"no registry credentials: the DEV server pulls {image.repository} anonymously")
    health = None
    if settings.health_from == "server" and settings.health_url:
        health = ssh.Health(
            url=settings.health_url,
            tries=settings.health_tries,
            interval=settings.health_interval,
            timeout=settings.health_timeout,
        )
    assert settings.dir
    try:
        return ssh.RemotePlan(
            deploy_dir=settings.dir,
            compose_command=tuple(settings.compose_command.split()),
            compose_file=settings.compose_file,
            services=settings.service_names,
            workers=settings.worker_names,
            repository=image.repository,
            tag=image.tag,
            digest=image.digest,
            env_vars=_env_vars(settings, image),
            rollback_file=settings.rollback_file,
            token=secrets.token_hex(8),
            owner=_owner(rt),
            lock_stale_seconds=settings.lock_stale_seconds,
            lock_wait_seconds=settings.lock_wait_seconds,
            registry_user=credentials.username if credentials else None,
            registry_password=credentials.password if credentials else None,
            server_health=health,
        )
    except ssh.InvalidValueError as exc:
        raise UsageError(f"deploy-dev: {exc}; it cannot be passed to the server's shell") from None


def _env_vars(settings: DeploySettings, image: Image) -> tuple[tuple[str, str], ...]:
    values = {
        settings.env_tag_var: image.tag,
        settings.env_digest_var: image.digest,
        settings.env_ref_var: image.ref,
    }
    if len(values) < 3:
        raise SettingsError(
            ["PIPELINE_DEPLOY_ENV_TAG_VAR, _DIGEST_VAR and _REF_VAR: must be three different names"]
        )
    return tuple(values.items())


def _owner(rt: Runtime) -> str:
    gitlab = rt.settings(GitLabSettings)
    job = gitlab.job_url or (f"job {gitlab.job_id}" if gitlab.job_id else "local run")
    text = f"{socket.gethostname()} pid {os.getpid()} {job}"
    return " ".join(_NOT_OWNER.sub("_", word) for word in text.split())[:200]


@dataclass(frozen=True, kw_only=True)
class Deploy:
    """One deploy in flight: what every remote step needs."""

    rt: Runtime
    conn: ssh.Connection
    plan: ssh.RemotePlan
    image: Image
    settings: DeploySettings

    def session(self, phase: str) -> Session:
        """Run one entry point of the remote script over the connection."""
        script = ssh.remote_script(self.plan, phase)
        if self.rt.dry_run:
            with log.section(f"remote script ({phase}, sent on stdin)", collapsed=True):
                log.info(script)
        result = self.rt.shell.run(
            ssh.session_argv(self.conn), stdin=script, ok_codes=range(256), what=f"ssh {phase}"
        )
        if not result.ran:
            return Session(code=0, markers=[])
        return Session(code=result.returncode, markers=ssh.parse_markers(result.stdout))

    def fail(self, session: Session) -> NoReturn:
        _fail(session, self.image)

    def check(self, session: Session) -> None:
        if session.code != RemoteExit.OK:
            self.fail(session)


def _deploy_server_health(d: Deploy) -> None:
    with log.step(f"deploy {d.image.ref} (health checked on the server)"):
        session = d.session(Phase.ALL)
        if d.rt.dry_run:
            return
        if session.code == RemoteExit.CONNECTION:
            session = _follow(d, session)
        d.check(session)
    _succeeded(session, d.image)


def _follow(d: Deploy, lost: Session) -> Session:
    """After a dropped connection: the script goes on by itself; connect again, wait for it."""
    log.warn(f"the SSH connection dropped during {lost.failure()}; connecting again to follow")
    _reconnect(d, lost)
    followed = d.session(Phase.FOLLOW)
    return Session(code=followed.code, markers=lost.markers + followed.markers)


def _reconnect(d: Deploy, lost: Session) -> None:
    """The second (and last) handshake of a deploy."""
    try:
        sshsession.open_master(d.rt, d.conn)
    except ExternalError as exc:
        raise ExternalError(
            f"the SSH connection dropped during {lost.failure()} and reconnecting failed ({exc}); "
            "the deploy script goes on by itself on the server and releases the lock when done"
        ) from None


def _deploy_runner_health(d: Deploy) -> None:
    with log.step(f"deploy {d.image.ref}"):
        up = d.session(Phase.UP)
    if d.rt.dry_run:
        return
    if up.code == RemoteExit.CONNECTION:
        _settle_restore(d, _recover(d, up))
    if up.code == RemoteExit.DEPLOY_FAILED:
        _roll_back_runner(d, up.markers)
    d.check(up)
    with log.step("health check from the runner"):
        healthy = _health_from_runner(d.settings, "health")
    if not healthy:
        text = f"no HTTP 200 from {d.settings.health_url} after {d.settings.health_tries} tries"
        _roll_back_runner(d, [*up.markers, Marker(step="health", status="fail", text=text)])
    finish = d.session(Phase.FINISH)
    d.check(finish)
    _succeeded(finish, d.image)


def _recover(d: Deploy, lost: Session) -> Session:
    """After a dropped connection: connect again (the second handshake) and restore."""
    log.warn(f"the SSH connection dropped during {lost.failure()}; connecting again to roll back")
    _reconnect(d, lost)
    recovered = d.session(Phase.RECOVER)
    return Session(code=recovered.code, markers=lost.markers + recovered.markers)


def _roll_back_runner(d: Deploy, markers: list[Marker]) -> NoReturn:
    """Restore the previous ``.env`` and bring it up; then check and settle it."""
    with log.step("roll back to the previous version"):
        back = d.session(Phase.ROLLBACK)
    _settle_restore(d, Session(code=back.code, markers=markers + back.markers))


def _settle_restore(d: Deploy, back: Session) -> NoReturn:
    """After a restore (exit 0: brought up, lock kept): health check, unlock, raise 6 or 7."""
    if back.code != RemoteExit.OK:
        code = back.code if back.code in _FAILED_ROLLBACK else RemoteExit.ROLLBACK_FAILED
        d.fail(Session(code=code, markers=back.markers))
    with log.step("health check of the restored version from the runner"):
        healthy = _health_from_runner(d.settings, "rollback-health")
    settle = d.session(Phase.SETTLE_HEALTHY if healthy else Phase.SETTLE_UNHEALTHY)
    markers = back.markers + settle.markers
    if healthy:
        d.fail(Session(code=RemoteExit.ROLLED_BACK, markers=markers))
    text = f"the restored version gives no HTTP 200 from {d.settings.health_url}"
    markers.append(Marker(step="rollback-health", status="fail", text=text))
    d.fail(Session(code=RemoteExit.ROLLBACK_FAILED, markers=markers))


def _health_from_runner(settings: DeploySettings, step: str) -> bool:
    assert settings.health_url
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    log.info(
        f"health check {settings.health_url} from the runner: up to {settings.health_tries} tries, {settings.health_interval:g}s apart"
    )
    for attempt in range(1, settings.health_tries + 1):
        status = _probe(opener, settings.health_url, settings.health_timeout)
        if status == "200":
            log.info(f"{step}: HTTP 200 on try {attempt}")
            return True
        log.info(f"{step}: try {attempt}/{settings.health_tries}: {status}")
        if attempt < settings.health_tries:
            time.sleep(settings.health_interval)
    return False


def _probe(opener: urllib.request.OpenerDirector, url: str, timeout: float) -> str:
    try:
        with opener.open(url, timeout=timeout) as response:
            return str(response.status)
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (OSError, urllib.error.URLError) as exc:
        return f"no answer ({getattr(exc, 'reason', exc)})"


# --- outcomes ------------------------------------------------------------------------------


def _fail(session: Session, image: Image) -> NoReturn:
    """Raise the error a session's exit code means, naming the failed step and what runs."""
    code, failure, running = session.code, session.failure(), session.running()
    messages: dict[int, type[PipelineError]] = {
        RemoteExit.REFUSED: UsageError,
        RemoteExit.ROLLED_BACK: RolledBackError,
        RemoteExit.ROLLBACK_FAILED: RollbackFailedError,
        RemoteExit.NO_ROLLBACK: RollbackFailedError,
    }
    error = messages.get(code, ExternalError)
    raise error(_outcome_text(code, failure, running, image))


def _outcome_text(code: int, failure: str, running: str, image: Image) -> str:
    texts: dict[int, str] = {
        RemoteExit.REFUSED: f"the DEV server refused the deploy before any change: {failure}",
        RemoteExit.LOCKED: f"deploy lock: {failure}",
        RemoteExit.NOT_CHANGED: f"{failure}; nothing was changed on the server",
        RemoteExit.ROLLED_BACK: f"deploy of {image.ref} failed ({failure}); rolled back, and the previous version is healthy; running now: {running}",
        RemoteExit.ROLLBACK_FAILED: f"deploy of {image.ref} failed and so did the roll back ({failure}); running now: {running}",
        RemoteExit.NO_ROLLBACK: f"deploy of {image.ref} failed ({failure}); nothing to roll back to (first deploy): the failed version is left as it is; running now: {running}",
        RemoteExit.WORKERS_FAILED: f"{image.ref} is deployed and healthy, but {failure}; running now: {running}",
        RemoteExit.CONNECTION: f"the SSH connection dropped during {failure}",
    }
    return texts.get(code, f"the remote deploy script exited {code} during {failure}")


def _succeeded(session: Session, image: Image) -> None:
    log.fact("deployed", image.ref)
    log.fact("tag", image.tag)
    log.fact("running now", session.running())
