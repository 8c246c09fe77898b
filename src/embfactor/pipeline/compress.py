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
from embfactor.data import read_texts
from embfactor.decomposition import refuse_spectrum_target
from embfactor.errors import ConfigError, InvalidInputError
from embfactor.fileio import check_output_dir
from embfactor.plan import wants_plan
from embfactor.plan.selfcal import calibration_texts, check_calibration
from embfactor.surgery import quantize_
from embfactor.surgery.factorize import FactorizationReport
from embfactor.surgery.io import WEIGHTS_FILE
from embfactor.surgery.rest import check_rest, store_rest_


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
    stages: dict[str, float] | None = None  # seconds of loading and saving (the planner's own stages are its report's)
    verified: dict[str, Any] | None = None
    size_choice: dict[str, Any] | None = None
    rest: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None  # which calibration text (--calibration), and the samples drawn

    def model_bytes(self) -> dict[str, Any]:
        """The whole model's bytes on disk, input -> output (the report's first lines), and whether it grew."""
        after = self.bytes_after
        return {"input": self.bytes_before, "output": after, "larger": after is not None and after > self.bytes_before,
                "ratio": self.bytes_before / after if after else None}

    def to_dict(self) -> dict[str, Any]:
        # "bytes" first (and first in embfactor's sorted JSON): what a user who asked for a smaller model reads first;
        # then the written model's verified figure
        d: dict[str, Any] = {"bytes": self.model_bytes()}
        if self.verified is not None:
            d["verified"] = self.verified
        d.update(self.factorization.to_dict())
        d.update(
            model=self.model, output=self.output, kind=self.kind, bytes_before=self.bytes_before,
            bytes_after=self.bytes_after, decompose_seconds=self.factorization.seconds, seconds=self.seconds,
        )
        if self.stages:
            d["stage_seconds"] = {**self.stages, **d.get("stage_seconds", {})}
        if self.calibration is not None:
            d["calibration_source"] = self.calibration
        if self.quantization is not None:
            d["quantization"] = self.quantization
        if self.size_choice is not None:
            d["size_choice"] = self.size_choice
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


def _checked_settings(
    config: FactorizationConfig | None, target: dict[str, Any], quantize: str | int | None, rest: str = "auto"
) -> tuple[FactorizationConfig, int | None]:
    """(config, --quantize bits) of :func:`compress`, checked without the model (cheap checks before the load)."""
    if config is None:
        config = FactorizationConfig(**target)
    elif target:
        raise ConfigError(f"give either config= or keyword settings ({', '.join(target)}), not both")
    bits = quantize_bits(quantize, config)  # a bad --quantize (or --rest) fails before the model is loaded
    check_rest(rest)
    # as does energy/max_error with method options that fix the size (factorize_ would refuse it after the load)
    refuse_spectrum_target(config.method, config.method_options, energy=config.energy, max_error=config.max_error)
    return config, bits


def _refuse_before_work(lm: Any, texts: list[str] | None, output: Any, *, verifying: bool) -> None:
    """Refused before any work on the loaded model: an output inside its folder, what a format cannot reproduce (an
    embedding that does more than scale its lookup), and text its tokenizer cannot encode (:func:`check_tokenizer`)."""
    from embfactor.surgery import find_embedding_and_head
    from embfactor.surgery.conform import table_readers

    if output is not None:
        check_output_dir(output, inputs=(lm.source,))
    site = find_embedding_and_head(lm.model)
    table_readers(lm.model, site.embedding, site.embedding_module, site.head)
    check_tokenizer(lm, texts, verifying=verifying)


