"""Causal LMs with a KV cache in ONNX: the one-file layout optimum's ``ORTModelForCausalLM`` and transformers.js read.

Inputs ``input_ids``, ``attention_mask`` (batch × past+new), ``position_ids`` where the model's forward takes them
(Bloom's ALiBi does not), ``past_key_values.{i}.key`` / ``.value`` (batch × kv_heads × past_len × head_dim; past_len
may be 0, so the same file serves the first pass and every later step); outputs ``logits`` and ``present.{i}.key`` /
``.value`` (past + new). The graph is traced (TorchScript exporter, as for encoders: it records the tables through
:func:`embfactor.export.graph.traceable_tables`) through a wrapper that builds transformers' ``DynamicCache`` from the
flat past tensors and flattens the cache it returns; the trace uses a non-empty past and a left-padded row, so the
mask arithmetic is recorded on shapes, not frozen. Sliding-window layers (Gemma 2/3) get full layers with the window
in the mask, so ``present`` always grows by the new tokens, as transformers.js and optimum expect.

:func:`greedy_generate` is the loop a runtime runs, in numpy only (no torch): what the export's check, the tests and
``benchmarks/deploy.py`` compare with PyTorch's ``generate``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from embfactor.errors import InvalidInputError

PAST = "past_key_values.{i}.{kv}"
PRESENT = "present.{i}.{kv}"


@dataclass(frozen=True)
class CacheLayout:
    """What the cache of a causal LM looks like: ``layers`` × (key, value) of batch × ``kv_heads`` × len × ``head_dim``."""

    layers: int
    kv_heads: int
    head_dim: int
    position_ids: bool

    def past_names(self) -> list[str]:
        return [PAST.format(i=i, kv=kv) for i in range(self.layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [PRESENT.format(i=i, kv=kv) for i in range(self.layers) for kv in ("key", "value")]

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", *(["position_ids"] if self.position_ids else []), *self.past_names()]


def cache_layout(model: Any) -> CacheLayout:
    """Run the model on two tokens and read its cache; refuse (InvalidInputError) a cache that is not per-layer
    key/value tensors of one shape (what the layout can carry).

    Example:
        >>> cache_layout(model)   # doctest: +SKIP
        CacheLayout(layers=30, kv_heads=3, head_dim=64, position_ids=True)
    """
    import torch

    arch = type(model).__name__
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2]]), use_cache=True, return_dict=True)
    cache = getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    shapes = set()
    for layer in layers or []:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.ndim == 4 and k.shape == v.shape):
            shapes.add(None)
        else:
            shapes.add((k.shape[1], k.shape[3]))
    if not layers or len(shapes) != 1 or None in shapes:
        raise InvalidInputError(
            f"{arch}: its cache ({type(cache).__name__}) is not one key/value tensor pair of a single "
            "shape per layer, which the ONNX decoder layout (past_key_values.N.key/value) carries; this architecture "
            "cannot be exported with a KV cache"
        )
    (heads, dim), = shapes
    takes = inspect.signature(model.forward).parameters
    return CacheLayout(len(layers), int(heads), int(dim), "position_ids" in takes)


def _wrapper(model: Any, layout: CacheLayout) -> Any:
    from torch import nn
    from transformers import DynamicCache

    names = layout.input_names()
    n_past = len(layout.past_names())

    class _CachedForward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> Any:
            kw = dict(zip(names[: len(names) - n_past], args))
            past = args[len(names) - n_past:]
            # no config: full layers everywhere (a sliding layer would crop what `present` returns)
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layout.layers)])
            out = self.model(**kw, past_key_values=cache, use_cache=True, return_dict=True)
            flat = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *flat)

    return _CachedForward().eval()


def trace_inputs(vocab: int, layout: CacheLayout, *, batch: int = 2, past: int = 3, new: int = 4) -> tuple[Any, ...]:
    """Example inputs for the trace: a non-empty past (recorded on shapes) and a left-padded second row."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, new), generator=g)
    mask = torch.ones(batch, past + new, dtype=torch.long)
    mask[-1, :2] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)[:, past:]
    kv = [torch.randn(batch, layout.kv_heads, past, layout.head_dim, generator=g) for _ in layout.past_names()]
    return (ids, mask, *([pos] if layout.position_ids else []), *kv)


