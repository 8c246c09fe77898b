"""Architecture conformance: every transformers architecture embfactor claims comes back with the original's outputs.

Each architecture is built tiny from its config (random weights, no download). For each:
  (a) near-lossless int8 storage gives the original's outputs: every module that reads the table (the input
      embedding, and an encoder-decoder's ``encoder.embed_tokens`` / ``decoder.embed_tokens``) within 2% relative
      error, every layer's hidden states cos >= 0.999, causal LMs and seq2seq models the same greedy tokens;
  (b) ``compress(..., size="8x")`` (the planner) saves a folder that ``from_pretrained`` reloads, after
      ``import embfactor``, to the in-memory model;
  (c) what embfactor cannot reproduce is refused before any work, naming the architecture and what it lacks.
Hidden states are compared, not only logits: a tiny random model's logits are nearly uniform, so a dropped √d
embedding scale moved Gemma 3's KL by 4e-4 while its embedding output was 87.5% off (issue 19).
"""

from __future__ import annotations

import copy
import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import embfactor as ef
from embfactor.errors import SurgeryError

V, D = 1000, 32
POS = 512  # the planner's decoder check reads windows of 256 tokens
LAYER = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=POS)
DEC = dict(LAYER, hidden_size=D, num_key_value_heads=1)
S2S = dict(d_model=D, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
           encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=POS)
T5 = dict(d_model=D, d_kv=16, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0)


@dataclass(frozen=True)
class Arch:
    config: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    untie: bool = False  # give the head its own weight (a checkpoint with a separate lm_head, e.g. T5 v1.1)


