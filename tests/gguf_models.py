"""Tiny random models of the architectures transformers reads from GGUF, written as GGUF files offline.

:func:`write_gguf` writes any of them the way llama.cpp's ``convert_hf_to_gguf.py`` would: tensors named by
transformers' own GGUF name map (``get_gguf_hf_weights_map``, i.e. ``gguf.tensor_mapping``), with llama.cpp's
transforms applied (the inverses of transformers' ``TensorProcessor``\\ s: Llama's q/k permutation, Gemma's and
Nemotron's norms stored as ``w + 1``, GPT-2's transposes, Bloom's interleaved qkv, Mamba's ``-exp(A_log)``, MoE
experts split into ``ffn_{gate,up,down}_exps``), and the metadata transformers reads back (its
``GGUF_CONFIG_MAPPING``, inverted). :data:`ARCHITECTURES` holds a tiny config per GGUF architecture.

Used by tests/test_gguf_loader.py and tests/test_gguf_architectures.py, and by benchmarks/gguf_load.py (a ~270M model
of one of them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _gemma(**extra: Any) -> dict[str, Any]:
    return {**SMALL, "head_dim": 16, "sliding_window": 32, **extra}


# GGUF architecture -> (transformers model_type, config kwargs). Sizes are multiples of 32 (the quant block) and,
# where transformers' GGUF metadata map has no key for a setting, the config class's default (the file cannot say).
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", dict(SMALL)),
    "qwen2": ("qwen2", dict(SMALL)),
    "qwen3": ("qwen3", dict(SMALL)),  # head_dim: the default 128 (no GGUF key for it in transformers' qwen3 map)
    "phi3": ("phi3", {**SMALL, "pad_token_id": 0}),
    "gemma2": ("gemma2", _gemma()),
    "gemma3": ("gemma3_text", _gemma()),
    "starcoder2": ("starcoder2", dict(SMALL)),
    "stablelm": ("stablelm", {**SMALL, "num_key_value_heads": 4}),
    "nemotron": ("nemotron", dict(SMALL)),
    "gpt2": ("gpt2", {"vocab_size": 128, "n_embd": 64, "n_layer": 2, "n_head": 4}),
    "bloom": ("bloom", {"vocab_size": 128, "hidden_size": 64, "n_layer": 2, "n_head": 4}),
    "falcon": ("falcon", {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "max_position_embeddings": 64}),
    "mamba": ("mamba", {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "state_size": 16,
                        "time_step_rank": 4, "intermediate_size": 128, "conv_kernel": 4}),
    "qwen2moe": ("qwen2_moe", {**SMALL, "num_experts": 4, "num_experts_per_tok": 2}),
    "qwen3moe": ("qwen3_moe", {**SMALL, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True}),
    "minimax-m2": ("minimax_m2", {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                                  "rotary_dim": 8, "bos_token_id": 1, "eos_token_id": 2}),
    "gemma4": ("gemma4_text", {**SMALL, "sliding_window": 32}),  # head_dim 256, global_head_dim 512: the defaults
    # transformers reads lfm2 through its newer GGUF path (integrations/gguf), with a config of its own
    "lfm2": ("lfm2", {**SMALL, "num_hidden_layers": 3, "layer_types": ["conv", "full_attention", "conv"],
                      "block_auto_adjust_ff_dim": False}),
}

# Architectures transformers 5.23 names but cannot load from GGUF: its GPT-OSS processor is registered as "gpt_oss",
# not llama.cpp's "gpt-oss", so the experts (ffn_*_exps) map to nothing and from_pretrained draws them at random.
UNLOADABLE: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt-oss": ("gpt_oss", {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 32}),
}

# transformers' key in GGUF_CONFIG_MAPPING where it differs from the file's architecture name
_CONFIG_KEY = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "minimax-m2": "minimax_m2", "gpt-oss": "gpt_oss"}


def tiny_model(arch: str, *, tied: bool | None = None, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random causal LM of GGUF architecture ``arch`` (its norms random too: ones would hide a misplaced norm)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type, kwargs = ARCHITECTURES[arch] if arch in ARCHITECTURES else UNLOADABLE[arch]
    kwargs = {**kwargs, **overrides}
    if tied is not None:
        kwargs["tie_word_embeddings"] = tied
    torch.manual_seed(seed)
    config = CONFIG_MAPPING[model_type](**kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.rsplit(".", 2)[-2] if name.count(".") > 1 else ""
            if "norm" in name or module.startswith("ln"):  # gpt2's ln_1, falcon's ln_f
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:  # biases, Mamba's D/dt
                p.normal_(0, 0.1)
        if arch == "mamba":
            for layer in model.backbone.layers:
                layer.mixer.A_log.uniform_(-1, 1)
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's LlamaModel.permute; transformers' LlamaTensorProcessor reverses it
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _bloom_qkv(w: np.ndarray, n_head: int, n_embed: int) -> np.ndarray:
    # llama.cpp's BloomModel.modify_tensors: transformers' qkv is interleaved per head, llama.cpp's is q, k, v
    qkv = w.reshape(n_head, 3, n_embed // n_head, *w.shape[1:])
    return np.concatenate([qkv[:, i].reshape(-1, *w.shape[1:]) for i in range(3)]).reshape(w.shape)


def _llama_cpp_form(arch: str, gguf_name: str, w: np.ndarray, config: Any) -> np.ndarray:
    """The tensor as llama.cpp's converter writes it (the inverse of transformers' TensorProcessor)."""
    if arch == "llama" and ".attn_q." in gguf_name:
        return _permute(w, config.num_attention_heads)
    if arch == "llama" and ".attn_k." in gguf_name:
        return _permute(w, config.num_key_value_heads)
    if arch in ("gemma2", "gemma3", "nemotron") and "norm.weight" in gguf_name:
        return w + 1
    if arch == "gpt2" and any(k in gguf_name for k in ("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight",
                                                       "attn_output.weight")):
        return np.ascontiguousarray(w.T)
    if arch == "bloom" and "attn_qkv" in gguf_name:
        return _bloom_qkv(w, config.n_head, config.hidden_size)
    if (arch == "mamba" and "ssm_conv1d.weight" in gguf_name) or (arch == "lfm2" and "shortconv.conv." in gguf_name):
        return w.squeeze(1)
    if arch == "mamba" and gguf_name.endswith("ssm_a"):
        return -np.exp(w)
    if "ffn_gate_inp_shexp" in gguf_name:
        return w.squeeze(0)
    return w


def _gguf_names(model: torch.nn.Module, arch: str) -> dict[str, list[str]]:
    """HF parameter name -> the GGUF tensor name(s) it is written as (two for a stacked gate_up_proj)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config={})
    names: dict[str, list[str]] = {}
    for gguf_name, hf_name in get_gguf_hf_weights_map(model, processor).items():
        if gguf_name.endswith(("_exps", "exp_probs_b")):  # stacked experts are keyed without ".weight"
            gguf_name += ".weight" if gguf_name.endswith("_exps") else ""
        names.setdefault(hf_name, []).append(gguf_name)
    return names