def export_decoder_graph(model: Any, layout: CacheLayout, *, opset: int = 18) -> Any:
    """The ONNX model (``onnx.ModelProto``) of one cached step of a causal LM (first pass: past_len 0).

    Example:
        >>> proto = export_decoder_graph(lm.model, cache_layout(lm.model))   # doctest: +SKIP
    """
    from embfactor.export.graph import trace_to_onnx

    names, outs = layout.input_names(), ["logits", *layout.present_names()]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in layout.past_names()})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in layout.present_names()})
    vocab = model.get_input_embeddings().num_embeddings
    return trace_to_onnx(model, _wrapper(model, layout), trace_inputs(vocab, layout), opset=opset, input_names=names,
                         output_names=outs, dynamic_axes={k: v for k, v in axes.items() if k in names + outs})


def empty_past(sess: Any, batch: int) -> dict[str, Any]:
    """Zero-length past tensors for every ``past_key_values.*`` input of an ONNX Runtime session (numpy only)."""
    import numpy as np

    out = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, dim = i.shape
            out[i.name] = np.zeros((batch, int(heads), 0, int(dim)), dtype=np.float32)
    return out


def step_feeds(sess: Any, ids: Any, mask: Any, past: dict[str, Any]) -> dict[str, Any]:
    """The feeds of one step: ``ids`` (batch × new), the whole ``mask`` (batch × past+new), positions from the mask."""
    import numpy as np

    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64), **past}
    if any(i.name == "position_ids" for i in sess.get_inputs()):
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        feeds["position_ids"] = pos[:, mask.shape[1] - ids.shape[1]:].astype(np.int64)
    return feeds


def greedy_generate(sess: Any, ids: Any, new_tokens: int, *, suppress: int | list[int] | None = None) -> Any:
    """Greedy decoding with the KV cache through an ONNX Runtime session (numpy only): ``ids`` (batch × prompt, no
    padding) followed by ``new_tokens`` tokens; ``suppress`` (EOS ids) are never chosen, as ``generate(
    min_new_tokens=...)`` does.

    Example:
        >>> greedy_generate(session("out/smollm2-8x/onnx/model.onnx"), np.array([[1, 2, 3]]), 8)   # doctest: +SKIP
    """
    import numpy as np

    out = np.asarray(ids, dtype=np.int64)
    past, cur = empty_past(sess, out.shape[0]), out
    present = [o.name for o in sess.get_outputs()][1:]
    for _ in range(new_tokens):
        mask = np.ones((out.shape[0], out.shape[1]), dtype=np.int64)
        res = sess.run(None, step_feeds(sess, cur, mask, past))
        logits = res[0][:, -1]
        for t in [suppress] if isinstance(suppress, int) else suppress or []:
            if 0 <= t < logits.shape[-1]:
                logits[:, t] = -np.inf
        cur = logits.argmax(-1)[:, None].astype(np.int64)
        out = np.concatenate([out, cur], axis=1)
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(present, res[1:])}
    return out


def compare_decoder_with_torch(lm: Any, data: bytes, texts: list[str], *, steps: int = 3) -> dict[str, float]:
    """The file against the PyTorch model on ``texts`` (left-padded batch): first-pass logits at every real position,
    then ``steps`` cached steps feeding PyTorch's greedy tokens to both. Worst cosine of last-position logits and
    largest absolute difference over all of them.
    """
    import numpy as np
    import torch
    from transformers import DynamicCache

    from embfactor.export.feeds import check_feeds, session

    side = getattr(lm.tokenizer, "padding_side", None)
    if lm.tokenizer is not None:
        lm.tokenizer.padding_side = "left"
    try:
        feeds = check_feeds(lm, ["input_ids", "attention_mask"], texts)
    finally:
        if lm.tokenizer is not None and side is not None:
            lm.tokenizer.padding_side = side
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    sess = session(data)
    present = [o.name for o in sess.get_outputs()][1:]
    past, cache = empty_past(sess, ids.shape[0]), DynamicCache()
    takes_pos = any(i.name == "position_ids" for i in sess.get_inputs())
    cosines, diff = [], 0.0
    cur = ids
    for _ in range(steps + 1):
        res = sess.run(None, step_feeds(sess, cur.numpy(), mask.numpy(), past))
        kw = {"position_ids": (mask.cumsum(1) - 1).clamp(min=0)[:, mask.shape[1] - cur.shape[1]:]} if takes_pos else {}
        with torch.no_grad():
            want = lm.model(input_ids=cur, attention_mask=mask, past_key_values=cache, use_cache=True, **kw)
        ref = want.logits.numpy()
        real = mask[:, mask.shape[1] - cur.shape[1]:].numpy().astype(bool)
        diff = max(diff, float(np.abs(res[0] - ref)[real].max()))
        a, b = res[0][:, -1].astype(np.float64), ref[:, -1].astype(np.float64)
        cosines.extend((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
        cache = want.past_key_values
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(present, res[1:])}
        cur = want.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(cur)], dim=1)
    return {"min_cosine": float(min(cosines)), "max_abs_diff": diff}
