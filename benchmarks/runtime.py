"""Runtime benchmark: FactorizedEmbedding vs nn.Embedding, factorized vs dense LM head, greedy generation.

All timings are medians of repeated runs in this process (``torch.get_num_threads()`` threads). Reported:

- embedding forward (no grad) and a training step (forward, backward of a sum loss, SGD update, zero_grad) for
  nn.Embedding (dense and sparse gradients) and FactorizedEmbedding at r = d/4 (dense and sparse gradients of U);
- logits for 1, 32, 512 tokens: dense head ``F.linear(h, W)`` (W: vocab × d) vs ``FactorizedLMHead``
  ((h·Vᵀ)·Uᵀ) at r = d/4, float32 and bfloat16, with the ideal speed-up vocab·d / (r·(vocab + d));
- greedy generation tokens/s of SmolLM2-135M (float32), dense vs its tied head factorized for 4× embedding
  compression (the rank ``factorize_(ratio=4)`` picks).

Run: ``python -m benchmarks.runtime`` (full, ~3 min plus ~45 s to load SmolLM2) or ``--quick``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    environment,
    header,
    machine_limits,
    markdown_table,
    time_call as _time_call,
    write_results,
)


def time_call(fn, **kw):  # noqa: ANN001, ANN202 - CPU time on one thread (see run())
    return _time_call(fn, clock=time.process_time, **kw)

FULL_EMB = [(30522, 384), (250002, 768)]
FULL_TOKENS = [512, 4096, 65536]
QUICK_EMB = [(3000, 64)]
QUICK_TOKENS = [256]
HEAD_SHAPE = (49152, 576)  # SmolLM2's tied embedding
QUICK_HEAD_SHAPE = (4000, 64)
HEAD_TOKENS = [1, 32, 512]


def _repeats(tokens: int, quick: bool) -> int:
    return 3 if quick else (15 if tokens <= 4096 else 5)


def bench_embedding(vocab: int, d: int, tokens: int, *, quick: bool) -> list[dict[str, Any]]:
    """Forward and training-step times of the four embedding variants for one (vocab, d, tokens)."""
    from embfactor.layers import FactorizedEmbedding

    torch.manual_seed(0)
    r = d // 4
    ids = torch.randint(0, vocab, (max(tokens // 512, 1), min(tokens, 512)))
    reps = _repeats(tokens, quick)
    rows = []
    variants = {
        "nn.Embedding": lambda: nn.Embedding(vocab, d),
        "nn.Embedding sparse": lambda: nn.Embedding(vocab, d, sparse=True),
        f"Factorized r={r}": lambda: FactorizedEmbedding(vocab, d, r),
        f"Factorized r={r} sparse": lambda: FactorizedEmbedding(vocab, d, r, sparse=True),
    }
    base_fwd = base_step = None
    for name, make in variants.items():
        m = make()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)

        def fwd() -> None:
            with torch.no_grad():
                m(ids)

        def step() -> None:
            m(ids).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        tf = time_call(fwd, repeats=reps, warmup=1, min_seconds=0.02)["median"]
        ts = time_call(step, repeats=reps, warmup=1, min_seconds=0.02)["median"]
        if base_fwd is None:
            base_fwd, base_step = tf, ts
        rows.append({"vocab": vocab, "d": d, "rank": r, "tokens": ids.numel(), "layer": name,
                     "forward_ms": tf * 1e3, "train_step_ms": ts * 1e3,
                     "forward_vs_dense": tf / base_fwd, "train_step_vs_dense": ts / base_step})
        m = opt = None  # free the layer before the next variant
    return rows


def bench_head(vocab: int, d: int, tokens: int, dtype: torch.dtype, *, quick: bool) -> dict[str, Any]:
    """Dense F.linear logits vs FactorizedLMHead at r = d/4 for ``tokens`` hidden states."""
    from embfactor.layers import FactorizedEmbedding, FactorizedLMHead

    torch.manual_seed(0)
    r = d // 4
    W = torch.randn(vocab, d).to(dtype)
    emb = FactorizedEmbedding(vocab, d, r, dtype=dtype).requires_grad_(False)
    head = FactorizedLMHead(emb)
    h = torch.randn(tokens, d).to(dtype)
    reps = 3 if quick else (21 if tokens <= 32 else 7)
    with torch.no_grad():
        td = time_call(lambda: F.linear(h, W), repeats=reps, warmup=2, min_seconds=0.05)["median"]
        tf = time_call(lambda: head(h), repeats=reps, warmup=2, min_seconds=0.05)["median"]
    ideal = vocab * d / (r * (vocab + d))
    return {"vocab": vocab, "d": d, "rank": r, "tokens": tokens, "dtype": str(dtype).replace("torch.", ""),
            "dense_ms": td * 1e3, "factorized_ms": tf * 1e3, "speedup": td / tf, "ideal_speedup": ideal,
            "target_speedup": 0.7 * d / r}


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def bench_generation(*, quick: bool, new_tokens: int = 32) -> list[dict[str, Any]]:
    """Greedy generation tokens/s: dense tied head vs factorized (4× embedding compression), float32."""
    import copy

    from embfactor.surgery import factorize_

    if quick:
        model, prompt_ids, name = _tiny_llama(), torch.tensor([[1, 5, 9, 42]]), "tiny-llama (random)"
        new_tokens = 8
    else:
        from embfactor.models import load_model

        lm = load_model("smollm2")
        model, name = lm.model, "SmolLM2-135M"
        prompt_ids = lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    fact = copy.deepcopy(model)
    rep = factorize_(fact, ratio=4.0)
    rows = []
    # bfloat16 generation is left out: bf16 GEMM runs at under a third of the fp32 rate on this CPU (see the
    # machine limits of the decompose suite), so it is not cheap here; the bf16 head is timed above.
    dtypes = [torch.float32]
    for dtype in dtypes:
        for label, m in (("dense", model), (f"factorized r={rep.rank}", fact)):
            mm = m.to(dtype)

            def gen() -> torch.Tensor:
                with torch.no_grad():
                    return mm.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       do_sample=False, pad_token_id=0)

            t = time_call(gen, repeats=2, warmup=1)["median"]
            rows.append({"model": name, "head": label, "dtype": str(dtype).replace("torch.", ""),
                         "new_tokens": new_tokens, "seconds": t, "tokens_per_s": new_tokens / t,
                         "rank": rep.rank, "embedding_ratio": rep.ratio})
    return rows


def run(*, quick: bool = False, output: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the runtime suite; write ``bench_runtime.json``/``.md`` (``bench_runtime_quick.*`` when quick); return the data.

    Timings are CPU time with torch on one thread (restored afterwards): on a shared machine wall-clock times of
    millisecond kernels were dominated by thread synchronization waiting for a core, not by the kernels.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    env = environment()  # records the one thread actually used
    try:
        return _run(quick=quick, output=output, progress=progress, env=env)
    finally:
        torch.set_num_threads(threads)


def gemm_bound(rows: list[dict[str, Any]], gemm_flops: float) -> None:
    """Add each factorized row's floor: its r-wide GEMM (2·tokens·r·d FLOPs) at this machine's float32 GEMM peak.

    ``bound_vs_dense`` = that floor / the dense lookup's measured time: the best ``× dense`` any float32
    implementation could reach here, however little overhead it had.
    """
    dense = {(r["vocab"], r["d"], r["tokens"]): r["forward_ms"] for r in rows if r["layer"] == "nn.Embedding"}
    for r in rows:
        if r["layer"].startswith("Factorized"):
            r["gemm_bound_ms"] = 2 * r["tokens"] * r["rank"] * r["d"] / gemm_flops * 1e3
            r["bound_vs_dense"] = r["gemm_bound_ms"] / dense[(r["vocab"], r["d"], r["tokens"])]


def _run(*, quick: bool, output: str | Path | None, progress: bool, env: dict[str, Any]) -> dict[str, Any]:
    limits = machine_limits(quick=quick, cpu_time=True)  # one thread, like every timing below
    emb_rows: list[dict[str, Any]] = []
    for vocab, d in QUICK_EMB if quick else FULL_EMB:
        for tokens in QUICK_TOKENS if quick else FULL_TOKENS:
            emb_rows += bench_embedding(vocab, d, tokens, quick=quick)
            if progress:
                print(f"[runtime] embedding {vocab}x{d} {tokens} tokens: " + ", ".join(
                    f"{r['layer']} {r['forward_ms']:.2f}/{r['train_step_ms']:.2f} ms" for r in emb_rows[-4:]),
                    flush=True)
    head_rows = []
    vocab, d = QUICK_HEAD_SHAPE if quick else HEAD_SHAPE
    for dtype in (torch.float32, torch.bfloat16):
        for tokens in HEAD_TOKENS:
            head_rows.append(bench_head(vocab, d, tokens, dtype, quick=quick))
            if progress:
                h = head_rows[-1]
                print(f"[runtime] head {vocab}x{d} {h['dtype']} {tokens} tokens: dense {h['dense_ms']:.2f} ms, "
                      f"factorized {h['factorized_ms']:.2f} ms ({h['speedup']:.2f}x)", flush=True)
    gen_rows = bench_generation(quick=quick)
    if progress:
        for g in gen_rows:
            print(f"[runtime] generation {g['model']} {g['head']} {g['dtype']}: {g['tokens_per_s']:.1f} tokens/s",
                  flush=True)
    gemm_bound(emb_rows, limits["gemm_fp32_gflops"] * 1e9)
    data = {"suite": "runtime", "quick": quick, "environment": env, "machine_limits": limits,
            "load_average_1m_end": environment()["load_average_1m"],
            "embedding": emb_rows, "head": head_rows, "generation": gen_rows}
    md = render(data)
    data["files"] = write_results("runtime", data, md, output)
    return data


def render(data: dict[str, Any]) -> str:
    cmd = "python -m benchmarks.runtime" + (" --quick" if data["quick"] else "")
    parts = [header("Runtime: factorized layers vs dense", data["environment"], None, cmd)]
    parts.append("Medians of repeated runs of CPU time with torch on ONE thread (on a machine shared with other jobs "
                 "wall time measured waiting, not work); 1-min load average at start "
                 f"{data['environment']['load_average_1m']}, at the end {data['load_average_1m_end']}.\n")
    parts.append("\n### Embedding lookup (forward without grad; training step = forward + backward + SGD step)\n")
    limits = data.get("machine_limits")
    if limits:
        parts.append(f"`GEMM floor` = a factorized forward's 2·tokens·r·d FLOPs at this machine's float32 GEMM peak "
                     f"({limits['gemm_fp32_gflops']:.0f} GFLOP/s, one thread, measured in the same run); "
                     "`floor × dense` = that floor over nn.Embedding's measured forward: the best ratio any float32 "
                     "implementation could reach here.\n")
    parts.append(markdown_table(
        [[r["layer"], f"{r['vocab']:,}×{r['d']}", r["tokens"], r["forward_ms"], r["forward_vs_dense"],
          r.get("gemm_bound_ms"), r.get("bound_vs_dense"), r["train_step_ms"], r["train_step_vs_dense"]]
         for r in data["embedding"]],
        ["layer", "table", "tokens", "forward ms", "× dense", "GEMM floor ms", "floor × dense", "train step ms",
         "× dense"]))
    parts.append("\n### LM head logits: dense F.linear vs FactorizedLMHead (r = d/4)\n")
    parts.append(markdown_table(
        [[f"{h['vocab']:,}×{h['d']}", h["dtype"], h["tokens"], h["dense_ms"], h["factorized_ms"], h["speedup"],
          h["ideal_speedup"], h["target_speedup"]] for h in data["head"]],
        ["head", "dtype", "tokens", "dense ms", "factorized ms", "speed-up", "ideal", "target"]))
    parts.append("\n### Greedy generation\n")
    parts.append(markdown_table(
        [[g["model"], g["head"], g["dtype"], g["new_tokens"], g["tokens_per_s"]] for g in data["generation"]],
        ["model", "head", "dtype", "new tokens", "tokens/s"]))
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    run(quick=a.quick, output=a.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
