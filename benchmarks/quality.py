"""Quality of svd vs the data-aware methods (wsvd, block) at equal parameters, before and after healing.

MiniLM (all-MiniLM-L6-v2) at ratio 6 (rank 63, 6.02x on the embedding): Lee Spearman, fidelity (mean cosine to the
original's sentence embeddings on the Lee documents + 200 held-out Wikipedia passages) and the frequency-weighted
10-NN overlap of the embedding table, all with ``embfactor.eval.tasks.evaluate(..., reference=original)``;
then healing (distillation, ``embfactor.train.heal``) of one method for ``--heal-minutes``.
SmolLM2-135M at ratio 4 (``--smollm2``): held-out Wikipedia perplexity vs the original before/after healing.

Targets (issue 3, not lowered here): MiniLM ≥6x: Spearman within 1% (relative) of the original and fidelity ≥ 0.98
after ≤ 10 min CPU healing; SmolLM2 ≥4x: perplexity within +3% after ≤ 20 min healing.

Run: ``python benchmarks/quality.py`` (MiniLM, ~15-30 min on 2 shared cores), ``--smollm2`` adds the decoder,
``--healed DIR`` evaluates an already healed output (from ``embfactor heal``) instead of healing again,
``--quick`` a tiny random BERT with MiniLM's tokenizer (pipeline check, seconds; numbers meaningless).
Writes ``benchmarks/results/quality.json`` and ``.md`` (``quality_quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"minilm_spearman_rel": 0.01, "minilm_fidelity": 0.98, "smollm2_ppl_rel": 0.03}


def _tiny_minilm_like():
    """A 2-layer random BERT with MiniLM's tokenizer and vocabulary (quick mode)."""
    from transformers import BertConfig, BertModel

    from transformers import AutoTokenizer

    from embfactor.models import LoadedModel, minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    return LoadedModel("tiny-bert", BertModel(cfg).eval(), tok, "encoder", Path("/nonexistent-tiny"))


def _factorized(teacher, method: str, ratio: float, weights: torch.Tensor | None):
    import embfactor as ef
    from embfactor.models import LoadedModel

    m = copy.deepcopy(teacher.model)
    t0 = time.perf_counter()
    rep = ef.factorize_(m, ratio=ratio, method=method, token_weights=weights if method != "svd" else None)
    lm = LoadedModel(f"{teacher.name}-{method}", m, teacher.tokenizer, teacher.kind, Path(f"/nonexistent-{method}"))
    return lm, {"method": method, "rank": rep.rank, "ratio": round(rep.ratio, 3),
                "embedding_params": rep.embedding_params_after, "relative_error": rep.relative_error,
                "decompose_seconds": round(time.perf_counter() - t0, 1)}


def _sim(lm, ref, quick: bool) -> dict[str, Any]:
    from embfactor.eval.tasks import evaluate

    opts = {"fidelity_texts": ref.__dict__.get("_quick_passages")} if quick else {}
    r = evaluate(lm, "similarity", reference=ref, **{k: v for k, v in opts.items() if v is not None})
    return {k: r[k] for k in ("spearman", "pearson", "fidelity", "fidelity_docs", "fidelity_passages", "fidelity_min") if k in r}


def _rec(lm, ref, quick: bool) -> dict[str, Any]:
    from embfactor.eval.tasks import evaluate

    r = evaluate(lm, "reconstruction", reference=ref, **({"queries": 200} if quick else {}))
    return {k: v for k, v in r.items() if isinstance(v, (int, float)) and k not in ("seconds",)}


