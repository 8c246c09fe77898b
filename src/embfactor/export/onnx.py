"""``export_onnx``: write a compressed folder's model as ``onnx/model.onnx``, the table still compressed inside.

The layout is the one sentence-transformers (``backend="onnx"``) and optimum's ``ORTModel*`` classes read: for an
encoder inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the tokenizer gives them), output
``last_hidden_state``, dynamic batch and sequence axes; a causal LM gets a KV cache in the layout optimum and
transformers.js read (:mod:`embfactor.export.decoder`: ``past_key_values.N.key/value`` in, ``logits`` and
``present.N.key/value`` out, one file for the first pass and every step), and ``generation_config.json`` beside it.
``--rest int4`` Linears become ONNX Runtime's ``MatMulNBits`` from the stored integers (:mod:`embfactor.export.nbits`).
The graph is
traced by torch's TorchScript exporter (opset 18) with the tables computing through
:func:`embfactor.export.rows.export_rows`: the stored integers, codebooks and scales become the file's initializers,
so the file is about as large as the compressed safetensors, and a tied head reads the same initializers (the table is
stored once). ``int8_rest`` adds ``onnx/model_qint8.onnx``: ONNX Runtime's dynamic int8 quantization of the other
MatMuls (the table's nodes excluded: its Gathers and MatMuls keep their stored values). config.json gets
``transformers.js_config`` so transformers.js (Node and browser) loads ``onnx/model.onnx`` by default.
"""

from __future__ import annotations

import inspect
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embfactor.errors import EmbfactorError, InvalidInputError, ModelNotFoundError
from embfactor.export.feeds import CHECK_TEXTS, check_feeds, example_inputs, session  # noqa: F401 - callers' names

ONNX_DIR = "onnx"
MODEL_FILE = "model.onnx"
QINT8_FILE = "model_qint8.onnx"
GENERATION_FILE = "generation_config.json"
OPSET = 18
# config.json key transformers.js reads (dtype: which onnx/model*.onnx it loads)
TRANSFORMERS_JS_KEY = "transformers.js_config"


class ExportError(EmbfactorError, RuntimeError):
    """The ONNX file could not be written as promised (a dense table in it, or outputs that differ from PyTorch)."""


@dataclass
class OnnxExportReport:
    """What :func:`export_onnx` wrote and how it checked it.

    Attributes:
        files: path relative to the folder -> bytes on disk, for each file written.
        safetensors_bytes: the folder's model.safetensors, for comparison.
        check: per file, the worst agreement of ONNX Runtime's outputs with PyTorch's on :data:`CHECK_TEXTS`
            (``min_cosine`` of pooled vectors or last-position logits, ``max_abs_diff``).
    """

    folder: str
    kind: str
    inputs: list[str]
    output: str
    files: dict[str, int] = field(default_factory=dict)
    safetensors_bytes: int | None = None
    check: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_onnx() -> None:
    """Raise ModelNotFoundError with the install command when onnx or onnxruntime is missing."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelNotFoundError(
            f"ONNX export needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            "pip install 'embfactor[onnx]'"
        )


def input_names(model: Any, tokenizer: Any, kind: str) -> list[str]:
    """The graph's inputs: ``input_ids``, ``attention_mask``, and ``token_type_ids`` where the encoder's tokenizer
    gives them and its forward takes them (what optimum feeds by name)."""
    names = ["input_ids", "attention_mask"]
    takes = inspect.signature(model.forward).parameters
    if kind == "encoder" and "token_type_ids" in takes and "token_type_ids" in getattr(
        tokenizer, "model_input_names", ()
    ):
        names.append("token_type_ids")
    return names


def _wrapper(model: Any, names: list[str], kind: str) -> Any:
    from torch import nn

    class _Forward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> Any:
            kw = dict(zip(names, args))
            if kind == "decoder":
                return self.model(**kw, use_cache=False, return_dict=True).logits
            return self.model(**kw, return_dict=True).last_hidden_state

    return _Forward().eval()


def export_graph(model: Any, names: list[str], kind: str, *, opset: int = OPSET) -> Any:
    """The ONNX model (``onnx.ModelProto``) of ``model``'s forward, tables through :func:`traceable_tables`, Linear
    weights stored transposed (:func:`fold_weight_transposes`).

    Example:
        >>> data = export_graph(lm.model, ["input_ids", "attention_mask"], "encoder")   # doctest: +SKIP
    """
    from embfactor.export.graph import trace_to_onnx

    output = "logits" if kind == "decoder" else "last_hidden_state"
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in [*names, output]}
    vocab = model.get_input_embeddings().num_embeddings
    proto = trace_to_onnx(model, _wrapper(model, names, kind), example_inputs(vocab, names), opset=opset,
                          input_names=names, output_names=[output], dynamic_axes=axes)
    fold_weight_transposes(proto, graph_scopes(model))
    return proto


def graph_scopes(model: Any) -> list[str]:
    """Scopes of the tables' and tied heads' nodes in the exported graph (the wrapper calls the model ``model``)."""
    from embfactor.export.graph import table_scopes

    return [f"model.{s}" for s in table_scopes(model)]


def fold_weight_transposes(proto: Any, keep: list[str]) -> int:
    """Store each ``Linear`` weight transposed instead of a Transpose node on it (in place; returns how many).

    The trace is exported without constant folding (which would decode a tied head's table into a float
    initializer), so every ``Linear`` reads ``Transpose(weight)``; folding these alone gives MatMuls with constant
    weights, which ONNX Runtime's dynamic quantization needs. Nodes in the ``keep`` module scopes are left as traced.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    users: dict[str, int] = {}
    for n in proto.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    marks = [f"/{s.replace('.', '/')}/" for s in keep]
    folded, drop = 0, []
    for n in proto.graph.node:
        src = n.input[0] if n.op_type == "Transpose" and n.input else None
        if src not in inits or users[src] != 1 or any(m in n.name for m in marks):
            continue
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        value = numpy_helper.to_array(inits[src])
        inits[src].CopyFrom(numpy_helper.from_array(value.transpose(perm).copy(), n.output[0]))
        drop.append(n)
        folded += 1
    for n in drop:
        proto.graph.node.remove(n)
    return folded


