"""Inference benchmark: each compressed model beside its original (float32 and bfloat16), in one run.

Reported (every timing is the median of interleaved repetitions: each repetition times every variant once, so
that load from other processes on a shared machine falls on all of them alike):

- head: logits of B hidden vectors (B = 1, 8, 64, 512) from the dense table (float32, bfloat16), from every storage
  format built from SmolLM2's table, and from the compressed model's own table (the plan); wall time on the
  process's threads and CPU time on one thread (which other jobs on the machine disturb much less);
- generation: greedy tokens/s at batch 1 and 8, 64 new tokens, original vs compressed, layers in float32 and in
  bfloat16 (the compressed table's own tensors keep their storage dtypes);
- prefill: one forward over 512 tokens (all 512 rows of logits);
- encoder: texts/s at batch 32 (tokenization, forward, mean pooling) of MiniLM vs its compressed copy;
- peak RSS of a fresh process that loads each model.

Run: ``python -m benchmarks.inference`` (SmolLM2 ``--size 8x`` and MiniLM ``--size 16x``, compressed into the
benchmark cache on the first run; ~20 min then) or ``--quick`` (tiny random models, ~1 min). ``--smollm2 DIR`` and
``--minilm DIR`` take already compressed folders. Results: ``benchmarks/results/inference.{md,json}``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    CACHE_DIR,
    RESULTS_DIR,
    emit,
    environment,
    header,
    markdown_table,
    run_isolated,
    write_result_files,
)

HEAD_BATCHES = (1, 8, 64, 512)
QUICK_HEAD_BATCHES = (1, 8, 64)


def interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int, clock: Callable[[], float] = time.perf_counter,
                min_seconds: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each function; every repetition runs each function once, in turn (one warm-up)."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            n, t0 = 0, clock()
            while True:
                fn()
                n += 1
                if clock() - t0 >= min_seconds:
                    break
            samples[k].append((clock() - t0) / n)
    return {k: statistics.median(v) for k, v in samples.items()}


# --- models -----------------------------------------------------------------------------------------------------
def compressed_folder(name: str, size: str, folder: str | None) -> Path:
    """The compressed copy of a built-in model: ``folder`` if given, else made once in the benchmark cache."""
    if folder is not None:
        return Path(folder)
    out = CACHE_DIR / f"inference-{name}-{size}"
    if not (out / "embfactor.json").is_file():
        print(f"compressing {name} --size {size} into {out} (once; minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "embfactor.cli.main", "compress", name, "--size", size, "-o", str(out),
                        "--quiet"], check=True)
    return out


def bf16_layers(model: nn.Module) -> nn.Module:
    """The model's layers in bfloat16 in place, except a compressed table's own tensors (fp16 scales and int8
    codebooks keep their storage dtypes; the kernels read them as stored); its rows are cast to bfloat16."""
    from embfactor.formats import is_row_format

    emb = model.get_input_embeddings()
    keep = {id(t) for t in (*emb.parameters(), *emb.buffers())} if is_row_format(emb) else set()
    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for k, t in store.items():
                if t is not None and t.is_floating_point() and id(t) not in keep:
                    new = t.detach().to(torch.bfloat16)
                    store[k] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
    if keep:
        emb.register_forward_hook(lambda _m, _i, out: out.to(torch.bfloat16))
    return model


def _tiny_models() -> dict[str, tuple[nn.Module, Any]]:
    """Quick mode: a random tiny Llama with a planner-like tiered table (int8 + int5 + PQ tiers), tied head."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from embfactor.decomposition.codebook import product_quantize
    from embfactor.decomposition.intk import int_quantize
    from embfactor.formats import CodebookEmbedding, IntKEmbedding, TieredFormat
    from embfactor.surgery import install_format_

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    orig = LlamaForCausalLM(cfg).eval()
    E = orig.get_input_embeddings().weight.detach()
    tiers = [IntKEmbedding.from_factors(int_quantize(E[:200], bits=8, group=32)),
             IntKEmbedding.from_factors(int_quantize(E[200:1800], bits=5, group=32)),
             CodebookEmbedding.from_factors(product_quantize(E[1800:], sub_dim=4, K=64, codebook_dtype="int8"))]
    comp = copy.deepcopy(orig)
    install_format_(comp, TieredFormat(tiers))
    return {"original": (orig, None), "compressed": (comp.eval(), None)}


