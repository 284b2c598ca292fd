"""A stand-in for the Kaniko executor that behaves like the real one at its boundary.

Kaniko cannot run on these machines (it must own a container's root filesystem),
so the build stage's tests run this instead, through the ``executor`` launcher
next to it. What it shares with the real executor:

- Flags: exactly those in the flag list of the chosen flavour (``flags-fork.tsv``,
  osscontainertools/kaniko v1.28.3, or ``flags-upstream.tsv``, v1.24.0, with
  ``STANDIN_FLAVOR=upstream``), parsed the way pflag does (``--flag=value``,
  ``--flag value``, bare booleans, ``-f value`` shorthands); anything else is
  refused with cobra's ``Error: unknown flag: --x`` and exit 1. ``--help`` lists
  the flavour's flags, ``version`` prints its version.
- Checks before the build, with Kaniko's texts: a destination unless
  ``--no-push``, a Dockerfile absolute or relative to the context.
- The build: reads the Dockerfile (stages, ``--target``, ``LABEL``) and the
  context, and writes a real image (one layer holding the context's files under
  ``/workspace``, ``--label`` labels in the config) with ``tests.infra.oci``.
- The push: ``skopeo copy`` to every ``--destination`` with the credentials in
  ``$DOCKER_CONFIG/config.json`` and the CA of ``--registry-certificate``; the
  registry's digest goes to ``--digest-file`` and ``--image-name-with-digest-file``.
- Failures print Kaniko's final error line on stdout (Kaniko's ``exit`` uses
  ``fmt.Println``) and exit 1, or a failing RUN's own status.

Test controls (environment):
``STANDIN_FAIL`` = ``transient-once`` (a connection reset on push, cleared on
the next run; needs ``STANDIN_STATE``, a file path), ``transient`` (503 on every
push), ``run:N`` (a RUN step exits N), ``killed`` (SIGKILL mid-build), ``hang`` (sleeps until signalled), ``unauthorized`` (401),
``manifest-invalid``; ``STANDIN_INSTANT=1`` exits at once after the flag checks
with a fixed digest (benchmarks); ``STANDIN_RECORD`` = a file that gets one JSON
line per run (argv, DOCKER_CONFIG, restore mode); ``STANDIN_WIPE`` = a path
deleted after the push, like a filesystem Kaniko did not restore.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.infra.oci import Entry

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
VERSIONS = {"fork": "v1.28.3", "upstream": "v1.24.0"}
RESTORE = ("--pre-cleanup", "--preserve-context", "--cleanup")
RESTORE_ENV = {
    "--pre-cleanup": "KANIKO_PRE_CLEANUP",
    "--preserve-context": "KANIKO_PRESERVE_CONTEXT",
    "--cleanup": "KANIKO_CLEANUP",
}
INT_TYPES = ("int",)
_START = time.monotonic()


class CobraError(Exception):
    """A command-line error cobra reports as ``Error: <message>`` on stderr."""


class KanikoExitError(Exception):
    """Kaniko's ``exit(err)``: the message on stdout, then this exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# --- flags ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    name: str
    kind: str  # "bool", "value" or "list"
    type: str
    default: str
    help: str
    short: str | None = None


def load_flags(flavor: str) -> dict[str, Flag]:
    """The flavour's executor flags from its TSV (subcommand rows left out)."""
    flags: dict[str, Flag] = {}
    for line in (HERE / f"flags-{flavor}.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        names, type_, default, help_ = line.split("\t")
        if not names.startswith("--"):
            continue  # `push <path> ...`, `login <registry> ...`
        long, _, short = names.partition(" / ")
        flag = Flag(long, _kind(type_), type_, default, help_, short or None)
        flags[long] = flag
    return flags


def _kind(type_: str) -> str:
    if type_ == "bool":
        return "bool"
    if "repeatable" in type_ or type_ == "stringSlice":
        return "list"
    return "value"


@dataclass
class Options:
    values: dict[str, str | bool] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)
    positional: list[str] = field(default_factory=list)
    help: bool = False

    def get(self, name: str, default: str = "") -> str:
        value = self.values.get(name, default)
        return value if isinstance(value, str) else default

    def on(self, name: str) -> bool:
        return self.values.get(name) is True

    def many(self, name: str) -> list[str]:
        return self.lists.get(name, [])


