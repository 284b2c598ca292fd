"""build.env: GitLab's dotenv rules, atomic writes, file-versus-environment agreement."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline import artifact
from pipeline.errors import ArtifactError
from tests.clirun import base_env, error_lines, run_cli

DIGEST = "sha256:" + "ab" * 32
SHA = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"


def sample() -> artifact.BuildEnv:
    return artifact.make(
        image_tag="main-a1b2c3d4",
        digest=DIGEST,
        push_repository="nexus.example.test:8443/orchestrator-server",
        pull_repository="nexus.example.test:8444/orchestrator-server",
        immutable_tags=("main-a1b2c3d4",),
        moving_tags=("latest",),
        commit_sha=SHA,
    )


def sample_text() -> str:
    return artifact.render(sample())


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "build.env"
    artifact.write(path, sample())
    assert artifact.read(path, {}) == sample()
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["build.env"]


def test_rendered_file_obeys_gitlab_rules() -> None:
    text = sample_text()
    lines = text.splitlines()
    assert text.endswith("\n")
    assert all("=" in line and line.strip() == line for line in lines)
    assert len(lines) <= artifact.MAX_VARIABLES
    assert len(text.encode()) < artifact.MAX_BYTES
    assert "BUILD_ENV_SCHEMA=1" in lines
    assert f"IMAGE_PULL_REF=nexus.example.test:8444/orchestrator-server@{DIGEST}" in lines
    assert not any(c in text for c in "\"'$#")


def test_read_from_environment_only() -> None:
    environ = dict(line.split("=", 1) for line in sample_text().splitlines())
    assert artifact.read(None, environ) == sample()


def test_file_and_matching_environment_agree(tmp_path: Path) -> None:
    path = tmp_path / "build.env"
    artifact.write(path, sample())
    assert artifact.read(path, {"IMAGE_TAG": "main-a1b2c3d4", "UNRELATED": "x"}) == sample()


def test_environment_overriding_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "build.env"
    artifact.write(path, sample())
    with pytest.raises(
        ArtifactError, match="IMAGE_TAG is 'main-a1b2c3d4' in .* but 'v9' in the environment"
    ):
        artifact.read(path, {"IMAGE_TAG": "v9"})


def test_missing_everywhere_names_the_producer(tmp_path: Path) -> None:
    with pytest.raises(
        ArtifactError, match=r"build.env not found .* build stage \(job build-push\) must run first"
    ):
        artifact.read(tmp_path / "build.env", {})


def replace_line(key: str, value: str) -> str:
    return "".join(
        f"{key}={value}\n" if line.startswith(f"{key}=") else f"{line}\n"
        for line in sample_text().splitlines()
    )


BAD_FILES = {
    "blank line": (sample_text() + "\n", "line 10 is blank"),
    "comment": (
        "# made by build\n" + sample_text(),
        "line 1 is a comment: GitLab rejects the whole file",
    ),
    "bad key": (sample_text() + "BAD-KEY=1\n", "'BAD-KEY' is not a valid key"),
    "quotes": (
        replace_line("IMAGE_TAG", '"main-a1b2c3d4"'),
        "the value of IMAGE_TAG holds a quote",
    ),
    "dollar": (
        replace_line("IMAGE_TAG", "main-$CI_COMMIT_SHA"),
        r"the value of IMAGE_TAG holds a quote, '\$'",
    ),
    "duplicate key": (sample_text() + "IMAGE_TAG=x\n", "IMAGE_TAG appears twice"),
    "21 variables": (
        sample_text() + "".join(f"EXTRA_{n}=x\n" for n in range(12)),
        "21 variables, GitLab accepts at most 20",
    ),
    "5 KB": (sample_text() + f"BIG={'x' * 5200}\n", "bytes, GitLab accepts less than 5120"),
    "unknown schema": (
        replace_line("BUILD_ENV_SCHEMA", "2"),
        "BUILD_ENV_SCHEMA is '2', this version reads '1'",
    ),
    "bad digest": (
        replace_line("IMAGE_DIGEST", "sha256:1234"),
        "IMAGE_DIGEST must be sha256: followed by 64",
    ),
    "missing key": (
        "".join(
            f"{line}\n"
            for line in sample_text().splitlines()
            if not line.startswith("IMAGE_DIGEST=")
        ),
        r"IMAGE_DIGEST is missing \(the build stage",
    ),
    "unknown key": (sample_text() + "SURPRISE=1\n", "SURPRISE is not a build.env key"),
    "no equals": (sample_text() + "JUSTAWORD\n", "has no '='"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_refused_with_one_line(case: str, tmp_path: Path) -> None:
    text, message = BAD_FILES[case]
    path = tmp_path / "build.env"
    path.write_text(text)
    with pytest.raises(ArtifactError, match=message):
        artifact.read(path, {})


@pytest.mark.parametrize(
    "case", ["blank line", "dollar", "21 variables", "unknown schema", "bad digest"]
)
def test_cli_check_reports_bad_file(case: str, tmp_path: Path) -> None:
    text, message = BAD_FILES[case]
    path = tmp_path / "build.env"
    path.write_text(text)
    done = run_cli(["artifact", "check", str(path)], cwd=tmp_path)
    assert done.returncode == 2
    errors = error_lines(done.stderr)
    assert len(errors) == 1
    assert re.search(message, errors[0])
    assert "Traceback" not in done.stderr
    assert path.read_text() == text


def test_cli_refuses_a_disagreeing_environment(tmp_path: Path) -> None:
    path = tmp_path / "build.env"
    artifact.write(path, sample())
    done = run_cli(["artifact", "check", str(path)], env=base_env(IMAGE_TAG="hotfix"), cwd=tmp_path)
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        f"pipeline: error: IMAGE_TAG is 'main-a1b2c3d4' in {path} but 'hotfix' in the environment: "
        "a project, group or pipeline variable named IMAGE_TAG overrides the artifact; remove it"
    ]


def test_cli_show_json(tmp_path: Path) -> None:
    import json

    path = tmp_path / "build.env"
    artifact.write(path, sample())
    done = run_cli(["artifact", "show", str(path), "--json"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["IMAGE_DIGEST"] == DIGEST


def test_write_refuses_before_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "build.env"
    path.write_text("old\n")
    bad = sample().model_copy(update={"IMAGE_MOVING_TAGS": "la test"})
    with pytest.raises(ArtifactError):
        artifact.write(path, bad)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["build.env"]


def test_interrupted_write_leaves_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "build.env"
    path.write_text("old\n")

    def boom(self: Path, target: Path) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(Path, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        artifact.write(path, sample())
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["build.env"]


def test_bom_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "build.env"
    path.write_text("\ufeff" + sample_text())
    assert artifact.read(path, {}) == sample()
