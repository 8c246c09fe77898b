"""Decoder healing's loss in chunks of token positions: the same loss and gradients as the whole batch's logits."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

import embfactor as ef
from embfactor.errors import ConfigError, InvalidInputError
from embfactor.models import LoadedModel
from embfactor.train.distill import (
    chunked_decoder_loss,
    decoder_loss,
    head_inputs,
    head_split_matches,
    teacher_logprobs,
)
from embfactor.train.heal import heal

from .conftest import VOCAB
from .test_heal import OPTS, TEXTS, word_tokenizer

# batch 3 × 10 tokens: 27 next-token positions; the last row ends in 4 padding positions
IDS = torch.arange(30).remainder(VOCAB - 1).add(1).view(3, 10)
MASK = torch.ones(3, 10, dtype=torch.long)
MASK[2, 6:] = 0


def compressed_pair(teacher: torch.nn.Module, method: str, options: dict, dtype=torch.float64) -> torch.nn.Module:
    """The teacher made float64 in place (equality to rounding, not to float32 noise) and a compressed copy of it,
    perturbed so the KL is far from 0, with every floating-point weight trainable."""
    teacher.to(dtype)
    student = copy.deepcopy(teacher)
    ef.factorize_(student, method=method, **options)  # the options fix the size
    student.to(dtype)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn_like(p))
    for p in student.parameters():
        p.requires_grad_(p.is_floating_point() and p.numel() > 0)
    return student


def whole_batch(student, teacher, mask):
    """The loss as heal computed it before chunking: the whole batch's logits."""
    batch = {"input_ids": IDS, "attention_mask": mask}
    with torch.no_grad():
        t_logp = teacher_logprobs(teacher(**batch).logits[:, :-1])
    return decoder_loss(student(**batch).logits[:, :-1], t_logp, mask[:, 1:])


def chunked(student, teacher, mask, chunk):
    batch = {"input_ids": IDS, "attention_mask": mask}
    with torch.no_grad(), head_inputs(teacher) as t_seen:
        teacher(**batch)
    with head_inputs(student) as s_seen:
        student(**batch)
    return chunked_decoder_loss(s_seen[0][:, :-1], t_seen[0][:, :-1], student.get_output_embeddings(),
                                teacher.get_output_embeddings(), mask[:, 1:], chunk=chunk)


def gradients(loss, model):
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {k: g for (k, _), g in zip(named, grads) if g is not None}


@pytest.mark.parametrize("method, options, table_tensor", [
    ("int", {"bits": 4, "group": 16}, "scale"),
    ("pq", {"sub_dim": 4, "K": 16}, "codebooks"),
])
@pytest.mark.parametrize("chunk", [1, 5, 27, 1000])  # one position, uneven chunks, exactly the batch, more than it
def test_chunked_loss_and_gradients_equal_the_whole_batchs(tiny_llama_tied, method, options, table_tensor, chunk):
    student = compressed_pair(tiny_llama_tied, method, options)
    teacher = tiny_llama_tied
    ref = whole_batch(student, teacher, MASK)
    ref_grads = gradients(ref, student)
    loss = chunked(student, teacher, MASK, chunk)
    grads = gradients(loss, student)
    assert float(ref.detach()) > 0.05  # far from 0: the comparison is not one of rounding noise
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert set(grads) == set(ref_grads)
    table = f"model.embed_tokens.{table_tensor}"
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert table in grads and weight in grads and ref_grads[table].abs().max() > 0
    for k, g in ref_grads.items():  # the codebook format computes its rows in float32: equal to float32 rounding
        assert (grads[k] - g).abs().max() <= 1e-5 * g.abs().max(), k


def test_chunked_loss_in_float32_matches_to_1e_5(tiny_llama_tied):
    teacher = tiny_llama_tied
    student = compressed_pair(teacher, "int", {"bits": 4, "group": 16}, dtype=torch.float32)
    ref = whole_batch(student, teacher, MASK)
    for chunk in (1, 4, 256):
        assert float(chunked(student, teacher, MASK, chunk).detach()) == pytest.approx(float(ref.detach()), abs=1e-5)


