"""The trivy-image-scan stage: scan exactly the built image, report, decide the policy.

The image is ``IMAGE_PULL_REPOSITORY@IMAGE_DIGEST`` from ``build.env``: the
bytes the build pushed, read through the pull registry. Trivy writes its JSON
with ``--exit-code 0``; the stage parses it, writes GitLab's
``container_scanning`` report, logs a summary, imports the JSON into
DefectDojo when it is configured, and only then applies
``PIPELINE_SCAN_FAIL_ON`` (exit 5). A scan that could not run (DB download
refused or rate-limited, registry 5xx, timeout) is retried, then exits 4; an
image that is not in the registry fails at once.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline import auth, defectdojo, report
from pipeline.artifact import BuildEnv
from pipeline.errors import ArtifactError, CommandError, ExternalError, PolicyError, UsageError
from pipeline.log import log
from pipeline.retry import classify_text
from pipeline.runtime import Runtime
from pipeline.settings import RegistrySettings, ScanSettings, Settings, VaultSettings
from pipeline.tools import trivy

SETTINGS: tuple[type[Settings], ...] = (ScanSettings, VaultSettings)

_IMAGE_UNREADABLE = re.compile(r"unable to find the specified image", re.IGNORECASE)
_MISSING = re.compile(r"MANIFEST_UNKNOWN|manifest unknown|NAME_UNKNOWN|\b404\b", re.IGNORECASE)
_RATE_LIMITED = re.compile(r"TOOMANYREQUESTS|\b429\b|too many requests", re.IGNORECASE)


def run(rt: Runtime) -> None:
    """Scan the built image by digest and apply the scan policy."""
    settings = rt.settings(ScanSettings)
    build = rt.read_build_env()
    image = report.ScannedImage(
        repository=build.IMAGE_PULL_REPOSITORY, tag=build.IMAGE_TAG, digest=build.IMAGE_DIGEST
    )
    log.fact("scanned", image.ref)
    from_json: Path | None = rt.options.get("from_json")

    start = _utc_now()
    json_path = from_json or _path(rt, settings.json_report)
    with _failure_reported(rt, settings, start):
        if from_json is None:
            _scan(rt, settings, build, json_path)
            if rt.dry_run:
                _explain_dry_run(rt, settings, image, json_path)
                return
        scanned = _load(json_path, from_trivy=from_json is None)

    _log_summary(scanned, image, settings.top_findings)
    if rt.dry_run:
        _explain_dry_run(rt, settings, image, None)
    else:
        _write_gitlab_report(rt, settings, scanned, image, start)
        _import(rt, settings, json_path)
    _apply_policy(scanned, settings.threshold)


# --- running Trivy --------------------------------------------------------------------------


@contextlib.contextmanager
def _failure_reported(rt: Runtime, settings: ScanSettings, start: str) -> Iterator[None]:
    """If the scan cannot run or its output cannot be read, leave GitLab a report saying so."""
    try:
        yield
    except ExternalError as exc:
        if not rt.dry_run:
            document = report.failed_gitlab_report(str(exc), start_time=start, end_time=_utc_now())
            _write_atomically(_path(rt, settings.gitlab_report), json.dumps(document) + "\n")
        raise


def _scan(rt: Runtime, settings: ScanSettings, build: BuildEnv, output: Path) -> None:
    scan = _image_scan(rt, settings, build.pull_ref, output)
    if scan.insecure:
        why = (
            "PIPELINE_SCAN_INSECURE=true"
            if settings.insecure
            else "PIPELINE_REGISTRY_TLS_VERIFY=false"
        )
        log.warn(f"{why}: Trivy skips TLS verification of the registry")
    if not rt.dry_run:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.unlink(missing_ok=True)  # never parse a report left by an earlier run
        scan.cache_dir.mkdir(parents=True, exist_ok=True)
    with log.step("trivy image scan"), auth.docker_config(rt) as docker_config:
        _run_trivy(rt, scan, _trivy_env(rt, docker_config))


def _image_scan(rt: Runtime, settings: ScanSettings, image: str, output: Path) -> trivy.ImageScan:
    return trivy.ImageScan(
        image=image,
        output=output,
        cache_dir=_path(rt, settings.cache_dir),
        severities=tuple(settings.severity.split(",")),
        scanners=tuple(settings.scanners.split(",")),
        ignore_unfixed=settings.ignore_unfixed,
        ignorefile=_checked_ignorefile(rt, settings),
        timeout=settings.timeout,
        db_repository=settings.db_repository,
        java_db_repository=settings.java_db_repository,
        skip_db_update=settings.skip_db_update,
        insecure=settings.insecure or not rt.settings(RegistrySettings).tls_verify,
        platform=settings.platform,
    )


def _run_trivy(rt: Runtime, scan: trivy.ImageScan, env: dict[str, str]) -> None:
    argv = trivy.image_argv(scan)
    try:
        rt.shell.run(argv, env=env, classify=classify_scan_error, what="trivy image")
    except CommandError as exc:
        if image_missing(exc.stderr_tail):
            raise ExternalError(
                f"{scan.image} is not in the pull registry (manifest unknown): "
                "check IMAGE_DIGEST in build.env and that the build pushed it"
            ) from None
        raise


def classify_scan_error(error: BaseException) -> str | None:
    """Retry rate limits (DB downloads), registry 5xx and timeouts; a missing image is final."""
    text = getattr(error, "stderr_tail", "") or str(error)
    if image_missing(text):
        return None
    if _RATE_LIMITED.search(text):
        return "rate limited (429)"
    return classify_text(text)


def image_missing(text: str) -> bool:
    """Whether Trivy's error says the image itself is not in the registry."""
    return bool(_IMAGE_UNREADABLE.search(text) and _MISSING.search(text))


