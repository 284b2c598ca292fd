"""The README stays true: its commands exist and every setting is documented."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from pipeline import errors, settings
from pipeline.cli import COMMANDS

README = (Path(__file__).parent.parent / "README.md").read_text()
#: GitLab's predefined variables are GitLab's to document.
PREDEFINED = re.compile(r"CI_(?!JOB_JWT_V2)[A-Z_]+|GITLAB_CI")


def documented_variables() -> set[str]:
    """Every `NAME` in a table row of the README."""
    rows = [line for line in README.splitlines() if line.startswith("|")]
    return set(re.findall(r"`([A-Z][A-Z0-9_]+)`", "\n".join(rows)))


def declared_variables() -> set[str]:
    names: set[str] = set()
    for model in vars(settings).values():
        if (
            inspect.isclass(model)
            and issubclass(model, settings.Settings)
            and model is not settings.Settings
        ):
            names.update(model.variable(field) for field in model.model_fields)
    return {name for name in names if not PREDEFINED.fullmatch(name)}


def test_every_setting_is_in_the_readme_table() -> None:
    missing = sorted(declared_variables() - documented_variables())
    assert missing == []


def test_every_command_is_in_the_readme() -> None:
    for command in COMMANDS:
        assert f"| `{command.name}" in README


def test_first_screen_has_the_two_commands() -> None:
    first_screen = "\n".join(README.splitlines()[:30])
    assert "pip install . && python -m pipeline run" in first_screen
    assert "scripts/test" in first_screen


def test_exit_codes_table_matches_the_error_tree() -> None:
    codes = {int(code) for code in re.findall(r"^\| (\d+) \|", README, re.M)}
    classes = [cls for cls in vars(errors).values() if inspect.isclass(cls)]
    declared = {cls.exit_code for cls in classes if issubclass(cls, errors.PipelineError)}
    assert declared | {0} <= codes