def test_padding_positions_are_excluded_as_before(tiny_llama_tied):
    """Masked positions add nothing (loss and gradients as decoder_loss's masked mean); no position masked = the
    plain mean; everything masked = 0 (not a division by zero)."""
    student = compressed_pair(tiny_llama_tied, "int", {"bits": 4, "group": 16})
    teacher = tiny_llama_tied
    ones = torch.ones_like(MASK)
    for mask in (MASK, ones):
        # the KL is summed in float32 (as before), so equal to float32 rounding
        assert float(chunked(student, teacher, mask, 4).detach()) == pytest.approx(
            float(whole_batch(student, teacher, mask).detach()), rel=1e-6)
    # the masked loss differs from the unmasked one, and the student's states at masked positions get no gradient
    h = torch.randn(3, 9, 32, dtype=torch.float64, requires_grad=True)
    head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    t_h = torch.randn(3, 9, 32, dtype=torch.float64)
    masked = chunked_decoder_loss(h, t_h, head, t_head, MASK[:, 1:], chunk=4)
    (g,) = torch.autograd.grad(masked, [h])
    assert torch.equal(g[2, 5:], torch.zeros_like(g[2, 5:])) and g[2, :5].abs().sum() > 0
    unmasked = chunked_decoder_loss(h, t_h, head, t_head, None, chunk=4)
    assert float(masked.detach()) != pytest.approx(float(unmasked.detach()))
    none = chunked_decoder_loss(h, t_h, head, t_head, torch.zeros(3, 9), chunk=4)
    assert float(none.detach()) == 0.0


def test_head_inputs_skip_the_logits_and_record_the_final_states(tiny_gpt2):
    with torch.no_grad():
        full = tiny_gpt2(input_ids=IDS).logits
        with head_inputs(tiny_gpt2) as seen:
            out = tiny_gpt2(input_ids=IDS)
    assert out.logits.shape == (3, 1, VOCAB) and len(seen) == 1  # the first position's only
    assert torch.allclose(tiny_gpt2.get_output_embeddings()(seen[0]), full, atol=1e-6)
    assert not tiny_gpt2.get_output_embeddings()._forward_pre_hooks  # removed on exit


def scaled_logits(model):
    """The model with its logits doubled after the head (as soft-capping or a logit scale would change them)."""
    forward = model.forward

    def doubled(*a, **k):
        out = forward(*a, **k)
        out.logits = out.logits * 2
        return out

    model.forward = doubled
    return model


def test_models_that_change_logits_after_the_head_use_the_whole_batch(tiny_gpt2):
    ids = IDS[:1, :8]
    assert head_split_matches(tiny_gpt2, ids)
    student, teacher = pair_of(tiny_gpt2)
    scaled_logits(student.model)
    assert not head_split_matches(student.model, ids)
    r = heal(student, teacher, texts=TEXTS * 4, steps=1, **OPTS)
    assert r["loss_chunk"] == 0 and r["steps"] == 1


def pair_of(model) -> tuple[LoadedModel, LoadedModel]:
    tok = word_tokenizer()
    student = copy.deepcopy(model)
    ef.factorize_(student, rank=4, method="svd")
    return (LoadedModel("student", student, tok, "decoder", Path("/nonexistent-student")),
            LoadedModel("teacher", model, tok, "decoder", Path("/nonexistent-teacher")))


