"""The table-only path: a safetensors checkpoint's embedding compressed without loading the model (issue 20)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from embfactor.config import FactorizationConfig
from embfactor.errors import ConfigError

FORMATS = ["int8 g32", "int4 g32", "pq sub4 K256 int8cb"]  # a small search space: seconds, not minutes
TEXT = ("the cat sat on the mat . the dog was in the house . a film is a movie and the film was good . " * 20).strip()


def write_checkpoint(folder: Path, *, tied: bool, vocab: int = 2000, d: int = 64, inter: int = 128, layers: int = 2,
                     shard: str = "150KB") -> Path:
    """A random bf16 Llama saved in shards, with a WordPiece tokenizer whose ids cover the vocabulary."""
    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, max_shard_size=shard)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TEXT.split(), *(chr(c) for c in range(97, 123))]
    words = list(dict.fromkeys(words + [f"w{i}" for i in range(vocab)]))[:vocab]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    (folder / "calib.txt").write_text("\n".join([TEXT] * 10) + "\n")
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 - safe_open is no dict
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_table_only_copies_the_rest_and_stores_the_proxy_plan(tmp_path: Path, tied: bool) -> None:
    from transformers import AutoModelForCausalLM

    from embfactor.data.frequency import token_counts
    from embfactor.decomposition import budget_bytes
    from embfactor.pipeline import compress
    from embfactor.plan import formats_from_options, calibration_split, plan_table

    src = write_checkpoint(tmp_path / "src", tied=tied)
    assert len(list(src.glob("*.safetensors"))) > 1  # sharded
    config = FactorizationConfig(method="auto", size="8x", method_options={"formats": FORMATS})
    r = compress(src, config, tmp_path / "out", progress=False, text_files=[str(src / "calib.txt")],
                 table_only=True).to_dict()
    assert (r["path"], r["check"]) == ("table-only", "proxy")
    assert {"counting", "fits", "build", "save"} <= set(r["stage_seconds"])
    out = tmp_path / "out"
    before, after = tensors(src), tensors(out)
    emb = "model.embed_tokens.weight"
    # every other tensor byte for byte, in its own dtype (bf16 stays bf16); the dense table is gone (the table's
    # name holds only the zero-size guard that makes a load without embfactor fail)
    assert after[emb].numel() == 0
    for k, v in before.items():
        if k == emb or (tied and k == "lm_head.weight"):
            assert after.get(k, torch.empty(0)).numel() == 0
            continue
        assert after[k].dtype == v.dtype == torch.bfloat16 and torch.equal(after[k], v), k
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(after)
    # the stored table is the proxy's plan of that table with those counts
    E = before[emb]
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(src))
    counts = token_counts(tok, calibration_split([(src / "calib.txt").read_text()])[0], vocab_size=E.shape[0],
                          cache=False)
    _, module, _ = plan_table(E, budget_bytes("8x", *E.shape), counts, check=0,
                              formats=formats_from_options(config.method_options, E.shape[1]))
    model = AutoModelForCausalLM.from_pretrained(out)  # transformers' own loader, after import embfactor
    ids = torch.arange(E.shape[0])
    got = model.get_input_embeddings()(ids).float()
    assert torch.allclose(got, module.gather(ids).to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)
    assert r["bytes_ratio"] >= 7.9
    gen = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)
    if not tied:  # the untied head is kept dense, unchanged
        assert torch.equal(model.lm_head.weight, before["lm_head.weight"])


def test_table_only_refuses_what_it_cannot_do_before_loading(tmp_path: Path) -> None:
    from embfactor.pipeline import compress

    src = write_checkpoint(tmp_path / "src", tied=True)
    with pytest.raises(ConfigError, match="safetensors"):
        compress("smollm2", size="8x", output=tmp_path / "a", table_only=True, progress=False)
    with pytest.raises(ConfigError, match="runs the planner"):
        compress(src, method="int", method_options={"bits": 4}, output=tmp_path / "b", table_only=True,
                 progress=False)
    with pytest.raises(ConfigError, match="--output"):
        compress(src, size="8x", table_only=True, progress=False)
    with pytest.raises(ConfigError, match="--rest does not apply"):
        compress(src, size="8x", output=tmp_path / "c", table_only=True, rest="int8", progress=False)
    assert not any((tmp_path / n).exists() for n in "abc")


# A child process whose address space is capped a little above what the interpreter and libraries take: the
# checkpoint's float32 size exceeds that headroom, so the model cannot be loaded whole; compress must choose the
# table-only path by itself and succeed.
CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    torch.set_num_threads(1)
    from embfactor.pipeline import compress
    import embfactor.pipeline.table_only as t, transformers, faiss  # every library loaded before the cap
    from transformers import LlamaForCausalLM, AutoTokenizer
    src, out, headroom = sys.argv[1], sys.argv[2], int(sys.argv[3])
    size = int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize:")][0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, size + headroom))
    fp32 = t.open_checkpoint(src).float32_bytes()
    try:
        torch.empty(fp32 // 4)  # the float32 model cannot even be allocated
        whole = True
    except (RuntimeError, MemoryError):
        whole = False
    r = compress(src, size="8x", method="auto", method_options={"formats": ["int8 g32", "int4 g32",
                 "pq sub4 K256 int8cb"]}, output=out, text_files=[src + "/calib.txt"], progress=False).to_dict()
    print(json.dumps({"path": r["path"], "reason": r["path_reason"], "fp32": fp32, "limit": headroom,
                      "whole": whole}))
""")


def test_compress_under_a_memory_limit_takes_the_table_only_path(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    headroom = 160 << 20
    src = write_checkpoint(tmp_path / "src", tied=False, vocab=2000, d=64, inter=32768, layers=8, shard="40MB")
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "out"), str(headroom)],
                          check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["fp32"] > headroom and not r["whole"]
    assert r["path"] == "table-only" and r["reason"].startswith("automatic")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False).shape == (1, 5)
