"""The rest of a compressed model on disk: the source's precision kept, --rest int8/int4, whole-model bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from embfactor.cli.main import main
from embfactor.layers.intk_linear import REST_SETTINGS, IntKLinear
from embfactor.models import load_model
from embfactor.pipeline import compress
from embfactor.surgery import count_params, factorize_, load_compressed, save_compressed
from embfactor.surgery.meta import get_meta
from embfactor.surgery.rest import rest_tensors, source_dtype, store_rest_
from embfactor.surgery.share import guard_keys

PROMPT = torch.tensor([[1, 17, 42, 99, 5, 64, 3, 110]])


def stored_dtypes(folder: Path) -> dict[str, str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        return {k: str(fh.get_slice(k).get_dtype()) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a dict


def table_keys(model: nn.Module) -> set[str]:
    """The stored names of the table: its format's tensors and the zero-size guards under its dense names."""
    emb = model.get_input_embeddings()
    prefix = next(n for n, m in model.named_modules() if m is emb)
    return {f"{prefix}.{k}" for k in emb.state_dict()} | set(guard_keys(get_meta(model)))


@pytest.fixture
def bf16_bert_dir(tiny_bert_dir: Path, tmp_path: Path) -> Path:
    """The tiny BERT folder saved in bfloat16 (as many Hugging Face checkpoints are), with its tokenizer."""
    from transformers import AutoTokenizer, BertModel

    folder = tmp_path / "bf16-bert"
    BertModel.from_pretrained(tiny_bert_dir, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
    return folder


def test_a_bf16_folder_stays_bf16_on_disk_and_reloads(bf16_bert_dir: Path, tmp_path: Path):
    assert source_dtype(bf16_bert_dir) == torch.bfloat16
    out = tmp_path / "out"
    r = compress(str(bf16_bert_dir), output=out, method="int", method_options={"bits": 8}, progress=False)
    rest = r.rest
    assert rest["dtype"] == "bfloat16" and rest["linear"] is None
    small = load_model(out)
    dtypes = stored_dtypes(out)
    table = table_keys(small.model)
    others = {k: v for k, v in dtypes.items() if k not in table}
    assert others and set(others.values()) == {"BF16"}  # every other tensor as the source stored it
    # the whole model got smaller: a float32 rest would have doubled it
    assert r.bytes_after <= r.bytes_before == (bf16_bert_dir / "model.safetensors").stat().st_size
    assert r.to_dict()["bytes"] == {"input": r.bytes_before, "output": r.bytes_after, "larger": False,
                                          "ratio": r.bytes_before / r.bytes_after}
    # embfactor loads it in float32 (its compute dtype): the values are the bf16 ones, the outputs the original's
    source = load_model(bf16_bert_dir)
    with torch.no_grad():
        a = source.model(PROMPT[:, :6] % 100).last_hidden_state
        b = small.model(PROMPT[:, :6] % 100).last_hidden_state
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
    for t in rest_tensors(small.model):
        assert t.dtype == torch.float32 and torch.equal(t, t.to(torch.bfloat16).float())
    # a transformers user gets the source's dtype (config.json states it)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_gguf_like_float32_source_stores_its_rest_in_bf16(tmp_path: Path, tiny_llama_tied):
    from tests.test_gguf_loader import write_tiny_gguf

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", _bigger_llama(), tokenizer=True)  # float32 tensors
    assert source_dtype(gguf_path) == torch.bfloat16
    out = tmp_path / "out"
    r = compress(str(gguf_path), output=out, rank=8, progress=False)
    assert r.rest["dtype"] == "bfloat16"
    assert r.bytes_before == gguf_path.stat().st_size  # the input's bytes are the GGUF file's
    small = load_model(out)
    others = {k: v for k, v in stored_dtypes(out).items() if k not in table_keys(small.model)}
    assert set(others.values()) == {"BF16"}
    assert r.bytes_after < r.bytes_before


def _bigger_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("rest", ["int8", "int4"])
@pytest.mark.parametrize("tied", [True, False])
def test_rest_int_round_trips_through_from_pretrained_and_load_compressed(tmp_path: Path, rest: str, tied: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        original = model(PROMPT).logits
    factorize_(model, method="int", bits=8)
    params = count_params(model)
    info = store_rest_(model, rest, source=tmp_path / "x.gguf")
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, IntKLinear))
    # every Linear but the tied head (a format); an untied head is a Linear like the others
    assert linears == info["linear_modules"] and len(linears) == 14 + (0 if tied else 1)
    assert not any(type(m) is nn.Linear for m in model.modules())
    with torch.no_grad():
        ours = model(PROMPT).logits
    err = float((ours - original).norm() / original.norm())
    assert 0 < err < (0.02 if rest == "int8" else 0.2)  # stored as integers: close to the original, not equal
    out = save_compressed(model, tmp_path / "out")
    assert {v for k, v in stored_dtypes(out).items() if k.endswith("proj.weight")} == {"U8"}
    for loaded in (load_compressed(out), AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)):
        assert sorted(n for n, m in loaded.named_modules() if isinstance(m, IntKLinear)) == linears
        with torch.no_grad():
            torch.testing.assert_close(loaded(PROMPT).logits, ours, rtol=0, atol=1e-5)
    bf16 = AutoModelForCausalLM.from_pretrained(out)  # config.json's dtype: the stored rest's
    assert bf16.dtype == torch.bfloat16
    with torch.no_grad():
        got = bf16(PROMPT).logits.float()
    assert float((got - ours).norm() / ours.norm()) < 0.05
    # an integer Linear's weight still counts as in × out parameters (plus its scales and minima)
    extra = sum(t.numel() for m in model.modules() if isinstance(m, IntKLinear)
                for t in (m.weight_scale, m.weight_min) if t is not None)
    assert count_params(load_compressed(out)) == params + extra
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format_version"] == 2 and q["rest"]["linear"] == rest


