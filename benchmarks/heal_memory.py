"""Peak memory and step time of decoder healing (``embfactor.train.heal.heal``), one fresh process per case.

A decoder heal distills next-token distributions: every vocabulary-sized tensor of a batch (logits, log-probs,
the KL's intermediates and their gradients) is batch × positions × vocab floats, 403 MB each for SmolLM2's 49,152
tokens at the default 16 × 128 batch. Each case runs a few optimizer steps (plus heal's first and last held-out
evaluation, one batch each) in a fresh Python process and reports its peak resident set size (``ru_maxrss``:
PyTorch's allocator never hands all memory back, so tracemalloc and in-process deltas undercount), the peak after
loading the two models (what heal adds is the difference) and the seconds per optimizer step.

Cases differ by heal options: ``loss_chunk`` (token positions whose vocabulary-sized tensors live at a time; 0 =
the whole batch at once, as heal did before it had the option) and ``checkpoint_layers`` (recompute each transformer
layer's activations in the backward pass). ``--cases default`` runs heal with its defaults only.

Run:
    ``python benchmarks/heal_memory.py --compressed /tmp/s8 --reference smollm2``  (a few minutes per case), or
    ``python benchmarks/heal_memory.py --quick``  (a tiny random Llama with a tied int-4 table; seconds).
Writes ``benchmarks/results/bench_heal_memory.{json,md}`` (``_quick`` for a quick run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script from anywhere
from benchmarks.common import (  # noqa: E402
    emit,
    environment,
    markdown_table,
    results_prefix,
    run_isolated,
    write_result_files,
)

TINY = {"vocab": 8192, "d": 64, "layers": 2}
WHOLE_BATCH = "loss_chunk=0,checkpoint_layers=false"  # heal as it was before either option existed


def _tiny_pair() -> tuple[Any, Any]:
    """A tiny random Llama (tied head) and its copy with an int-4 table, with a word-level tokenizer over the most
    common words of the bundled Wikipedia: a decoder whose vocabulary-sized tensors dominate, built in a second."""
    import collections
    import copy

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import embfactor as ef
    from embfactor.data import wiki_split
    from embfactor.models import LoadedModel

    counts = collections.Counter(w for t in wiki_split("train")[:200] for w in t.split())
    specials = ["<unk>", "</s>"]
    words = specials + [w for w, _ in counts.most_common(TINY["vocab"] - len(specials))]
    words += [f"w{i}" for i in range(TINY["vocab"] - len(words))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=TINY["vocab"], hidden_size=TINY["d"], intermediate_size=2 * TINY["d"],
                      num_hidden_layers=TINY["layers"], num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(cfg).eval()
    student = copy.deepcopy(teacher)
    ef.factorize_(student, method="int", bits=4, group=16)  # bits fix the size: no target
    return (LoadedModel("student", student, tok, "decoder", Path("/nonexistent-student")),
            LoadedModel("teacher", teacher, tok, "decoder", Path("/nonexistent-teacher")))


def case(compressed: str | None, reference: str | None, steps: int, batch_size: int, max_length: int,
         options: dict[str, Any]) -> None:
    """Subprocess entry: load the pair, emit the load peak, heal ``steps`` steps, emit the run's figures."""
    import torch

    from embfactor.models import load_model
    from embfactor.train.heal import heal

    torch.manual_seed(0)
    if compressed is None:
        student, teacher = _tiny_pair()
    else:
        student, teacher = load_model(compressed), load_model(reference)
    emit({"stage": "loaded"})
    t = time.perf_counter()
    r = heal(student, teacher, steps=steps, batch_size=batch_size, max_length=max_length, eval_size=batch_size,
             eval_every=10**6, progress=False, **options)
    emit({"stage": "healed", "seconds": time.perf_counter() - t, "steps": r["steps"],
          "step_seconds": r["step_seconds"] / max(1, r["steps"]), "eval_before": r["eval_before"]["loss"],
          "eval_last": r["last_eval"]["loss"], "train_all": r["train_all"],
          "trainable_params": r["trainable_params"], "loss_chunk": r.get("loss_chunk"),
          "checkpoint_layers": r.get("checkpoint_layers")})


def parse_case(text: str) -> dict[str, Any]:
    """``default`` or ``name=value,...`` (ints, true/false) -> heal options."""
    if text == "default":
        return {}
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        low = value.strip().lower()
        out[key.strip()] = True if low == "true" else False if low == "false" else int(value)
    return out


