"""Outputs of a from-scratch run: the perplexity plot, the summary table rows, the run folder."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from torch import nn

from embfactor.errors import InvalidInputError


def plot_curves(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Validation perplexity vs step for every trained variant (log y axis), written atomically as PNG.

    Example:
        >>> plot_curves(train_variants(cfg), "curves.png")     # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from embfactor.fileio import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for v in result["variants"]:
            if v.get("skipped"):
                continue
            steps = [p["step"] for p in v["curve"]]
            ppl = [p["val_ppl"] for p in v["curve"]]
            ax.plot(steps, ppl, marker="o", ms=3, label=f"{v['name']} ({v['embedding_params'] / 1e6:.2f}M emb params)")
        c = result.get("config", {})
        ax.set_xlabel("step")
        ax.set_ylabel("validation perplexity (log scale)")
        ax.set_yscale("log")
        ax.set_title(f"From scratch: d={c.get('d_model')}, {c.get('layers')} layers, {c.get('positional')} positions")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=120)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def summary_rows(result: dict[str, Any]) -> list[list[Any]]:
    """Table rows: variant, embedding params, total params, final val ppl, train time, tokens/s."""
    rows = []
    for v in result["variants"]:
        if v.get("skipped"):
            rows.append([v["name"], None, None, None, None, None, "skipped: " + v["skipped"]])
            continue
        rows.append([v["name"], v["embedding_params"], v["total_params"], v["final_val_ppl"],
                     round(v["train_time_s"], 1), round(v["tokens_per_s"] or 0.0), ""])
    return rows


def save_run(result: dict[str, Any], output: str | os.PathLike, models: dict[str, nn.Module] | None = None) -> Path:
    """Write ``results.json`` (and ``<variant>.safetensors`` weights when given) into a run folder.

    Refuses an existing non-empty folder unless it is an earlier ``embfactor train`` output.
    """
    from safetensors.torch import save as st_save

    from embfactor.fileio import atomic_write_bytes, atomic_write_json

    out = Path(output)
    if out.exists():
        if not out.is_dir():
            raise InvalidInputError(f"output {out} exists and is not a folder")
        if any(out.iterdir()) and not (out / "results.json").is_file():
            raise InvalidInputError(
                f"output folder {out} exists, is not empty and is not an 'embfactor train' output; choose a new folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    for name, model in (models or {}).items():
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(out / f"{name}.safetensors", st_save(state, metadata={"variant": name}))
    atomic_write_json(out / "results.json", {"embfactor_train": 1, **strip_models(result)})
    return out


def strip_models(result: dict[str, Any]) -> dict[str, Any]:
    """The result without the (non-serializable) trained models."""
    return {**result, "variants": [{k: v for k, v in r.items() if k != "model"} for r in result["variants"]]}
