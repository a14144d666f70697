"""The project's promises to a newcomer: the README's two commands are what CI and setup run."""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    main_cmd, test_cmd = _quickstart_commands()
    assert main_cmd == "bash scripts/quickstart.sh"
    assert test_cmd == "bash scripts/test.sh"
    ci = (ROOT / ".ci" / "run").read_text()
    assert [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))] == [test_cmd]
    for script in ("quickstart.sh", "test.sh"):
        assert ". scripts/bootstrap.sh" in (ROOT / "scripts" / script).read_text()
    # the main job is the debug training run (issue: the README's main command runs exactly it)
    assert 'rig train --config configs/debug.yaml "$@"' in (ROOT / "scripts" / "quickstart.sh").read_text()


def test_packaging_declares_what_the_issue_lists():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = " ".join(meta["dependencies"])
    for name in ("torch", "ray[rllib]", "deepspeed", "gymnasium", "transformers", "mlflow", "crafter"):
        assert name in deps, name
    assert "minerl" in " ".join(meta["optional-dependencies"]["minerl"])
    assert "pytest" in " ".join(meta["optional-dependencies"]["dev"])
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("rig") == "rig.cli:main"
