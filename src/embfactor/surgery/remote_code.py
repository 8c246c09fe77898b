"""Load an embfactor folder without embfactor: ``from_pretrained(folder, trust_remote_code=True)``.

embfactor copies this file into every folder it writes, as ``embfactor_remote.py``, and names its classes in
config.json's ``auto_map``. With ``trust_remote_code=True``, transformers' Auto classes (and sentence-transformers)
call :meth:`_RemoteAuto.from_pretrained` here: it decodes the stored table (and any Linear stored as integers) to a
dense tensor in plain PyTorch and returns the architecture's own transformers class holding it: the right model, at
the dense model's memory. With embfactor installed, ``import embfactor`` keeps the table compressed instead.

This module must not import embfactor (it runs where embfactor is not installed); it imports only torch,
safetensors and transformers. Its decoders mirror the storage formats of ``embfactor.formats`` (tests compare them
for every format). A format it does not know (``block``, ``tt``) is refused with an error that says what to install:
never a model with a table other than the stored one.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
# the zero-size tensor under this name (and under the dense table's own names) makes a plain transformers load fail
# instead of drawing a random table; its name is the instruction transformers' load report shows
GUARD_NOTE = "embfactor_compressed_table.load_after_import_embfactor_or_with_trust_remote_code_True"
INSTALL_HINT = "pip install embfactor, then `import embfactor` before from_pretrained"


class EmbfactorRemoteError(RuntimeError):
    """The folder cannot be decoded here (a format this file does not know, or weights that do not fit)."""


# --- integer unpacking (embfactor.quant) ----------------------------------------------------------------------------
def unpack_bits(p: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """(..., bytes) uint8 packed ``bits``-bit values, 8 values per ``bits`` bytes -> (..., cols) int64."""
    if bits == 8:
        return p[..., :cols].long()
    b = p.view(*p.shape[:-1], -1, bits).to(torch.int64)
    word = (b << (torch.arange(bits) * 8)).sum(-1, keepdim=True)
    v = (word >> (torch.arange(8) * bits)) & ((1 << bits) - 1)
    return v.view(*p.shape[:-1], -1)[..., :cols]


def dequantize_groups(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor | None, *, bits: int, cols: int,
                      group: int | None) -> torch.Tensor:
    """k-bit integers per group of ``group`` columns (None: per row), fp16 scale (and minimum) -> float32 rows."""
    groups = scale.shape[-1]
    g = group or cols
    q = unpack_bits(packed, bits, groups * g).view(*packed.shape[:-1], groups, g).float()
    if lo is None:
        out = (q - ((1 << (bits - 1)) - 1)) * scale.float()[..., None]
    else:
        out = q * scale.float()[..., None] + lo.float()[..., None]
    return out.reshape(*packed.shape[:-1], groups * g)[..., :cols]


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, *, bits: int, cols: int) -> torch.Tensor:
    """Per-row symmetric int8, or int4 two per byte (low nibble first, two's complement) -> float32."""
    if bits == 4:
        lo, hi = (q & 0xF).to(torch.int8), (q >> 4).to(torch.int8)
        lo, hi = torch.where(lo > 7, lo - 16, lo), torch.where(hi > 7, hi - 16, hi)
        q = torch.stack([lo, hi], dim=-1).flatten(-2)[..., :cols]
    return q.float() * scale.float()[..., None]


# --- storage formats (embfactor.formats) ----------------------------------------------------------------------------
class _Tensors:
    """The stored tensors under one module's prefix."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        self.tensors, self.prefix = tensors, prefix

    def __call__(self, name: str) -> torch.Tensor:
        key = f"{self.prefix}.{name}"
        if key not in self.tensors:
            raise EmbfactorRemoteError(f"the weights have no tensor {key!r}: the folder is incomplete")
        return self.tensors[key]

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(f"{self.prefix}.{name}")

    def sub(self, name: str) -> _Tensors:
        return _Tensors(self.tensors, f"{self.prefix}.{name}")


def _intk(t: _Tensors, rows: int, d: int, cfg: dict[str, Any]) -> torch.Tensor:
    return dequantize_groups(t("packed"), t("scale"), t.get("lo"), bits=cfg["bits"], cols=d, group=cfg.get("group"))


def _codebook(t: _Tensors, rows: int, d: int, cfg: dict[str, Any]) -> torch.Tensor:
    codes = t("codes").long()
    if t("codes").dtype == torch.int16:  # K > 256: stored shifted by -32,768
        codes = codes + 32768
    books = t("codebooks").float()
    scale = t.get("codebook_scale")
    if scale is not None:  # int8 codebooks times their column scales
        books = books * scale.float()
    S, M, K, sub = books.shape
    offsets = torch.arange(S * M).view(S, M) * K
    rows_ = torch.nn.functional.embedding(codes + offsets, books.reshape(S * M * K, sub))  # n × S × M × sub
    out = rows_.sum(1).reshape(codes.shape[0], M * sub)[:, :d]
    if t.get("rotation") is not None:
        out = out @ t("rotation").float().T
    if t.get("row_scale") is not None:
        out = out * t("row_scale").float()[:, None]
    return out


def _factorized(t: _Tensors, rows: int, d: int, cfg: dict[str, Any]) -> torch.Tensor:
    return t("U").float() @ t("V").float()


def _quantized(t: _Tensors, rows: int, d: int, cfg: dict[str, Any]) -> torch.Tensor:
    bits, r = int(cfg.get("bits", 8)), int(cfg["rank"])
    U = dequantize_rows(t("U_q"), t("U_scale"), bits=bits, cols=r)
    return U @ dequantize_rows(t("V_q"), t("V_scale"), bits=bits, cols=d)


def _zeros(t: _Tensors, rows: int, d: int, cfg: dict[str, Any]) -> torch.Tensor:
    return torch.zeros(rows, d)


def _tiered(t: _Tensors, rows: int, d: int, cfg: dict[str, Any]) -> torch.Tensor:
    specs = cfg["tiers"]
    parts = [decode_format(t.sub(f"tiers.{i}"), s["format"], int(s["rows"]), d, s["config"])
             for i, s in enumerate(specs)]
    table = torch.cat(parts)  # rows in the tier-concatenated order
    if cfg.get("compact_index"):
        bits = int(cfg.get("index_bits", 8))
        packed = t("tier_of")
        if bits == 8:
            tier = packed.long()
        else:
            per = 8 // bits
            shifts = (1 << (bits * torch.arange(per))).to(torch.int64)
            tier = ((packed.long()[:, None] // shifts) % (1 << bits)).reshape(-1)[:rows]
        onehot = torch.nn.functional.one_hot(tier, len(specs))
        rank = (onehot.cumsum(0) - 1).gather(1, tier[:, None]).squeeze(1)  # each token's index within its tier
        starts = torch.tensor([0, *torch.tensor([int(s["rows"]) for s in specs]).cumsum(0).tolist()])
        position = starts[tier] + rank
    else:
        position = t("position").long()
    return table[position]


_DECODERS = {"intk": _intk, "codebook": _codebook, "factorized": _factorized, "quantized": _quantized,
             "zeros": _zeros, "tiered": _tiered}


def decode_format(t: _Tensors, fmt: str, rows: int, d: int, cfg: dict[str, Any],
                  padding_idx: int | None = None) -> torch.Tensor:
    """The (rows × d) float32 table a stored format holds (its padding row zero where the format reads it so)."""
    if fmt not in _DECODERS:
        raise EmbfactorRemoteError(
            f"the table is stored in embfactor's {fmt!r} format, which this file cannot decode without embfactor "
            f"(it decodes {', '.join(sorted(_DECODERS))}): {INSTALL_HINT}"
        )
    out = _DECODERS[fmt](t, rows, d, cfg)
    if tuple(out.shape) != (rows, d):
        raise EmbfactorRemoteError(f"{t.prefix}: decoded {tuple(out.shape)}, expected ({rows}, {d})")
    if padding_idx is not None and (cfg.get("zero_padding_row") or (fmt == "tiered" and cfg.get("zero_padding", True))):
        out[padding_idx] = 0.0
    return out


# --- the folder -----------------------------------------------------------------------------------------------------
def read_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors (one file or shards), the guard tensors left out."""
    folder = Path(folder)
    files = [folder / WEIGHTS_FILE]
    if not files[0].is_file() and (folder / SHARD_INDEX).is_file():
        weight_map = json.loads((folder / SHARD_INDEX).read_text())["weight_map"]
        files = [folder / f for f in sorted(set(weight_map.values()))]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    out.pop(GUARD_NOTE, None)
    return out


def dense_state_dict(model: Any, tensors: dict[str, torch.Tensor], qc: dict[str, Any],
                     dtype: torch.dtype) -> dict[str, Any]:
    """The state dict of ``model`` (the uncompressed architecture): the table decoded (over the zero-size guard
    tensors under its dense names), the Linears stored as integers dequantized."""
    emb = qc["embedding_module"]
    table = decode_format(_Tensors(tensors, emb), qc["format"], int(qc["num_embeddings"]), int(qc["embedding_dim"]),
                          qc.get("format_config") or {}, qc.get("padding_idx"))
    out = {k: v for k, v in tensors.items() if not k.startswith(emb + ".")}
    out[f"{emb}.weight"] = table.to(dtype)
    if qc.get("tied_head") and qc.get("head_module"):
        out[f"{qc['head_module']}.weight"] = out[f"{emb}.weight"]
    for name in qc.get("shared_modules") or {}:
        out[f"{name}.weight"] = out[f"{emb}.weight"]
    rest = qc.get("rest") or {}
    settings = {"int8": (8, None, True), "int4": (4, 32, False)}
    for fqn in rest.get("linear_modules") or []:
        if rest.get("linear") not in settings:
            raise EmbfactorRemoteError(f"rest linear {rest.get('linear')!r} is unknown to this file: {INSTALL_HINT}")
        bits, group, symmetric = settings[rest["linear"]]
        t = _Tensors(tensors, fqn)
        w = dequantize_groups(t("weight"), t("weight_scale"), None if symmetric else t("weight_min"), bits=bits,
                              cols=model.get_submodule(fqn).in_features, group=group)
        out[f"{fqn}.weight"] = w.to(dtype)
        out.pop(f"{fqn}.weight_scale", None)
        out.pop(f"{fqn}.weight_min", None)
    return out


def load_model(auto_name: str, folder: str | os.PathLike, config: Any = None, **kwargs: Any) -> Any:
    """The architecture's own transformers class (through the Auto class ``auto_name``) with the table decoded."""
    import transformers
    from transformers import AutoConfig

    if config is None:
        config = AutoConfig.from_pretrained(folder)
    qc = getattr(config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    if not isinstance(qc, dict) or qc.get("quant_method") != "embfactor":
        raise EmbfactorRemoteError(f"{folder}: config.json has no embfactor quantization_config")
    config = copy.deepcopy(config)
    del config.quantization_config
    config.auto_map = None
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    cls = getattr(transformers, auto_name)._model_mapping[type(config)]
    model = cls._from_config(config, dtype=dtype)
    state = dense_state_dict(model, read_tensors(folder), qc, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and k not in state]
    if missing or unexpected:
        raise EmbfactorRemoteError(
            f"{folder}: the decoded weights do not fit {cls.__name__} (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}): {INSTALL_HINT}"
        )
    if kwargs.get("device_map") not in (None, "cpu"):
        model.to(kwargs["device_map"] if isinstance(kwargs["device_map"], str) else "cpu")
    return model.eval()


class _RemoteAuto:
    """What transformers' Auto classes call for a folder whose config.json maps them here (``auto_map``)."""

    auto_name = "AutoModel"

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = None) -> None:
        """Nothing to register: the returned model is the architecture's own class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        return load_model(cls.auto_name, pretrained_model_name_or_path, kwargs.pop("config", None), **kwargs)


def _auto(name: str) -> type:
    return type(name, (_RemoteAuto,), {"auto_name": name, "__doc__": f"{name} for an embfactor folder."})


AUTO_CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM",
                "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                "AutoModelForQuestionAnswering", "AutoModelForImageTextToText")
AutoModel = _auto("AutoModel")
AutoModelForCausalLM = _auto("AutoModelForCausalLM")
AutoModelForMaskedLM = _auto("AutoModelForMaskedLM")
AutoModelForSeq2SeqLM = _auto("AutoModelForSeq2SeqLM")
AutoModelForSequenceClassification = _auto("AutoModelForSequenceClassification")
AutoModelForTokenClassification = _auto("AutoModelForTokenClassification")
AutoModelForQuestionAnswering = _auto("AutoModelForQuestionAnswering")
AutoModelForImageTextToText = _auto("AutoModelForImageTextToText")
