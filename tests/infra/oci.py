"""Container images written without Docker, byte for byte reproducible.

`write_docker_archive` writes what `docker save` writes (manifest.json, the
config JSON, one uncompressed tar per layer) from an `ImageSpec`: layers are
mappings of path -> content, or a `random_layer` of incompressible bytes that
is streamed to disk. Every timestamp is fixed, so the same spec always gives
the same image ID and, once pushed, the same digest; `salt` makes a distinct
image cheaply.

The rootfs helpers give layers that scanners recognise (busybox, Debian's dpkg
database, Alpine's apk database, Python and npm packages);
`push_multiarch_index` pushes single-arch images by digest and an OCI index
over them through the registry API.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.infra.registry import OCI_INDEX, OCI_MANIFEST, Registry, request

if TYPE_CHECKING:
    from _typeshed import SupportsRead

SOURCE_DATE_EPOCH = 1_704_067_200
CREATED = "2024-01-01T00:00:00Z"
DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = ("sh", "httpd", "wget", "cat", "echo", "sleep", "ls", "env", "true", "false")
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

_BLOCK = 512
_COPY_BUFFER = 1 << 20
_DEBIAN_CODENAMES = {"10": "buster", "11": "bullseye", "12": "bookworm", "13": "trixie"}


@dataclass(frozen=True)
class File:
    """A regular file with an explicit mode (plain `bytes` mean mode 0644)."""

    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755


Entry = bytes | File | Symlink | Dir
Files = Mapping[str, Entry]


@dataclass(frozen=True)
class RandomLayer:
    """A layer holding one file of `size` seeded, incompressible bytes."""

    size: int
    seed: int
    path: str = "data/random.bin"


Layer = Files | RandomLayer


@dataclass(frozen=True, kw_only=True)
class ImageSpec:
    """What goes into an image: layers (bottom first) and the config's fields."""

    layers: Sequence[Layer]
    labels: Mapping[str, str] = field(default_factory=dict)
    env: Sequence[str] = DEFAULT_ENV
    cmd: Sequence[str] | None = None
    entrypoint: Sequence[str] | None = None
    workdir: str | None = None
    user: str | None = None
    architecture: str = "amd64"
    os: str = "linux"
    variant: str | None = None
    salt: str | None = None
    """When set, one more layer holds `/etc/image-salt` with this text."""

    @property
    def platform(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True, kw_only=True)
class Archive:
    """A written docker-archive tarball."""

    path: Path
    image_id: str
    """`sha256:` of the config JSON, as `docker images --digests` shows the ID."""
    diff_ids: tuple[str, ...]
    config: Mapping[str, Any]


# --- layers ------------------------------------------------------------------------------


def random_layer(size_bytes: int, seed: int, *, path: str = "data/random.bin") -> RandomLayer:
    """A layer of `size_bytes` incompressible bytes; the same seed gives the same bytes."""
    return RandomLayer(size=size_bytes, seed=seed, path=path)


def busybox_rootfs() -> dict[str, Entry]:
    """Debian's static busybox with symlinked applets, /etc/passwd and /etc/group."""
    files: dict[str, Entry] = {
        "bin/busybox": File(_busybox_binary(), 0o755),
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
        "root": Dir(0o700),
        "tmp": Dir(0o1777),
    }
    files.update({f"bin/{applet}": Symlink("busybox") for applet in BUSYBOX_APPLETS})
    return files


@functools.cache
def _busybox_binary() -> bytes:
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} missing: apt-get install busybox-static")
    return BUSYBOX.read_bytes()


def debian_rootfs(
    version: str, packages: Sequence[tuple[str, str, str]], *, architecture: str = "amd64"
) -> dict[str, Entry]:
    """Debian's release files and a dpkg status of (name, source, version) packages."""
    major = version.partition(".")[0]
    codename = _DEBIAN_CODENAMES.get(major, "unknown")
    os_release = (
        f'PRETTY_NAME="Debian GNU/Linux {major} ({codename})"\nNAME="Debian GNU/Linux"\n'
        f'VERSION_ID="{major}"\nVERSION="{major} ({codename})"\n'
        f"VERSION_CODENAME={codename}\nID=debian\n"
    )
    stanzas = [_dpkg_stanza(name, source, ver, architecture) for name, source, ver in packages]
    return {
        "etc/debian_version": f"{version}\n".encode(),
        "etc/os-release": os_release.encode(),
        "var/lib/dpkg/status": "\n".join(stanzas).encode(),
    }


