"""`make test` (pytest -q, what CI runs) runs every docstring example of src/embfactor (pyproject's pytest config).

The examples themselves are collected as tests (``src/embfactor/...::<name>``); this checks that the configuration
which collects them stays in place, since nothing else would notice their silent removal from CI.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_pytest_run_collects_the_doctests_of_the_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--doctest-modules" in config.get("addopts", "").split()
    assert "src/embfactor" in config["testpaths"] and "tests" in config["testpaths"]
    examples = sum(p.read_text().count(">>> ") for p in (ROOT / "src" / "embfactor").rglob("*.py"))
    assert examples > 100  # the package documents itself with examples; the count only guards the glob
