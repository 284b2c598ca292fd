"""The Kaniko argv builder, settings parsers, digest-file parsers and failure classifier (pure)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.tools import kaniko
from pipeline.tools.kaniko import Build, Kind, Verdict

STANDIN = Path(__file__).parent / "standins" / "kaniko"
DIGEST = "sha256:" + "ab" * 32


def tsv_flags(name: str) -> dict[str, str]:
    """Flag name -> type column of a reference flag list (subcommand rows left out)."""
    flags = {}
    for line in (STANDIN / f"flags-{name}.tsv").read_text().splitlines():
        if line.startswith("#") or not line.startswith("--"):
            continue
        names, type_ = line.split("\t")[:2]
        flags[names.partition(" / ")[0]] = type_
    return flags


FORK = tsv_flags("fork")
UPSTREAM = tsv_flags("upstream")

MINIMAL = Build(
    executor="/kaniko/executor",
    context=Path("/builds/group/server"),
    dockerfile=Path("/builds/group/server/Dockerfile"),
    destinations=("nexus:8443/orchestrator-server:main-a1b2c3d4",),
    digest_file=Path("/builds/group/server/.pipeline/build/digest"),
    image_name_with_digest_file=Path("/builds/group/server/.pipeline/build/names"),
)
MAXIMAL = replace(
    MINIMAL,
    destinations=("nexus:8443/app:1.2.3", "nexus:8443/app:extra"),
    registry_mirror="nexus:8444",
    labels=(
        ("org.opencontainers.image.revision", "a" * 40),
        ("org.opencontainers.image.title", "app"),
    ),
    build_args=("PYTHON_VERSION=3.12", "EMPTY="),
    cache=True,
    cache_repo="nexus:8443/app/cache",
    push_retry=3,
    image_download_retry=4,
    image_fs_extract_retry=2,
    registry_certificates=(("nexus:8443", Path("/ca.pem")), ("nexus:8444", Path("/ca.pem"))),
    target="runtime",
    extra_flags=kaniko.parse_extra_flags(
        "--reproducible --snapshot-mode redo --ignore-path=/var/cache -v debug --label a=b"
    ),
)


# --- flag lists -------------------------------------------------------------------------


def test_flag_table_is_exactly_the_fork_flag_list() -> None:
    assert set(kaniko.FLAGS) == set(FORK)


@pytest.mark.parametrize("flag", sorted(FORK))
def test_flag_kind_matches_the_fork_flag_list(flag: str) -> None:
    type_ = FORK[flag]
    expected = (
        Kind.BOOL
        if type_ == "bool"
        else Kind.REPEATABLE
        if "repeatable" in type_ or type_ == "stringSlice"
        else Kind.VALUE
    )
    assert kaniko.FLAGS[flag] is expected


def test_upstream_flags_are_a_subset_of_the_fork() -> None:
    assert set(UPSTREAM) <= set(FORK)


@pytest.mark.parametrize("build", [MINIMAL, MAXIMAL, replace(MAXIMAL, cache=False)])
def test_every_emitted_flag_is_in_the_flag_lists(build: Build) -> None:
    emitted = set(kaniko.emitted_flags(kaniko.build_argv(build)))

    assert emitted <= set(FORK)
    assert emitted - set(kaniko.RESTORE_FLAGS) <= set(UPSTREAM)


def test_restore_mode_needs_the_fork() -> None:
    assert set(kaniko.RESTORE_FLAGS) <= set(FORK)
    assert {"--pre-cleanup", "--preserve-context"}.isdisjoint(UPSTREAM)


@pytest.mark.parametrize("flag", sorted(kaniko.OWNED_FLAGS))
def test_owned_flags_exist(flag: str) -> None:
    assert flag in FORK


# --- argv -------------------------------------------------------------------------------


def test_minimal_argv() -> None:
    assert kaniko.build_argv(MINIMAL) == (
        "/kaniko/executor",
        "--context=/builds/group/server",
        "--dockerfile=/builds/group/server/Dockerfile",
        "--destination=nexus:8443/orchestrator-server:main-a1b2c3d4",
        "--digest-file=/builds/group/server/.pipeline/build/digest",
        "--image-name-with-digest-file=/builds/group/server/.pipeline/build/names",
        "--cache=true",
        "--push-retry=0",
        "--image-download-retry=0",
        "--image-fs-extract-retry=0",
        "--pre-cleanup",
        "--preserve-context",
        "--cleanup",
    )


def test_maximal_argv() -> None:
    argv = kaniko.build_argv(MAXIMAL)

    assert argv[0] == "/kaniko/executor"
    assert argv[1:] == (
        "--context=/builds/group/server",
        "--dockerfile=/builds/group/server/Dockerfile",
        "--destination=nexus:8443/app:1.2.3",
        "--destination=nexus:8443/app:extra",
        "--digest-file=/builds/group/server/.pipeline/build/digest",
        "--image-name-with-digest-file=/builds/group/server/.pipeline/build/names",
        "--registry-mirror=nexus:8444",
        f"--label=org.opencontainers.image.revision={'a' * 40}",
        "--label=org.opencontainers.image.title=app",
        "--build-arg=PYTHON_VERSION=3.12",
        "--build-arg=EMPTY=",
        "--cache=true",
        "--cache-repo=nexus:8443/app/cache",
        "--push-retry=3",
        "--image-download-retry=4",
        "--image-fs-extract-retry=2",
        "--registry-certificate=nexus:8443=/ca.pem",
        "--registry-certificate=nexus:8444=/ca.pem",
        "--target=runtime",
        "--pre-cleanup",
        "--preserve-context",
        "--cleanup",
        "--reproducible=true",
        "--snapshot-mode=redo",
        "--ignore-path=/var/cache",
        "--verbosity=debug",
        "--label=a=b",
    )


def test_cache_off_drops_the_cache_repository() -> None:
    argv = kaniko.build_argv(replace(MAXIMAL, cache=False))

    assert "--cache=false" in argv
    assert not any(arg.startswith("--cache-repo") for arg in argv)


def test_one_destination_per_tag() -> None:
    tags = ("1.2.3", "1.2", "1")
    build = replace(MINIMAL, destinations=tuple(f"nexus:8443/app:{tag}" for tag in tags))

    destinations = [a for a in kaniko.build_argv(build) if a.startswith("--destination=")]

    assert destinations == [f"--destination=nexus:8443/app:{tag}" for tag in tags]


def test_no_destination_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one --destination"):
        kaniko.build_argv(replace(MINIMAL, destinations=()))


def test_restore_mode_is_always_on() -> None:
    for build in (MINIMAL, MAXIMAL):
        assert set(kaniko.RESTORE_FLAGS) <= set(kaniko.build_argv(build))


def test_oci_labels() -> None:
    labels = dict(
        kaniko.oci_labels(
            revision="a" * 40,
            created="2026-01-02T03:04:05Z",
            version="1.2.3",
            ref_name="v1.2.3",
            title="server",
            source="https://gitlab.example/group/server",
        )
    )

    assert labels == {
        "org.opencontainers.image.revision": "a" * 40,
        "org.opencontainers.image.source": "https://gitlab.example/group/server",
        "org.opencontainers.image.created": "2026-01-02T03:04:05Z",
        "org.opencontainers.image.version": "1.2.3",
        "org.opencontainers.image.ref.name": "v1.2.3",
        "org.opencontainers.image.title": "server",
    }


def test_oci_labels_leave_out_an_unknown_source() -> None:
    labels = dict(
        kaniko.oci_labels(
            revision="a" * 40, created="c", version="v", ref_name="r", title="t", source=None
        )
    )

    assert "org.opencontainers.image.source" not in labels
    assert len(labels) == 5


# --- settings text ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1 B=two", ("A=1", "B=two")),
        ("  A=1\tB=  ", ("A=1", "B=")),
        ("GREETING=hello world\nPATHS=/a:/b\n", ("GREETING=hello world", "PATHS=/a:/b")),
        ("URL=https://x/?a=b", ("URL=https://x/?a=b",)),
        ("_X=1", ("_X=1",)),
        ("", ()),
    ],
)
def test_parse_build_args(text: str, expected: tuple[str, ...]) -> None:
    assert kaniko.parse_build_args(text) == expected


def test_secret_looking_build_args() -> None:
    args = (
        "NPM_TOKEN=x",
        "DB_PASSWORD=y",
        "api_key=z",
        "VERSION=1",
        "PYPI_SECRET=s",
        "KEYBOARD=us",
    )

    assert kaniko.secret_looking(args) == ("NPM_TOKEN", "DB_PASSWORD", "api_key", "PYPI_SECRET")


@pytest.mark.parametrize("bad", ["TOKEN", "=value", "1ABC=x", "A-B=1", "A=1 SECRET"])
def test_parse_build_args_refuses_malformed_items(bad: str) -> None:
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        kaniko.parse_build_args(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("--reproducible", ("--reproducible=true",)),
        ("--reproducible=false --use-new-run=1", ("--reproducible=false", "--use-new-run=true")),
        ("--verbosity debug", ("--verbosity=debug",)),
        ("-v=warn", ("--verbosity=warn",)),
        ("-v warn", ("--verbosity=warn",)),
        ("--snapshot-mode=redo --ignore-path /a --ignore-path=/b", ("--snapshot-mode=redo", "--ignore-path=/a", "--ignore-path=/b")),
        ("--label 'team=platform tools'", ("--label=team=platform tools",)),
        ("--compression zstd --compression-level 3", ("--compression=zstd", "--compression-level=3")),
        ("", ()),
    ],
)  # fmt: skip
def test_parse_extra_flags(text: str, expected: tuple[str, ...]) -> None:
    assert kaniko.parse_extra_flags(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("--nope", "'--nope' is not a Kaniko executor flag"),
        ("--skip-tls", "'--skip-tls' is not a Kaniko executor flag"),
        ("-x", "'-x' is not a Kaniko executor flag"),
        ("debug", "'debug' is not a Kaniko executor flag"),
        ("--destination=x/y:z", "--destination is set by the build stage; use the tag plan"),
        ("--cleanup=false", "--cleanup is set by the build stage"),
        ("--kaniko-dir /k", "--kaniko-dir is set by the build stage; use nothing"),
        ("--no-push", "--no-push is set by the build stage"),
        ("--build-arg A=1", "--build-arg is set by the build stage; use PIPELINE_BUILD_ARGS"),
        ("--verbosity", "--verbosity needs a value"),
        ("--verbosity --reproducible", "--verbosity needs a value"),
        ("--reproducible=maybe", "--reproducible takes true or false"),
        ("--label 'unbalanced", "cannot be split like a shell line"),
    ],
)
def test_parse_extra_flags_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        kaniko.parse_extra_flags(text)


# --- digest files -----------------------------------------------------------------------


@pytest.mark.parametrize("text", [DIGEST, f"{DIGEST}\n", f"  {DIGEST}  "])
def test_parse_digest_file(text: str) -> None:
    assert kaniko.parse_digest_file(text) == DIGEST


@pytest.mark.parametrize("text", ["", "sha256:abc", "SHA256:" + "AB" * 32, f"{DIGEST}x", "md5:00"])
def test_parse_digest_file_refuses(text: str) -> None:
    with pytest.raises(kaniko.OutputError, match="not sha256: and 64 hex digits"):
        kaniko.parse_digest_file(text)


def test_parse_image_names() -> None:
    text = f"nexus:8443/app@{DIGEST}\nnexus:8443/app@{DIGEST}\n\n"

    assert kaniko.parse_image_names(text, digest=DIGEST) == ("nexus:8443/app", "nexus:8443/app")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        (f"nexus:8443/app@sha256:{'cd' * 32}\n", "is not <repository>@sha256:abab"),
        ("nexus:8443/app:tag\n", "is not <repository>@"),
        (f"@{DIGEST}\n", "is not <repository>@"),
    ],
)
def test_parse_image_names_refuses(text: str, message: str) -> None:
    with pytest.raises(kaniko.OutputError, match=message):
        kaniko.parse_image_names(text, digest=DIGEST)


# --- failures ---------------------------------------------------------------------------

PUSH = "error pushing image: failed to push to destination nexus:8443/app:main-1: "
PERMISSION = (
    "error checking push permissions -- make sure you entered the correct tag name, and that "
    'you are authenticated correctly, and try again: checking push permission for "nexus:8443/app:t": '
)


@pytest.mark.parametrize(
    ("code", "text", "verdict", "reason"),
    [
        (7, "error building image: error building stage: failed to execute command: waiting for process to exit: exit status 7", Verdict.PERMANENT, "RUN step in the Dockerfile failed with exit status 7"),
        (2, "something else entirely", Verdict.PERMANENT, "exit status 2"),
        # a RUN whose own output mentions a network error is still not retried
        (1, "pip: connection reset by peer\nerror building image: error building stage: failed to execute command: waiting for process to exit: exit status 1", Verdict.PERMANENT, "RUN step"),
        (1, "Error: error resolving dockerfile path: please provide a valid path to a Dockerfile within the build context with --dockerfile", Verdict.PERMANENT, "Dockerfile was not found"),
        (1, "error building image: Error finding target stage: web is not a valid target build stage", Verdict.PERMANENT, "target stage"),
        (1, PERMISSION + "POST https://nexus:8443/v2/app/blobs/uploads/: UNAUTHORIZED: authentication required; [map[]]", Verdict.PERMANENT, "401 UNAUTHORIZED"),
        (1, PUSH + "PUT https://nexus:8443/v2/app/manifests/t: DENIED: requested access to the resource is denied", Verdict.PERMANENT, "403 DENIED"),
        (1, PUSH + "unexpected status code 403 Forbidden", Verdict.PERMANENT, "403"),
        (1, PUSH + "PUT https://nexus:8443/v2/app/manifests/t: MANIFEST_INVALID: manifest invalid; map[]", Verdict.PERMANENT, "MANIFEST_INVALID"),
        (1, "error building image: GET https://nexus:8444/v2/python/manifests/3.99: MANIFEST_UNKNOWN: manifest unknown", Verdict.PERMANENT, "base image was not found"),
        (1, PERMISSION + 'Get "https://nexus:8443/v2/": tls: failed to verify certificate: x509: certificate signed by unknown authority', Verdict.PERMANENT, "TLS certificate"),
        (1, PERMISSION + 'Get "https://nexsu:8443/v2/": dial tcp: lookup nexsu on 10.0.0.2:53: no such host', Verdict.PERMANENT, "does not resolve"),
        (1, PUSH + "TOOMANYREQUESTS: too many requests", Verdict.TRANSIENT, "429 TOOMANYREQUESTS"),
        (1, PUSH + "unexpected status code 503 Service Unavailable", Verdict.TRANSIENT, "server error (5xx)"),
        (1, PUSH + "unexpected status code 502 Bad Gateway", Verdict.TRANSIENT, "server error (5xx)"),
        (1, PUSH + 'Patch "https://nexus:8443/v2/app/blobs/uploads/x": read tcp 10.0.0.1:40000->10.0.0.2:8443: read: connection reset by peer', Verdict.TRANSIENT, "dropped or was refused"),
        (1, PUSH + "net/http: TLS handshake timeout", Verdict.TRANSIENT, "timed out"),
        (1, PERMISSION + 'Get "https://nexus:8443/v2/": dial tcp 10.0.0.2:8443: i/o timeout', Verdict.TRANSIENT, "timed out"),
        (1, PUSH + "unexpected EOF", Verdict.TRANSIENT, "dropped or was refused"),
        (1, PERMISSION + "dial tcp 127.0.0.1:1: connect: connection refused", Verdict.TRANSIENT, "dropped or was refused"),
        # a permanent sign beats an earlier transient one
        (1, "WARN retrying after connection reset by peer\n" + PUSH + "UNAUTHORIZED: authentication required", Verdict.PERMANENT, "401"),
        (1, "error building image: something nobody has seen before", Verdict.UNKNOWN, "something nobody has seen before"),
        (1, "", Verdict.UNKNOWN, "no error output"),
        (-9, "", Verdict.UNKNOWN, "killed by signal 9"),
        (-15, "", Verdict.UNKNOWN, "killed by signal 15"),
    ],
)  # fmt: skip
def test_classify_failure(code: int, text: str, verdict: Verdict, reason: str) -> None:
    failure = kaniko.classify_failure(code, text)

    assert failure.verdict is verdict
    assert reason in failure.reason
    assert failure.fix


def test_digests_and_ports_are_not_server_errors() -> None:
    text = f"error building image: pushed layer {DIGEST[:20]}5031 to nexus:5000 failed oddly"

    assert kaniko.classify_failure(1, text).verdict is Verdict.UNKNOWN


def test_failure_messages_are_one_line() -> None:
    permanent = kaniko.classify_failure(1, PUSH + "MANIFEST_INVALID")
    transient = kaniko.classify_failure(1, PUSH + "unexpected EOF")
    unknown = kaniko.classify_failure(1, "odd")

    assert permanent.message() == (
        f"kaniko build failed: {permanent.reason} (not retried); {permanent.fix}"
    )
    assert (
        transient.message(3)
        == f"kaniko build failed after 3 attempts: {transient.reason}; {transient.fix}"
    )
    assert unknown.message() == f"kaniko build failed: {unknown.reason}; {unknown.fix}"
    for failure in (permanent, transient, unknown):
        assert "\n" not in failure.message(2)