def _config_mapping(arch: str) -> dict[str, Any]:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return GGUF_CONFIG_MAPPING[_CONFIG_KEY.get(arch, arch)]


def _add_metadata(writer: Any, arch: str, config: Any, vocab_size: int) -> None:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    keys = [(f"{arch}.{k}", v) for k, v in _config_mapping(arch).items()]
    keys += [(f"tokenizer.{k}", v) for k, v in GGUF_CONFIG_MAPPING["tokenizer"].items()]
    if arch == "lfm2":  # its own config reader: kv heads per layer (0 on a convolution layer), norm_eps
        kv = [config.num_key_value_heads if t == "full_attention" else 0 for t in config.layer_types]
        writer.add_array(f"{arch}.attention.head_count_kv", kv)
        writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.norm_eps)
        keys = [(k, v) for k, v in keys if k != f"{arch}.attention.head_count_kv"]
    for key, hf_key in keys:
        if hf_key in (None, -1):
            continue
        if hf_key == "rope_theta":
            value = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
        else:
            value = getattr(config, hf_key, None)
        if value is None or (key.startswith("tokenizer.") and not (isinstance(value, int) and 0 <= value < vocab_size)):
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)


def write_gguf(
    path: Path,
    model: torch.nn.Module,
    arch: str,
    types: dict[str, Any] | None = None,
    *,
    skip: tuple[str, ...] = (),
    tokens: bool = False,
    transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> Path:
    """Write ``model`` (of GGUF architecture ``arch``) as llama.cpp would.

    Args:
        types: GGUF name suffix (``"attn_q.weight"``, ``"weight"``) -> ggml type; F32 elsewhere, and for a tensor
            whose rows are not whole blocks of the type.
        skip: GGUF tensor names left out.
        tokens: add a token list (one dummy token per row), as for the architectures whose vocabulary size
            transformers reads from it (GPT-2, StarCoder2).
        transform: applied to each tensor (GGUF name, llama.cpp form) before it is written.
    """
    import gguf

    Q = gguf.GGMLQuantizationType
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    vocab_size = model.get_input_embeddings().num_embeddings
    _add_metadata(writer, arch, config, vocab_size)
    if tokens or arch == "lfm2" or "vocab_size" not in _config_mapping(arch).values():  # then transformers counts the tokens
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(vocab_size)])
    names = _gguf_names(model, arch)
    tied_heads = set(model.all_tied_weights_keys)  # {"lm_head.weight": "model.embed_tokens.weight"} when tied
    for hf_name, tensor in model.state_dict().items():
        if hf_name in tied_heads:
            continue  # llama.cpp writes no output.weight for a tied head
        data = tensor.detach().numpy().astype(np.float32)
        gguf_names = names.get(hf_name)
        if gguf_names is None:
            continue  # a buffer or a parameter transformers does not read from a GGUF either
        parts = np.split(data, 2, axis=1) if len(gguf_names) == 2 else [data]  # gate_up_proj: gate, then up
        for gguf_name, part in zip(sorted(gguf_names, key=lambda n: "up" in n), parts, strict=True):
            if gguf_name in skip:
                continue
            part = _llama_cpp_form(arch, gguf_name, part, config)
            if transform is not None:
                part = transform(gguf_name, part)
            qtype = next((t for suffix, t in (types or {}).items() if gguf_name.endswith(suffix)), Q.F32)
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if part.ndim < 2 or part.shape[-1] % block:
                qtype = Q.F32
            if qtype == Q.F32:
                writer.add_tensor(gguf_name, np.ascontiguousarray(part))
            elif qtype == Q.F16:
                writer.add_tensor(gguf_name, part.astype(np.float16))
            else:
                writer.add_tensor(gguf_name, gguf.quants.quantize(np.ascontiguousarray(part), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Qwen3.5 (transformers' newer GGUF path only): model name pattern -> llama.cpp's, in order
_QWEN35_NAMES = [
    (r"\.mlp\.gate\.", ".ffn_gate_inp."), (r"\.mlp\.experts\.down_proj$", ".ffn_down_exps.weight"),
    (r"\.mlp\.shared_expert_gate\.", ".ffn_gate_inp_shexp."),
    (r"\.mlp\.shared_expert\.gate_proj\.", ".ffn_gate_shexp."), (r"\.mlp\.shared_expert\.up_proj\.", ".ffn_up_shexp."),
    (r"\.mlp\.shared_expert\.down_proj\.", ".ffn_down_shexp."),
    (r"^model\.embed_tokens\.", "token_embd."), (r"^lm_head\.", "output."), (r"^model\.norm\.", "output_norm."),
    (r"^model\.layers\.", "blk."), (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".post_attention_norm."), (r"\.self_attn\.q_proj\.", ".attn_q."),
    (r"\.self_attn\.k_proj\.", ".attn_k."), (r"\.self_attn\.v_proj\.", ".attn_v."),
    (r"\.self_attn\.o_proj\.", ".attn_output."), (r"\.self_attn\.q_norm\.", ".attn_q_norm."),
    (r"\.self_attn\.k_norm\.", ".attn_k_norm."), (r"\.linear_attn\.in_proj_qkv\.", ".attn_qkv."),
    (r"\.linear_attn\.in_proj_z\.", ".attn_gate."), (r"\.linear_attn\.in_proj_a\.", ".ssm_alpha."),
    (r"\.linear_attn\.in_proj_b\.", ".ssm_beta."), (r"\.linear_attn\.conv1d\.", ".ssm_conv1d."),
    (r"\.linear_attn\.norm\.", ".ssm_norm."), (r"\.linear_attn\.out_proj\.", ".ssm_out."),
    (r"\.linear_attn\.A_log$", ".ssm_a"), (r"\.linear_attn\.dt_bias$", ".ssm_dt.bias"),
    (r"\.mlp\.gate_proj\.", ".ffn_gate."), (r"\.mlp\.up_proj\.", ".ffn_up."), (r"\.mlp\.down_proj\.", ".ffn_down."),
]
QWEN35 = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2,
          "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
          "linear_conv_kernel_dim": 4, "full_attention_interval": 4, "max_position_embeddings": 64,
          "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1],
                                                    "mrope_interleaved": True}}


QWEN35_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
              "shared_expert_intermediate_size": 64}


