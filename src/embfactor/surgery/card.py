"""The model card (README.md) of every folder embfactor writes: what was done, what it cost, how to load it.

Written by :func:`embfactor.surgery.save_compressed` from the record it writes to embfactor.json (so ``compress``,
``heal``, the table-only path and ``upgrade`` all get one, and a heal's card carries the heal's figures), through
``huggingface_hub``'s :class:`~huggingface_hub.ModelCard`: YAML metadata a hub reads (``base_model`` where known,
``library_name``, ``pipeline_tag``, ``tags``, the source's ``license`` and ``language``), then the plan, the bytes
before and after, the verified quality with its protocol, and how to load the folder with and without embfactor.
The source model's own card is kept below ours, never lost (from an earlier embfactor card, only that part).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"
MARKER = "<!-- embfactor model card -->"
ORIGINAL_HEADING = "## The original model's card"
# bundled model names -> their hub ids (for ``base_model``); a local folder names none unless its config does
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# metadata of the source's card that stays true of the compressed model
_KEPT = ("license", "language", "datasets")


def describe_plan(plan: dict[str, Any]) -> list[list[Any]]:
    """Rows (tier, format, rows, token mass, bytes) of a recorded plan, for ``inspect``, the compress report and the
    card."""
    rows = []
    for i, t in enumerate(plan.get("tiers", [])):
        rows.append([i, t.get("label", t.get("format")), f"{t['rows']:,}", f"{100 * t.get('token_mass', 0):.1f}%",
                     f"{t['bytes']:,}"])
    return rows


def _mb(n: Any) -> str:
    return f"{n / 1e6:,.2f} MB" if isinstance(n, (int, float)) else "?"


def _split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(YAML metadata, body) of a card; ({}, text) when it has none or it does not parse."""
    import yaml

    m = re.match(r"^---\s*\n(.*?)\n---\s*\n?", text, flags=re.S)
    if not m:
        return {}, text
    try:
        data = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return {}, text
    return (data if isinstance(data, dict) else {}), text[m.end():]


def source_card(folder: Path | None) -> tuple[dict[str, Any], str]:
    """(metadata, body) of the source model's card in ``folder``; of an embfactor card, only the original's part."""
    path = folder / CARD_FILE if folder is not None and folder.is_dir() else None
    if path is None or not path.is_file():
        return {}, ""
    meta, body = _split_front_matter(path.read_text(encoding="utf-8", errors="replace"))
    if MARKER in body:  # our own card (an output compressed or healed again): keep what it kept
        _, _, body = body.partition(ORIGINAL_HEADING)
        meta = {k: v for k, v in meta.items() if k in _KEPT}
    return meta, body.strip()


def _pipeline_tag(record: dict[str, Any], sentence_transformers: bool) -> str:
    if record.get("tied_head") or record.get("architecture", "").endswith(("ForCausalLM", "LMHeadModel")):
        return "text-generation"
    return "sentence-similarity" if sentence_transformers else "feature-extraction"


def _quality(verified: dict[str, Any] | None) -> list[str]:
    if not verified:
        return ["Not verified: the folder was written with `--no-verify` (or by an API call without a check). Run "
                "`embfactor evaluate FOLDER --reference SOURCE` to measure it."]
    measured = verified.get("measured") or {}
    figures = ", ".join(f"{k} **{v:.4f}**" if isinstance(v, float) else f"{k} {v}" for k, v in measured.items())
    out = [f"Measured on the written folder, loaded as users load it ({verified.get('loaded_with', 'from_pretrained')}"
           f"), against the original model's outputs: {figures or 'see embfactor.json'}."]
    if verified.get("metric") == "fidelity":
        out.append("Fidelity is the mean cosine of the mean-pooled sentence embeddings to the original's.")
    elif verified.get("metric") == "kl":
        out.append("KL is KL(original ‖ this model) of the next-token distributions per position, in nats; "
                   "top-1 agreement is how often both predict the same next token.")
    if verified.get("text"):
        out.append(f"Text: {verified['text']} (never seen by the compression).")
    return out


