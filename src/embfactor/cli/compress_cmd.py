"""``embfactor compress``: factorize a model's embedding (and tied head), save it, print before/after."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from embfactor.cli.common import (
    add_method_arg, add_model_arg, add_target_args, check_outputs, mb, table, write_json,
)
from embfactor.config import FactorizationConfig


def compress(
    model: str,
    config: FactorizationConfig,
    output: str | Path,
    *,
    progress: bool = True,
    quantize: str | int | None = None,
    text_files: list[str] | None = None,
) -> dict[str, Any]:
    """Load ``model``, factorize it with ``config``, save to ``output``; return the report as a dict.

    Data-aware methods (``wsvd``, ``block``) weight tokens by their frequency, counted with the model's tokenizer
    on ``text_files`` (default: the training part of the bundled Wikipedia extract).

    Example:
        >>> compress("minilm", FactorizationConfig(ratio=6), "out/minilm-r6")   # doctest: +SKIP
    """
    from embfactor.eval.size import tensor_bytes, weights_bytes_on_disk
    from embfactor.data import read_texts
    from embfactor.data.frequency import token_weights as frequency_weights
    from embfactor.decomposition import get_method
    from embfactor.fileio import check_output_dir, release_mapped_pages
    from embfactor.models import load_model, source_path
    from embfactor.surgery import META_ATTR, factorize_, save_compressed
    from embfactor.surgery.io import WEIGHTS_FILE

    t0 = time.perf_counter()
    bits = _quantize_bits(quantize, config)  # a bad --quantize fails before the model is loaded
    check_output_dir(output, inputs=(source_path(model),))  # cheap checks first: before the load and decomposition
    texts = read_texts(text_files) if text_files else None
    stages = tqdm(total=3, desc="compress", unit="stage", disable=not progress, leave=False)
    stages.set_postfix_str(f"loading {model}")
    lm = load_model(model)
    check_output_dir(output, inputs=(lm.source,))
    stages.update()
    bytes_before = weights_bytes_on_disk(lm.source) or tensor_bytes(lm.model)
    token_weights = None
    if config.method is not None and get_method(config.method).data_aware:
        stages.set_postfix_str("counting token frequencies")
        vocab = lm.model.get_input_embeddings().num_embeddings
        token_weights = frequency_weights(lm.tokenizer, texts, vocab_size=vocab)
    stages.set_postfix_str("decomposing")
    dense = lm.model.get_input_embeddings()
    rep = factorize_(lm.model, config, progress=progress, token_weights=token_weights)
    # recorded in embfactor.json's report, so /info (and any later reader) states the same "bytes before" as this run
    getattr(lm.model, META_ATTR)["report"]["bytes_before"] = bytes_before
    if lm.model.get_input_embeddings() is not dense:  # replaced: nothing uses the dense table any more
        release_mapped_pages(dense.weight)
    del dense
    stages.update()
    quant = None
    if bits is not None:
        from embfactor.surgery import quantize_

        quant = quantize_(lm.model, bits)
    stages.set_postfix_str("saving")
    out = save_compressed(
        lm.model, output, tokenizer=lm.tokenizer, inputs=(lm.source,), extra={"source_model": lm.name}
    )
    stages.update()
    stages.close()
    d = rep.to_dict()
    d.update(
        model=lm.name,
        output=str(out),
        kind=lm.kind,
        bytes_before=bytes_before,
        bytes_after=(Path(out) / WEIGHTS_FILE).stat().st_size,
        decompose_seconds=rep.seconds,
        seconds=time.perf_counter() - t0,
    )
    if quant is not None:
        d["quantization"] = quant
    return d


def _quantize_bits(quantize: str | int | None, config: FactorizationConfig) -> int | None:
    if quantize is None:
        return None
    from embfactor.errors import ConfigError
    from embfactor.formats.quantized import parse_bits

    bits = parse_bits(quantize)
    if config.method in ("tt", "block"):
        raise ConfigError(
            f"--quantize stores one U·V pair; it does not apply to --method {config.method} (use svd, eig, wsvd, ...)"
        )
    return bits


def render(r: dict[str, Any]) -> str:
    rows = [
        ["embedding parameters", r["embedding_params_before"], r["embedding_params_after"]],
        ["model parameters", r["model_params_before"], r["model_params_after"]],
        ["embedding compression", "1.00x", f"{r['ratio']:.2f}x"],
        ["model compression", "1.00x", f"{r['model_params_before'] / r['model_params_after']:.2f}x"],
        ["bytes on disk", mb(r["bytes_before"]), mb(r["bytes_after"])],
        ["relative error ||E-UV||/||E||", 0.0, r["relative_error"]],
        [f"optimum for rank {r['rank']} (truncated SVD)", "-", r["optimal_relative_error"]],
    ]
    head = (
        f"{r['model']}: {r['vocab_size']:,} x {r['hidden_size']} embedding -> rank {r['rank']} "
        f"({r['method']}), tied head: {'yes' if r['tied_head'] else 'no'}"
    )
    q = r.get("quantization")
    if q:
        rows.append(
            [f"embedding bytes (int{q['bits']} factors)", mb(q["fp32_embedding_bytes"]),
             f"{mb(q['embedding_bytes'])} ({q['bytes_ratio']:.1f}x)"]
        )
    tail = f"wall time: {r['seconds']:.1f} s (decomposition {r['decompose_seconds']:.2f} s); saved to {r['output']}"
    return "\n".join([head, table(rows, ["", "before", "after"]), tail])


def run(args: argparse.Namespace) -> int:
    check_outputs(folder=args.output, files=[("--json", args.json)], inputs=[args.model])
    config = FactorizationConfig(
        method=args.method, rank=args.rank, ratio=args.ratio, energy=args.energy, max_error=args.max_error,
        seed=args.seed,
    )
    r = compress(args.model, config, args.output, progress=not args.quiet, quantize=args.quantize, text_files=args.text)
    print(render(r))
    write_json(args.json, r)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="factorize a model's embedding and save the compressed model")
    add_model_arg(p)
    add_target_args(p)
    add_method_arg(p)
    p.add_argument("--output", "-o", required=True, help="output folder (a new folder or an earlier embfactor output)")
    p.add_argument(
        "--text", nargs="+", metavar="FILE",
        help="text files to count token frequencies on for data-aware methods (wsvd, block); "
        "default: the bundled Wikipedia extract",
    )
    p.add_argument(
        "--quantize", choices=["int8", "int4"],
        help="store the factors U and V as per-row int8 or int4 (with float32 scales), dequantized on gather",
    )
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
