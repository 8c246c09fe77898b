"""transformers integration: the HfQuantizer of embfactor's ``quantization_config`` (:mod:`embfactor.surgery.qconfig`).

``from_pretrained`` builds the model on the meta device, calls :meth:`EmbfactorHfQuantizer.preprocess_model` (which
swaps the dense embedding for ``get_format(format).empty(...)`` and the tied head for a ``FactorizedLMHead``), then
loads the safetensors into the new module's tensors by name, then calls ``postprocess_model``. Every storage format
goes through this one path: nothing here knows a format beyond its registered name, its ``format_config()`` and its
``empty(vocab, d, padding_idx, **format_config)``.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from embfactor.errors import CorruptFileError
from embfactor.surgery.qconfig import EmbfactorConfig, format_class
from embfactor.surgery.rest import build_rest_structure_
from embfactor.surgery.share import guard_keys, guard_tensors


def build_structure_(model: nn.Module, qconfig: EmbfactorConfig, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Swap the dense embedding (and tied head) of a freshly built model for the format's empty module, in place.

    Used by the quantizer on the meta device and usable on any device: the module's tensors are left for the
    weights loader to fill. Returns the new embedding module.
    """
    from embfactor.surgery.replace import apply_structure_

    cls = format_class(qconfig.format)
    try:
        dense = model.get_submodule(qconfig.embedding_module)
    except AttributeError:
        raise CorruptFileError(
            f"quantization_config names the embedding {qconfig.embedding_module!r}, which {type(model).__name__} "
            "does not have"
        ) from None
    vocab = qconfig.num_embeddings if qconfig.num_embeddings is not None else getattr(dense, "num_embeddings", None)
    d = qconfig.embedding_dim if qconfig.embedding_dim is not None else getattr(dense, "embedding_dim", None)
    if (getattr(dense, "num_embeddings", None), getattr(dense, "embedding_dim", None)) != (vocab, d):
        raise CorruptFileError(
            f"quantization_config describes a {vocab}×{d} embedding, but {qconfig.embedding_module!r} of "
            f"{type(model).__name__} is {getattr(dense, 'num_embeddings', '?')}×{getattr(dense, 'embedding_dim', '?')}"
        )
    device = next((t.device for t in dense.parameters()), torch.device("cpu"))
    dtype = dtype or next((t.dtype for t in dense.parameters()), None)
    try:
        try:
            new = cls.empty(vocab, d, qconfig.padding_idx, device=device, dtype=dtype, **qconfig.format_config)
        except (RuntimeError, NotImplementedError):
            if device.type != "meta":
                raise
            # A format whose constructor reads tensor values (the block format checks its permutation) cannot be
            # built on the meta device: build it on the CPU (its compressed size), the loader replaces the tensors.
            # Random initialization is skipped: it cost 0.12 s of SmolLM2's 0.37 s block-format load, now 2 ms.
            with torch.device("cpu"), _no_init():
                new = cls.empty(vocab, d, qconfig.padding_idx, device="cpu", dtype=dtype, **qconfig.format_config)
    except TypeError as e:
        raise CorruptFileError(
            f"quantization_config format_config {qconfig.format_config!r} does not fit format {qconfig.format!r} ({e})"
        ) from None
    apply_structure_(model, embedding_module=qconfig.embedding_module, new_embedding=new,
                     tied_head=qconfig.tied_head, head_module=qconfig.head_module, embed_scale=qconfig.embed_scale,
                     shared_modules=qconfig.shared_modules)
    return new


def _no_init() -> contextlib.AbstractContextManager[Any]:
    """transformers' switch that turns torch.nn.init functions into no-ops (values are loaded right after)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # another transformers version: initialize, only slower
        return contextlib.nullcontext()
    return no_init_weights()


def _non_persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.{name}" if prefix else name: buf
        for prefix, sub in module.named_modules()
        for name, buf in sub._buffers.items()
        if buf is not None and name in sub._non_persistent_buffers_set
    }


class EmbfactorHfQuantizer(HfQuantizer):
    """Rebuilds an embfactor storage format in place of the dense embedding before transformers loads weights.

    Nothing is quantized at load time (``pre_quantized`` folders only): the checkpoint already holds the format's
    tensors under the module's own names, so transformers' loader fills them like any other parameter.
    """

    requires_calibration = True  # only folders written by embfactor; from_pretrained(quantization_config=) cannot compress

    def __init__(self, quantization_config: EmbfactorConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._derived: dict[str, torch.Tensor] = {}

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        qc = self.quantization_config
        # the zero-size guard tensors under the table's dense names (embfactor.surgery.share) are not model tensors
        model._keys_to_ignore_on_load_unexpected = {
            *(model._keys_to_ignore_on_load_unexpected or ()), *(rf"^{re.escape(k)}$" for k in guard_keys(qc))
        }
        new = build_structure_(model, qc, dtype=kwargs.get("dtype"))
        build_rest_structure_(model, qc.rest, dtype=kwargs.get("dtype"))
        new.awaiting_weights = True  # until _process_model_after_weight_loading: see RowFormat.weight
        # Non-persistent buffers are derived from the format's config (e.g. the block format's bucket starts), not
        # saved; transformers re-creates them uninitialized after loading, so compute them here on the CPU from a
        # small real instance and put them back afterwards.
        if _non_persistent_buffers(new):
            real = new
            if any(t.device.type == "meta" for t in _non_persistent_buffers(new).values()):
                with torch.device("cpu"):
                    real = format_class(qc.format).empty(
                        new.num_embeddings, new.embedding_dim, qc.padding_idx, device="cpu", **qc.format_config
                    )
            self._derived = {k: v.clone() for k, v in _non_persistent_buffers(real).items()}
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from embfactor.surgery.meta import CompressionMeta, set_meta

        qc = self.quantization_config
        layer = model.get_submodule(qc.embedding_module)
        for name, value in self._derived.items():
            owner, _, attr = name.rpartition(".")
            sub = layer.get_submodule(owner) if owner else layer
            current = sub._buffers[attr]
            sub._buffers[attr] = value.to(current.device if current.device.type != "meta" else "cpu")
        layer.awaiting_weights = False
        set_meta(model, CompressionMeta(
            embedding_module=qc.embedding_module, head_module=qc.head_module, tied_head=qc.tied_head,
            rank=qc.meta.get("rank", qc.format_config.get("rank")), method=qc.meta.get("method", qc.format),
            factorization=qc.meta.get("factorization", {}), rest=dict(qc.rest), embed_scale=qc.embed_scale,
            shared_modules=qc.shared_modules,
        ))
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
        """``save_pretrained`` stores the guard tensors too: a folder it writes fails loudly without embfactor."""
        from embfactor.surgery.meta import get_meta

        meta = get_meta(model)
        return ({**model.state_dict(), **guard_tensors(meta)}, {}) if meta is not None else (None, {})

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True