def run(*, compressed: str | None, reference: str | None, cases: list[str], steps: int, batch_size: int,
        max_length: int, timeout: float) -> dict[str, Any]:
    rows = []
    for label in cases:
        kw = {"compressed": compressed, "reference": reference, "steps": steps, "batch_size": batch_size,
              "max_length": max_length, "options": parse_case(label)}
        res = run_isolated("benchmarks.heal_memory", "case", kw, timeout=timeout)
        loaded = next((r for r in res if r.get("stage") == "loaded"), {})
        healed = next((r for r in res if r.get("stage") == "healed"), {})
        failed = next((r for r in res if r.get("status") != "ok"), None)
        row = {"case": label, "loss_chunk": healed.get("loss_chunk"),
               "checkpoint_layers": healed.get("checkpoint_layers"), "load_peak_rss_mb": loaded.get("peak_rss_mb"),
               "peak_rss_mb": healed.get("peak_rss_mb"), "step_seconds": healed.get("step_seconds"),
               "eval_before": healed.get("eval_before"), "eval_last": healed.get("eval_last"),
               "train_all": healed.get("train_all"), "status": failed["status"] if failed else "ok"}
        if failed:
            row["error"] = failed.get("error")
        if row["peak_rss_mb"] and row["load_peak_rss_mb"]:
            row["heal_extra_mb"] = row["peak_rss_mb"] - row["load_peak_rss_mb"]
        rows.append(row)
        print(f"[heal_memory] {label}: peak {row['peak_rss_mb'] or 0:.0f} MB (load "
              f"{row['load_peak_rss_mb'] or 0:.0f} MB), {row['step_seconds'] or 0:.2f} s/step ({row['status']})",
              file=sys.stderr, flush=True)
    model = "tiny random Llama " + "×".join(str(v) for v in TINY.values()) if compressed is None else compressed
    return {"model": model, "reference": reference, "steps": steps, "batch_size": batch_size,
            "max_length": max_length, "environment": environment(), "rows": rows}


def markdown(res: dict[str, Any]) -> str:
    head = (f"Decoder healing memory: {res['model']} against {res['reference'] or 'its dense original'}, "
            f"{res['steps']} steps of {res['batch_size']} × {res['max_length']} tokens (+ 2 evaluations), "
            f"{res['environment']['torch_threads']} torch threads, {res['environment']['time_utc']}")
    rows = [[r["case"], r["loss_chunk"], r["checkpoint_layers"], r["load_peak_rss_mb"], r["peak_rss_mb"],
             r.get("heal_extra_mb"), r["step_seconds"], r["eval_before"], r["eval_last"], r["status"]]
            for r in res["rows"]]
    table = markdown_table(rows, ["case (heal options)", "loss chunk", "layers recomputed", "peak after load (MB)",
                                  "peak (MB)", "heal adds (MB)", "s/step", "eval KL before", "eval KL after",
                                  "status"])
    return head + "\n\n" + table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny random decoder, two steps: a smoke test")
    p.add_argument("--compressed", help="a compressed decoder folder (from 'embfactor compress')")
    p.add_argument("--reference", default="smollm2", help="its original (default smollm2)")
    p.add_argument("--cases", nargs="+", default=[WHOLE_BATCH, "default"],
                   help="heal options of each case: 'default' or name=value,... (default: the whole batch's logits "
                   "and every activation kept, as before loss_chunk existed; then heal's defaults)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per case (default 3)")
    p.add_argument("--batch-size", type=int, default=16, help="token windows per step (default 16)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case (default 3600)")
    p.add_argument("--output", default=None, help="results folder (default benchmarks/results)")
    a = p.parse_args(argv)
    if not a.quick and a.compressed is None:
        p.error("give --compressed FOLDER (e.g. from 'embfactor compress smollm2 --size 8x -o /tmp/s8') or --quick")
    if a.quick:
        res = run(compressed=None, reference=None, cases=a.cases, steps=2, batch_size=8, max_length=64,
                  timeout=600)
    else:
        res = run(compressed=a.compressed, reference=a.reference, cases=a.cases, steps=a.steps,
                  batch_size=a.batch_size, max_length=a.max_length, timeout=a.timeout)
    res["quick"] = a.quick
    md = markdown(res)
    print(md)
    write_result_files(results_prefix("heal_memory", a.quick, a.output), res, md)
    return 0 if all(r["status"] == "ok" for r in res["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
