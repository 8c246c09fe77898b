"""``embfactor bench``: decomposition, runtime and memory benchmarks; JSON + markdown in benchmarks/results/.

``--quick`` runs write ``bench_<suite>_quick.*`` (git-ignored), so they never replace the committed full results.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from embfactor.cli.common import check_outputs, table, write_json
from embfactor.errors import ConfigError

SUITES = ("decompose", "runtime", "memory")


def _benchmarks_root() -> Path:
    # The benchmarks live next to src/ in the source checkout (they are not part of the installed package).
    return Path(__file__).resolve().parents[3]


def _import_suite(name: str) -> Any:
    root = _benchmarks_root()
    if not (root / "benchmarks" / f"{name}.py").is_file():
        raise ConfigError(
            f"benchmark suite {name!r} not found under {root / 'benchmarks'}; `embfactor bench` runs from a source "
            "checkout installed with `pip install -e .`"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"benchmarks.{name}")


def parse_suites(text: str) -> list[str]:
    """'decompose,runtime' -> ['decompose', 'runtime'], validated against :data:`SUITES`."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SUITES]
    if bad or not names:
        raise ConfigError(f"unknown benchmark suite(s) {', '.join(bad) or repr(text)}; valid: {', '.join(SUITES)}")
    return names


def bench(
    suites: list[str] | tuple[str, ...] = SUITES,
    *,
    quick: bool = False,
    output: str | Path | None = None,
    progress: bool = True,
    huge: bool = False,
) -> dict[str, Any]:
    """Run benchmark suites; each writes ``bench_<suite>.json`` and ``.md`` to ``output``.

    Args:
        suites: any of ``decompose``, ``runtime``, ``memory``.
        quick: tiny shapes, in-process where possible (seconds; what CI runs); the files are then named
            ``bench_<suite>_quick.*`` so the committed full results are never overwritten.
        output: folder for the results (default ``benchmarks/results`` of the checkout).
        huge: decomposition suite also runs 128,256×4,096 (≈2 GB float32).

    Returns:
        {suite name: that suite's result dict (with ``files``)}.

    Example:
        >>> bench(["decompose"], quick=True, output="/tmp/b")   # doctest: +SKIP
    """
    results: dict[str, Any] = {}
    for name in suites:
        mod = _import_suite(name)
        # None: the suites' own default, benchmarks/results (benchmarks.common.RESULTS_DIR)
        kw: dict[str, Any] = {"quick": quick, "output": output, "progress": progress}
        if name == "decompose":
            kw["huge"] = huge
        results[name] = mod.run(**kw)
    return results


def render(results: dict[str, Any]) -> str:
    rows = []
    for name, r in results.items():
        n = len(r.get("cases") or r.get("rows") or []) or len(r.get("embedding", [])) + len(r.get("head", []))
        rows.append([name, "quick" if r["quick"] else "full", n, r["files"]["markdown"]])
    return table(rows, ["suite", "mode", "measurements", "table"])


def run(args: argparse.Namespace) -> int:
    check_outputs(files=[("--json", args.json)], write_into=[("--output", args.output)])
    results = bench(parse_suites(args.suite), quick=args.quick, output=args.output, progress=not args.quiet,
                    huge=args.huge)
    print(render(results))
    write_json(args.json, {k: {kk: vv for kk, vv in v.items() if kk != "cost_model"} for k, v in results.items()})
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: decomposition vs peers, layer runtime, compress memory")
    p.add_argument("--quick", action="store_true", help="tiny shapes, seconds (what CI runs)")
    p.add_argument("--suite", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    p.add_argument("--output", "-o", default=None, help="results folder (default: benchmarks/results; --quick writes bench_*_quick.* files)")
    p.add_argument("--huge", action="store_true", help="decompose suite: also 128,256x4,096 (2 GB, slow)")
    p.add_argument("--json", help="also write all results as one JSON file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    p.set_defaults(func=run)