def _trivy_env(rt: Runtime, docker_config: Path) -> dict[str, str]:
    """Credentials and CA for Trivy, as variables: nothing secret goes in its argv."""
    registry = rt.settings(RegistrySettings)
    env = {
        "TRIVY_SKIP_VERSION_CHECK": "true",
        "TRIVY_DISABLE_TELEMETRY": "true",
        "DOCKER_CONFIG": str(docker_config),
    }
    if registry.ca_file is not None:
        # Go adds SSL_CERT_FILE to the roots it trusts (the system directory stays).
        env["SSL_CERT_FILE"] = str(_path(rt, registry.ca_file))
    return env


def _checked_ignorefile(rt: Runtime, settings: ScanSettings) -> Path | None:
    path = _path(rt, settings.ignore_file)
    if not path.is_file():
        if "ignore_file" in settings.model_fields_set:
            raise UsageError(f"PIPELINE_SCAN_IGNORE_FILE: {path} does not exist")
        return None
    if path.suffix in (".yaml", ".yml"):
        log.info(f"ignore file: {path} (YAML; Trivy checks its syntax)")
        return path
    try:
        entries = trivy.parse_ignorefile(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the ignore file: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"{path} {exc}") from None
    _warn_expired(path, entries)
    log.info(f"ignore file: {path} ({len(entries)} entries)")
    return path


def _warn_expired(path: Path, entries: tuple[trivy.IgnoreEntry, ...]) -> None:
    today = datetime.datetime.now(datetime.UTC).date()
    for entry in entries:
        if entry.expires is not None and entry.expires < today:
            log.warn(
                f"{path} line {entry.line}: {entry.id} expired on {entry.expires}; it no longer applies"
            )


# --- reports ----------------------------------------------------------------------------------


def _load(path: Path, *, from_trivy: bool) -> trivy.Report:
    error = ExternalError if from_trivy else ArtifactError
    try:
        return trivy.load_report(path.read_bytes())
    except OSError as exc:
        raise error(f"Trivy report {path}: cannot read it: {exc.strerror or exc}") from None
    except trivy.ReportError as exc:
        raise error(f"Trivy report {path}: {exc}") from None


