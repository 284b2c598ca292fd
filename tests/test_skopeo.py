"""skopeo argv builders and parsers (pure), checked against real skopeo output texts."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import pytest

from pipeline.errors import CommandError
from pipeline.tools import skopeo
from pipeline.tools.skopeo import Access, Failure

DIGEST = "sha256:" + "ab" * 32
PREFIX = (
    'time="2026-12-03T16:58:27Z" level=fatal msg="Error parsing image name \\"docker://h:1/x:1\\": '
)
# The last line of real skopeo 1.9.3 failures against docker-registry 2.8 and the fault proxy.
NO_PLATFORM = (
    'time="2026-12-03T17:10:56Z" level=fatal msg="Error parsing manifest for image: choosing '
    'image instance: no image found in image index for architecture amd64, variant \\"\\", OS linux"'
)
UNAUTHORIZED = PREFIX + 'reading manifest 1 in h:1/x: unauthorized: authentication required"'
DENIED = (
    PREFIX + 'pinging container registry h:1: invalid status code from registry 403 (Forbidden)"'
)
UNKNOWN = PREFIX + 'reading manifest 1 in h:1/x: manifest unknown: manifest unknown"'
X509 = (
    PREFIX + 'pinging container registry h:1: Get \\"https://h:1/v2/\\": '
    'x509: certificate signed by unknown authority"'
)
REFUSED = (
    PREFIX + 'pinging container registry h:1: Get \\"http://h:1/v2/\\": '
    'dial tcp h:1: connect: connection refused"'
)
UNAVAILABLE = (
    PREFIX
    + 'pinging container registry h:1: invalid status code from registry 503 (Service Unavailable)"'
)
THROTTLED = PREFIX + 'pinging container registry h:1: too many requests to registry"'
RESET = (
    PREFIX + 'pinging container registry h:1: Get \\"http://h:1/v2/\\": read tcp '
    '127.0.0.1:4->127.0.0.1:3: read: connection reset by peer"'
)


def test_access_flags_for_inspect_and_each_side_of_copy() -> None:
    access = Access(authfile=Path("/d/config.json"), cert_dir=Path("/c"), tls_verify=True)

    assert access.flags() == [
        "--tls-verify=true",
        "--cert-dir",
        "/c",
        "--authfile",
        "/d/config.json",
    ]
    assert access.flags("src")[:3] == ["--src-tls-verify=true", "--src-cert-dir", "/c"]
    assert access.flags("dest")[-2:] == ["--dest-authfile", "/d/config.json"]
    assert Access(tls_verify=False).flags("dest") == ["--dest-tls-verify=false"]


def test_copy_is_by_digest_whole_index_and_digest_preserving() -> None:
    argv = skopeo.copy_by_digest(
        source=f"r:1/app@{DIGEST}", destination="r:1/app:latest", access=Access()
    )

    assert argv[:4] == ["skopeo", "copy", "--all", "--preserve-digests"]
    assert argv[-2:] == [f"docker://r:1/app@{DIGEST}", "docker://r:1/app:latest"]
    assert "--src-tls-verify=true" in argv
    assert "--dest-tls-verify=true" in argv


def test_inspect_builders() -> None:
    access = Access(tls_verify=False)

    assert skopeo.inspect_raw("r/app:1", access=access) == [
        "skopeo",
        "inspect",
        "--raw",
        "--tls-verify=false",
        "docker://r/app:1",
    ]
    assert skopeo.inspect_image("r/app:1", access=access)[2] == "--no-tags"


def test_raw_digest_is_the_sha256_of_the_bytes_served() -> None:
    raw = '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}'

    assert skopeo.raw_digest(raw) == f"sha256:{hashlib.sha256(raw.encode()).hexdigest()}"
    with pytest.raises(ValueError, match="printed nothing"):
        skopeo.raw_digest("\n")


def test_parse_inspect_reads_digest_revision_and_creation_time() -> None:
    output = json.dumps(
        {
            "Digest": DIGEST,
            "Created": "2024-01-01T00:00:00Z",
            "Labels": {skopeo.REVISION_LABEL: "a" * 40, "other": "x"},
        }
    )

    info = skopeo.parse_inspect(output)

    assert info.digest == DIGEST
    assert info.revision == "a" * 40
    assert info.created == datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)


@pytest.mark.parametrize("created", [None, "", "0001-01-01T00:00:00Z", "yesterday"])
def test_parse_inspect_without_labels_or_a_usable_time(created: str | None) -> None:
    info = skopeo.parse_inspect(json.dumps({"Digest": DIGEST, "Labels": None, "Created": created}))

    assert info.revision is None
    assert info.created is None


@pytest.mark.parametrize(
    ("stderr", "kind"),
    [
        (NO_PLATFORM, Failure.NO_PLATFORM),
        (UNAUTHORIZED, Failure.UNAUTHORIZED),
        (DENIED, Failure.DENIED),
        (UNKNOWN, Failure.NOT_FOUND),
        (X509, Failure.TLS),
        (REFUSED, Failure.UNREACHABLE),
        (UNAVAILABLE, Failure.OTHER),
        ("", Failure.OTHER),
    ],
)
def test_classify_failure(stderr: str, kind: Failure) -> None:
    assert skopeo.classify_failure(stderr) is kind


def test_error_message_drops_the_log_prefix_and_the_image_name() -> None:
    assert skopeo.error_message("noise\n" + UNKNOWN) == (
        "reading manifest 1 in h:1/x: manifest unknown: manifest unknown"
    )
    assert skopeo.error_message("plain failure") == "plain failure"
    assert skopeo.error_message("") == "no error output"


@pytest.mark.parametrize(
    ("stderr", "retried"),
    [
        (UNAVAILABLE, True),
        (THROTTLED, True),
        (RESET, True),
        (REFUSED, True),
        (UNAUTHORIZED, False),
        (DENIED, False),
        (UNKNOWN, False),
        (X509, False),
        (NO_PLATFORM, False),
    ],
)
def test_only_transient_failures_are_retried(stderr: str, retried: bool) -> None:
    error = CommandError("skopeo failed", argv=("skopeo",), returncode=1, stderr_tail=stderr)

    assert (skopeo.transient(error) is not None) is retried
    assert skopeo.transient(ValueError(stderr)) is None


@pytest.mark.parametrize("label", ["main", "v1.2.3", "--upload-pack=x", "abc", "A" * 40, ""])
def test_a_revision_label_that_is_no_commit_sha_is_ignored(label: str) -> None:
    info = skopeo.parse_inspect(
        json.dumps({"Digest": DIGEST, "Labels": {skopeo.REVISION_LABEL: label}})
    )

    assert info.revision is None


def test_a_short_commit_sha_is_a_revision() -> None:
    info = skopeo.parse_inspect(
        json.dumps({"Digest": DIGEST, "Labels": {skopeo.REVISION_LABEL: "1a2b3c4"}})
    )

    assert info.revision == "1a2b3c4"