def parse(argv: Sequence[str], flags: dict[str, Flag]) -> Options:
    """pflag's parsing: long and short forms, ``=`` or a separate value, bare booleans."""
    shorts = {flag.short: flag for flag in flags.values() if flag.short}
    options = Options()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            options.positional += args
            break
        if arg in ("-h", "--help"):
            options.help = True
        elif arg.startswith("--"):
            name, eq, value = arg.partition("=")
            flag = flags.get(name)
            if flag is None:
                raise CobraError(f"unknown flag: {name}")
            _set(options, flag, value if eq else None, args, shown=name)
        elif arg.startswith("-") and len(arg) > 1:
            flag = shorts.get(arg[:2])
            if flag is None:
                raise CobraError(f"unknown shorthand flag: {arg[1]!r} in {arg}")
            rest = arg[2:].removeprefix("=")
            _set(options, flag, rest or None, args, shown=arg[:2])
        else:
            options.positional.append(arg)
    return options


def _set(options: Options, flag: Flag, value: str | None, rest: list[str], *, shown: str) -> None:
    if flag.kind == "bool":
        options.values[flag.name] = _parse_bool(flag, "true" if value is None else value)
        return
    if value is None:
        if not rest:
            raise CobraError(f"flag needs an argument: {shown}")
        value = rest.pop(0)
    if flag.type in INT_TYPES and not _is_int(value):
        raise CobraError(
            f'invalid argument "{value}" for "{flag.name}" flag: '
            f'strconv.ParseInt: parsing "{value}": invalid syntax'
        )
    if flag.kind == "list":
        options.lists.setdefault(flag.name, []).append(value)
    else:
        options.values[flag.name] = value


def _parse_bool(flag: Flag, value: str) -> bool:
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise CobraError(
        f'invalid argument "{value}" for "{flag.name}" flag: '
        f'strconv.ParseBool: parsing "{value}": invalid syntax'
    )


def _is_int(value: str) -> bool:
    return value.lstrip("-").isdigit()


def help_text(flavor: str, flags: dict[str, Flag]) -> str:
    lines = [
        "Usage:",
        "  executor [flags]",
        "  executor [command]",
        "",
        "Available Commands:",
        "  help        Help about any command",
        "  version     Print the version number of kaniko",
        "",
        "Flags:",
    ]
    for flag in sorted(flags.values(), key=lambda f: f.name):
        short = f"{flag.short}, " if flag.short else "    "
        type_ = "" if flag.kind == "bool" else f" {flag.type.split(' ')[0]}"
        lines.append(f"  {short}{flag.name}{type_}\t{flag.help}")
    lines.append("")
    lines.append(
        f'Use "executor [command] --help" for more information about a command. ({flavor})'
    )
    return "\n".join(lines)


# --- the build --------------------------------------------------------------------------