def short_names(proto: Any) -> int:
    """Merge equal Constant nodes; give nodes and intermediate values short names (in place; returns how many values).

    The tracer names each node and value after its module scope (``/model/model/layers.0/self_attn/q_proj/
    MatMul_output_0``): about 50 kB per decoder layer, which made a file larger than the safetensors it came from.
    Graph inputs, outputs and initializers keep their names (runtimes feed and read them by name); done last, after
    :func:`table_nodes` has read the scopes.
    """
    keep = {v.name for v in (*proto.graph.input, *proto.graph.output)} | {t.name for t in proto.graph.initializer}
    rename: dict[str, str] = {}
    # one Constant node per distinct value (the trace writes one per use: a third of a decoder's nodes)
    first: dict[bytes, str] = {}
    for n in list(proto.graph.node):
        if n.op_type == "Constant" and len(n.output) == 1 and n.output[0] not in keep:
            key = b"".join(a.SerializeToString() for a in n.attribute)
            if key in first:
                rename[n.output[0]] = first[key]
                proto.graph.node.remove(n)
            else:
                first[key] = n.output[0]
    for n in proto.graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    rename = {}
    for k, n in enumerate(proto.graph.node):
        n.name = f"n{k:x}"
        for i, out in enumerate(n.output):
            if out and out not in keep:
                rename[out] = n.output[i] = f"v{len(rename):x}"
    for n in proto.graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    for v in proto.graph.value_info:
        v.name = rename.get(v.name, v.name)
    return len(rename)


