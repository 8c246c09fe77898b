"""No function in src/embfactor is longer than 80 lines (signature, docstring and body), except CLI argument wiring.

A long function mixes concerns (issue 23 found create_app at 149 lines, sweep 127, factorize_ 118, quantize_table
115): split it along its steps. The only exception is an argparse ``add_arguments``-style function in ``cli/``
that declares flags and nothing else; it goes in ALLOWED with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "embfactor"
MAX_LINES = 80
# "cli/<file>.py:<function>" -> why it may be longer (argparse wiring only)
ALLOWED: dict[str, str] = {}


def long_functions(root: Path = SRC, limit: int = MAX_LINES) -> dict[str, int]:
    """``{"<path>:<function>": lines}`` of every function (methods and nested ones too) longer than ``limit``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out[f"{path.relative_to(root).as_posix()}:{node.name}"] = lines
    return out


def test_no_function_over_80_lines():
    assert all(k.startswith("cli/") for k in ALLOWED), "the allow-list is for CLI argument wiring only"
    found = {k: n for k, n in long_functions().items() if k not in ALLOWED}
    assert not found, "split these functions (lines): " + ", ".join(f"{k} ({n})" for k, n in sorted(found.items()))


def test_the_checker_counts_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    assert long_functions(tmp_path) == {"m.py:long": MAX_LINES + 1}
