"""The ``quantization_config`` record of a compressed model: which storage format holds the embedding, and where.

surgery owns it: ``factorize_``, ``quantize_`` and ``save_compressed`` write it into the model's config
(:func:`embfactor.surgery.integration.attach_quantization_config`), :mod:`embfactor.surgery.loading` reads it back.
:mod:`embfactor.hf` registers it with transformers, together with the HfQuantizer that rebuilds the structure it
names; the imports point one way, hf -> surgery (tests/test_imports.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from embfactor.errors import ConfigError, CorruptFileError

if TYPE_CHECKING:
    from embfactor.surgery.meta import CompressionMeta

# The quant_method of the record; embfactor.hf.hook registers the config and the quantizer under the same name.
QUANT_METHOD = "embfactor"
# Version of the quantization_config layout below; a folder with a newer one was written by a newer embfactor.
# 2: ``rest`` may name Linears stored as integers (IntKLinear), or the config has embed_scale/shared_modules; a
# folder that needs none of them is still written as version 1, so that earlier embfactors load it, and one that
# needs them is refused by those (they would drop the scale or the integer Linears silently).
HF_FORMAT_VERSION = 2
_FIELDS = ("format", "format_config", "num_embeddings", "embedding_dim", "padding_idx", "embedding_module",
           "head_module", "tied_head", "embed_scale", "shared_modules")


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
        embed_scale: what the replaced embedding multiplied its lookup by (None, a float, or one per column).
        shared_modules: other input modules reading the same table, name -> their embed_scale (T5, BART).
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
        embed_scale: float | list[float] | None = None,
        shared_modules: dict[str, Any] | None = None,
        format_version: int | None = None,
        embfactor_version: str | None = None,
        meta: dict[str, Any] | None = None,
        rest: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        if format_version is None:  # a new config: the oldest layout that holds it
            needs_2 = embed_scale is not None or bool(shared_modules)
            format_version = max(rest_format_version(rest), 2 if needs_2 else 1)
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
        if not _is_scale(embed_scale) or not isinstance(shared_modules or {}, dict) or not all(
            isinstance(k, str) and _is_scale(v) for k, v in (shared_modules or {}).items()
        ):
            raise ConfigError(
                f"quantization_config embed_scale must be null, a number or a list of numbers, and shared_modules an "
                f"object of module name -> such a scale; got {embed_scale!r} and {shared_modules!r}"
            )
        self.quant_method = QUANT_METHOD
        self.format = format
        self.format_config = dict(format_config)
        self.num_embeddings = None if num_embeddings is None else int(num_embeddings)
        self.embedding_dim = None if embedding_dim is None else int(embedding_dim)
        self.padding_idx = padding_idx
        self.embedding_module = embedding_module
        self.head_module = head_module if tied_head else None
        self.tied_head = bool(tied_head)
        self.embed_scale = embed_scale
        self.shared_modules = dict(shared_modules or {})
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
            head_module=meta.head_module, tied_head=meta.tied_head, embed_scale=meta.embed_scale,
            shared_modules=meta.shared_modules,
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
            tied_head=bool(record.get("tied_head")), embed_scale=record.get("embed_scale"),
            shared_modules=record.get("shared_modules"), embfactor_version=record.get("embfactor_version"),
            meta={k: record[k] for k in ("method", "rank", "factorization") if k in record},
            rest=record.get("rest") or {},
        )


def rest_format_version(rest: dict[str, Any] | None) -> int:
    """The quantization_config version a folder needs: 2 with integer Linears, else 1 (which older embfactors read)."""
    return 2 if isinstance(rest, dict) and rest.get("linear_modules") else 1


def _is_scale(v: Any) -> bool:
    """None, a number, or a non-empty list of numbers: what an ``embed_scale`` may be."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    return v is None or number(v) or (isinstance(v, list) and bool(v) and all(number(x) for x in v))
