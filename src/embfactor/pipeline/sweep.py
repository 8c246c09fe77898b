"""Rank sweeps: quality against embedding bytes for several methods and ratios, with reference points.

For each (method, ratio) the loaded model is deep-copied, its embedding factorized in memory, optionally healed
(distillation from the original), then evaluated (optionally with its factors stored as int8/int4) on one task
against the original. Reference points: the original model (dense float32 embedding) and the dense embedding
per-row quantized to int8 and int4. Embedding bytes count float32 factors, or the quantized integers plus one
float32 scale per row (:func:`embfactor.quant.quantized_bytes`).
"""

from __future__ import annotations

import copy
import functools
import io
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embfactor.errors import ConfigError, InvalidInputError
from embfactor.pipeline.compress import data_weights

QUANTIZE_MODES = {"none": None, "int8": 8, "int4": 4}
# the dense int-k reference curve of a sweep: (bits, group of columns or None for per row), most bytes first
INT_K_CURVE = ((8, None), (6, 32), (4, 32), (3, 32), (2, 32))
# the numbers besides the headline metric that each task contributes to a sweep row
_TASK_FIELDS = {
    "similarity": ("spearman", "pearson", "fidelity", "fidelity_min", "fidelity_other"),
    "perplexity": ("perplexity", "kl", "top1_agreement", "reference_perplexity"),
    "classification": ("accuracy", "accuracy_std", "reference_accuracy"),
    "reconstruction": ("relative_error", "overlap_weighted", "overlap_uniform"),
}
# the "agreement with the original" number drawn in the plot's second panel
_AGREEMENT = {"similarity": "fidelity", "perplexity": "kl", "classification": "accuracy", "reconstruction": "relative_error"}


def default_task(kind: str) -> str:
    """``similarity`` for encoders, ``perplexity`` for decoders."""
    return "perplexity" if kind == "decoder" else "similarity"


def clone_model(lm):
    """A LoadedModel whose nn.Module is a deep copy (tokenizer shared): cheaper than reloading from disk."""
    from embfactor.models import LoadedModel

    return LoadedModel(lm.name, copy.deepcopy(lm.model), lm.tokenizer, lm.kind, lm.source, lm.compressed, dict(lm.record))