def _dpkg_stanza(name: str, source: str, version: str, architecture: str) -> str:
    source_line = f"Source: {source}\n" if source and source != name else ""
    return (
        f"Package: {name}\nStatus: install ok installed\nPriority: optional\n"
        f"Section: misc\nInstalled-Size: 100\n"
        f"Maintainer: Test Maintainer <maintainer@example.invalid>\n"
        f"Architecture: {architecture}\n{source_line}Version: {version}\n"
        f"Description: {name} (test package)\n"
    )


def alpine_rootfs(
    version: str, packages: Sequence[tuple[str, str, str]], *, architecture: str = "x86_64"
) -> dict[str, Entry]:
    """Alpine's release files and an apk database of (name, origin, version) packages."""
    minor = ".".join(version.split(".")[:2])
    os_release = (
        f'NAME="Alpine Linux"\nID=alpine\nVERSION_ID={version}\n'
        f'PRETTY_NAME="Alpine Linux v{minor}"\n'
    )
    stanzas = [
        f"P:{name}\nV:{ver}\nA:{architecture}\nT:{name} (test package)\nL:MIT\no:{origin}\n"
        for name, origin, ver in packages
    ]
    return {
        "etc/alpine-release": f"{version}\n".encode(),
        "etc/os-release": os_release.encode(),
        "lib/apk/db/installed": "\n".join(stanzas).encode(),
    }


def python_dist(
    name: str, version: str, *, site_packages: str = "usr/local/lib/python3.11/site-packages"
) -> dict[str, Entry]:
    """An installed Python distribution: `NAME-VERSION.dist-info/METADATA`."""
    dist_info = f"{site_packages}/{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    return {f"{dist_info}/METADATA": metadata.encode(), f"{dist_info}/INSTALLER": b"pip\n"}


def npm_package(
    name: str, version: str, *, node_modules: str = "usr/src/app/node_modules"
) -> dict[str, Entry]:
    """An installed npm package: `node_modules/NAME/package.json`."""
    manifest = json.dumps({"name": name, "version": version, "license": "MIT"}, indent=2)
    return {f"{node_modules}/{name}/package.json": manifest.encode()}


# --- writing a docker-archive ------------------------------------------------------------


def write_docker_archive(path: Path, spec: ImageSpec, *, repo_tags: Sequence[str] = ()) -> Archive:
    """Write `spec` as a `docker save` tarball at `path`, streaming each layer to disk."""
    layers = [*spec.layers, {"etc/image-salt": spec.salt.encode()}] if spec.salt else spec.layers
    with path.open("wb") as out:
        writer = _OuterTar(out)
        diff_ids = [writer.add_layer(layer) for layer in layers]
        config = _config_json(spec, diff_ids)
        config_bytes = _canonical_json(config)
        image_hex = hashlib.sha256(config_bytes).hexdigest()
        writer.add(f"{image_hex}.json", config_bytes)
        manifest = [
            {
                "Config": f"{image_hex}.json",
                "RepoTags": list(repo_tags),
                "Layers": [f"{diff_id.removeprefix('sha256:')}/layer.tar" for diff_id in diff_ids],
            }
        ]
        writer.add("manifest.json", _canonical_json(manifest))
        writer.close()
    return Archive(
        path=path, image_id=f"sha256:{image_hex}", diff_ids=tuple(diff_ids), config=config
    )


def _config_json(spec: ImageSpec, diff_ids: Sequence[str]) -> dict[str, Any]:
    container: dict[str, Any] = {"Env": list(spec.env), "Labels": dict(spec.labels)}
    commands = {"Cmd": spec.cmd, "Entrypoint": spec.entrypoint}
    container.update({key: list(value) for key, value in commands.items() if value is not None})
    if spec.workdir:
        container["WorkingDir"] = spec.workdir
    if spec.user:
        container["User"] = spec.user
    config: dict[str, Any] = {
        "architecture": spec.architecture,
        "os": spec.os,
        "created": CREATED,
        "config": container,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [
            {"created": CREATED, "created_by": f"tests.infra.oci layer {n}"}
            for n in range(len(diff_ids))
        ],
    }
    if spec.variant:
        config["variant"] = spec.variant
    return config


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


