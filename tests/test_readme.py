"""The README's Install block is what CI runs, and it installs everything the tests need."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _install_block() -> list[str]:
    """The lines of the first ```bash block under '## Install' in README.md, parsed here independently of .ci/run."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_install_block():
    printed = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True, check=True, timeout=60)
    assert printed.stdout.splitlines() == _install_block()
    script = (ROOT / ".ci" / "run").read_text()
    assert "pip install" not in script and "pytest" not in script  # nothing of its own to drift


def test_the_install_line_installs_what_the_tests_import():
    install, test = _install_block()
    words = shlex.split(install, comments=True)
    assert words[:2] == ["pip", "install"]
    editable = [words[i + 1] for i, w in enumerate(words) if w == "-e"]
    extras = {e for target in editable if target.startswith(".[") for e in target[2:-1].split(",")}
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    # Every extra: dev has the test tools, align and eval the optional parts the tests exercise.
    assert extras == set(declared)
    # Every plugin package in the repository (tests/test_plugins.py loads the example through its entry points).
    plugins = {f"plugins/{p.parent.name}" for p in (ROOT / "plugins").glob("*/pyproject.toml")}
    assert plugins and plugins <= set(editable)
    assert shlex.split(test, comments=True) == ["python", "-m", "pytest", "-q"]