def test_heal_in_chunks_trains_as_the_whole_batch_does(tiny_gpt2):
    """Two heals from the same start, one with the whole batch's logits and one 7 positions at a time: the same
    held-out losses and the same trained weights (every weight trains, so the transformer's gradients count too)."""
    results, weights = [], []
    for chunk in (0, 7):
        student, teacher = pair_of(tiny_gpt2)
        r = heal(student, teacher, texts=TEXTS * 4, steps=3, train_all=True, loss_chunk=chunk,
                 **{**OPTS, "lr": 1e-3})
        results.append(r)
        weights.append({k: v.detach().clone() for k, v in student.model.named_parameters()})
    assert [r["loss_chunk"] for r in results] == [0, 7]
    for a, b in zip(results[0]["history"], results[1]["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    for k, v in weights[0].items():
        assert torch.allclose(weights[1][k], v, rtol=1e-4, atol=1e-6), k
    assert any(not torch.equal(v, tiny_gpt2.state_dict().get(k, v)) for k, v in weights[0].items())


def test_loss_chunk_bad_values():
    with pytest.raises(ConfigError, match=r"loss_chunk must be an integer ≥ 0, got -1"):
        heal_config(loss_chunk=-1)
    h = torch.zeros(1, 2, 4)
    lin = torch.nn.Linear(4, 5)
    with pytest.raises(InvalidInputError, match="chunk must be a positive number of token positions, got 0"):
        chunked_decoder_loss(h, h, lin, lin, chunk=0)
    with pytest.raises(InvalidInputError, match="the student has 2 hidden positions and the teacher 3"):
        chunked_decoder_loss(h, torch.zeros(1, 3, 4), lin, lin)


def heal_config(**kw):
    from embfactor.train.config import HealConfig

    return HealConfig(**kw)


# ----------------------------------------------------------------------------------------------- layers recomputed


def test_recompute_layers_runs_each_layer_again_in_backward_with_the_same_gradients(tiny_llama_tied, monkeypatch):
    """Under recompute_layers each layer's inner modules run twice per step (forward, then the backward's replay),
    in eval mode too; the gradients are those of the plain forward; on exit the model is as it was."""
    from embfactor.train.distill import recompute_layers, transformer_layers

    model = tiny_llama_tied.double()
    layers = transformer_layers(model)
    assert len(layers) == 2 and model.training is False
    calls = []
    mlp_forward = type(layers[0].mlp).forward  # counted in the class: module hooks do not run in the replay

    def counted(self, *a, **k):
        calls.append(1)
        return mlp_forward(self, *a, **k)

    monkeypatch.setattr(type(layers[0].mlp), "forward", counted)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(recompute: bool):
        calls.clear()
        with recompute_layers(model, recompute) as n:
            loss = model(input_ids=IDS, attention_mask=MASK, use_cache=False).logits.pow(2).mean()
        g = torch.autograd.grad(loss, params)
        return n, len(calls), g

    n, runs, plain = grads(False)
    assert (n, runs) == (0, 2)
    n, runs, again = grads(True)
    assert (n, runs) == (2, 4)
    for a, b in zip(plain, again):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    assert all("forward" not in layer.__dict__ for layer in layers)  # unwrapped on exit
    with torch.no_grad(), recompute_layers(model) as n:  # nothing to recompute without gradients
        assert n == 0


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama_tied"])
def test_heal_with_layers_recomputed_trains_as_without(request, fixture):
    """Decoders recompute their layers by default (checkpoint_layers="auto"): the same held-out losses and trained
    weights as keeping every activation."""
    model = request.getfixturevalue(fixture)
    results, weights = [], []
    for recompute in (False, "auto"):
        student, teacher = pair_of(model)
        r = heal(student, teacher, texts=TEXTS * 4, steps=3, train_all=True, checkpoint_layers=recompute,
                 **{**OPTS, "lr": 1e-3})
        results.append(r)
        weights.append({k: v.detach().clone() for k, v in student.model.named_parameters()})
    assert [r["checkpoint_layers"] for r in results] == [False, True]
    for a, b in zip(results[0]["history"], results[1]["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    for k, v in weights[0].items():
        assert torch.allclose(weights[1][k], v, rtol=1e-5, atol=1e-7), k


def test_encoders_keep_their_activations_unless_asked(tiny_bert):
    from .test_heal import pair

    student, teacher = pair(tiny_bert, "encoder")
    assert heal(student, teacher, texts=TEXTS, steps=1, **OPTS)["checkpoint_layers"] is False
    student, teacher = pair(tiny_bert, "encoder")
    r = heal(student, teacher, texts=TEXTS, steps=1, checkpoint_layers=True, **OPTS)
    assert r["checkpoint_layers"] is True and r["loss_chunk"] is None
    with pytest.raises(ConfigError, match="checkpoint_layers must be True, False or 'auto', got 'yes'"):
        heal_config(checkpoint_layers="yes")


PROBE = """
import json, sys
import torch
sys.path.insert(0, {root!r})
from tests.conftest import _llama
from tests.test_heal import OPTS, TEXTS
from tests.test_heal_chunked import pair_of
from embfactor.train.heal import heal

student, teacher = pair_of(_llama(True))
r = heal(student, teacher, texts=TEXTS * 4, steps=3, train_all=True, loss_chunk=int(sys.argv[1]),
         **{{**OPTS, "lr": 1e-3}})
w = torch.cat([p.detach().flatten().double() for p in student.model.parameters()])
print("RESULT " + json.dumps([r["processes"], r["loss_chunk"], r["checkpoint_layers"], float(w.pow(2).sum())]),
      flush=True)
"""


@pytest.mark.slow  # two torchrun launches of two processes each (~40 s on a busy 2-core machine)
def test_chunked_heal_under_two_cpu_processes_trains_as_the_whole_batch(tmp_path):
    """Under DDP (two CPU processes) a decoder heals with chunked, checkpointed losses and recomputed layers: every
    parameter's gradient is reduced once per step (non-reentrant checkpoints), the processes stay in step, and the
    weights match a two-process run on the whole batch's logits."""
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(root=str(Path(__file__).resolve().parents[1])))
    src = str(Path(ef.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    runs = {}
    for chunk in (0, 5):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), str(chunk)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # the two processes share stdout and their lines can run together
        runs[chunk] = [json.loads(m) for m in re.findall(r"RESULT (\[[^\]]*\])", proc.stdout)]
    assert [r[:3] for r in runs[0]] == [[2, 0, True]] * 2 and [r[:3] for r in runs[5]] == [[2, 5, True]] * 2
    norms = [r[3] for r in runs[0] + runs[5]]
    assert max(norms) - min(norms) <= 1e-6 * max(norms)