def run_minilm(args, out: dict[str, Any], save) -> None:
    import embfactor as ef
    from embfactor.data.frequency import token_weights
    from embfactor.train.heal import heal

    teacher = _tiny_minilm_like() if args.quick else ef.load_model("minilm")
    if args.quick:
        from embfactor.data import lee_documents

        teacher._quick_passages = lee_documents()[:8]
    vocab = teacher.model.get_input_embeddings().num_embeddings
    weights = token_weights(teacher.tokenizer, vocab_size=vocab)
    if args.healed_only:  # add the healed model to an earlier run's results
        res = out["minilm"]
        weights = None
    else:
        res = {"model": teacher.name, "ratio_target": args.ratio, "original": _sim(teacher, teacher, args.quick)}
        res["methods"] = {}
        out["minilm"] = res
    students = {}
    for method in [] if args.healed_only else args.methods:
        lm, info = _factorized(teacher, method, args.ratio, weights)
        info.update(_sim(lm, teacher, args.quick))
        info["reconstruction"] = _rec(lm, teacher, args.quick)
        res["methods"][method] = info
        students[method] = lm
        print(f"[quality] {method}: {json.dumps(info)}", file=sys.stderr, flush=True)
        save()
    svd = res["methods"].get("svd")
    if svd:
        for m, info in res["methods"].items():
            info["vs_svd"] = {k: info[k] - svd[k] for k in ("spearman", "fidelity") if k in info and k in svd}
    healed: dict[str, Any] = {}
    if args.healed:
        lm = ef.load_model(args.healed)
        h = dict(lm.record.get("healing", {}))
        h.pop("history", None)
        healed = {"method": lm.record.get("method"), "source": str(args.healed), "healing": h, **_sim(lm, teacher, False)}
    elif args.heal_minutes > 0 or args.quick:
        lm = students[args.heal_method]
        summary = heal(lm, teacher, minutes=None if args.quick else args.heal_minutes, steps=3 if args.quick else None,
                       progress=not args.quick, batch_size=8, max_length=64, eval_every=10, eval_size=16)
        summary.pop("history", None)
        healed = {"method": args.heal_method, "healing": summary, **_sim(lm, teacher, args.quick)}
    if healed:
        orig = res["original"]
        healed["spearman_rel_gap"] = (healed["spearman"] - orig["spearman"]) / orig["spearman"]
        healed["meets_spearman_target"] = healed["spearman_rel_gap"] >= -TARGETS["minilm_spearman_rel"]
        healed["meets_fidelity_target"] = healed["fidelity"] >= TARGETS["minilm_fidelity"]
        res["healed"] = healed
    save()


def run_smollm2(args, out: dict[str, Any], save) -> None:
    import embfactor as ef
    from embfactor.data.frequency import token_weights
    from embfactor.eval.tasks import evaluate
    from embfactor.train.heal import heal

    teacher = ef.load_model("smollm2")
    ppl_opts = {"max_tokens": args.ppl_tokens}
    orig = evaluate(teacher, "perplexity", **ppl_opts)
    res: dict[str, Any] = {"original_perplexity": orig["perplexity"], "ppl_tokens": args.ppl_tokens}
    out["smollm2"] = res
    save()
    vocab = teacher.model.get_input_embeddings().num_embeddings
    weights = token_weights(teacher.tokenizer, vocab_size=vocab)
    lm, info = _factorized(teacher, args.smollm2_method, args.smollm2_ratio, weights)
    before = evaluate(lm, "perplexity", reference=teacher, **ppl_opts)
    info["before"] = {k: before[k] for k in ("perplexity", "kl", "top1_agreement") if k in before}
    res.update(info)
    save()
    if args.smollm2_heal_minutes > 0:
        summary = heal(lm, teacher, minutes=args.smollm2_heal_minutes, batch_size=4, max_length=128,
                       eval_every=10, eval_size=8, progress=True)
        summary.pop("history", None)
        after = evaluate(lm, "perplexity", reference=teacher, **ppl_opts)
        res["after"] = {k: after[k] for k in ("perplexity", "kl", "top1_agreement") if k in after}
        res["healing"] = summary
        res["ppl_rel_gap"] = after["perplexity"] / orig["perplexity"] - 1
        res["meets_target"] = res["ppl_rel_gap"] <= TARGETS["smollm2_ppl_rel"]
    save()