def info(message: str) -> None:
    print(f"INFO[{int(time.monotonic() - _START):04d}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Inputs:
    context: Path
    dockerfile: Path
    destinations: tuple[str, ...]


def check(options: Options) -> Inputs:
    """Kaniko's PersistentPreRunE checks, with its error texts."""
    destinations = tuple(options.many("--destination"))
    if not options.on("--no-push") and not destinations:
        raise CobraError("you must provide --destination, or use --no-push")
    context = Path(options.get("--context", "/workspace/"))
    dockerfile = Path(options.get("--dockerfile", "Dockerfile"))
    if not dockerfile.is_file():
        dockerfile = context / dockerfile
    if not dockerfile.is_file():
        raise CobraError(
            "error resolving dockerfile path: please provide a valid path to a Dockerfile "
            "within the build context with --dockerfile"
        )
    for name in ("--image-name-with-digest-file", "--image-name-tag-with-digest-file"):
        if options.get(name) and not destinations:
            raise CobraError(f"you must provide --destination if setting {name}")
    return Inputs(
        context=context.resolve(), dockerfile=dockerfile.resolve(), destinations=destinations
    )


def record(options: Options, argv: Sequence[str]) -> None:
    path = os.environ.get("STANDIN_RECORD")
    if not path:
        return
    restore = {
        flag: options.on(flag) or os.environ.get(env) == "1" for flag, env in RESTORE_ENV.items()
    }
    entry = {
        "argv": list(argv),
        "docker_config": os.environ.get("DOCKER_CONFIG"),
        "restore": restore,
        "pid": os.getpid(),
    }
    with Path(path).open("a") as stream:
        stream.write(json.dumps(entry) + "\n")


@dataclass(frozen=True)
class Dockerfile:
    stages: tuple[str, ...]
    labels: dict[str, str]
    runs: tuple[str, ...]


def read_dockerfile(path: Path) -> Dockerfile:
    stages: list[str] = []
    labels: dict[str, str] = {}
    runs: list[str] = []
    for instruction, rest in _instructions(path.read_text()):
        if instruction == "FROM":
            words = [word for word in rest.split() if not word.startswith("--")]
            named = len(words) >= 3 and words[1].lower() == "as"
            stages.append(words[2].lower() if named else "")
        elif instruction == "LABEL":
            labels.update(_pairs(rest))
        elif instruction == "RUN":
            runs.append(rest)
    if not stages:
        raise KanikoExitError("error building image: parsing dockerfile: file with no instructions")
    return Dockerfile(stages=tuple(stages), labels=labels, runs=tuple(runs))


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    joined = text.replace("\\\n", " ")
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            yield instruction.upper(), rest.strip()


def _pairs(text: str) -> dict[str, str]:
    return dict(item.partition("=")[::2] for item in shlex.split(text) if "=" in item)


def check_target(dockerfile: Dockerfile, options: Options) -> None:
    for target in options.many("--target"):
        if target.lower() not in dockerfile.stages:
            raise KanikoExitError(
                f"error building image: Error finding target stage: {target} "
                "is not a valid target build stage"
            )


def context_files(context: Path) -> dict[str, Entry]:
    """The context's regular files (modes kept) under /workspace, as ``tests.infra.oci`` entries."""
    from tests.infra.oci import File

    files: dict[str, Entry] = {}
    for path in sorted(context.rglob("*")):
        relative = path.relative_to(context)
        if relative.parts[0] == ".git" or not path.is_file() or path.is_symlink():
            continue
        files[f"workspace/{relative.as_posix()}"] = File(
            path.read_bytes(), path.stat().st_mode & 0o777
        )
    return files or {"workspace/.empty": b""}


def write_image(inputs: Inputs, options: Options, dockerfile: Dockerfile, out: Path) -> Path:
    from tests.infra.oci import ImageSpec, write_docker_archive

    labels = {**dockerfile.labels, **dict(x.partition("=")[::2] for x in options.many("--label"))}
    spec = ImageSpec(layers=[context_files(inputs.context)], labels=labels)
    archive = out / "image.tar"
    write_docker_archive(archive, spec)
    return archive


# --- the push ---------------------------------------------------------------------------


def push(archive: Path, destination: str, options: Options, scratch: Path) -> str:
    """Push with skopeo; return the registry's digest, or exit like Kaniko."""
    host = destination.split("/", 1)[0]
    digest_file = scratch / f"digest-{hashlib.sha256(destination.encode()).hexdigest()[:8]}"
    argv = ["skopeo", "copy", "--retry-times", options.get("--push-retry", "0")]
    argv += _auth_flags() + _tls_flags(host, options, scratch)
    argv += [
        "--digestfile",
        str(digest_file),
        f"docker-archive:{archive}",
        f"docker://{destination}",
    ]
    info(f"Pushing image to {destination}")
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)
    if done.returncode != 0:
        raise KanikoExitError(_kaniko_push_error(destination, done.stderr))
    digest = digest_file.read_text().strip()
    info(f"Pushed {destination.rpartition(':')[0]}@{digest}")
    return digest