def test_intk_linear_matches_its_dequantized_weight_and_counts_its_bytes():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    x = torch.randn(3, 5, 96)
    for kind, settings in REST_SETTINGS.items():
        q = IntKLinear.from_linear(lin, **settings)
        w = q.dequantized()
        torch.testing.assert_close(q(x), torch.nn.functional.linear(x, w, lin.bias))
        rel = float((w.detach() - lin.weight.detach()).norm() / lin.weight.detach().norm())
        assert rel < (0.01 if kind == "int8" else 0.1)
        stored = sum(t.numel() * t.element_size() for t in (q.weight, q.weight_scale, q.weight_min) if t is not None)
        assert q.num_bytes() == stored


def test_the_report_leads_with_the_model_bytes_and_says_when_it_grew(bf16_bert_dir: Path, tmp_path: Path, capsys):
    rep = tmp_path / "r.json"
    argv = ["compress", str(bf16_bert_dir), "--method", "int", "--method-option", "bits=8", "-q", "--json", str(rep)]
    assert main([*argv, "--rest", "fp32", "--output", str(tmp_path / "big")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    r = json.loads(rep.read_text())
    assert next(iter(r)) == "bytes" and r["bytes"]["larger"]  # float32 rest from a bf16 source: larger
    assert first.startswith("model on disk:") and "LARGER than the input" in first
    assert r["bytes"]["output"] == (tmp_path / "big" / "model.safetensors").stat().st_size
    assert main([*argv, "--rest", "int8", "--output", str(tmp_path / "small")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "smaller" in first and "LARGER" not in first and not json.loads(rep.read_text())["bytes"]["larger"]


def test_a_bad_rest_is_refused_before_the_load(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compress", "no-such-model", "--ratio", "4", "--rest", "int3", "--output", str(tmp_path / "o")])
    assert e.value.code == 2 and "--rest" in capsys.readouterr().err
    from embfactor.errors import ConfigError

    with pytest.raises(ConfigError, match="rest must be one of auto, bf16, fp16, fp32, int8, int4, got 'int3'"):
        compress("no-such-model", ratio=4, rest="int3")


def test_heal_keeps_the_rest_as_stored(tmp_path: Path, tiny_bert_dir: Path):
    from embfactor.pipeline.heal import heal

    out = tmp_path / "out"
    compress(str(tiny_bert_dir), output=out, method="int", method_options={"bits": 8}, rest="int8", progress=False)
    healed = tmp_path / "healed"
    heal(str(out), str(tiny_bert_dir), healed, steps=2, progress=False, batch_size=2, eval_every=2, train_all=True)
    again = load_model(healed)
    assert again.record["rest"] == load_model(out).record["rest"]
    assert any(isinstance(m, IntKLinear) for m in again.model.modules())
    assert {v for k, v in stored_dtypes(healed).items() if k.endswith("dense.weight")} == {"U8"}


def test_integer_rest_with_the_planner_is_verified_without_false_alarm(tmp_path: Path, tiny_bert_dir: Path):
    # the in-memory prediction is taken after the rest is stored; the plan's check (made before it) is not compared
    r = compress(str(tiny_bert_dir), output=tmp_path / "o", size="8x", rest="int8", progress=False)
    assert r.verified["ok"] and r.verified["plan_check"] is None
    assert r.to_dict()["rest"]["linear"] == "int8"


def test_a_quantized_gguf_keeps_each_linears_precision_by_default(tmp_path: Path):
    """--rest auto of a GGUF: Q4_1 Linears stored as int4, Q8_0 ones as int8, float tensors bf16 (issue 30)."""
    from gguf import GGMLQuantizationType as Q
    from transformers import AutoModelForCausalLM

    from tests.test_gguf_loader import write_tiny_gguf

    types = {"attn_q.weight": Q.Q4_1, "attn_k.weight": Q.Q4_1, "attn_v.weight": Q.Q4_1, "attn_output.weight": Q.Q4_1,
             "ffn_gate.weight": Q.Q4_1, "ffn_up.weight": Q.Q4_1, "ffn_down.weight": Q.Q8_0, "token_embd.weight": Q.Q8_0}
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", _bigger_llama(), types, tokenizer=True)
    out = tmp_path / "out"
    r = compress(str(gguf_path), output=out, method="int", method_options={"bits": 4}, progress=False)
    kinds = r.rest["linear_kinds"]
    assert r.rest["linear"] == "mixed" and sorted(kinds) == r.rest["linear_modules"] and len(kinds) == 14
    assert {k: v for k, v in kinds.items() if k.endswith("down_proj")} == dict.fromkeys(
        [f"model.layers.{i}.mlp.down_proj" for i in range(2)], "int8")
    assert {v for k, v in kinds.items() if not k.endswith("down_proj")} == {"int4"}
    assert r.bytes_after <= r.bytes_before  # never more bytes than it read
    small = load_model(out)
    got = {n: (m.bits, m.group) for n, m in small.model.named_modules() if isinstance(m, IntKLinear)}
    assert got == {k: (REST_SETTINGS[v]["bits"], REST_SETTINGS[v]["group"]) for k, v in kinds.items()}
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(plain(PROMPT % 100).logits, small.model(PROMPT % 100).logits, rtol=0, atol=1e-5)


def test_a_float_gguf_and_an_explicit_rest_are_unchanged(tmp_path: Path):
    from embfactor.surgery.rest import gguf_kind

    assert [gguf_kind(t) for t in ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_1", "Q4_K", "Q4_0", "IQ4_XS", "Q2_K")] == [
        None, None, None, "int8", "int8", "int8", "int4", "int4", "int4", "int4"]