class _HashingWriter:
    """Counts and hashes what passes through to the file (tarfile's "w" mode needs tell)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.size = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._out.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def read(self, size: int, /) -> bytes:
        raise io.UnsupportedOperation("write-only")

    def seek(self, pos: int, /) -> int:
        raise io.UnsupportedOperation("write-only")

    def close(self) -> None:
        """The underlying file stays open: the outer tar goes on after the layer."""


class _OuterTar:
    """The docker-archive tar, written by hand so layers can stream straight into it.

    A layer member's header is written after its data, once size and digest are
    known (the header slot is reserved and filled in by seeking back).
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._layers: set[str] = set()

    def add(self, name: str, data: bytes) -> None:
        self._out.write(_member_header(name, len(data)))
        self._out.write(data)
        self._pad(len(data))

    def add_layer(self, layer: Layer) -> str:
        start = self._out.tell()
        self._out.write(bytes(_BLOCK))
        body = _HashingWriter(self._out)
        _write_layer_tar(body, layer)
        digest = body.sha256.hexdigest()
        if digest in self._layers:  # an identical layer is stored once
            self._out.seek(start)
            self._out.truncate()
            return f"sha256:{digest}"
        self._layers.add(digest)
        self._pad(body.size)
        end = self._out.tell()
        self._out.seek(start)
        self._out.write(_member_header(f"{digest}/layer.tar", body.size))
        self._out.seek(end)
        return f"sha256:{digest}"

    def close(self) -> None:
        self._out.write(bytes(2 * _BLOCK))

    def _pad(self, size: int) -> None:
        self._out.write(bytes(-size % _BLOCK))


def _member_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = SOURCE_DATE_EPOCH
    info.mode = 0o644
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def _write_layer_tar(out: _HashingWriter, layer: Layer) -> None:
    files = {layer.path: b""} if isinstance(layer, RandomLayer) else layer
    entries = _with_parents(files)
    pax = tarfile.PAX_FORMAT
    with tarfile.TarFile(fileobj=out, mode="w", format=pax, copybufsize=_COPY_BUFFER) as tar:
        for name in sorted(entries):
            info, data = _tar_member(name, entries[name])
            data_source: SupportsRead[bytes] | None = data
            if isinstance(layer, RandomLayer) and name == _normalise(layer.path):
                info.size, data_source = layer.size, _RandomReader(layer.seed)
            tar.addfile(info, data_source)


def _normalise(path: str) -> str:
    return path.strip("/")


def _with_parents(files: Files) -> dict[str, Entry]:
    """The entries with their paths normalised and every missing parent directory added."""
    entries: dict[str, Entry] = {_normalise(p): e for p, e in files.items()}
    for name in list(entries):
        parts = name.split("/")
        for depth in range(1, len(parts)):
            entries.setdefault("/".join(parts[:depth]), Dir())
    return entries


def _tar_member(name: str, entry: Entry) -> tuple[tarfile.TarInfo, IO[bytes] | None]:
    info = tarfile.TarInfo(name)
    info.mtime = SOURCE_DATE_EPOCH
    info.uname = info.gname = ""
    if isinstance(entry, Dir):
        info.type, info.mode = tarfile.DIRTYPE, entry.mode
        return info, None
    if isinstance(entry, Symlink):
        info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, entry.target
        return info, None
    file = entry if isinstance(entry, File) else File(entry)
    info.mode, info.size = file.mode, len(file.data)
    return info, io.BytesIO(file.data)


class _RandomReader:
    """An endless stream of seeded pseudo-random bytes (AES-CTR over zeros: GB/s)."""

    def __init__(self, seed: int) -> None:
        key = hashlib.sha256(f"tests.infra.oci random layer {seed}".encode()).digest()
        self._cipher = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def read(self, size: int = _COPY_BUFFER) -> bytes:
        return self._cipher.update(bytes(size))


# --- reading an archive back and pushing by digest --------------------------------------


def push_archive_by_digest(registry: Registry, repo: str, archive: Path) -> str:
    """Push a docker-archive as an OCI manifest with uncompressed layers, untagged.

    Returns the manifest digest (`sha256:...`), which is also the reference pushed.
    """
    return _push_archive(registry, repo, archive)[0]