def _auth_flags() -> list[str]:
    config = Path(os.environ.get("DOCKER_CONFIG", "/kaniko/.docker")) / "config.json"
    return ["--authfile", str(config)] if config.is_file() else ["--dest-no-creds"]


def _tls_flags(host: str, options: Options, scratch: Path) -> list[str]:
    insecure = options.many("--insecure-registry") + options.many("--skip-tls-verify-registry")
    if options.on("--insecure") or options.on("--skip-tls-verify") or host in insecure:
        return ["--dest-tls-verify=false"]
    certificates = dict(item.partition("=")[::2] for item in options.many("--registry-certificate"))
    if host not in certificates:
        return []
    cert_dir = scratch / f"certs-{host.replace(':', '-')}"
    cert_dir.mkdir(exist_ok=True)
    shutil.copyfile(certificates[host], cert_dir / "ca.crt")
    return ["--dest-cert-dir", str(cert_dir)]


def _kaniko_push_error(destination: str, stderr: str) -> str:
    host, _, rest = destination.partition("/")
    repo = rest.rpartition(":")[0] or rest
    permission = (
        "error checking push permissions -- make sure you entered the correct tag name, and "
        f'that you are authenticated correctly, and try again: checking push permission for "{destination}": '
    )
    text = stderr.lower()
    if "authentication required" in text or "unauthorized" in text:
        return (
            f"{permission}POST https://{host}/v2/{repo}/blobs/uploads/: UNAUTHORIZED: authentication "
            f"required; [map[Action:push Class: Name:{repo} Type:repository]]"
        )
    if "connection refused" in text:
        return (
            f'{permission}creating push check transport for {host} failed: Get "https://{host}/v2/": '
            f"dial tcp {host}: connect: connection refused"
        )
    if "x509" in text or "certificate" in text:
        return (
            f'{permission}creating push check transport for {host} failed: Get "https://{host}/v2/": '
            "tls: failed to verify certificate: x509: certificate signed by unknown authority"
        )
    last = [line for line in stderr.splitlines() if line.strip()][-1:] or ["no output"]
    return f"error pushing image: failed to push to destination {destination}: {last[0]}"


def write_outputs(options: Options, destinations: Sequence[str], digest: str) -> None:
    if path := options.get("--digest-file"):
        Path(path).write_text(digest)
    names = [
        f"{d.rpartition(':')[0] if '@' not in d else d.partition('@')[0]}@{digest}\n"
        for d in destinations
    ]
    if path := options.get("--image-name-with-digest-file"):
        Path(path).write_text("".join(names))
    if path := options.get("--image-name-tag-with-digest-file"):
        Path(path).write_text("".join(f"{d}@{digest}\n" for d in destinations))


# --- failures on demand -----------------------------------------------------------------


def injected(stage: str, inputs: Inputs) -> None:
    """Fail like Kaniko at ``stage`` ("permission", "build" or "push") when told to."""
    mode = os.environ.get("STANDIN_FAIL", "")
    destination = inputs.destinations[0] if inputs.destinations else "registry/image:tag"
    host, _, rest = destination.partition("/")
    repo, _, tag = rest.rpartition(":")
    if stage == "permission" and mode == "unauthorized":
        raise KanikoExitError(
            _kaniko_push_error(destination, "unauthorized: authentication required")
        )
    if stage == "build" and mode.startswith("run:"):
        code = int(mode.removeprefix("run:"))
        info(f"RUN exit {code}")
        info("Cmd: /bin/sh")
        raise KanikoExitError(
            "error building image: error building stage: failed to execute command: "
            f"waiting for process to exit: exit status {code}",
            code,
        )
    if stage == "build" and mode == "hang":
        time.sleep(600)  # until a signal ends it
    if stage == "build" and mode == "killed":
        os.kill(os.getpid(), signal.SIGKILL)  # like the OOM killer: no cleanup, no message
    if stage == "push":
        _push_failure(mode, destination, host, repo, tag)