def dense_tables(proto: Any, vocab: int, d: int, *, besides: list[str] = ()) -> list[str]:
    """Float initializers holding a whole vocab × d table (what a compressed export must not contain), except those of
    the ``besides`` module scopes (an untied output head, which embfactor does not compress)."""
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    marks = [m for s in besides for m in (f"{s}.", f"/{s.replace('.', '/')}/")]
    # initializers, and Constant nodes' values (a traced tensor of static shape becomes one)
    tensors = [(t.name, t) for t in proto.graph.initializer]
    tensors += [(n.name, a.t) for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return [
        f"{name} {list(t.dims)}" for name, t in tensors
        if t.data_type in floats and len(t.dims) >= 2 and vocab in t.dims and d * vocab <= _numel(t.dims)
        and not any(m in name for m in marks)
    ]


def untied_head(model: Any) -> list[str]:
    """The graph scope of a causal LM's own (untied, uncompressed) output head, if it has one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    from embfactor.layers.head import FactorizedLMHead

    if head is None or isinstance(head, FactorizedLMHead):
        return []
    return [f"model.{n}" for n, m in model.named_modules() if m is head]


def _numel(dims: Any) -> int:
    n = 1
    for x in dims:
        n *= int(x)
    return n


def table_nodes(proto: Any, scopes: list[str]) -> list[str]:
    """Names of the graph's nodes inside the given module scopes (the tables and tied heads)."""
    marks = [f"/{s.replace('.', '/')}/" for s in scopes]
    return [n.name for n in proto.graph.node if any(m in n.name for m in marks)]


def quantize_rest(data: bytes, exclude: list[str]) -> bytes:
    """ONNX Runtime dynamic int8 quantization of the MatMuls with constant weights, except the ``exclude`` nodes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="embfactor-onnx-") as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "model_qint8.onnx"
        src.write_bytes(data)
        # MatMul only: ONNX Runtime's default list also quantizes Gather, which would re-quantize codebooks and
        # scales the table already stores compactly
        # per channel: per-tensor int8 weights moved MiniLM's pooled vectors to cosine 0.962, per channel 0.990
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True})
        return dst.read_bytes()


def compare_with_torch(lm: Any, data: bytes, names: list[str]) -> dict[str, float]:
    """Run the ONNX file and the PyTorch model on :func:`check_feeds`: worst cosine (mean-pooled vectors for an
    encoder, last-position logits for a decoder) and largest absolute difference of the outputs."""
    import numpy as np
    import torch

    feeds = check_feeds(lm, names)
    out = session(data).run(None, {n: v.numpy().astype(np.int64) for n, v in feeds.items()})[0]
    with torch.no_grad():
        res = lm.model(**feeds, **({"use_cache": False} if lm.kind == "decoder" else {}))
    ref = (res.logits if lm.kind == "decoder" else res.last_hidden_state).numpy()
    mask = feeds["attention_mask"].numpy()[..., None].astype(np.float64)
    rows = np.arange(len(mask))
    if lm.kind == "decoder":
        last = mask[:, :, 0].sum(1).astype(int) - 1
        a, b = out[rows, last], ref[rows, last]
    else:
        a, b = (out * mask).sum(1) / mask.sum(1), (ref * mask).sum(1) / mask.sum(1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    diff = np.abs((out - ref) * mask).max()
    return {"min_cosine": float(cos.min()), "max_abs_diff": float(diff)}


def write_transformers_js_config(folder: Path) -> None:
    """Add ``"transformers.js_config": {"dtype": "fp32"}`` to the folder's config.json (kept if already there).

    transformers.js picks ``onnx/model{suffix}.onnx`` by a dtype suffix and, without one, defaults to ``q8``
    (``model_quantized.onnx``) in the browser: the key makes ``pipeline(task, folder)`` load ``onnx/model.onnx``
    everywhere. ``model_qint8.onnx`` loads with ``{dtype: "fp32", model_file_name: "model_qint8"}``.
    """
    import json

    from embfactor.fileio import atomic_write_json

    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.get(TRANSFORMERS_JS_KEY, {}).get("dtype") != "fp32":
        config[TRANSFORMERS_JS_KEY] = {**config.get(TRANSFORMERS_JS_KEY, {}), "dtype": "fp32"}
        atomic_write_json(path, config)  # sorted, indented: the layout transformers writes


def _check_targets(folder: Path, rels: list[str]) -> None:
    from embfactor.fileio import foreign_entries

    foreign = set(foreign_entries(folder))
    for rel in [f"{ONNX_DIR}/", *rels]:
        if rel in foreign:
            raise InvalidInputError(
                f"{folder / rel} exists and embfactor did not write it; move it away (embfactor never replaces files "
                "it did not write)"
            )


def _graph(folder: Path, lm: Any) -> tuple[Any, list[str]]:
    """The loaded folder's ONNX graph and its input names; refuses what cannot be exported (before any write)."""
    from embfactor.export.decoder import cache_layout, export_decoder_graph
    from embfactor.export.graph import check_exportable

    model = lm.model
    check_exportable(model)
    if getattr(model.config, "is_encoder_decoder", False):
        raise InvalidInputError(
            f"{folder}: {type(model).__name__} is an encoder-decoder; ONNX export covers encoders (last_hidden_state) "
            "and causal LMs (logits)"
        )
    if lm.tokenizer is None:
        raise InvalidInputError(
            f"{folder}: no tokenizer files (tokenizer.json, tokenizer_config.json); ONNX runtimes (optimum, "
            "transformers.js) tokenize with the folder's own tokenizer, so save the folder with it"
        )
    if lm.kind == "decoder":  # one file with a KV cache (first pass: empty past)
        proto = export_decoder_graph(model, cache_layout(model))
        fold_weight_transposes(proto, graph_scopes(model))
        return proto, [i.name for i in proto.graph.input]
    names = input_names(model, lm.tokenizer, lm.kind)
    return export_graph(model, names, lm.kind), names


def export_onnx(folder: str | Path, *, int8_rest: bool = False, check: bool = True) -> OnnxExportReport:
    """Write ``FOLDER/onnx/model.onnx`` (and ``model_qint8.onnx`` with ``int8_rest``) for a compressed folder.

    Args:
        folder: an embfactor output folder (``embfactor compress``/``heal``), encoder or causal LM.
        int8_rest: also write the dynamic-int8 copy of the rest of the graph (the table's nodes excluded).
        check: run each file in ONNX Runtime against the PyTorch model on :data:`CHECK_TEXTS` (the report's
            ``check``); an encoder whose pooled vectors fall below cosine 0.9999 raises ExportError (int8 files are
            reported, not judged).

    Example:
        >>> r = export_onnx("out/minilm-16x", int8_rest=True)   # doctest: +SKIP
        >>> SentenceTransformer("out/minilm-16x", backend="onnx")   # doctest: +SKIP
    """
    from embfactor.export.decoder import compare_decoder_with_torch
    from embfactor.fileio import MARKER_FILE, add_to_manifest, atomic_write_bytes
    from embfactor.models import load_model

    start = time.perf_counter()
    folder = Path(folder)
    require_onnx()
    if not (folder / MARKER_FILE).is_file():
        raise InvalidInputError(
            f"{folder}: not an embfactor output folder (no {MARKER_FILE}); export the folder that "
            "`embfactor compress MODEL --output OUT` or `embfactor heal` wrote"
        )
    rels = [f"{ONNX_DIR}/{MODEL_FILE}"] + ([f"{ONNX_DIR}/{QINT8_FILE}"] if int8_rest else [])
    _check_targets(folder, rels)
    lm = load_model(folder)
    model = lm.model.eval()
    proto, names = _graph(folder, lm)
    data = proto.SerializeToString()
    emb = model.get_input_embeddings()
    dense = dense_tables(proto, emb.num_embeddings, emb.embedding_dim, besides=untied_head(model))
    if dense:
        raise ExportError(f"the exported graph holds a dense vocab x d table ({', '.join(dense)}); nothing written")
    report = OnnxExportReport(
        str(folder), lm.kind, names, "logits" if lm.kind == "decoder" else "last_hidden_state",
        safetensors_bytes=(folder / "model.safetensors").stat().st_size
        if (folder / "model.safetensors").is_file() else None,
    )
    outputs = {rels[0]: data}
    if int8_rest:
        outputs[rels[1]] = quantize_rest(data, table_nodes(proto, graph_scopes(model)))
    short_names(proto)
    outputs[rels[0]] = proto.SerializeToString()
    for rel, blob in outputs.items():
        if check:
            report.check[rel] = (compare_decoder_with_torch(lm, blob, CHECK_TEXTS) if lm.kind == "decoder"
                                 else compare_with_torch(lm, blob, names))
            if rel == rels[0] and report.check[rel]["min_cosine"] < 0.9999:
                raise ExportError(f"ONNX Runtime's outputs differ from PyTorch's ({report.check[rel]}); nothing written")
    if lm.kind == "decoder" and not (folder / GENERATION_FILE).exists():
        # generate()'s settings where optimum and transformers.js look for them (eos, bos, pad)
        outputs[GENERATION_FILE] = model.generation_config.to_json_string(use_diff=True).encode()
    add_to_manifest(folder, [f"{ONNX_DIR}/", *outputs])  # first: a file we write is never left unlisted
    for rel, blob in outputs.items():
        atomic_write_bytes(folder / rel, blob)
        report.files[rel] = len(blob)
    write_transformers_js_config(folder)
    report.seconds = time.perf_counter() - start
    return report