def markdown(out: dict[str, Any]) -> str:
    lines = ["# Quality: svd vs data-aware methods, before/after healing", "",
             f"Command: `{out['command']}` · {out['date']} · 1-min load average {os.getloadavg()[0]:.2f} "
             "(timings depend on the load)", ""]
    m = out.get("minilm")
    if m:
        o = m["original"]
        lines += [f"## {m['model']} at ratio {m['ratio_target']} (equal parameters)", "",
                  "| method | rank | ratio | rel. error | Lee Spearman | fidelity | 10-NN overlap (freq-weighted) |",
                  "|---|---|---|---|---|---|---|",
                  f"| original | - | 1.00 | 0 | {o['spearman']:.4f} | 1.0000 | 1.0000 |"]
        for name, i in m["methods"].items():
            rec = i.get("reconstruction", {})
            nn_ = rec.get("overlap_weighted", float("nan"))
            lines.append(f"| {name} | {i['rank']} | {i['ratio']:.2f} | {i['relative_error']:.3f} | {i['spearman']:.4f} "
                         f"| {i['fidelity']:.4f} | {nn_:.4f} |")
        h = m.get("healed")
        if h:
            hs = h["healing"]
            lines += ["", f"Healed ({h['method']}): Spearman {h['spearman']:.4f} ({100 * h['spearman_rel_gap']:+.2f}% vs "
                      f"original; target ≥ -1%: {'met' if h['meets_spearman_target'] else 'missed'}), fidelity "
                      f"{h['fidelity']:.4f} (target ≥ 0.98: {'met' if h['meets_fidelity_target'] else 'missed'}); "
                      f"{hs.get('steps')} steps, {hs.get('seconds')} s wall, {hs.get('cpu_seconds')} s CPU."]
    s = out.get("smollm2")
    if s:
        lines += ["", "## SmolLM2-135M", "", f"Original perplexity {s['original_perplexity']:.3f} ({s['ppl_tokens']} tokens)."]
        if "before" in s:
            lines.append(f"{s['method']} ratio {s['ratio']:.2f}: perplexity {s['before']['perplexity']:.3f} before healing.")
        if "after" in s:
            hs = s["healing"]
            lines.append(f"After healing ({hs['steps']} steps, {hs['seconds']} s wall): perplexity "
                         f"{s['after']['perplexity']:.3f} ({100 * s['ppl_rel_gap']:+.1f}%; target ≤ +3%: "
                         f"{'met' if s['meets_target'] else 'missed'}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random BERT, 3 healing steps (pipeline check)")
    p.add_argument("--ratio", type=float, default=6.0)
    p.add_argument("--methods", default="svd,wsvd,block")
    p.add_argument("--heal-method", default="wsvd")
    p.add_argument("--heal-minutes", type=float, default=10.0)
    p.add_argument("--healed", help="evaluate this healed output folder instead of healing")
    p.add_argument("--healed-only", action="store_true", help="with --healed: add it to the existing results file")
    p.add_argument("--no-minilm", action="store_true")
    p.add_argument("--smollm2", action="store_true")
    p.add_argument("--smollm2-method", default="wsvd")
    p.add_argument("--smollm2-ratio", type=float, default=4.0)
    p.add_argument("--smollm2-heal-minutes", type=float, default=20.0)
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--output", default=None, help="results JSON path (default benchmarks/results/quality[_quick].json)")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    from embfactor.fileio import atomic_write_json, atomic_write_text

    path = Path(args.output) if args.output else RESULTS / ("quality_quick.json" if args.quick else "quality.json")
    out: dict[str, Any] = {"command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "targets": TARGETS}

    def save() -> None:
        atomic_write_json(path, out)
        atomic_write_text(path.with_suffix(".md"), markdown(out))

    if args.healed_only:
        if not args.healed or not path.is_file():
            p.error("--healed-only needs --healed DIR and an earlier results file")
        out = {**json.loads(path.read_text()), "command_healed": out["command"]}
    if not args.no_minilm:
        run_minilm(args, out, save)
    if args.smollm2 and not args.quick:
        run_smollm2(args, out, save)
    save()
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
