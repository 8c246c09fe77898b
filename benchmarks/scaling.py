"""Scaling benchmark: ``embfactor compress --size 8x`` time and peak RSS as the embedding table grows (issue 20).

Points: all-MiniLM-L6-v2 (30,522 x 384), SmolLM2-135M (49,152 x 576), multilingual-e5-small (250,037 x 384, converted
by ``python -m benchmarks.extra_models e5``; skipped when absent), and synthetic checkpoints of real shapes and dtype,
written here shard by shard (random layers, a table with a decaying spectrum): 262,144 x 640 (a Gemma-3-270M-sized
table on 4 Llama layers of width 640, float32, loaded whole), a Gemma-2-2B-shaped bf16 checkpoint (256,000 x 2304
tied table, 26 layers of its dims, Llama layers) and a Llama-3-8B-shaped bf16 checkpoint (128,256 x 4096 table,
untied head, 32 layers of the real shapes, 16 GB), the last two through the table-only path. Every compress runs
as its own process; its peak RSS is the kernel's (``os.wait4``). The 8B output is then loaded with transformers'
``from_pretrained`` and generates a few tokens, also measured.

Run: ``python -m benchmarks.scaling`` (all points; needs ~40 GB of disk for the 8B checkpoint and its output, which
are deleted afterwards unless --keep), ``--only NAME ...``, ``--quick`` (MiniLM and a small synthetic checkpoint
through the table-only path: a few minutes). Results: benchmarks/results/scaling.{md,json,png} (quick: *_quick.*).
Timings on a shared machine are noisy; the benchmark never asserts them.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere

from benchmarks.common import RESULTS_DIR, environment, markdown_table
from benchmarks.memory import _run_measured

E5_DIR = Path("~/.cache/embfactor/models/multilingual-e5-small").expanduser()

# name -> (vocab, d, how): "real" a bundled/converted model, else a synthetic checkpoint's architecture
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                 rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)
GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, tie_word_embeddings=True,
                 max_position_embeddings=8192, rms_norm_eps=1e-6)
T262K = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=1, head_dim=256, tie_word_embeddings=True, max_position_embeddings=8192)
TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=512)

POINTS: dict[str, dict[str, Any]] = {
    "minilm": {"model": "minilm", "shape": (30522, 384)},
    "smollm2": {"model": "smollm2", "shape": (49152, 576)},
    "e5": {"model": str(E5_DIR), "shape": (250037, 384), "needs": E5_DIR},
    "synthetic-262k-640": {"config": T262K, "dtype": "float32", "shape": (262144, 640)},
    "gemma2-2b-shape": {"config": GEMMA2_2B, "dtype": "bfloat16", "shape": (256000, 2304), "table_only": True},
    "llama3-8b-shape": {"config": LLAMA3_8B, "dtype": "bfloat16", "shape": (128256, 4096), "table_only": True,
                        "generate": True},
}
QUICK = {"minilm": POINTS["minilm"],
         "synthetic-49k-64": {"config": TINY, "dtype": "bfloat16", "shape": (49152, 64), "table_only": True,
                              "generate": True}}


# --- synthetic checkpoints, written shard by shard ----------------------------------------------------------------
def spectral_table(n: int, d: int, dtype: Any, seed: int = 0, rank: int = 256) -> Any:
    """An n x d table with a realistic spectrum: a power-law head of ``rank`` directions over a flat floor, rows of
    varying norm (what trained embedding tables look like: a few strong directions, frequent tokens larger).

    Written in row blocks into a tensor of ``dtype`` (no float32 copy of a bf16 table).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    r = min(rank, d)
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=g))
    basis = (torch.arange(1, r + 1, dtype=torch.float32) ** -0.7)[:, None] * q.T * 3.0  # r x d
    out = torch.empty(n, d, dtype=dtype)
    step = max(1, (1 << 24) // d)
    for a in range(0, n, step):
        b = min(n, a + step)
        x = torch.randn(b - a, r, generator=g) @ basis + 0.3 * torch.randn(b - a, d, generator=g)
        norms = 1.0 + 0.5 * torch.rand(b - a, 1, generator=g)
        out[a:b] = (0.02 * x / x.norm(dim=1, keepdim=True).clamp_min(1e-6) * math.sqrt(d) * norms / 3).to(dtype)
    return out


def write_synthetic(folder: Path, arch: dict[str, Any], dtype_name: str, tokenizer_from: Path,
                    shard_bytes: int = 2 << 30) -> dict[str, Any]:
    """A Llama checkpoint of ``arch``'s shapes in ``folder``: random layers, a spectral table, shards of ~2 GB.

    One layer's tensors are in memory at a time; nothing of the model is ever built.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from embfactor.pipeline.table_only import SHARD_INDEX, TORCH_TO_ST, Entry, write_safetensors

    t0 = time.perf_counter()
    dtype = getattr(torch, dtype_name)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**arch, dtype=dtype_name, architectures=["LlamaForCausalLM"])
    cfg.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_from), local_files_only=True)
    tok.save_pretrained(folder)
    h, inter, hd = arch["hidden_size"], arch["intermediate_size"], arch["head_dim"]
    nq, nkv = arch["num_attention_heads"], arch["num_key_value_heads"]
    g = torch.Generator().manual_seed(1)
    # Layer weights are N(0, 0.02) values copied from a 32M-value pool at random offsets: drawing 7.5 billion normal
    # values took minutes of CPU; copying costs what writing them does.
    pool = (torch.randn(1 << 25, generator=g) * 0.02).to(dtype)

    def rnd(*shape: int) -> Any:
        t = torch.empty(math.prod(shape), dtype=dtype)
        at = 0
        while at < t.numel():
            start = int(torch.randint(0, pool.numel() // 2, (1,), generator=g))
            n = min(t.numel() - at, pool.numel() - start)
            t[at:at + n] = pool[start:start + n]
            at += n
        return t.view(*shape)

    def layer(i: int) -> dict[str, Any]:
        p = f"model.layers.{i}."
        return {p + "self_attn.q_proj.weight": (nq * hd, h), p + "self_attn.k_proj.weight": (nkv * hd, h),
                p + "self_attn.v_proj.weight": (nkv * hd, h), p + "self_attn.o_proj.weight": (h, nq * hd),
                p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,)}

    groups: list[dict[str, Any]] = [{"model.embed_tokens.weight": "table"}]
    groups += [layer(i) for i in range(arch["num_hidden_layers"])]
    tail = {"model.norm.weight": (h,)}
    if not arch["tie_word_embeddings"]:
        tail["lm_head.weight"] = (arch["vocab_size"], h)
    groups.append(tail)
    shards: list[list[str]] = [[]]
    size = 0
    esize = torch.tensor([], dtype=dtype).element_size()
    for grp in groups:  # shards of whole layers, ~shard_bytes each
        b = sum(arch["vocab_size"] * h * esize if v == "table" else math.prod(v) * esize for v in grp.values())
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(grp)
        size += b
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = []
        for grp in shard:
            for k, shape in grp.items():
                if shape == "table":
                    t = spectral_table(arch["vocab_size"], h, dtype)
                elif len(shape) == 1:
                    t = torch.ones(shape, dtype=dtype)
                else:
                    t = rnd(*shape)
                entries.append(Entry(k, TORCH_TO_ST[dtype], tuple(t.shape), t.numel() * t.element_size(), tensor=t))
        total += write_safetensors(folder / name, entries, {"format": "pt"})
        weight_map.update({e.name: name for e in entries})
        del entries
    (folder / SHARD_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"bytes": total, "shards": len(shards), "write_seconds": round(time.perf_counter() - t0, 1)}


def tokenizer_source(vocab: int, work: Path) -> Path:
    """A tokenizer folder whose ids fit ``vocab``: e5's XLM-R one (250k) for large vocabularies, else SmolLM2's."""
    e5 = Path(POINTS["e5"]["model"])
    if vocab >= 250_002 and (e5 / "tokenizer.json").is_file():
        return e5
    folder = work / "smollm2-tokenizer"
    if not (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        from embfactor.models import smollm2_path

        gguf = smollm2_path()  # the tokenizer alone, from the GGUF's metadata (the model is not needed)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    return folder


# --- measuring ---------------------------------------------------------------------------------------------------
GENERATE = (
    "import sys, time, torch, embfactor; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    "t0 = time.perf_counter(); m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype='auto')\n"
    "t1 = time.perf_counter()\n"
    "tok = AutoTokenizer.from_pretrained(sys.argv[1]); ids = tok('The capital of France is', return_tensors='pt')\n"
    "out = m.generate(**ids, max_new_tokens=8, do_sample=False)\n"
    "rss = {l.split(':')[0]: int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('Rss')}\n"
    "print(type(m.get_input_embeddings()).__name__, m.dtype, 'new tokens', out.shape[1] - ids['input_ids'].shape[1],"
    " 'load s', round(t1 - t0, 1), 'generate s', round(time.perf_counter() - t1, 1), 'RSS MB', rss)\n"
)


def run_point(name: str, spec: dict[str, Any], work: Path, *, size: str, keep: bool, timeout: float) -> dict[str, Any]:
    vocab, d = spec["shape"]
    row: dict[str, Any] = {"name": name, "vocab": vocab, "d": d, "table_fp32_mb": round(vocab * d * 4 / 2**20, 1)}
    if "needs" in spec and not Path(spec["needs"]).exists():
        return {**row, "status": f"skipped: {spec['needs']} is missing (python -m benchmarks.extra_models e5)"}
    model = spec.get("model")
    if model is None:
        model = work / name
        if not (model / "model.safetensors.index.json").is_file():
            row["checkpoint"] = write_synthetic(model, spec["config"], spec["dtype"],
                                                tokenizer_source(spec["config"]["vocab_size"], work))
        row["dtype"] = spec["dtype"]
    out = work / f"{name}-{size}"
    shutil.rmtree(out, ignore_errors=True)
    report = work / f"{name}-{size}.json"
    cmd = [sys.executable, "-m", "embfactor.cli.main", "compress", str(model), "--size", size, "-o", str(out),
           "--json", str(report), "-q"] + (["--table-only"] if spec.get("table_only") else [])
    res = _run_measured(cmd, timeout)
    row.update(status=res["status"], seconds=round(res["seconds"], 1), peak_rss_mb=round(res.get("peak_rss_mb", 0)),
               command="embfactor " + " ".join(cmd[3:]))
    if res["status"] != "ok":
        row["error"] = res.get("error", "")[-400:]
        return row
    r = json.loads(report.read_text())
    row.update(path=r.get("path", "full"), check=r.get("check"), bytes_ratio=round(r["bytes_ratio"], 2),
               relative_error=round(r["relative_error"], 4), stage_seconds=r.get("stage_seconds", {}),
               plan=r["plan"] and " + ".join(f"{t['label']} [{t['rows']:,}]" for t in r["plan"]["tiers"]),
               rss_per_fp32_table=round(res["peak_rss_mb"] / max(row["table_fp32_mb"], 1e-9), 2))
    if spec.get("generate"):
        g = _run_measured([sys.executable, "-c", GENERATE, str(out)], timeout)
        row["generate"] = {"status": g["status"], "seconds": round(g["seconds"], 1),
                           "peak_rss_mb": round(g.get("peak_rss_mb", 0)), "stdout": g.get("stdout", "")[-300:],
                           "error": g.get("error", "")[-300:]}
    if not keep and model != spec.get("model"):
        shutil.rmtree(model, ignore_errors=True)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def render(rows: list[dict[str, Any]], env: dict[str, Any], command: str) -> str:
    table = [[r["name"], f"{r['vocab']:,} x {r['d']}", r.get("dtype", "float32"), r.get("path", "-"),
              r.get("seconds", "-"), r.get("peak_rss_mb", "-"), r.get("table_fp32_mb"), r.get("rss_per_fp32_table", "-"),
              r.get("bytes_ratio", "-"), r.get("plan", r.get("status"))] for r in rows]
    lines = ["## compress --size 8x as the table grows\n",
             (f"`{command}` — {env['time_utc']}, {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, "
              f"1-min load average at start {env['load_average_1m']}. **Measured on a shared machine** (other jobs "
              "ran at the same time): wall times are noisy and only comparable within one run; peak RSS is the "
              "kernel's ru_maxrss of the compress process.\n"),
             markdown_table(table, ["point", "table", "dtype", "path", "wall s", "peak RSS MB", "fp32 table MB",
                                    "RSS / table", "x fewer bytes", "plan"]), ""]
    for r in rows:
        if r.get("stage_seconds"):
            lines.append(f"- {r['name']}: seconds per stage " + ", ".join(f"{k} {v}" for k, v in
                                                                          r["stage_seconds"].items()))
        if r.get("generate"):
            g = r["generate"]
            lines.append(f"- {r['name']}: output loaded with `AutoModelForCausalLM.from_pretrained` and generated "
                         f"({g['status']}): {g['stdout']} — {g['seconds']} s, peak RSS {g['peak_rss_mb']} MB")
        if r.get("checkpoint"):
            c = r["checkpoint"]
            lines.append(f"- {r['name']}: synthetic checkpoint {c['bytes'] / 2**30:.2f} GiB in {c['shards']} shards, "
                         f"written in {c['write_seconds']} s")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "seconds", "wall seconds"), (axes[1], "peak_rss_mb", "peak RSS (MB)")):
        for path_kind, marker in (("full", "o"), ("table-only", "s")):
            pts = [r for r in ok if r.get("path") == path_kind]
            ax.loglog([r["vocab"] * r["d"] for r in pts], [r[key] for r in pts], marker, label=path_kind)
            for r in pts:
                ax.annotate(r["name"], (r["vocab"] * r["d"], r[key]), fontsize=7)
        if key == "peak_rss_mb":
            xs = sorted(r["vocab"] * r["d"] for r in ok)
            ax.loglog(xs, [x * 4 / 2**20 for x in xs], "k--", lw=0.8, label="fp32 table")
        ax.set_xlabel("table values (vocab x d)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("embfactor compress --size 8x (shared 2-core machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="MiniLM and a small synthetic checkpoint only")
    p.add_argument("--only", nargs="+", choices=sorted({*POINTS, *QUICK}), help="these points only")
    p.add_argument("--size", default="8x")
    p.add_argument("--work", default="/tmp/embfactor-scaling", help="where checkpoints and outputs are written")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints and outputs")
    p.add_argument("--output", default=str(RESULTS_DIR), help="folder for scaling.{md,json,png}")
    p.add_argument("--timeout", type=float, default=7200)
    p.add_argument("--e5", default=str(E5_DIR), help="the converted multilingual-e5-small folder")
    args = p.parse_args(argv)
    POINTS["e5"].update(model=args.e5, needs=Path(args.e5))
    points = {**POINTS, **QUICK}
    names = args.only or list(QUICK if args.quick else POINTS)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    command = "python -m benchmarks.scaling" + (" --quick" if args.quick else "") + (
        f" --only {' '.join(args.only)}" if args.only else "")
    prefix = Path(args.output) / ("scaling_quick" if args.quick else "scaling")
    old = json.loads(prefix.with_suffix(".json").read_text()).get("rows", []) if prefix.with_suffix(
        ".json").is_file() and args.only else []
    rows = [r for r in old if r["name"] not in names]
    for name in names:
        row = run_point(name, points[name], work, size=args.size, keep=args.keep, timeout=args.timeout)
        print(json.dumps(row), flush=True)
        rows.append(row)
    order = {n: i for i, n in enumerate(points)}
    rows.sort(key=lambda r: order.get(r["name"], 99))
    from embfactor.fileio import atomic_write_json, atomic_write_text

    prefix.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(prefix.with_suffix(".json"), {"env": env, "command": command, "rows": rows})
    atomic_write_text(prefix.with_suffix(".md"), render(rows, env, command))
    plot(rows, prefix.with_suffix(".png"))
    print(prefix.with_suffix(".md").read_text())
    return 0 if all(r.get("status") == "ok" or str(r.get("status")).startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