def _push_archive(registry: Registry, repo: str, archive: Path) -> tuple[str, int]:
    with tarfile.open(archive) as tar:
        entry = json.loads(_member_bytes(tar, "manifest.json"))[0]
        config = _member_bytes(tar, entry["Config"])
        config_digest = _upload_blob(registry, repo, io.BytesIO(config), len(config))
        layers = [_upload_member(registry, repo, tar, name) for name in entry["Layers"]]
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [
            {"mediaType": OCI_LAYER_TAR, "digest": digest, "size": size} for digest, size in layers
        ],
    }
    body = _canonical_json(manifest)
    digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
    _put_manifest(registry, repo, digest, body, OCI_MANIFEST)
    return digest, len(body)


def push_multiarch_index(
    registry: Registry, repo: str, tag: str, images_per_platform: Mapping[str, Path]
) -> str:
    """Push each docker-archive by digest and tag an OCI index over them; return its digest.

    Keys are platforms ("linux/amd64", "linux/arm/v7") and must match each image's config.
    """
    manifests = []
    for platform, archive in images_per_platform.items():
        _check_platform(platform, archive)
        digest, size = _push_archive(registry, repo, archive)
        manifests.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": size,
                "platform": _platform(platform),
            }
        )
    body = _canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
    _put_manifest(registry, repo, tag, body, OCI_INDEX)
    return f"sha256:{hashlib.sha256(body).hexdigest()}"


def read_config(archive: Path) -> dict[str, Any]:
    """The image config JSON inside a docker-archive."""
    with tarfile.open(archive) as tar:
        entry = json.loads(_member_bytes(tar, "manifest.json"))[0]
        config: dict[str, Any] = json.loads(_member_bytes(tar, entry["Config"]))
        return config


def _check_platform(platform: str, archive: Path) -> None:
    config = read_config(archive)
    actual = "/".join(p for p in (config["os"], config["architecture"], config.get("variant")) if p)
    if actual != platform:
        raise ValueError(f"{archive} is a {actual} image, not {platform}")


def _platform(platform: str) -> dict[str, str]:
    os_name, architecture, *variant = platform.split("/")
    result = {"os": os_name, "architecture": architecture}
    if variant:
        result["variant"] = variant[0]
    return result


def _member_bytes(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    if member is None:
        raise ValueError(f"{name} is not a regular file in {tar.name!r}")
    return member.read()


def _upload_member(
    registry: Registry, repo: str, tar: tarfile.TarFile, name: str
) -> tuple[str, int]:
    member = tar.getmember(name)
    stream = tar.extractfile(member)
    if stream is None:
        raise ValueError(f"{name} is not a regular file in {tar.name!r}")
    return _upload_blob(registry, repo, stream, member.size), member.size


def _upload_blob(registry: Registry, repo: str, stream: IO[bytes], size: int) -> str:
    """Monolithic upload (POST, then PUT with the digest); skipped when the blob exists."""
    digest = _stream_digest(stream)
    if request(registry, "HEAD", f"/v2/{repo}/blobs/{digest}").status == 200:
        return digest
    started = request(registry, "POST", f"/v2/{repo}/blobs/uploads/")
    if started.status != 202:
        raise AssertionError(
            f"starting an upload to {repo}: HTTP {started.status} {started.body!r}"
        )
    location = started.headers["Location"]
    location = location if "://" in location else f"{registry.url}{location}"
    separator = "&" if "?" in location else "?"
    stream.seek(0)
    done = request(
        registry,
        "PUT",
        f"{location}{separator}digest={digest}",
        headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        body=stream,
    )
    if done.status != 201:
        raise AssertionError(f"uploading {digest} to {repo}: HTTP {done.status} {done.body!r}")
    return digest


def _stream_digest(stream: IO[bytes]) -> str:
    sha256 = hashlib.sha256()
    while chunk := stream.read(_COPY_BUFFER):
        sha256.update(chunk)
    return f"sha256:{sha256.hexdigest()}"


def _put_manifest(
    registry: Registry, repo: str, reference: str, body: bytes, media_type: str
) -> None:
    done = request(
        registry,
        "PUT",
        f"/v2/{repo}/manifests/{reference}",
        headers={"Content-Type": media_type},
        body=body,
    )
    if done.status != 201:
        raise AssertionError(f"PUT manifest {repo}:{reference}: HTTP {done.status} {done.body!r}")