def _load(path: str | Path) -> tuple[nn.Module, Any]:
    from embfactor.models import load_model

    lm = load_model(str(path))
    return lm.model.eval(), lm.tokenizer


def emit_load_rss(path: str) -> None:
    """Subprocess entry: load one model; emit the process's peak RSS and the load time."""
    t0 = time.perf_counter()
    _load(path)
    emit({"model": path, "load_s": time.perf_counter() - t0})


# --- measurements ----------------------------------------------------------------------------------------------
def head_formats(E: torch.Tensor, plan: nn.Module | None, *, quick: bool, formats: bool = True
                 ) -> dict[str, nn.Module]:
    """One head per storage format built from the table E (settings near 8x where the format allows), and the plan.

    ``formats=False``: the plan alone.
    """
    import embfactor as ef
    from embfactor.formats import from_factors

    vocab, d = E.shape
    r = max(d // 8, 2)
    out: dict[str, nn.Module] = {}
    if not formats:
        return {"plan: " + _plan_name(plan): plan.requires_grad_(False)} if plan is not None else {}
    lowrank = ef.decompose(E, rank=r, method="eig")
    out[f"lowrank r={r}"] = from_factors(lowrank)
    from embfactor.formats import QuantizedFactorizedEmbedding

    out[f"quantized r={r} int8"] = QuantizedFactorizedEmbedding.from_factors(from_factors(lowrank), bits=8)
    for bits in (8, 5, 4):
        out[f"intk int{bits} g32"] = from_factors(ef.decompose(E, method="int", bits=bits, group=32))
    sub = 4 if quick else 6
    pq_rows = E if quick else E[: vocab // 4]  # k-means on the whole table takes minutes; logits time per row
    out[f"codebook pq sub{sub} int8cb ({pq_rows.shape[0]:,} rows)"] = from_factors(
        ef.decompose(pq_rows, method="pq", sub_dim=sub, K=64 if quick else 256, codebook_dtype="int8"))
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)  # block is data-aware: Zipf-like token weights
    out[f"block r={r}"] = from_factors(ef.decompose(E, method="block", rank=r, token_weights=zipf))
    out["tt"] = from_factors(ef.decompose(E, method="tt", tt_rank=16))
    if plan is not None:
        out["plan: " + _plan_name(plan)] = plan
    return {k: v.requires_grad_(False) for k, v in out.items()}


def _plan_name(fmt: nn.Module) -> str:
    """``int8 g32 [1175] + int5 g32 [19741] + pq sub3 K256 [28236]``: each tier's format and rows."""

    def one(t: nn.Module) -> str:
        c = t.format_config()
        if t.format_name == "intk":
            return f"int{c['bits']} g{c['group']}"
        if t.format_name == "codebook":
            return f"{'pq' if c['stages'] == 1 else 'rvq'} sub{c['sub_dim']} K{t.K}"
        return t.format_name

    tiers = getattr(fmt, "tiers", [fmt])
    return " + ".join(f"{one(t)} [{t.num_embeddings}]" for t in tiers)


def bench_heads(E: torch.Tensor, heads: dict[str, nn.Module], batches: tuple[int, ...], *, quick: bool
                ) -> list[dict[str, Any]]:
    """Head time per format and batch beside the dense float32 and bfloat16 heads, wall and one-thread CPU time."""
    W, Wb = E.float().contiguous(), E.to(torch.bfloat16).contiguous()
    rows = []
    threads = torch.get_num_threads()
    for B in batches:
        h = torch.randn(B, E.shape[1], generator=torch.Generator().manual_seed(B))
        hb = h.to(torch.bfloat16)
        fns: dict[str, Callable[[], Any]] = {"dense fp32": lambda h=h: F.linear(h, W),
                                             "dense bf16": lambda hb=hb: F.linear(hb, Wb)}
        for name, fmt in heads.items():
            fns[name] = lambda fmt=fmt, h=h: fmt.project(h)
            if name.startswith("plan"):  # bf16 activations: the plan's head (the formats' are alike)
                fns[name + " (bf16 h)"] = lambda fmt=fmt, hb=hb: fmt.project(hb)
        reps = 3 if quick or B >= 64 else 5
        with torch.no_grad():
            wall = interleaved(fns, repeats=reps, min_seconds=0.0 if B >= 64 else 0.02)
            torch.set_num_threads(1)
            try:
                cpu = interleaved(fns, repeats=reps, clock=time.process_time, min_seconds=0.02)
            finally:
                torch.set_num_threads(threads)
        for name in fns:
            rows.append({"batch": B, "head": name, "wall_ms": wall[name] * 1e3, "cpu1_ms": cpu[name] * 1e3,
                         "wall_vs_dense_fp32": wall[name] / wall["dense fp32"],
                         "cpu1_vs_dense_fp32": cpu[name] / cpu["dense fp32"]})
    return rows


def bench_decoder(models: dict[str, nn.Module], prompt: torch.Tensor, *, new_tokens: int, prefill: int,
                  quick: bool) -> list[dict[str, Any]]:
    """Greedy generation tokens/s at batch 1 and 8 and prefill time, all models interleaved."""
    rows = []
    reps = 2 if quick else 3
    with torch.no_grad():
        for B in (1, 8):
            ids = prompt[:B]

            def gen(m: nn.Module = None, ids: torch.Tensor = ids) -> None:  # type: ignore[assignment]
                m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

            t = interleaved({k: (lambda m=m: gen(m)) for k, m in models.items()}, repeats=reps)
            rows += [{"measure": f"generate batch {B}", "model": k, "tokens_per_s": B * new_tokens / v,
                      "seconds": v} for k, v in t.items()]
        ids = torch.cat([prompt.reshape(-1)] * (prefill // prompt.numel() + 1))[:prefill].unsqueeze(0)
        t = interleaved({k: (lambda m=m: m(input_ids=ids)) for k, m in models.items()}, repeats=reps)
        rows += [{"measure": f"prefill {prefill}", "model": k, "seconds": v, "tokens_per_s": prefill / v}
                 for k, v in t.items()]
    return rows


def bench_encoder(models: dict[str, tuple[nn.Module, Any]], texts: list[str], *, batch: int, quick: bool
                  ) -> list[dict[str, Any]]:
    """Texts/s at ``batch`` texts per call: tokenization, forward, mean pooling."""

    def encode(model: nn.Module, tok: Any) -> None:
        enc = tok(texts[:batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
        (out * mask).sum(1) / mask.sum(1)

    with torch.no_grad():
        t = interleaved({k: (lambda m=m, tok=tok: encode(m, tok)) for k, (m, tok) in models.items()},
                        repeats=3 if quick else 9)
    return [{"measure": f"encode batch {batch}", "model": k, "texts_per_s": batch / v, "seconds": v}
            for k, v in t.items()]


# --- the run -----------------------------------------------------------------------------------------------------
PARTS = ("load", "heads", "formats", "decoder", "encoder")


def run(*, quick: bool = False, smollm2: str | None = None, minilm: str | None = None,
        output: str | Path | None = None, parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """Measure ``parts`` (full mode; quick mode runs all): ``heads`` the plan's head and the dense ones, ``formats``
    every format's head too, ``decoder`` generation and prefill, ``encoder`` MiniLM, ``load`` peak RSS."""
    env = environment()
    data: dict[str, Any] = {"quick": quick, "environment": env, "parts": list(parts), "heads": [], "decoder": []}
    if quick:
        tiny = _tiny_models()
        orig, comp = tiny["original"][0], tiny["compressed"][0]
        E = orig.get_input_embeddings().weight.detach()
        data["heads"] = bench_heads(E, head_formats(E, comp.get_input_embeddings(), quick=True), QUICK_HEAD_BATCHES,
                                    quick=True)
        prompt = torch.randint(1, 4000, (8, 16), generator=torch.Generator().manual_seed(0))
        import copy

        models = {"original fp32": orig, "compressed fp32": comp, "original bf16": bf16_layers(copy.deepcopy(orig)),
                  "compressed bf16": bf16_layers(copy.deepcopy(comp))}
        data["decoder"] = bench_decoder(models, prompt, new_tokens=8, prefill=128, quick=True)
    else:
        from embfactor.data.corpora import lee_background

        smol_dir = compressed_folder("smollm2", "8x", smollm2)
        mini_dir = compressed_folder("minilm", "16x", minilm) if {"load", "encoder"} & set(parts) else None
        if "load" in parts:
            data["load"] = [r for p in ("smollm2", str(smol_dir), "minilm", str(mini_dir))
                            for r in run_isolated("benchmarks.inference", "emit_load_rss", {"path": p}, timeout=900)]
        orig, tok = _load("smollm2")
        comp, _ = _load(smol_dir)
        if {"heads", "formats"} & set(parts):
            E = orig.get_input_embeddings().weight.detach()
            heads = head_formats(E, comp.get_input_embeddings(), quick=False, formats="formats" in parts)
            data["heads"] = bench_heads(E, heads, HEAD_BATCHES, quick=False)
        texts = lee_background()
        if "decoder" in parts:
            enc = tok(texts[:8], truncation=True, max_length=32, return_tensors="pt", padding="max_length")
            prompt = enc["input_ids"][:, :32]
            orig_b, comp_b = bf16_layers(_load("smollm2")[0]), bf16_layers(_load(smol_dir)[0])
            data["decoder"] = bench_decoder({"original fp32": orig, "compressed fp32": comp, "original bf16": orig_b,
                                             "compressed bf16": comp_b}, prompt, new_tokens=64, prefill=512,
                                            quick=False)
            del orig_b, comp_b
        del orig, comp
        if "encoder" in parts:
            mini, mtok = _load("minilm")
            mini_c, _ = _load(mini_dir)
            data["encoder"] = bench_encoder({"original fp32": (mini, mtok), "compressed fp32": (mini_c, mtok)},
                                            texts, batch=32, quick=False)
    data["smollm2_folder"] = None if quick else str(smol_dir)
    md = render(data)
    prefix = Path(output if output is not None else RESULTS_DIR) / f"inference{'_quick' if quick else ''}"
    write_result_files(prefix, data, md)
    print(md)
    return data


def render(data: dict[str, Any]) -> str:
    from benchmarks.common import fmt_cell

    quick = data["quick"]
    cmd = "python -m benchmarks.inference" + (" --quick" if quick else "")
    note = ("Timings were measured on a shared machine (other jobs running): each is the median of interleaved "
            "repetitions, so compare ratios within one table. `cpu1` is CPU time on one thread, which other jobs "
            "disturb much less than wall time.")
    s = [header("Inference: compressed models beside their originals", data["environment"], None, cmd), note, ""]
    heads = data["heads"]
    if heads:
        s += ["### Tied head: logits of B hidden vectors", ""]
        s.append(markdown_table(
            [[r["head"], r["batch"], fmt_cell(r["wall_ms"]), fmt_cell(r["wall_vs_dense_fp32"]), fmt_cell(r["cpu1_ms"]),
              fmt_cell(r["cpu1_vs_dense_fp32"])] for r in heads],
            ["head", "B", "wall ms", "wall / dense fp32", "cpu1 ms", "cpu1 / dense fp32"]))
        s.append("")
    if data["decoder"]:
        s += ["### Decoder: greedy generation and prefill", ""]
        s.append(markdown_table([[r["measure"], r["model"], fmt_cell(r["tokens_per_s"]), fmt_cell(r["seconds"])]
                                 for r in data["decoder"]], ["measure", "model", "tokens/s", "seconds"]))
    if data.get("encoder"):
        s += ["", "### Encoder", ""]
        s.append(markdown_table([[r["measure"], r["model"], fmt_cell(r["texts_per_s"])] for r in data["encoder"]],
                                ["measure", "model", "texts/s"]))
    if data.get("load"):
        s += ["", "### Loading (a fresh process each)", ""]
        s.append(markdown_table([[r.get("model", "?"), fmt_cell(r.get("peak_rss_mb")), fmt_cell(r.get("load_s"))]
                                 for r in data["load"]], ["model", "peak RSS MB", "load s"]))
    return "\n".join(s) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny random models (CI)")
    p.add_argument("--smollm2", help="a SmolLM2 folder compressed with --size 8x (default: made in the cache)")
    p.add_argument("--minilm", help="a MiniLM folder compressed with --size 16x (default: made in the cache)")
    p.add_argument("--output", help=f"results folder (default {RESULTS_DIR})")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    a = p.parse_args(argv)
    parts = tuple(x.strip() for x in a.parts.split(",") if x.strip())
    if bad := sorted(set(parts) - set(PARTS)):
        p.error(f"--parts: unknown part(s) {bad}; choose from {','.join(PARTS)}")
    run(quick=a.quick, smollm2=a.smollm2, minilm=a.minilm, output=a.output, parts=parts)


if __name__ == "__main__":
    main()