def _embedding_bytes_fp32(layer: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(layer.parameters()) + list(layer.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def fake_quantize_module_(layer: nn.Module, bits: int) -> int:
    """Replace every 2-D parameter of ``layer`` by its per-row quantized-dequantized values; return stored bytes.

    Quality is exactly that of storing the tables quantized (the model reads dequantized values either way); bytes
    are the integers plus one float32 scale per row for 2-D tables, float32 for anything else.
    """
    from embfactor.quant import fake_quantize_rows, quantized_bytes

    total = 0
    seen: set[int] = set()
    for p in layer.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim == 2:
            p.copy_(fake_quantize_rows(p.detach(), bits))
            total += quantized_bytes(p.shape[0], p.shape[1], bits)
        else:
            total += p.numel() * 4
    return total


def _quantize(lm, bits: int) -> tuple[int, str]:
    """Store ``lm``'s (factorized) embedding with ``bits``-bit rows; return (embedding bytes, implementation).

    U·V layers go through :func:`embfactor.surgery.quantize_` (the real int8/int4 storage) when it exists; other
    layer types (e.g. ``block``) are fake-quantized table by table, which gives the same quality numbers.
    """
    from embfactor.eval.tasks import input_embedding
    from embfactor.layers import FactorizedEmbedding

    try:
        from embfactor.surgery import quantize_
    except ImportError:
        quantize_ = None
    layer = input_embedding(lm.model)
    if quantize_ is not None and type(layer) is FactorizedEmbedding:
        info = quantize_(lm.model, bits)
        return int(info["embedding_bytes"]), "surgery.quantize_"
    return fake_quantize_module_(layer, bits), "fake_quantize_rows"


def _row(result: dict[str, Any], task: str) -> dict[str, Any]:
    return {k: result[k] for k in _TASK_FIELDS[task] if k in result}


def _parse_list(value: str | Sequence, kind: type, what: str) -> list:
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    try:
        out = [kind(v) for v in items if v != ""]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a comma-separated list of {kind.__name__}s, got {value!r}") from None
    if not out:
        raise ConfigError(f"{what} is empty; give at least one value")
    return out


def check_methods(methods: Sequence[str], *, skip_missing: bool) -> list[str]:
    """Registered methods among ``methods``; unknown ones raise UnknownMethodError (or warn with skip_missing)."""
    from embfactor.decomposition.registry import get_method
    from embfactor.errors import UnknownMethodError

    from embfactor.pipeline.references import check_external, is_external

    out = []
    for m in methods:
        # the byte-budget planner (embfactor.plan) and other tools' formats (pipeline.references) are not registered
        if m == "auto" or is_external(m):
            if is_external(m):
                check_external(m)  # its tool is installed: before the model is loaded
            out.append(m)
            continue
        try:
            get_method(m)
        except UnknownMethodError as e:
            if not skip_missing:
                raise UnknownMethodError(f"{e} (pass --skip-missing to leave it out of the sweep)") from None
            warnings.warn(f"sweep: skipping {e}", stacklevel=2)
            continue
        out.append(m)
    if not out:
        raise UnknownMethodError(f"none of the methods {', '.join(methods)} is registered; nothing to sweep")
    return out


def sweep(
    model: str | Any,
    *,
    ratios: Sequence[float] | str = (2, 4, 6, 8, 12),
    methods: Sequence[str] | str = ("svd",),
    task: str | None = None,
    heal_minutes: float = 0.0,
    quantize: Sequence[str] | str = ("none",),
    skip_missing: bool = False,
    seed: int = 0,
    progress: bool = True,
    task_options: dict[str, Any] | None = None,
    heal_options: dict[str, Any] | None = None,
    int_k_curve: bool | None = None,
    sizes: Sequence[str] | str | None = None,
) -> dict[str, Any]:
    """Factorize, (heal,) evaluate at every (method, ratio, storage); return the table with reference points.

    Args:
        model: a model name/folder, or an already loaded :class:`~embfactor.models.LoadedModel` (left untouched).
        ratios: target embedding compression ratios (each > 1).
        sizes: byte targets instead of ratios (``"8x,12x,16x"`` or ``"2.5MB"``): every method stores the table within
            each (``auto`` = the planner, ``int`` = dense int-k, pq/rvq/svd pick their settings).
        methods: registered decomposition methods; data-aware ones (wsvd, block) get token weights counted with
            the model's tokenizer on the bundled Wikipedia training split.
        task: evaluation task (default ``similarity`` for encoders, ``perplexity`` for decoders).
        heal_minutes: minutes of distillation healing per point (0 = none).
        quantize: storage of the factors to evaluate: any of ``none`` (float32), ``int8``, ``int4`` (formats that
            store integers already, ``pq``/``rvq``/``int``, are evaluated as they are).
        int_k_curve: also evaluate the dense int-k curve (int8 per row, int6/4/3/2 per group of 32; packed, fp16
            scales), returned as ``int_k_curve`` and drawn as the reference line; None (default): when a byte-format
            method (pq, rvq, int) is swept.
        skip_missing: leave unregistered methods out with a warning instead of failing.
        seed: decomposition seed.
        progress: progress bars.
        task_options: passed to :func:`embfactor.eval.tasks.evaluate` (e.g. ``{"max_tokens": 4096}``).
        heal_options: passed to :func:`embfactor.train.heal.heal` (e.g. ``{"lr": 1e-3}``).

    Returns:
        ``{"model", "task", "metric", "lower_is_better", "reference": [...], "points": [...], "settings": {...}}``;
        every point/reference row has ``label``, ``embedding_bytes`` and the task's numbers.

    Raises:
        UnknownMethodError: a method is not registered (unless skip_missing). ConfigError: bad ratios/quantize.
        InvalidInputError: task not applicable to the model.

    Example:
        >>> [(p["label"], p["fidelity"]) for p in ef.sweep("minilm", sizes="8x", methods="auto,int")["points"]]  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    # --- validate everything before the (long) work ---
    ratio_list, method_list, quant_list = _check_settings(ratios, methods, quantize, heal_minutes, skip_missing, sizes)
    from embfactor.train.heal import heal as heal_fn  # at call time: tests replace it with a fake

    heal = heal_fn if heal_minutes > 0 else None
    t_start, lm = time.perf_counter(), _sweepable(model)
    task, info, opts = _task_and_options(lm, task, task_options)
    external, method_list = _external_references(lm, method_list)
    weights = data_weights(lm, [m for m in method_list if m != "auto"])

    run_eval = functools.partial(_evaluate, task=task, opts=opts)
    if int_k_curve is None:
        int_k_curve = any(m in ("pq", "rvq", "int", "auto") for m in method_list)
    n_points = len(method_list) * len(ratio_list) * len(quant_list) + 3 + (len(INT_K_CURVE) if int_k_curve else 0)
    bar = tqdm(total=n_points, desc=f"sweep {task}", unit="point", disable=not progress)
    reference_rows = _reference_rows(lm, task, run_eval, bar, external)
    int_curve = _int_k_curve(lm, task, run_eval, bar) if int_k_curve else []
    points, skipped = _grid_points(
        lm, method_list, ratio_list, quant_list, by_size=sizes is not None, bar=bar,
        weights=weights, seed=seed, heal=heal, heal_minutes=heal_minutes, heal_options=heal_options,
        run_eval=run_eval, task=task, progress=progress,
    )
    bar.close()
    settings = {
        "ratios" if sizes is None else "sizes": ratio_list, "methods": method_list + external, "quantize": quant_list,
        "heal_minutes": heal_minutes, "seed": seed, "task_options": {k: v for k, v in opts.items() if k != "cache"},
    }
    return _sweep_table(lm, task, info, reference_rows, int_curve, points, skipped, settings,
                        time.perf_counter() - t_start)


def _evaluate(m, ref, *, task: str, opts: dict[str, Any]) -> dict[str, Any]:
    """One evaluation of a sweep point (``m``) against ``ref`` (None: the task's own numbers only)."""
    from embfactor.eval.tasks import evaluate

    return evaluate(m, task, reference=ref, progress=False, **opts)


def _sweepable(model: str | Any):
    """The LoadedModel to sweep (``model`` itself when already loaded); a compressed one is refused."""
    from embfactor.models import load_model

    lm = load_model(model) if isinstance(model, (str, Path)) else model
    if lm.compressed:
        raise InvalidInputError(
            f"{lm.source} is already compressed; sweep the original model (its source: {lm.record.get('source_model')})"
        )
    return lm


def _task_and_options(lm, task: str | None, task_options: dict[str, Any] | None) -> tuple[str, Any, dict[str, Any]]:
    """(task name, its TaskInfo, evaluate() options); a task that does not apply to the model raises its error."""
    from embfactor.eval.tasks import evaluate, get_task

    task = task or default_task(lm.kind)
    info = get_task(task)
    if lm.kind not in info.kinds:
        evaluate(lm, task)  # raises the clear "applies to ..." error
    opts = dict(task_options or {})
    if task == "similarity":
        opts.setdefault("cache", {})  # the original's embeddings are computed once for the whole sweep
    return task, info, opts


def _grid_points(lm, method_list: list[str], ratio_list: list, quant_list: list[str], *, by_size: bool, bar,
                 **point_options: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(points, skipped) of every (method, ratio or size, storage); ``point_options`` go to _method_points."""
    points: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for method in method_list:
        for ratio in ratio_list:
            try:
                points += _method_points(lm, method, ratio, quant_list, bar=bar, **point_options)
            except ConfigError as e:
                if not by_size:  # a ratio every method can reach: a real error
                    raise
                # a byte size this method cannot reach (int-k stops at ~16x): the other points still count
                skipped.append({"method": method, "size": ratio, "reason": str(e)})
                bar.update(len(quant_list))
    return points, skipped


def _sweep_table(lm, task: str, info, reference_rows: list, int_curve: list, points: list, skipped: list,
                 settings: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The dict :func:`sweep` returns (its Returns: section)."""
    from embfactor.eval.tasks import input_embedding

    emb = input_embedding(lm.model)
    vocab, dim = int(emb.num_embeddings), int(emb.embedding_dim)
    return {
        "model": lm.name,
        "kind": lm.kind,
        "task": task,
        "metric": info.metric,
        "lower_is_better": info.lower_is_better,
        "agreement_metric": _AGREEMENT[task],
        "vocab_size": vocab,
        "hidden_size": dim,
        "dense_embedding_bytes": vocab * dim * 4,
        "reference": reference_rows,
        "int_k_curve": int_curve,
        "points": points,
        "skipped": skipped,
        "settings": settings,
        "seconds": seconds,
    }


def _check_settings(
    ratios: Sequence[float] | str, methods: Sequence[str] | str, quantize: Sequence[str] | str,
    heal_minutes: float, skip_missing: bool, sizes: Sequence[str] | str | None = None,
) -> tuple[list[float] | list[str], list[str], list[str]]:
    """The sweep's ratios (or byte sizes), methods and quantize modes, parsed and validated.

    Raises ConfigError/UnknownMethodError naming the bad value.
    """
    if sizes is not None:
        from embfactor.decomposition import parse_size

        ratio_list = _parse_list(sizes, str, "sizes")
        for sz in ratio_list:
            parse_size(sz)  # ConfigError naming the bad size, before any work
    else:
        ratio_list = _parse_list(ratios, float, "ratios")
        for r in ratio_list:
            if not (r > 1 and math.isfinite(r)):
                raise ConfigError(f"every ratio must be a finite number > 1, got {r}")
    method_list = check_methods(_parse_list(methods, str, "methods"), skip_missing=skip_missing)
    quant_list = _parse_list(quantize, str, "quantize")
    for q in quant_list:
        if q not in QUANTIZE_MODES:
            raise ConfigError(f"unknown quantize mode {q!r}; valid: {', '.join(QUANTIZE_MODES)}")
    if heal_minutes is None or heal_minutes < 0 or not math.isfinite(heal_minutes):
        raise ConfigError(f"heal_minutes must be >= 0, got {heal_minutes}")
    return ratio_list, method_list, quant_list


def _reference_rows(lm: Any, task: str, run_eval: Any, bar: Any, external: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The original model and its dense int8/int4 tables: the points every compressed one is compared with; then
    the ``external`` tools' formats (:func:`_external_row`)."""
    from embfactor.eval.tasks import input_embedding
    from embfactor.quant import fake_quantize_rows, quantized_bytes

    emb = input_embedding(lm.model)
    vocab, dim = int(emb.num_embeddings), int(emb.embedding_dim)
    dense_bytes = vocab * dim * 4
    reference_rows: list[dict[str, Any]] = []
    # the original model (for similarity/perplexity the agreement numbers are exact by definition)
    t0 = time.perf_counter()
    base = run_eval(lm, lm if task == "reconstruction" else None)  # reconstruction always needs a reference
    row = {"label": "original (fp32)", "kind": "original", "bits": 32, "embedding_bytes": dense_bytes, **_row(base, task)}
    row.update({"fidelity": 1.0} if task == "similarity" else {"kl": 0.0, "top1_agreement": 1.0} if task == "perplexity" else {})
    if task == "classification":
        row["reference_accuracy"] = base["accuracy"]
    row["seconds"] = time.perf_counter() - t0
    reference_rows.append(row)
    bar.update()
    for bits in (8, 4):
        t0 = time.perf_counter()
        q = clone_model(lm)
        with torch.no_grad():
            w = input_embedding(q.model).weight
            w.copy_(fake_quantize_rows(w.detach(), bits))
        res = run_eval(q, lm)
        reference_rows.append({
            "label": f"dense int{bits}", "kind": "dense-quantized", "bits": bits,
            "embedding_bytes": quantized_bytes(vocab, dim, bits), **_row(res, task), "seconds": time.perf_counter() - t0,
        })
        del q
        bar.update()

    bar.total += len(external)
    return reference_rows + [_external_row(lm, m, task, run_eval, bar) for m in external]


def _external_references(lm, method_list: list[str]) -> tuple[list[str], list[str]]:
    """(other tools' formats, the other methods) of a sweep; each format is checked against the table's width."""
    from embfactor.eval.tasks import input_embedding
    from embfactor.pipeline.references import check_external, is_external

    external = [m for m in method_list if is_external(m)]  # one reference point each, whatever the ratios
    for m in external:
        check_external(m, int(input_embedding(lm.model).embedding_dim))
    return external, [m for m in method_list if m not in external]


def _external_row(lm: Any, name: str, task: str, run_eval: Any, bar: Any) -> dict[str, Any]:
    """A reference row: the table stored by another tool (:mod:`embfactor.pipeline.references`), read back as it
    reads it, in a copy of the model (a tied head reads the same table)."""
    from embfactor.eval.tasks import input_embedding
    from embfactor.pipeline.references import external_table

    t0 = time.perf_counter()
    q = clone_model(lm)
    w = input_embedding(q.model).weight
    table, nbytes, info = external_table(name, w.detach())
    with torch.no_grad():
        w.copy_(table.to(w.dtype))
    res = run_eval(q, lm)
    bar.update()
    return {"label": name, "kind": "external", **info, "embedding_bytes": nbytes,
            "bytes_ratio": w.numel() * 4 / nbytes, **_row(res, task), "seconds": time.perf_counter() - t0}


def _int_k_curve(lm: Any, task: str, run_eval: Any, bar: Any) -> list[dict[str, Any]]:
    """The dense int-k curve (packed k-bit rows, fp16 scales): the reference every compressed point must beat."""
    from embfactor.decomposition.intk import int_quantize
    from embfactor.eval.tasks import input_embedding
    from embfactor.formats import from_factors
    from embfactor.surgery import install_format_

    emb = input_embedding(lm.model)
    dense_bytes = emb.weight.numel() * 4
    rows: list[dict[str, Any]] = []
    for bits, group in INT_K_CURVE:
        t0 = time.perf_counter()
        q = clone_model(lm)
        layer = from_factors(int_quantize(emb.weight.detach(), bits=bits, group=group), emb.padding_idx,
                             zero_padding_row=False)
        # as compress installs a table: a tied head reads it, and the module's scale and shared readers are kept
        install_format_(q.model, layer, method="int", rank=bits)
        res = run_eval(q, lm)
        rows.append({
            "label": f"int{bits} " + (f"g{group}" if group else "per row"), "kind": "dense-int-k", "bits": bits,
            "group": group, "embedding_bytes": layer.num_bytes(), "bytes_ratio": dense_bytes / layer.num_bytes(),
            **_row(res, task), "seconds": time.perf_counter() - t0,
        })
        del q
        bar.update()
    return rows


def _method_points(
    lm: Any, method: str, ratio: float | str, quant_list: list[str], *, weights: Any, seed: int, heal: Any,
    heal_minutes: float, heal_options: dict[str, Any] | None, run_eval: Any, task: str, bar: Any, progress: bool,
) -> list[dict[str, Any]]:
    """One (method, ratio or byte size): factorize a copy, heal it if asked, evaluate it in every storage of
    ``quant_list``. A size (``"16x"``) gives the method that byte budget; method ``auto`` is the planner."""
    from embfactor.config import FactorizationConfig
    from embfactor.decomposition import get_method
    from embfactor.eval.tasks import input_embedding
    from embfactor.surgery import factorize_

    dense_bytes = input_embedding(lm.model).weight.numel() * 4
    points: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    tag = ratio if isinstance(ratio, str) else f"x{ratio:g}"
    bar.set_postfix_str(f"{method} {tag}")
    student = clone_model(lm)
    plan = None
    if method == "auto":
        from embfactor.plan import plan_compress_

        rep = _ReportView(plan_compress_(student, FactorizationConfig(size=ratio, seed=seed)))
        plan = getattr(rep, "plan", None)
    else:
        config = FactorizationConfig(
            method=method, seed=seed, **({"size": ratio} if isinstance(ratio, str) else {"ratio": ratio})
        )
        rep = factorize_(
            student.model, config, **({"token_weights": weights} if get_method(method).data_aware else {})
        )
    heal_summary = None
    if heal is not None:
        bar.set_postfix_str(f"{method} {tag} healing")
        heal_summary = heal(student, lm, minutes=heal_minutes, progress=progress, **(heal_options or {}))
    factor_seconds = time.perf_counter() - t0
    stored_compact = rep.format in ("codebook", "intk", "tiered")  # integers already: no int8/int4 storage on top
    for qmode in quant_list:
        t1 = time.perf_counter()
        bits = QUANTIZE_MODES[qmode]
        if stored_compact and bits is not None:
            bar.update()
            continue
        target = student if bits is None or qmode == quant_list[-1] else clone_model(student)
        if bits is None:
            nbytes, impl = rep.embedding_bytes_after or rep.embedding_params_after * 4, None
        else:
            nbytes, impl = _quantize(target, bits)
        res = run_eval(target, lm)
        points.append({
            "label": method + ("" if bits is None else f"+int{bits}") + (f"+heal{heal_minutes:g}m" if heal else ""),
            "method": method, "ratio": dense_bytes / nbytes if isinstance(ratio, str) else ratio,
            "size": ratio if isinstance(ratio, str) else None, "plan": plan,
            "actual_ratio": rep.ratio, "rank": rep.rank,
            "quantize": qmode, "bits": bits or 32, "quantize_impl": impl,
            "heal_minutes": heal_minutes, "heal": _heal_digest(heal_summary),
            "embedding_params": rep.embedding_params_after, "embedding_bytes": nbytes,
            "bytes_ratio": dense_bytes / nbytes, "relative_error": rep.relative_error,
            **_row(res, task), "seconds": factor_seconds + time.perf_counter() - t1,
        })
        bar.update()
    return points


class _ReportView:
    """Attribute access to the planner's report dict (it has factorize_'s FactorizationReport fields)."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)


def _heal_digest(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    # the eval history can be long; the sweep keeps what tells whether healing helped
    keep = ("steps", "seconds", "best_step", "eval_before", "best_eval", "improvement", "trainable_params",
            "train_layernorm")
    return {k: summary[k] for k in keep if k in summary}


def plot_sweep(result: dict[str, Any]) -> bytes:
    """PNG bytes of the sweep: headline metric (left) and agreement with the original (right) vs embedding bytes.

    One line per method/storage; the original and the dense int8/int4 embeddings are marked as reference points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, agree = result["metric"], result["agreement_metric"]
    panels = [metric] + ([agree] if agree != metric else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    lines: dict[str, list[dict[str, Any]]] = {}
    for p in result["points"]:
        lines.setdefault(p["label"], []).append(p)
    markers = {"original (fp32)": ("*", "black", 14), "dense int8": ("s", "tab:gray", 8), "dense int4": ("D", "tab:brown", 7)}
    for ax, key in zip(axes[0], panels):
        for label, pts in lines.items():
            pts = sorted((p for p in pts if p.get(key) is not None), key=lambda p: p["embedding_bytes"])
            if pts:
                ax.plot([p["embedding_bytes"] for p in pts], [p[key] for p in pts], "o-", label=label)
                for p in pts:
                    ax.annotate(f"{p['ratio']:.3g}x", (p["embedding_bytes"], p[key]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
        curve = sorted((c for c in result.get("int_k_curve") or [] if c.get(key) is not None),
                       key=lambda c: c["embedding_bytes"])
        if curve:  # the dense int-k curve: the line every compressed point should lie above
            ax.plot([c["embedding_bytes"] for c in curve], [c[key] for c in curve], "--", color="tab:gray",
                    linewidth=1.5, marker=".", label="dense int-k (reference)")
            for c in curve:
                ax.annotate(c["label"], (c["embedding_bytes"], c[key]), fontsize=6, color="tab:gray",
                            textcoords="offset points", xytext=(3, -8))
        values = [v for v in (*(p.get(key) for p in result["points"]), *(c.get(key) for c in curve),
                              *(r.get(key) for r in result["reference"])) if isinstance(v, (int, float)) and v > 0]
        log_y = bool(values) and max(values) > 50 * min(values)  # e.g. int2's perplexity of millions beside 20
        if log_y:
            ax.set_yscale("log")
        orig = result["reference"][0].get(key) if result["reference"] else None
        if orig is not None and (orig > 0 or not log_y):  # the original's level, to read every point's loss against
            ax.axhline(orig, color="black", linewidth=0.8, linestyle=":", alpha=0.6)
        others = iter(zip("^v<>PXh", ("tab:red", "tab:purple", "tab:pink", "tab:olive", "tab:cyan", "tab:blue",
                                       "tab:green")))
        for ref in result["reference"]:
            mk, color, size = markers.get(ref["label"]) or (*next(others, ("^", "tab:red")), 8)
            if ref.get(key) is None:
                continue
            ax.plot([ref["embedding_bytes"]], [ref[key]], mk, color=color, markersize=size, label=ref["label"],
                    linestyle="none")
        ax.set_xscale("log")
        ax.set_xlabel("embedding bytes (log scale)" + (", log y" if log_y else ""))
        better = "lower is better" if (key == metric and result["lower_is_better"]) or key in ("kl", "relative_error") else "higher is better"
        ax.set_ylabel(f"{key} ({better})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']}: {result['task']} vs embedding size ({result['vocab_size']:,} x {result['hidden_size']})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