def _write_gitlab_report(
    rt: Runtime,
    settings: ScanSettings,
    scanned: trivy.Report,
    image: report.ScannedImage,
    start: str,
) -> None:
    path = _path(rt, settings.gitlab_report)
    document = report.gitlab_report(scanned, image, start_time=start, end_time=_utc_now())
    # compact: indent= would switch json to its pure-Python encoder, 5x slower on big reports
    _write_atomically(path, json.dumps(document) + "\n")
    log.info(f"wrote {path} ({len(document['vulnerabilities'])} vulnerabilities)")


def _log_summary(scanned: trivy.Report, image: report.ScannedImage, top: int) -> None:
    summary = report.summarise(scanned, top=top)
    with log.section("scan summary"):
        for line in report.summary_lines(summary, image):
            log.info(line)
    counts = ", ".join(f"{count} {severity}" for severity, count in summary.counts if count)
    log.fact("findings", f"{summary.total} ({counts or 'none'})")


def _apply_policy(scanned: trivy.Report, threshold: str | None) -> None:
    if threshold is None:
        log.info("policy: off (PIPELINE_SCAN_FAIL_ON=off): findings are reported only")
        return
    failing = report.breaking(scanned.findings, threshold)
    if failing:
        worst = max(failing, key=lambda finding: finding.rank)
        raise PolicyError(
            f"{len(failing)} findings at or above {threshold} (PIPELINE_SCAN_FAIL_ON), "
            f"e.g. {worst.id} {worst.severity} in {worst.package}"
        )
    log.info(f"policy: passed (no findings at or above {threshold})")


# --- DefectDojo ---------------------------------------------------------------------------------


def _import(rt: Runtime, settings: ScanSettings, json_path: Path) -> None:
    client = _client(settings)
    if client is None:
        return
    scan = _import_fields(rt, settings)
    with log.step(f"DefectDojo import ({scan.product_name} / {scan.engagement_name})"):
        answer = client.import_scan(scan, json_path, policy=rt.shell.policy)
    test = answer.get("test_id") or answer.get("test")
    if test is not None:
        log.fact("DefectDojo test", f"{client.url}/test/{test}")


def _client(settings: ScanSettings) -> defectdojo.Client | None:
    token = settings.defectdojo_token
    if not settings.defectdojo_url or token is None:
        return None
    return defectdojo.Client(url=settings.defectdojo_url, token=token.get_secret_value())


def _import_fields(rt: Runtime, settings: ScanSettings) -> defectdojo.ImportScan:
    context = rt.context
    return defectdojo.ImportScan(
        product_name=f"orchestrator-{context.project_name}",
        product_type_name=settings.defectdojo_product_type,
        engagement_name=defectdojo.engagement_name(
            context.ref.name, context.pipeline_id or "local"
        ),
        branch_tag=context.ref.name,
        commit_hash=context.sha,
        build_id=context.pipeline_id,
        source_code_management_uri=context.project_url,
    )


def _explain_dry_run(
    rt: Runtime, settings: ScanSettings, image: report.ScannedImage, json_path: Path | None
) -> None:
    gitlab = _path(rt, settings.gitlab_report)
    log.info(
        f"would write {json_path} (Trivy JSON) and {gitlab}"
        if json_path
        else f"would write {gitlab}"
    )
    if _client(settings) is None:
        log.info("would not import into DefectDojo (DEFECTDOJO_URL and DEFECTDOJO_TOKEN unset)")
    else:
        scan = _import_fields(rt, settings)
        log.info(
            f"would import into DefectDojo: POST {settings.defectdojo_url}{defectdojo.IMPORT_PATH} "
            f"product {scan.product_name}, engagement {scan.engagement_name}"
        )
    threshold = settings.threshold or "off"
    log.info(f"would apply the policy PIPELINE_SCAN_FAIL_ON={threshold} to {image.ref}")


# --- helpers --------------------------------------------------------------------------------------


def _path(rt: Runtime, path: Path) -> Path:
    return path if path.is_absolute() else rt.project_dir / path


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
        Path(tmp).chmod(0o644)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