def compress(
    model: str | os.PathLike | Any,
    config: FactorizationConfig | None = None,
    output: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    quantize: str | int | None = None,
    text_files: Sequence[str] | None = None,
    table_only: bool | None = None,
    verify: int | bool | None = None,
    rest: str = "auto",
    calibration: str = "bundled",
    calibration_tokens: int | None = None,
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
        table_only: True: the table-only path (:mod:`.table_only`: the planner's proxy, the other tensors copied);
            None: taken when the float32 model would not fit in memory; False: always load the model.
        verify: held-out samples the written folder is scored on against the original (:mod:`embfactor.verify`; None/True:
            64 passages or 2 windows; 0/False: skip); VerificationError, writing nothing, when it is far worse.
        rest: how the other weights are stored (:func:`embfactor.surgery.rest.store_rest_`): ``auto`` (the source's
            precision; a GGUF's quantized Linears as int4/int8, the rest bf16), ``bf16``/``fp16``/``fp32``, or
            ``int8``/``int4`` (the other nn.Linears' weights).
        calibration: ``bundled`` (the given text) or ``self`` (with a decoder's own samples, ``calibration_tokens``
            of them, None: ``selfcal.DEFAULT_TOKENS``; :mod:`~.selfcal`).

    Example:
        >>> import embfactor as ef
        >>> report = ef.compress("minilm", size="8x", output="out/minilm-8x")    # doctest: +SKIP
        >>> report.verified["measured"]["fidelity"], report.to_dict()["bytes_ratio"]   # doctest: +SKIP
        (0.999..., 8.0...)
    """
    from tqdm.auto import tqdm

    from embfactor.models import LoadedModel, load_model, source_path

    t0 = time.perf_counter()
    config, bits = _checked_settings(config, target, quantize, rest)
    self_settings = check_calibration(calibration, tokens=calibration_tokens)
    loaded = isinstance(model, LoadedModel)
    if output is not None and not loaded:
        check_output_dir(output, inputs=(source_path(str(model)),))  # cheap checks first: before load and decompose
    texts = read_texts(list(text_files)) if text_files else None
    if (reason := None if loaded else table_only_reason(model, config, output, table_only, quantize=bits, rest=rest)):
        return _compress_table_only(model, config, output, texts, reason, progress, t0, calibration)
    checking = output is not None and verify is not False and verify != 0
    stages = tqdm(total=3 + checking, desc="compress", unit="stage", disable=not progress, leave=False,
                  postfix=f"loading {model if not loaded else model.name}")
    lm = model if loaded else load_model(str(model))
    seconds = {"load": time.perf_counter() - t0}
    _refuse_before_work(lm, texts, output, verifying=checking)
    texts, calibration_record = calibration_texts(lm, calibration, texts, self_settings)  # self: samples join
    stages.update()
    verifier = _verifier(lm, verify, stages, config, texts) if checking else None  # the original's outputs first
    rep, bytes_before = _compress_in_place(lm, config, texts, progress, stages, getattr(verifier, "check", None))
    choice = None if wants_plan(config) else size_choice_of(config, rep.to_dict())
    stages.update()
    quant = quantize_(lm.model, bits) if bits is not None else None
    stored = store_rest_(lm.model, rest, source=lm.source)  # before the prediction: what is written includes it
    out = _predict(verifier, lm, rep, stored, stages) if verifier is not None else None
    if output is not None:
        out, seconds["save"] = _save(lm, output, verifier, stages)
    stages.update(), stages.close()
    return CompressReport(
        model=lm.name, kind=lm.kind, output=str(out) if out is not None else None, factorization=rep,
        bytes_before=bytes_before, bytes_after=(Path(out) / WEIGHTS_FILE).stat().st_size if out else None,
        seconds=time.perf_counter() - t0, quantization=quant, verified=verifier.result if verifier else None,
        size_choice=choice, stages={k: round(v, 2) for k, v in seconds.items()}, rest=stored,
        calibration=calibration_record,
    )


def check_tokenizer(lm: Any, texts: list[str] | None, *, verifying: bool) -> None:
    """Encode every text compress will read with the model's tokenizer, before any work on the model.

    A tokenizer that cannot encode them (a word-level vocabulary without an unknown token raises on the first word
    it lacks) would otherwise end the run in a traceback from the tokenizers library, after minutes of work. A fast
    tokenizer encodes the bundled extract in about a second.

    Raises:
        InvalidInputError: naming the text, the tokenizer's error and the remedy (``--text``, ``--no-verify``).
    """
    from embfactor.data import wiki_split

    calibration = ("the calibration text given with --text", texts, "give --text with text this tokenizer encodes")
    if texts is None:
        calibration = ("the bundled calibration text (English Wikipedia)", wiki_split("train"),
                       "give --text with text this tokenizer encodes")
    sets = [calibration]
    if verifying:
        sets.append(("the held-out text the written model is verified on (English Wikipedia)", wiki_split("heldout"),
                     "pass --no-verify to write the model without that check"))
    for what, items, remedy in sets:
        try:
            for i in range(0, len(items), 256):
                lm.tokenizer(items[i:i + 256], add_special_tokens=False)
        except Exception as e:  # noqa: BLE001 - tokenizers raise bare Exceptions (WordLevel: "Missing [UNK] token")
            raise InvalidInputError(
                f"the tokenizer of {lm.name} cannot encode {what}: {type(e).__name__}: {e}; {remedy}"
            ) from None


def _predict(verifier: Any, lm: Any, rep: Any, stored: dict[str, Any], stages: Any) -> None:
    """Score the compressed model in memory, its rest stored as written (what the written folder must match).

    The planner's check predicted the model before its rest was stored: an integer rest (``--rest int8/int4``) adds
    error that prediction lacks, so the plan's check is then not a prediction of the written model and is skipped.
    """
    stages.set_postfix_str("scoring the compressed model in memory")
    verifier.predict(lm, plan_report=None if stored.get("linear_modules") else rep.to_dict())
    stages.update()


def _save(lm: Any, output: Any, verifier: Any, stages: Any) -> tuple[Path, float]:
    """Write (and verify) the compressed model: (the folder, seconds taken)."""
    from embfactor.surgery import save_compressed

    t = time.perf_counter()
    stages.set_postfix_str("saving and verifying the written model" if verifier else "saving")
    out = save_compressed(lm.model, output, tokenizer=lm.tokenizer, inputs=(lm.source,),
                          extra={"source_model": lm.name}, verify=verifier)
    return out, time.perf_counter() - t


def _verifier(lm: Any, verify: int | bool | None, stages: Any, config: FactorizationConfig,
              texts: list[str] | None) -> Any:
    """The check of the written model; with the planner, also on the text its check scores plans on."""
    from embfactor.verify import Verifier
    from embfactor.plan import calibration_split, wants_plan

    check_texts = None
    if wants_plan(config):  # the split plan_compress_ makes
        from embfactor.data import wiki_split

        check_texts = calibration_split(texts if texts is not None else wiki_split("train"))[1]
    stages.set_postfix_str("scoring the original on held-out text")
    return Verifier(lm, samples=None if verify is True else verify, check_texts=check_texts)


def _compress_in_place(lm: Any, config: FactorizationConfig, texts: list[str] | None, progress: bool,
                       stages: Any, scorer: Any = None) -> tuple[Any, int]:
    """Replace ``lm``'s table (the planner, or one method): (its report, the model's bytes before).

    ``scorer``: the planner's check scorer when one exists already (the verifier's, on the same held-apart text).
    """
    from embfactor.eval.size import tensor_bytes, weights_bytes_on_disk
    from embfactor.fileio import release_mapped_pages
    from embfactor.plan import plan_compress_, wants_plan
    from embfactor.surgery import factorize_, get_meta

    bytes_before = weights_bytes_on_disk(lm.source) or tensor_bytes(lm.model)  # a GGUF source: the file
    stages.set_postfix_str("counting token frequencies" if config.method else "decomposing")
    weights = None if wants_plan(config) else data_weights(lm, [config.method], texts)
    stages.set_postfix_str("decomposing")
    dense = lm.model.get_input_embeddings()
    if wants_plan(config):  # --size without --method, or --method auto: the byte-budget planner
        rep = plan_compress_(lm, config, texts=texts, progress=stages.set_postfix_str, scorer=scorer)
    else:
        rep = factorize_(lm.model, config, progress=progress, token_weights=weights)
    # recorded in embfactor.json's report, so /info (and any later reader) states the same "bytes before" as this run
    get_meta(lm.model).report["bytes_before"] = bytes_before
    if lm.model.get_input_embeddings() is not dense:  # replaced: nothing uses the dense table any more
        release_mapped_pages(dense.weight)
    return rep, bytes_before


def size_choice_of(config: FactorizationConfig, report: dict[str, Any]) -> dict[str, Any] | None:
    """For a byte ``size`` given to one method that picks its settings (pq, rvq, int): the setting it picked and
    the finer one it narrowly missed (:func:`embfactor.decomposition.choice.size_choice`); else None."""
    from embfactor.decomposition import budget_bytes, fixes_size
    from embfactor.decomposition.choice import size_choice

    if config.size is None or fixes_size(config.method, config.method_options) or not report.get("format_config"):
        return None
    vocab, d = report["vocab_size"], report["hidden_size"]
    return size_choice(config.method, vocab, d, budget_bytes(config.size, vocab, d), report["format_config"],
                       report["embedding_bytes_after"], config.method_options)


__all__ = ["CompressReport", "compress", "data_weights", "quantize_bits", "size_choice_of", "table_only_reason"]


def table_only_reason(model: Any, config: FactorizationConfig, output: Any, table_only: bool | None, *,
                      quantize: int | None = None, rest: str = "auto") -> str | None:
    """Why ``compress`` takes the table-only path (None: it loads the model), decided before anything is loaded.

    Asked for (``table_only=True``): the model must be a safetensors folder, the method the planner, an output given
    and ``rest`` auto (ConfigError otherwise). Automatic (None): a planner run on a safetensors folder, ``rest`` auto,
    whose float32 model plus the planner's working set exceeds the memory available
    (``embfactor.pipeline.table_only.full_load_bytes``).
    """
    from embfactor.pipeline.table_only import SHARD_INDEX, SINGLE_FILE
    from embfactor.plan import wants_plan

    if table_only is False:
        return None
    folder = Path(str(model)).expanduser()
    is_folder = folder.is_dir() and ((folder / SINGLE_FILE).is_file() or (folder / SHARD_INDEX).is_file())
    if table_only:
        if not is_folder:
            raise ConfigError(f"--table-only reads a folder of safetensors weights ({SINGLE_FILE} or {SHARD_INDEX}); "
                              f"{model!s} is not one")
        if not wants_plan(config):
            raise ConfigError("--table-only runs the planner: give --size without --method (or --method auto)")
        if rest != "auto":
            raise ConfigError("--rest does not apply to --table-only (the other tensors are copied as they are stored)")
        if quantize is not None:
            raise ConfigError("--quantize does not apply to --table-only (the planner stores int-k and codebooks)")
        if output is None:
            raise ConfigError("--table-only writes its result to a folder: give --output")
        return "asked for (--table-only)"
    if not is_folder or not wants_plan(config) or output is None or quantize is not None or rest != "auto":
        return None
    from embfactor.pipeline.table_only import available_memory, full_load_bytes, open_checkpoint, table_numel

    ckpt = open_checkpoint(folder)
    need, have = full_load_bytes(ckpt, table_numel(folder, ckpt)), available_memory()
    if need <= have:
        return None
    return (f"automatic: loading the model in float32 and planning would take ~{need / 2**30:.1f} GiB, "
            f"{have / 2**30:.1f} GiB are available")


def _compress_table_only(model: Any, config: FactorizationConfig, output: Any, texts: list[str] | None, reason: str,
                         progress: bool, t0: float, calibration: str = "bundled") -> CompressReport:
    from tqdm.auto import tqdm

    check_calibration(calibration, table_only=reason)  # no model: bundled text only

    from embfactor.pipeline.table_only import compress_table_only, open_checkpoint, output_weight_bytes
    from embfactor.plan import PlanReport

    bar = tqdm(total=1, desc="compress (table only)", unit="stage", disable=not progress, leave=False)
    try:
        rep = compress_table_only(model, config, output, texts=texts, reason=reason, progress=bar.set_postfix_str)
    finally:
        bar.close()
    kind = rep.pop("kind")
    return CompressReport(
        model=str(model), kind=kind, output=str(output), factorization=PlanReport(rep),
        bytes_before=open_checkpoint(model).bytes_on_disk(), bytes_after=output_weight_bytes(output),
        seconds=time.perf_counter() - t0,
    )