def render_card(record: dict[str, Any], *, folder_bytes: int, sentence_transformers: bool,
                source: Path | None) -> Any:
    """The :class:`huggingface_hub.ModelCard` of a folder whose embfactor.json is ``record``."""
    from huggingface_hub import ModelCard, ModelCardData

    report = record.get("report") or {}
    source_name = str(record.get("source_model") or report.get("model") or "")
    kept, original = source_card(source)
    base = HUB_IDS.get(source_name)
    data = ModelCardData(
        base_model=base, library_name="sentence-transformers" if sentence_transformers else "transformers",
        pipeline_tag=_pipeline_tag(record, sentence_transformers),
        tags=["embfactor", "compressed-embeddings", "embedding-compression"],
        **{k: v for k, v in kept.items() if k in _KEPT},
    )
    vocab, d = record.get("vocab_size"), record.get("hidden_size")
    ratio = report.get("bytes_ratio")
    title = f"{base or Path(source_name).name or record.get('architecture', 'model')}, embedding table compressed"
    title += f" {ratio:.2f}× by embfactor" if isinstance(ratio, (int, float)) else " by embfactor"
    lines = [
        MARKER, f"# {title}", "",
        f"This folder is {f'`{base}`' if base else 'a ' + str(record.get('architecture', 'Transformer'))} with its "
        f"token-embedding table ({vocab:,} × {d:,}) stored in embfactor's `{record.get('layer_type')}` format "
        f"(method `{record.get('method')}`), written by embfactor {record.get('embfactor_version', '')}. "
        "Every other weight is as the source stored it"
        + (f" ({record['rest'].get('linear')} Linears)." if (record.get("rest") or {}).get("linear") else "."), "",
        "| | before | after |", "|---|---:|---:|",
        f"| embedding table | {_mb(report.get('embedding_bytes_before'))} | {_mb(report.get('embedding_bytes_after'))}"
        + (f" ({ratio:.2f}× fewer bytes than fp32)" if isinstance(ratio, (int, float)) else "") + " |",
        f"| model weights on disk | {_mb(report.get('bytes_before'))} | {_mb(folder_bytes)} |", "",
    ]
    plan = describe_plan(report.get("plan") or {})
    if plan:
        lines += ["## Plan (tiers by token frequency)", "", "| tier | format | rows | token mass | bytes |",
                  "|---|---|---:|---:|---:|", *(f"| {' | '.join(map(str, r))} |" for r in plan), ""]
    lines += ["## Quality", "", *_quality(record.get("verified")), ""]
    lines += _how_to_load(record, sentence_transformers)
    if original:
        lines += ["", ORIGINAL_HEADING, "", original]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines) + "\n")


def _how_to_load(record: dict[str, Any], sentence_transformers: bool) -> list[str]:
    auto = "AutoModelForCausalLM" if _pipeline_tag(record, False) == "text-generation" else "AutoModel"
    if sentence_transformers:
        plain, remote = ('model = SentenceTransformer("FOLDER")',
                         'model = SentenceTransformer("FOLDER", trust_remote_code=True)')
        imp = "from sentence_transformers import SentenceTransformer"
    else:
        plain, remote = (f'model = {auto}.from_pretrained("FOLDER")',
                         f'model = {auto}.from_pretrained("FOLDER", trust_remote_code=True)')
        imp = f"from transformers import {auto}"
    return [
        "## How to load", "",
        "With embfactor installed (`pip install embfactor`), the table stays compressed in memory:", "",
        "```python", "import embfactor  # registers the loader with transformers", imp, plain, "```", "",
        "Without embfactor, the shipped `embfactor_remote.py` decodes the table to a dense one (the dense model's "
        "memory, the same outputs):", "",
        "```python", imp, remote, "```", "",
        "A load with neither fails on purpose: the table's dense names hold zero-size tensors, so transformers "
        "reports a size mismatch instead of drawing a random table. `embfactor export FOLDER --onnx` writes an "
        "ONNX file with the table still compressed.",
    ]


def write_card(folder: Path, record: dict[str, Any], *, source: Path | None) -> None:
    """Write ``folder/README.md`` for ``record`` (its weight files counted as the bytes after, as compress reports)."""
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    card = render_card(record, folder_bytes=size, sentence_transformers=(folder / "modules.json").is_file(),
                       source=source)
    (folder / CARD_FILE).write_text(str(card), encoding="utf-8")
