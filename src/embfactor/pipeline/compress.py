"""compress: load a model, factorize its embedding (and tied head), optionally quantize, save; one report."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from embfactor.config import FactorizationConfig
from embfactor.decomposition import refuse_spectrum_target
from embfactor.errors import ConfigError
from embfactor.surgery.factorize import FactorizationReport


@dataclass
class CompressReport:
    """What :func:`compress` did: the factorization report plus the model, the sizes on disk and the time.

    ``to_dict()`` is the flat JSON the CLI prints and writes (``--json``).
    """

    model: str
    kind: str
    output: str | None
    factorization: FactorizationReport
    bytes_before: int
    bytes_after: int | None
    seconds: float
    quantization: dict[str, Any] | None = None
    rest: dict[str, Any] | None = None

    def model_bytes(self) -> dict[str, Any]:
        """The whole model's bytes on disk, input -> output (the report's first lines), and whether it grew."""
        after = self.bytes_after
        return {"input": self.bytes_before, "output": after, "larger": after is not None and after > self.bytes_before,
                "ratio": self.bytes_before / after if after else None}

    def to_dict(self) -> dict[str, Any]:
        # "bytes" first (and first in embfactor's sorted JSON): what a user who asked for a smaller model reads first
        d: dict[str, Any] = {"bytes": self.model_bytes()}
        d.update(self.factorization.to_dict())
        d.update(
            model=self.model, output=self.output, kind=self.kind, bytes_before=self.bytes_before,
            bytes_after=self.bytes_after, decompose_seconds=self.factorization.seconds, seconds=self.seconds,
        )
        if self.quantization is not None:
            d["quantization"] = self.quantization
        if self.rest is not None:
            d["rest"] = self.rest
        return d


def data_weights(lm: Any, methods: Sequence[str | None], texts: list[str] | None = None) -> torch.Tensor | None:
    """Token weights for the data-aware methods among ``methods`` (None when none is data-aware).

    The one place where embfactor decides that a method needs data: frequencies counted with the model's tokenizer
    on ``texts`` (default: the training part of the bundled Wikipedia extract).
    """
    from embfactor.decomposition import get_method

    if not any(m is not None and get_method(m).data_aware for m in methods):
        return None
    from embfactor.data.frequency import token_weights

    vocab = lm.model.get_input_embeddings().num_embeddings
    return token_weights(lm.tokenizer, texts, vocab_size=vocab)


def quantize_bits(quantize: str | int | None, config: FactorizationConfig) -> int | None:
    """The bits of ``--quantize`` (None for none); ConfigError when the method's format has no U·V to quantize."""
    if quantize is None:
        return None
    from embfactor.plan import wants_plan

    if wants_plan(config):
        raise ConfigError("--quantize does not apply to the planner (--size without --method, or --method auto): "
                          "its tiers are stored in int-k and codebook formats already")
    from embfactor.formats.quantized import parse_bits

    if config.method in ("pq", "rvq"):
        return 16  # codebooks, rotation and row scales stored as fp16 (codes are integers already)
    bits = parse_bits(quantize)
    if config.method in ("tt", "block", "int"):
        raise ConfigError(
            f"--quantize stores one U·V pair; it does not apply to --method {config.method} (use svd, eig, wsvd, ...)"
        )
    return bits