def tiny_qwen35(seed: int = 0, *, moe: bool = False, **overrides: Any) -> torch.nn.Module:
    """A random Qwen3.5 text model (linear attention on three layers of four, full attention on the fourth), its
    FFNs experts with ``moe=True``."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    torch.manual_seed(seed)
    if moe:
        kwargs = {**{k: v for k, v in QWEN35.items() if k != "intermediate_size"}, **QWEN35_MOE, **overrides}
        config = CONFIG_MAPPING["qwen3_5_moe_text"](**kwargs)
    else:
        config = CONFIG_MAPPING["qwen3_5_text"](**{**QWEN35, **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms, A_log, dt_bias: none left at its init constant
                p.uniform_(-0.5, 0.5) if name.endswith(("A_log", "dt_bias")) else p.uniform_(0.5, 1.5)
    return model


def write_qwen35_gguf(path: Path, model: torch.nn.Module, types: dict[str, Any] | None = None) -> Path:
    """Write a Qwen3.5 text model as llama.cpp does: names, norms as ``w + 1`` (not ``ssm_norm``), ``ssm_a`` as
    ``-exp(A_log)``, the squeezed conv kernel, value heads tiled (the inverse of transformers' own reorder ops)."""
    import re

    import gguf
    from transformers.core_model_loading import WeightConverter
    from transformers.integrations.gguf.utils import get_gguf_conversion_mapping

    config = model.config
    arch = "qwen35moe" if "moe" in config.model_type else "qwen35"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    moe = (("expert_feed_forward_length", config.moe_intermediate_size), ("expert_count", config.num_experts),
           ("expert_shared_feed_forward_length", config.shared_expert_intermediate_size),
           ("expert_used_count", config.num_experts_per_tok)) if arch == "qwen35moe" else (
           ("feed_forward_length", config.intermediate_size),)
    for key, value in (("context_length", config.max_position_embeddings), ("embedding_length", config.hidden_size),
                       ("block_count", config.num_hidden_layers), *moe,
                       ("attention.head_count", config.num_attention_heads),
                       ("attention.head_count_kv", config.num_key_value_heads),
                       ("attention.key_length", config.head_dim),
                       ("full_attention_interval", config.layer_types.index("full_attention") + 1),
                       ("ssm.conv_kernel", config.linear_conv_kernel_dim),
                       ("ssm.state_size", config.linear_key_head_dim),
                       ("ssm.group_count", config.linear_num_key_heads),
                       ("ssm.time_step_rank", config.linear_num_value_heads),
                       ("ssm.inner_size", config.linear_num_value_heads * config.linear_value_head_dim),
                       ("rope.dimension_count", int(config.head_dim * config.rope_parameters["partial_rotary_factor"]))):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", config.rope_parameters["rope_theta"])
    w.add_array(f"{arch}.rope.dimension_sections", [*config.rope_parameters["mrope_section"], 0, 0][:4])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    converters = [c for c in get_gguf_conversion_mapping(arch, config) if isinstance(c, WeightConverter)]
    tensors = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("experts.gate_up_proj"):  # stacked gate, then up: llama.cpp's two tensors
            stem = hf_name.replace("model.layers.", "blk.").replace(".mlp.experts.gate_up_proj", "")
            gate, up = tensor.chunk(2, dim=1)
            tensors += [(f"{stem}.ffn_gate_exps.weight", gate, hf_name), (f"{stem}.ffn_up_exps.weight", up, hf_name)]
        elif hf_name not in model.all_tied_weights_keys:
            name = hf_name
            for pattern, replacement in _QWEN35_NAMES:
                name = re.sub(pattern, replacement, name)
            tensors.append((name, tensor.squeeze(0) if name.endswith("ffn_gate_inp_shexp.weight") else tensor,
                            hf_name))
    for name, tensor, hf_name in tensors:
        data = tensor.detach().float()
        for converter in converters:  # undo the reorders transformers applies on load
            if name.endswith("_exps.weight") or not any(re.search(p, hf_name) for p in converter.target_patterns):
                continue
            for op in reversed(converter.operations):
                data = _undo(op, data)
        if name.endswith("norm.weight") and not name.endswith("ssm_norm.weight"):
            data = data + 1
        if name.endswith("ssm_a"):
            data = -torch.exp(data)
        data = data.numpy()
        qtype = next((t for suffix, t in (types or {}).items() if name.endswith(suffix)), gguf.GGMLQuantizationType.F32)
        if data.ndim < 2 or data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, np.ascontiguousarray(data))
        else:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _undo(op: Any, data: torch.Tensor) -> torch.Tensor:
    """The inverse of one of transformers' GGUF conversion ops (the reorders and the conv kernel's unsqueeze)."""
    from transformers.integrations.gguf import gguf_conversion_mapping as c

    if isinstance(op, c.PermuteRows):
        out = data.clone()
        out[op.offset :][op.permutation] = data[op.offset :]
        return out
    if isinstance(op, c.PermuteInputFeatures):
        out = data.clone()
        out[:, op.permutation] = data
        return out
    if isinstance(op, c.Unsqueeze):
        return data if op.expected_ndim is not None else data.squeeze(op.dim)
    return data  # SubtractOne and LogNegate: undone by name in write_qwen35_gguf


def assert_same_weights(ours, ref) -> None:
    """Parameters and buffers bit for bit (dtype included), none left on the meta device."""
    import torch

    a, b = ours.state_dict(), ref.state_dict()
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"differ from transformers' load: {different}"
    buffers, ref_buffers = dict(ours.named_buffers()), dict(ref.named_buffers())
    assert sorted(buffers) == sorted(ref_buffers)
    assert all(not t.is_meta and torch.equal(t, ref_buffers[k]) for k, t in buffers.items())  # rotary inv_freq
    assert not any(p.is_meta for p in ours.parameters())
