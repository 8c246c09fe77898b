"""Sizes: parameters and bytes of models and embeddings."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of all tensors in the state dict, each shared storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def weights_bytes_on_disk(folder_or_file: Path) -> int | None:
    """Size of a model's weights on disk: the safetensors of a folder, or a GGUF file (None when there are none)."""
    p = Path(folder_or_file)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else ([p] if p.suffix.lower() in (".safetensors", ".gguf") else [])
    return sum(f.stat().st_size for f in files) if files else None
