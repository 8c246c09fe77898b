"""Healing checkpoints: the best model so far plus its classifier and resume state, written in one atomic swap.

The best model goes through :func:`embfactor.surgery.save_compressed`; the classifier (``classifier.*``) and the
training state (current and best trainable tensors, optimizer moments, step, elapsed time: ``heal_state.*``, no
pickles) are handed to it as extra files, so they land in the same temporary folder and appear together: a kill at
any moment leaves the complete earlier output or the complete new one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from embfactor.errors import CorruptFileError, InvalidInputError

STATE_TENSORS = "heal_state.safetensors"
STATE_JSON = "heal_state.json"
HEAD_FILE = "classifier.safetensors"
HEAD_JSON = "classifier.json"


def head_files(head_state: dict[str, torch.Tensor], classes: list[str]) -> dict[str, bytes]:
    """The classifier as file contents: its weights (safetensors) and classes/pooling (JSON)."""
    from safetensors.torch import save

    from embfactor.fileio import json_bytes

    meta = {"classes": classes, "pooling": "mean", "in_features": int(head_state["weight"].shape[1])}
    return {HEAD_FILE: save({k: v.contiguous() for k, v in head_state.items()}), HEAD_JSON: json_bytes(meta)}


def state_files(
    params: dict[str, nn.Parameter], best: dict[str, torch.Tensor], optimizer: Any, head: nn.Module | None,
    info: dict[str, Any],
) -> dict[str, bytes]:
    """The resume state as file contents (written into the checkpoint's temporary folder, swapped in with it)."""
    from safetensors.torch import save

    from embfactor.fileio import json_bytes

    tensors = {f"current.{k}": p.detach().cpu().contiguous() for k, p in params.items()}
    tensors.update({f"best.{k}": v.cpu().contiguous() for k, v in best.items()})
    if head is not None:
        tensors.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    sd = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0:
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{k}"] = float(v)
    meta = {**info, "param_names": list(params), "optimizer_scalars": scalars, "param_groups": sd["param_groups"]}
    return {STATE_TENSORS: save(tensors), STATE_JSON: json_bytes(meta)}


def read_state(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(heal_state.json, heal_state.safetensors) of an interrupted run's folder; clear errors if absent or corrupt."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (directory / STATE_JSON).is_file() or not (directory / STATE_TENSORS).is_file():
        raise InvalidInputError(f"cannot resume: {directory} holds no healing state ({STATE_JSON}, {STATE_TENSORS})")
    try:
        info = json.loads((directory / STATE_JSON).read_text())
        tensors = load_file(str(directory / STATE_TENSORS))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CorruptFileError(f"cannot resume from {directory}: corrupt healing state ({e})") from None
    return info, tensors


def restore_optimizer(optimizer: Any, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Load the optimizer moments and scalars that :func:`state_files` stored."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    for key, v in info.get("optimizer_scalars", {}).items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = torch.tensor(v)
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