def compress(
    model: str | os.PathLike | Any,
    config: FactorizationConfig | None = None,
    output: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    quantize: str | int | None = None,
    text_files: Sequence[str] | None = None,
    rest: str = "auto",
    **target: Any,
) -> CompressReport:
    """Load ``model`` (a name, a path or a LoadedModel), factorize it, optionally quantize, and save to ``output``.

    Every check that needs no model (config, method options, --quantize, the output folder) runs before the load.

    Args:
        model: a bundled name (``minilm``), a local folder or GGUF file, or an :class:`embfactor.models.LoadedModel`
            (compressed in place).
        config: a FactorizationConfig; or give its fields as keywords (``ratio=6, method="svd"``).
        output: folder to save to (None: compress in memory only; the LoadedModel passed in holds the result).
        quantize: "int8"/"int4" to store the factors as per-row integers.
        text_files: text to count token frequencies on for data-aware methods (wsvd, block).
        rest: how the other weights are stored (:func:`embfactor.surgery.rest.store_rest_`): ``auto`` keeps the
            source's precision (bf16 for a GGUF source), ``bf16``/``fp16``/``fp32``, or ``int8``/``int4`` for every
            other nn.Linear's weight as integers.

    Example:
        >>> report = compress("minilm", ratio=6, output="out/minilm-r6")      # doctest: +SKIP
        >>> report.factorization.ratio                                       # doctest: +SKIP
        6.06...
    """
    from tqdm.auto import tqdm

    from embfactor.data import read_texts
    from embfactor.eval.size import tensor_bytes, weights_bytes_on_disk
    from embfactor.fileio import check_output_dir, release_mapped_pages
    from embfactor.models import LoadedModel, load_model, source_path
    from embfactor.plan import plan_compress_, wants_plan
    from embfactor.surgery import factorize_, get_meta, quantize_, save_compressed
    from embfactor.surgery.io import WEIGHTS_FILE
    from embfactor.surgery.rest import check_rest, store_rest_

    t0 = time.perf_counter()
    if config is None:
        config = FactorizationConfig(**target)
    elif target:
        raise ConfigError(f"give either config= or keyword settings ({', '.join(target)}), not both")
    bits = quantize_bits(quantize, config)  # a bad --quantize fails before the model is loaded
    check_rest(rest)
    # as does energy/max_error with method options that fix the size (factorize_ would refuse it after the load)
    refuse_spectrum_target(config.method, config.method_options, energy=config.energy, max_error=config.max_error)
    loaded = isinstance(model, LoadedModel)
    if output is not None and not loaded:
        check_output_dir(output, inputs=(source_path(str(model)),))  # cheap checks first: before load and decompose
    texts = read_texts(list(text_files)) if text_files else None
    stages = tqdm(total=3, desc="compress", unit="stage", disable=not progress, leave=False)
    stages.set_postfix_str(f"loading {model if not loaded else model.name}")
    lm = model if loaded else load_model(str(model))
    if output is not None:
        check_output_dir(output, inputs=(lm.source,))
    stages.update()
    bytes_before = weights_bytes_on_disk(lm.source) or tensor_bytes(lm.model)  # a GGUF source: the file
    stages.set_postfix_str("counting token frequencies" if config.method else "decomposing")
    weights = None if wants_plan(config) else data_weights(lm, [config.method], texts)
    stages.set_postfix_str("decomposing")
    dense = lm.model.get_input_embeddings()
    if wants_plan(config):  # --size without --method, or --method auto: the byte-budget planner
        rep = plan_compress_(lm, config, texts=texts, progress=stages.set_postfix_str)
    else:
        rep = factorize_(lm.model, config, progress=progress, token_weights=weights)
    meta = get_meta(lm.model)
    # recorded in embfactor.json's report, so /info (and any later reader) states the same "bytes before" as this run
    meta.report["bytes_before"] = bytes_before
    if lm.model.get_input_embeddings() is not dense:  # replaced: nothing uses the dense table any more
        release_mapped_pages(dense.weight)
    del dense
    stages.update()
    quant = quantize_(lm.model, bits) if bits is not None else None
    stored_rest = store_rest_(lm.model, rest, source=lm.source)
    out = None
    if output is not None:
        stages.set_postfix_str("saving")
        out = save_compressed(
            lm.model, output, tokenizer=lm.tokenizer, inputs=(lm.source,), extra={"source_model": lm.name}
        )
    stages.update()
    stages.close()
    return CompressReport(
        model=lm.name, kind=lm.kind, output=str(out) if out is not None else None, factorization=rep,
        bytes_before=bytes_before, bytes_after=(Path(out) / WEIGHTS_FILE).stat().st_size if out else None,
        seconds=time.perf_counter() - t0, quantization=quant, rest=stored_rest,
    )


__all__ = ["CompressReport", "compress", "data_weights", "quantize_bits"]