def _push_failure(mode: str, destination: str, host: str, repo: str, tag: str) -> None:
    failed = f"error pushing image: failed to push to destination {destination}: "
    if mode == "transient-once" and _first_time():
        raise KanikoExitError(
            f'{failed}Patch "https://{host}/v2/{repo}/blobs/uploads/5c3a": '
            f"read tcp 127.0.0.1:49152->{host}: read: connection reset by peer"
        )
    if mode == "transient":
        raise KanikoExitError(
            f"{failed}PUT https://{host}/v2/{repo}/manifests/{tag}: "
            "unexpected status code 503 Service Unavailable: <html>503 Service Unavailable</html>"
        )
    if mode == "manifest-invalid":
        raise KanikoExitError(
            f"{failed}PUT https://{host}/v2/{repo}/manifests/{tag}: MANIFEST_INVALID: "
            "manifest invalid; map[description:Cannot redeploy tag]"
        )


def _first_time() -> bool:
    state = os.environ.get("STANDIN_STATE")
    if not state:
        raise KanikoExitError(
            "stand-in: STANDIN_FAIL=transient-once needs STANDIN_STATE (a file path)"
        )
    marker = Path(state)
    if marker.exists():
        return False
    marker.write_text("failed once\n")
    return True


# --- main -------------------------------------------------------------------------------


def build_and_push(options: Options, inputs: Inputs) -> None:
    injected("permission", inputs)
    dockerfile = read_dockerfile(inputs.dockerfile)
    check_target(dockerfile, options)
    if options.on("--pre-cleanup"):
        info("Pre-cleanup: deleting the filesystem (stand-in: nothing is deleted)")
    info(f"Building stage {dockerfile.stages[-1] or '0'} from {inputs.dockerfile}")
    injected("build", inputs)
    with tempfile.TemporaryDirectory(prefix="kaniko-standin-") as scratch:
        archive = write_image(inputs, options, dockerfile, Path(scratch))
        if options.on("--cleanup"):
            info("Cleanup: restoring the preserved filesystem")
        injected("push", inputs)
        digests = {push(archive, d, options, Path(scratch)) for d in inputs.destinations}
    if len(digests) > 1:
        raise KanikoExitError(f"stand-in: destinations got different digests {sorted(digests)}")
    write_outputs(options, inputs.destinations, digests.pop() if digests else "")


def main(argv: Sequence[str]) -> int:
    sys.path.insert(0, str(REPO))  # tests.infra.oci writes the image
    flavor = os.environ.get("STANDIN_FLAVOR", "fork")
    flags = load_flags(flavor)
    try:
        options = parse(argv, flags)
        if options.help:
            print(help_text(flavor, flags))
            return 0
        if options.positional[:1] == ["version"]:
            print(f"Kaniko version : {VERSIONS[flavor]} (stand-in)")
            return 0
        if options.positional:
            raise CobraError(f'unknown command "{options.positional[0]}" for "executor"')
        inputs = check(options)
    except CobraError as exc:
        print(f"Error: {exc}\nUsage:\n  executor [flags]\n  executor [command]", file=sys.stderr)
        return 1
    record(options, argv)
    try:
        if os.environ.get("STANDIN_INSTANT"):
            write_outputs(
                options, inputs.destinations, "sha256:" + hashlib.sha256(b"standin").hexdigest()
            )
        else:
            build_and_push(options, inputs)
    except KanikoExitError as exc:
        print(exc, flush=True)
        return exc.code
    if wipe := os.environ.get("STANDIN_WIPE"):
        shutil.rmtree(wipe, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
