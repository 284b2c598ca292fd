"""Output: colour decided once, GitLab sections, ✓/✕ steps, summary, masking."""

from __future__ import annotations

import io
import re

import pytest

from pipeline.log import Logger, use_colour


def logger(*, colour: bool = False, sections: bool = False) -> tuple[Logger, io.StringIO]:
    err = io.StringIO()
    log = Logger(err=err, out=io.StringIO())
    log.configure(colour=colour, gitlab_sections=sections)
    return log, err


@pytest.mark.parametrize(
    ("no_color", "force_color", "isatty", "expected"),
    [
        (False, False, False, False),
        (False, False, True, True),
        (False, True, False, True),
        (True, True, True, False),
    ],
)
def test_colour_policy(no_color: bool, force_color: bool, isatty: bool, expected: bool) -> None:
    assert use_colour(no_color=no_color, force_color=force_color, isatty=isatty) is expected


def test_plain_step_shows_tick_and_duration() -> None:
    log, err = logger()
    with log.step("Promote latest"):
        log.info("working")
    lines = err.getvalue().splitlines()
    assert lines[0] == "▸ Promote latest"
    assert lines[1] == "working"
    assert re.fullmatch(r"✓ Promote latest \(\d+\.\d\ds\)", lines[2])
    assert "\x1b" not in err.getvalue()


def test_failed_step_shows_cross_and_is_in_the_summary() -> None:
    log, err = logger()
    with pytest.raises(RuntimeError), log.step("Scan"):
        raise RuntimeError("x")
    log.fact("digest", "sha256:abc")
    log.summary()
    text = err.getvalue()
    assert re.search(r"^✕ Scan \(\d+\.\d\ds\)$", text, re.M)
    assert re.search(r"^  ✕ Scan +\d+\.\d\ds$", text, re.M)
    assert "  digest: sha256:abc" in text


def test_gitlab_sections_wrap_a_step() -> None:
    log, err = logger(sections=True)
    with log.step("Build image"):
        pass
    text = err.getvalue()
    assert re.search(r"\x1b\[0Ksection_start:\d+:build_image\r\x1b\[0KBuild image", text)
    assert re.search(r"\x1b\[0Ksection_end:\d+:build_image\r\x1b\[0K", text)


def test_colour_is_data_not_branches() -> None:
    log, err = logger(colour=True)
    log.warn("careful")
    assert err.getvalue() == "\x1b[33mpipeline: warning:\x1b[0m careful\n"


def test_masking_longest_first_and_everywhere() -> None:
    log, err = logger()
    log.add_secret("abc")
    log.add_secret("abcdef")
    log.add_secret("")
    log.add_secret("x")
    log.command(["login", "-p", "abcdef", "--user", "abc"])
    log.error("token abcdef rejected")
    assert err.getvalue() == (
        "+ login -p [MASKED] --user [MASKED]\npipeline: error: token [MASKED] rejected\n"
    )
