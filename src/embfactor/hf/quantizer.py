"""transformers integration: a ``quantization_config`` naming the embedding's storage format, and its HfQuantizer.

``from_pretrained`` builds the model on the meta device, calls :meth:`EmbfactorHfQuantizer.preprocess_model` (which
swaps the dense embedding for ``get_format(format).empty(...)`` and the tied head for a ``FactorizedLMHead``), then
loads the safetensors into the new module's tensors by name, then calls ``postprocess_model``. Every storage format
goes through this one path: nothing here knows a format beyond its registered name, its ``format_config()`` and its
``empty(vocab, d, padding_idx, **format_config)``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from embfactor.errors import ConfigError, CorruptFileError
from embfactor.hf.hook import QUANT_METHOD

if TYPE_CHECKING:
    from embfactor.surgery.meta import CompressionMeta

# Version of the quantization_config layout below; a folder with a newer one was written by a newer embfactor.
# 2: ``rest`` may name Linears stored as integers (IntKLinear); a folder without them is written as version 1, which
# every earlier embfactor reads.
HF_FORMAT_VERSION = 2
_FIELDS = ("format", "format_config", "num_embeddings", "embedding_dim", "padding_idx", "embedding_module",
           "head_module", "tied_head")


def format_class(name: str) -> type[nn.Module]:
    """The module class of a registered storage format (an unknown name raises, listing the valid ones)."""
    from embfactor.formats import get_format

    return get_format(name)


def format_of(layer: nn.Module) -> tuple[str, dict[str, Any]]:
    """(format name, format config) of an embfactor embedding module: what ``empty`` needs besides the sizes."""
    return layer.format_name, dict(layer.format_config())


class EmbfactorConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a compressed folder: which format stores the embedding, and where it sits.

    Args:
        format: registered storage format name (``embfactor.formats.available_formats()``).
        format_config: the format's settings beyond the sizes (its ``format_config()``).
        num_embeddings, embedding_dim, padding_idx: the table's shape and padding row (a size of None: the size of
            the model's embedding, for records whose sizes are checked after loading).
        embedding_module: fully qualified name of the input embedding in the model.
        head_module: name of the output head tied to it (None when the head is not tied).
        tied_head: whether the head is a FactorizedLMHead sharing the embedding's tensors.
        format_version: layout version of this config (a newer one needs a newer embfactor); default: the oldest
            that holds it.
        embfactor_version: the embfactor version that wrote the folder (for error messages).
        rest: how the other weights are stored (:func:`embfactor.surgery.rest.store_rest_`); its
            ``linear_modules`` are rebuilt as integer Linears before the weights load.

    Example:
        >>> cfg = EmbfactorConfig(format="factorized", format_config={"rank": 8}, num_embeddings=100,
        ...                       embedding_dim=32, embedding_module="embed")
        >>> cfg.to_dict()["quant_method"]
        'embfactor'
    """

    def __init__(
        self,
        format: str,
        format_config: dict[str, Any],
        num_embeddings: int | None,
        embedding_dim: int | None,
        embedding_module: str,
        padding_idx: int | None = None,
        head_module: str | None = None,
        tied_head: bool = False,
        format_version: int | None = None,
        embfactor_version: str | None = None,
        meta: dict[str, Any] | None = None,
        rest: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        if format_version is None:  # the oldest layout that holds this config
            format_version = rest_format_version(rest)
        written_by = f"written by embfactor {embfactor_version}" if embfactor_version else "written by embfactor"
        if not isinstance(format_version, int) or format_version > HF_FORMAT_VERSION:
            from embfactor import __version__

            raise CorruptFileError(
                f"quantization_config format_version {format_version!r} ({written_by}) is newer than this embfactor "
                f"{__version__} reads ({HF_FORMAT_VERSION}): upgrade embfactor (pip install -U embfactor)"
            )
        if not isinstance(format, str) or not isinstance(format_config, dict):
            raise ConfigError(
                f"quantization_config needs a format name and a format_config object, got {format!r} and "
                f"{format_config!r}"
            )
        if not isinstance(embedding_module, str) or not embedding_module:
            raise ConfigError(f"quantization_config embedding_module must be a module name, got {embedding_module!r}")
        if tied_head and not head_module:
            raise ConfigError("quantization_config tied_head=true needs head_module (the output head's name)")
        self.quant_method = QUANT_METHOD
        self.format = format
        self.format_config = dict(format_config)
        self.num_embeddings = None if num_embeddings is None else int(num_embeddings)
        self.embedding_dim = None if embedding_dim is None else int(embedding_dim)
        self.padding_idx = padding_idx
        self.embedding_module = embedding_module
        self.head_module = head_module if tied_head else None
        self.tied_head = bool(tied_head)
        self.format_version = format_version
        self.embfactor_version = embfactor_version
        # what embfactor's tools read back (method, rank, factorization settings); not needed to rebuild the model
        self.meta = dict(meta or {})
        if rest is not None and not isinstance(rest, dict):
            raise ConfigError(f"quantization_config rest must be an object, got {rest!r}")
        self.rest = dict(rest or {})
        self.extra = kwargs  # unknown keys from a newer writer are kept (and written back), not lost

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("quant_method", *_FIELDS, "format_version", "embfactor_version", "meta")}
        if self.rest:
            d["rest"] = self.rest
        return {**self.extra, **d}

    @classmethod
    def from_model(cls, model: nn.Module, meta: CompressionMeta) -> EmbfactorConfig:
        """The config describing a model factorized in this session (``meta``: its embfactor metadata)."""
        from embfactor import __version__

        layer = model.get_submodule(meta.embedding_module)
        name, config = format_of(layer)
        keep = {"method": meta.method, "rank": meta.rank, "factorization": meta.factorization}
        return cls(
            format=name, format_config=config, num_embeddings=layer.num_embeddings, embedding_dim=layer.embedding_dim,
            padding_idx=layer.padding_idx, embedding_module=meta.embedding_module,
            head_module=meta.head_module, tied_head=meta.tied_head,
            embfactor_version=__version__, meta=keep, rest=meta.rest,
        )

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> EmbfactorConfig:
        """The config equivalent to an embfactor.json record (folders written before config.json carried one).

        The sizes come from the model (as embfactor 0.1.0 rebuilt them); the record's own sizes are checked against
        the loaded embedding afterwards (:func:`embfactor.surgery.io.check_record_against_model`).
        """
        return cls(
            format=record["layer_type"], format_config=record["layer_config"], num_embeddings=None,
            embedding_dim=None, padding_idx=record.get("padding_idx"),
            embedding_module=record["embedding_module"], head_module=record.get("head_module"),
            tied_head=bool(record.get("tied_head")), embfactor_version=record.get("embfactor_version"),
            meta={k: record[k] for k in ("method", "rank", "factorization") if k in record},
            rest=record.get("rest") or {},
        )


def rest_format_version(rest: dict[str, Any] | None) -> int:
    """The quantization_config version a folder needs: 2 with integer Linears, else 1 (which older embfactors read)."""
    return 2 if isinstance(rest, dict) and rest.get("linear_modules") else 1


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
                     tied_head=qconfig.tied_head, head_module=qconfig.head_module)
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
        from embfactor.surgery.rest import build_rest_structure_

        qc = self.quantization_config
        new = build_structure_(model, qc, dtype=kwargs.get("dtype"))
        build_rest_structure_(model, qc.rest, dtype=kwargs.get("dtype"))
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
        set_meta(model, CompressionMeta(
            embedding_module=qc.embedding_module, head_module=qc.head_module, tied_head=qc.tied_head,
            rank=qc.meta.get("rank", qc.format_config.get("rank")), method=qc.meta.get("method", qc.format),
            factorization=qc.meta.get("factorization", {}), rest=dict(qc.rest),
        ))
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True