ARCHS = {
    # encoders
    "bert": Arch("BertConfig", "BertModel", dict(LAYER, hidden_size=D, pad_token_id=0)),
    "roberta": Arch("RobertaConfig", "RobertaModel", dict(LAYER, hidden_size=D, pad_token_id=1)),
    "xlm-roberta": Arch("XLMRobertaConfig", "XLMRobertaModel", dict(LAYER, hidden_size=D, pad_token_id=1)),
    "distilbert": Arch("DistilBertConfig", "DistilBertModel",
                       dict(dim=D, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=POS, pad_token_id=0)),
    "albert": Arch("AlbertConfig", "AlbertModel", dict(LAYER, embedding_size=16, hidden_size=D, pad_token_id=0)),
    "electra": Arch("ElectraConfig", "ElectraModel", dict(LAYER, embedding_size=16, hidden_size=D, pad_token_id=0)),
    "mpnet": Arch("MPNetConfig", "MPNetModel", dict(LAYER, hidden_size=D, pad_token_id=1)),
    "deberta-v2": Arch("DebertaV2Config", "DebertaV2Model", dict(LAYER, hidden_size=D, pad_token_id=0)),
    "modernbert": Arch("ModernBertConfig", "ModernBertModel",
                       dict(LAYER, hidden_size=D, pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2,
                            sep_token_id=3)),
    # decoders (tied and untied heads)
    "gpt2": Arch("GPT2Config", "GPT2LMHeadModel", dict(n_embd=D, n_layer=1, n_head=2, n_positions=POS,
                                                        bos_token_id=2, eos_token_id=3)),
    "gpt-neox": Arch("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(LAYER, hidden_size=D)),
    "opt": Arch("OPTConfig", "OPTForCausalLM", dict(hidden_size=D, word_embed_proj_dim=16, num_hidden_layers=1,
                                                    num_attention_heads=2, ffn_dim=64, max_position_embeddings=POS,
                                                    pad_token_id=1)),
    "bloom": Arch("BloomConfig", "BloomForCausalLM", dict(hidden_size=D, n_layer=1, n_head=2)),
    "falcon": Arch("FalconConfig", "FalconForCausalLM", dict(hidden_size=D, num_hidden_layers=1,
                                                             num_attention_heads=2)),
    "llama": Arch("LlamaConfig", "LlamaForCausalLM", DEC),
    "llama-tied": Arch("LlamaConfig", "LlamaForCausalLM", dict(DEC, tie_word_embeddings=True)),
    "mistral": Arch("MistralConfig", "MistralForCausalLM", DEC),
    "qwen2": Arch("Qwen2Config", "Qwen2ForCausalLM", dict(DEC, tie_word_embeddings=True)),
    "qwen3": Arch("Qwen3Config", "Qwen3ForCausalLM", dict(DEC, head_dim=16)),
    "phi3": Arch("Phi3Config", "Phi3ForCausalLM", dict(DEC, pad_token_id=0, eos_token_id=3)),
    "gemma": Arch("GemmaConfig", "GemmaForCausalLM", dict(DEC, head_dim=16)),
    "gemma2": Arch("Gemma2Config", "Gemma2ForCausalLM", dict(DEC, head_dim=16)),
    "gemma3": Arch("Gemma3TextConfig", "Gemma3ForCausalLM", dict(DEC, head_dim=16)),
    "gemma3-untied": Arch("Gemma3TextConfig", "Gemma3ForCausalLM", dict(DEC, head_dim=16, tie_word_embeddings=False)),
    "olmo2": Arch("Olmo2Config", "Olmo2ForCausalLM", dict(DEC, eos_token_id=3, pad_token_id=1)),
    "stablelm": Arch("StableLmConfig", "StableLmForCausalLM", DEC),
    # encoder-decoders: one table shared by `shared`, encoder.embed_tokens, decoder.embed_tokens (and a tied head)
    "t5": Arch("T5Config", "T5ForConditionalGeneration", T5),
    "t5-untied": Arch("T5Config", "T5ForConditionalGeneration", dict(T5, tie_word_embeddings=False), untie=True),
    "mt5": Arch("MT5Config", "MT5ForConditionalGeneration", T5),
    "bart": Arch("BartConfig", "BartForConditionalGeneration", dict(S2S, scale_embedding=True)),
    "mbart": Arch("MBartConfig", "MBartForConditionalGeneration", dict(S2S, scale_embedding=True)),
    "marian": Arch("MarianConfig", "MarianMTModel", dict(S2S, scale_embedding=True, decoder_start_token_id=3,
                                                         pad_token_id=3)),
    "m2m100": Arch("M2M100Config", "M2M100ForConditionalGeneration", dict(S2S, scale_embedding=True)),
    "pegasus": Arch("PegasusConfig", "PegasusForConditionalGeneration", dict(S2S, scale_embedding=True)),
}


def build(name: str) -> nn.Module:
    """The architecture ``name`` of ARCHS, tiny, with seeded random weights."""
    import transformers

    arch = ARCHS[name]
    torch.manual_seed(0)
    config = getattr(transformers, arch.config)(vocab_size=V, **arch.options)
    model = getattr(transformers, arch.model)(config)
    if arch.untie:
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(torch.randn_like(head.weight) * 0.05)
    return model.eval()


def kind(model: nn.Module) -> str:
    from embfactor.models import kind_of

    return "seq2seq" if model.config.is_encoder_decoder else kind_of(model)


def table_readers(model: nn.Module) -> list[str]:
    """Every input-side module that reads the input table: nn.Embeddings holding its weight (T5/BART `shared` too)."""
    w = model.get_input_embeddings().weight
    return [f for f, m in model.named_modules() if isinstance(m, nn.Embedding) and m.weight is w]


IDS = torch.tensor([[5, 17, 2, 980, 44, 1, 0, 123, 7, 999, 31, 64]])


@torch.no_grad()
def hidden_states(model: nn.Module) -> list[torch.Tensor]:
    """Every layer's hidden states on IDS (encoder and decoder ones for a seq2seq model)."""
    if model.config.is_encoder_decoder:
        out = model(input_ids=IDS, decoder_input_ids=IDS[:, :6], output_hidden_states=True)
        return [*out.encoder_hidden_states, *out.decoder_hidden_states]
    return list(model(input_ids=IDS, output_hidden_states=True).hidden_states)


@torch.no_grad()
def greedy(model: nn.Module) -> torch.Tensor:
    return model.generate(input_ids=IDS[:, :6], max_new_tokens=4, do_sample=False, num_beams=1,
                          pad_token_id=0, eos_token_id=None, min_new_tokens=4)


def row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of each pair of rows; a pair of zero rows (a padding token's zero embedding) counts as equal."""
    zero = (a.norm(dim=-1) < 1e-12) & (b.norm(dim=-1) < 1e-12)
    return torch.where(zero, 1.0, torch.nn.functional.cosine_similarity(a, b, dim=-1))


def assert_same_outputs(original: nn.Module, other: nn.Module, *, min_cos: float = 0.999, rel: float = 0.02,
                        readers: list[str] | None = None) -> None:
    """(a): every table reader within ``rel`` relative error, every layer cos >= ``min_cos``, same greedy tokens.

    ``readers``: the modules reading the table (default: the dense ``original``'s :func:`table_readers`).
    """
    ids = IDS[0]
    for fqn in table_readers(original) if readers is None else readers:
        with torch.no_grad():
            want, got = original.get_submodule(fqn)(ids), other.get_submodule(fqn)(ids)
        err = float((got - want).norm() / want.norm())
        assert err < rel, f"{type(original).__name__}.{fqn}: embedding output {100 * err:.1f}% off"
    for i, (a, b) in enumerate(zip(hidden_states(original), hidden_states(other), strict=True)):
        cos = float(row_cosines(a, b).min())
        assert cos >= min_cos, f"{type(original).__name__}: hidden states of layer {i} cos {cos:.4f} < {min_cos}"
    if kind(original) != "encoder":
        assert torch.equal(greedy(original), greedy(other)), f"{type(original).__name__}: greedy tokens differ"


@pytest.mark.parametrize("name", list(ARCHS))
def test_int8_keeps_the_original_outputs(name):
    original = build(name)
    model = copy.deepcopy(original)
    head = original.get_output_embeddings() if hasattr(original, "get_output_embeddings") else None
    report = ef.factorize_(model, method="int", bits=8)
    # every module that read the dense table now reads the int8 one (none keeps a dense copy of its own)
    assert [f for f in table_readers(original) if isinstance(model.get_submodule(f), nn.Embedding)] == []
    # tied is what the model computes (the head reads the input table), not what its config says
    assert report.tied_head == (head is not None and head.weight is original.get_input_embeddings().weight)
    if ARCHS[name].untie:  # T5 v1.1's own lm_head: transformers 5 forces config.tie_word_embeddings=True all the same
        assert not report.tied_head and original.config.tie_word_embeddings
    assert_same_outputs(original, model)


# --- (b): the planner, saved and reloaded ------------------------------------------------------------------------
@functools.cache
def wiki_texts() -> list[str]:
    """A few paragraphs of the bundled Wikipedia text: the planner counts tokens and checks plans on them."""
    from embfactor.data import wiki_split

    return [line for art in wiki_split("train")[:12] for line in art.splitlines()[:2] if line.strip()]


@functools.cache
def wiki_tokenizer():
    """A word-level tokenizer over the V most frequent words of the bundled Wikipedia text (the planner counts them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Counter(w for t in wiki_texts() for w in t.split())
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = specials + [w for w, _ in words.most_common(V - len(specials))]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>")


@pytest.fixture
def tokenizer():
    return wiki_tokenizer()


# int-k and one PQ format: every kind of tier, without fitting the eleven default formats on each architecture
PLANNER_FORMATS = {"formats": ["int8 g32", "int4 g32", "pq sub8 K256 int8cb"]}


def reload(folder: Path, architecture: str) -> nn.Module:
    import transformers

    return getattr(transformers, architecture).from_pretrained(folder).eval()


@pytest.mark.parametrize("name", list(ARCHS))
def test_size_8x_saves_and_reloads_through_from_pretrained(name, tokenizer, tmp_path):
    from embfactor.models import LoadedModel
    from embfactor.pipeline.compress import compress

    original = build(name)
    model = copy.deepcopy(original)
    lm = LoadedModel(name, model, tokenizer, kind(model).replace("seq2seq", "encoder"), tmp_path / "src")
    (tmp_path / "calibration.txt").write_text("\n\n".join(wiki_texts()))
    # verify=False: this test reloads the folder itself and demands the in-memory model's outputs to 1e-5 (stricter
    # than compress's own check, whose comparison with the plan's check misfires on a random model checked on a few
    # calibration paragraphs: BART 0.24 held-out fidelity vs 0.97 on the calibration text, written == in memory)
    report = compress(lm, size="8x", method="auto", method_options=PLANNER_FORMATS, output=tmp_path / "out",
                      text_files=[str(tmp_path / "calibration.txt")], progress=False, verify=False)
    assert report.factorization["bytes_ratio"] >= 7.9
    again = reload(tmp_path / "out", ARCHS[name].model)
    assert type(again.get_input_embeddings()) is type(model.get_input_embeddings())
    assert_same_outputs(model, again, min_cos=0.99999, rel=1e-5, readers=table_readers(original))
    # the planned table is lossy, but every module still reads it the way the original read its own table
    for fqn in table_readers(original):
        with torch.no_grad():
            want, got = original.get_submodule(fqn)(IDS[0]), again.get_submodule(fqn)(IDS[0])
        assert float((got - want).norm() / want.norm()) < 0.5, fqn


# --- extreme scales: found by probing the module, whatever the value ---------------------------------------------
@pytest.mark.parametrize("name", ["gemma3", "bart"])
@pytest.mark.parametrize("scale", [1e-3, 1e4])
def test_extreme_embedding_scales_are_carried_and_saved(name, scale, tmp_path):
    original = build(name)
    for fqn in table_readers(original):
        module = original.get_submodule(fqn)
        if isinstance(getattr(module, "embed_scale", None), torch.Tensor):
            module.embed_scale.fill_(scale)
        elif hasattr(module, "embed_scale"):
            module.embed_scale = scale
    model = copy.deepcopy(original)
    ef.factorize_(model, method="int", bits=8)
    assert_same_outputs(original, model)
    ef.save_compressed(model, tmp_path / "out")
    assert_same_outputs(original, reload(tmp_path / "out", ARCHS[name].model))
    assert_same_outputs(original, ef.load_compressed(tmp_path / "out"))


@pytest.mark.parametrize("name", ["gemma3", "bart", "t5"])
def test_the_plans_check_scores_a_table_as_the_saved_model_computes_it(name, tokenizer, tmp_path):
    """The planner scores a candidate by writing it into the original module (which scales, and which T5's encoder
    and decoder share): the saved model must compute what was scored for its own table."""
    from embfactor.data import read_texts
    from embfactor.eval.embed import pooled_embeddings
    from embfactor.models import LoadedModel
    from embfactor.pipeline.compress import compress
    from embfactor.plan import ModelScorer, calibration_split

    original = build(name)
    k = kind(original).replace("seq2seq", "encoder")
    (tmp_path / "calibration.txt").write_text("\n\n".join(wiki_texts()))
    compress(LoadedModel(name, copy.deepcopy(original), tokenizer, k, tmp_path / "src"), size="8x",
             method="auto", method_options=PLANNER_FORMATS, output=tmp_path / "out",
             text_files=[str(tmp_path / "calibration.txt")], progress=False, verify=False)
    saved = LoadedModel(name, reload(tmp_path / "out", ARCHS[name].model), tokenizer, k, tmp_path / "out")
    scorer = ModelScorer(LoadedModel(name, original, tokenizer, k, tmp_path / "src"),
                         texts=calibration_split(read_texts([tmp_path / "calibration.txt"]))[1])
    predicted = scorer.score(saved.model.get_input_embeddings().dense())  # the check's view of the saved table
    scorer.restore()
    with torch.inference_mode():
        if k == "decoder":
            lp = torch.log_softmax(saved.model(input_ids=scorer.batch).logits.float(), -1)
            measured = -float((scorer.ref.exp() * (scorer.ref - lp)).sum(-1).mean())
        else:
            measured = float((pooled_embeddings(saved, scorer.texts, batch_size=16) * scorer.ref).sum(-1).mean())
    assert measured == pytest.approx(predicted, rel=1e-3, abs=1e-6), (measured, predicted)


# --- (c): what a format cannot reproduce is refused before any work ----------------------------------------------
class Shifted(nn.Embedding):
    """An embedding whose forward adds a constant: not a scaled lookup."""

    def forward(self, ids):
        return super().forward(ids) + 0.5


class PerColumn(nn.Embedding):
    """An embedding whose forward scales each column by its own factor (reproducible: carried as a list)."""

    def forward(self, ids):
        return super().forward(ids) * torch.linspace(0.01, 100.0, self.embedding_dim)


def with_embedding(model: nn.Module, cls: type[nn.Embedding], **kw: Any) -> nn.Module:
    old = model.get_input_embeddings()
    new = cls(old.num_embeddings, old.embedding_dim, old.padding_idx, **kw)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    model.set_input_embeddings(new)
    if model.get_output_embeddings() is not None and model.config.tie_word_embeddings:
        model.get_output_embeddings().weight = new.weight
    return model


@pytest.mark.parametrize("cls, kw, match", [
    (Shifted, {}, r"LlamaForCausalLM\.model\.embed_tokens \(Shifted\): its forward is not a scaled lookup"),
    (nn.Embedding, {"max_norm": 1.0}, r"LlamaForCausalLM\.model\.embed_tokens \(Embedding\) renormalizes"),
])
def test_what_a_format_cannot_reproduce_is_refused_before_any_work(cls, kw, match, tokenizer, monkeypatch):
    from embfactor.models import LoadedModel
    from embfactor.pipeline.compress import compress

    model = with_embedding(build("llama-tied"), cls, **kw)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError, match=match):
        ef.factorize_(model, method="int", bits=8)
    monkeypatch.setattr("embfactor.plan.plan_compress_", lambda *a, **k: pytest.fail("the planner ran"))
    with pytest.raises(SurgeryError, match=match):
        compress(LoadedModel("llama", model, tokenizer, "decoder", Path("src")), size="8x", progress=False)
    assert type(model.get_input_embeddings()) is cls  # untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_module_sharing_the_table_that_is_not_an_embedding_is_refused():
    model = build("llama")
    model.extra = nn.Linear(D, V, bias=False)
    model.extra.weight = model.get_input_embeddings().weight
    with pytest.raises(SurgeryError, match=r"LlamaForCausalLM\.extra \(Linear\) holds the input table"):
        ef.factorize_(model, method="int", bits=8)
    assert isinstance(model.get_input_embeddings(), nn.Embedding)


def test_a_per_column_scale_is_carried_through_save_and_from_pretrained(tmp_path):
    original = with_embedding(build("llama"), PerColumn)
    model = copy.deepcopy(original)
    ef.factorize_(model, method="int", bits=8)
    assert isinstance(model.get_input_embeddings().embed_scale, list)
    assert_same_outputs(original, model)
    ef.save_compressed(model, tmp_path / "out")
    # the folder names LlamaForCausalLM (a plain embedding): the scale comes from the saved quantization_config
    assert_same_outputs(original, reload(tmp_path / "out", "LlamaForCausalLM"))


def test_a_bf16_scaled_embedding_keeps_its_scale():
    original = build("gemma3").to(torch.bfloat16)
    model = copy.deepcopy(original)
    ef.factorize_(model, method="int", bits=8)
    scale = model.get_input_embeddings().embed_scale
    assert scale == pytest.approx(D**0.5, rel=1e-2)
    with torch.no_grad():
        want, got = original.get_input_embeddings()(IDS[0]).float(), model.get_input_embeddings()(IDS[0]).float()
    assert float((got - want).norm() / want.norm()) < 0.02


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_quantized_factors_keep_the_shared_readers_and_scales(name, tmp_path):
    """quantize_ swaps the format again: the encoder's and decoder's views must follow it to the new table."""
    from embfactor.layers import SharedEmbedding

    readers = table_readers(build(name))
    factors = build(name)
    ef.factorize_(factors, rank=16, method="svd")
    model = copy.deepcopy(factors)
    ef.quantize_(model, "int8")
    table = model.get_input_embeddings()
    views = [model.get_submodule(f) for f in readers[1:]]
    assert views and all(isinstance(v, SharedEmbedding) and v.table is table for v in views)
    assert_same_outputs(factors, model, readers=readers)  # int8 factors: near-lossless against the float ones
    ef.save_compressed(model, tmp_path / "out")
    again = reload(tmp_path / "out", ARCHS[name].model)
    assert_same_outputs(model, again, min_cos=0.99999, rel=1e-5, readers=readers)
