"""The Hugging Face formats of our models: config.json keys and tensor names, both ways, without transformers.

gpt2 is written as `GPT2LMHeadModel`; llama as `LlamaForCausalLM`, or `Qwen3ForCausalLM` when it has QK-norm
(Llama has no place for it). Each loads with `AutoModelForCausalLM` and no custom code. Ours fuses what the formats
split: a layer's q, k and v projections are one `attn.c_attn` ([q; k; v] rows) and SwiGLU's gate and up projections
are one `mlp.c_fc` ([gate; up] rows); RoPE uses transformers' half-split (rotate_half) layout, so q and k need no
permutation. `model.py` builds the GPT from what this module reads (this module imports nothing of it).
"""
from __future__ import annotations

from typing import Any

import torch

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
INIT_STD = 0.02  # GPT-2's and Llama's initializer_range
LLAMA_TYPES = ("llama", "qwen3")
# ours -> Llama's, inside layer i (the fused c_attn and c_fc are split apart)
LLAMA_LAYER_NAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}


def hf_config(cfg: Any, eos_token_id: int) -> dict[str, Any]:
    """config.json of a GPTConfig (model.py's)."""
    if cfg.arch == "gpt2":
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.n_positions,
            "n_ctx": cfg.n_positions,
            "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": None if cfg.intermediate_size == 4 * cfg.n_embd else cfg.intermediate_size,
            "activation_function": "gelu_new",
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "layer_norm_epsilon": cfg.norm_eps,
            "initializer_range": INIT_STD,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
            "reorder_and_upcast_attn": cfg.reorder_and_upcast_attn,
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": eos_token_id,
            "eos_token_id": eos_token_id,
            "codeparrot_vocab_pad_multiple": cfg.vocab_pad_multiple,  # ours; transformers keeps it as an attribute
        }
    qwen3 = cfg.qk_norm
    out = {
        "model_type": "qwen3" if qwen3 else "llama",
        "architectures": ["Qwen3ForCausalLM" if qwen3 else "LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.n_positions,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # where transformers 4.x reads it
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # where 5.x does
        "attention_bias": False,
        "attention_dropout": cfg.dropout,
        "initializer_range": INIT_STD,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "codeparrot_vocab_pad_multiple": cfg.vocab_pad_multiple,
        "codeparrot_reorder_and_upcast_attn": cfg.reorder_and_upcast_attn,  # fp32 scores: ours only, same math
    }
    if qwen3:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    else:
        out.update(mlp_bias=False, pretraining_tp=1)
    return out


def config_kwargs(hf: dict[str, Any]) -> dict[str, Any]:
    """GPTConfig's keyword arguments of a config.json (ours or transformers')."""
    kind = hf.get("model_type", "gpt2")
    if kind == "gpt2":
        return dict(arch="gpt2", vocab_size=hf["vocab_size"], n_positions=hf["n_positions"], n_layer=hf["n_layer"],
                    n_head=hf["n_head"], n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner"),
                    dropout=hf.get("resid_pdrop", 0.0), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                    scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
                    reorder_and_upcast_attn=hf.get("reorder_and_upcast_attn", False),
                    tie_embeddings=hf.get("tie_word_embeddings", True),
                    vocab_pad_multiple=hf.get("codeparrot_vocab_pad_multiple", 1))
    if kind not in LLAMA_TYPES:
        raise ValueError(f"model_type {kind!r} cannot be loaded; valid: gpt2, {', '.join(LLAMA_TYPES)}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    unsupported = {
        "rope_type": rope.get("rope_type", rope.get("type", "default")) != "default",
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
        "use_sliding_window": hf.get("use_sliding_window", False),
        "head_dim": hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]),
    }
    if any(unsupported.values()):
        raise ValueError(f"{kind} checkpoint with options this model lacks: "
                         f"{', '.join(k for k, v in unsupported.items() if v)}")
    return dict(arch="llama", vocab_size=hf["vocab_size"], n_positions=hf["max_position_embeddings"],
                n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                n_kv_head=hf.get("num_key_value_heads"), intermediate_size=hf["intermediate_size"],
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                norm_eps=hf.get("rms_norm_eps", 1e-6), qk_norm=kind == "qwen3",
                dropout=hf.get("attention_dropout", 0.0), tie_embeddings=hf.get("tie_word_embeddings", False),
                reorder_and_upcast_attn=hf.get("codeparrot_reorder_and_upcast_attn", False),
                vocab_pad_multiple=hf.get("codeparrot_vocab_pad_multiple", 1))


def to_hf_tensors(cfg: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (names as GPT's, an optional torch.compile prefix) -> the format's tensors, on the CPU."""
    llama = cfg.arch == "llama"
    qkv = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    out = {}
    for name, t in state.items():
        name = name.replace("_orig_mod.", "")  # torch.compile's wrapper prefix (whole model or per block)
        t = t.detach().cpu()
        if name in ("wte.weight", "lm_head.weight"):
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # tied to wte; transformers re-ties it on load
            t = t[: cfg.vocab_size]  # padding rows are ours, not part of the format
            if name == "lm_head.weight":
                out[name] = t.contiguous()
                continue
        if not llama:
            if name.endswith(CONV1D_SUFFIXES):
                t = t.t()  # GPT-2's Conv1D stores [in, out], nn.Linear [out, in]
            out["transformer." + name] = t.contiguous()
            continue
        if name == "wte.weight":
            out["model.embed_tokens.weight"] = t.contiguous()
        elif name == "ln_f.weight":
            out["model.norm.weight"] = t.contiguous()
        else:  # h.{i}.<rest>
            _, i, rest = name.split(".", 2)
            prefix = f"model.layers.{i}."
            if rest == "attn.c_attn.weight":
                for part, piece in zip(("q", "k", "v"), t.split(qkv, dim=0)):
                    out[f"{prefix}self_attn.{part}_proj.weight"] = piece.contiguous()
            elif rest == "mlp.c_fc.weight":
                for part, piece in zip(("gate", "up"), t.chunk(2, dim=0)):
                    out[f"{prefix}mlp.{part}_proj.weight"] = piece.contiguous()
            else:
                out[prefix + LLAMA_LAYER_NAMES[rest]] = t.contiguous()
    return out


def from_hf_tensors(cfg: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The format's tensors -> our state dict (vocabulary rows not yet padded; lm_head only when untied)."""
    state = {}
    if cfg.arch == "gpt2":
        for name, t in tensors.items():
            if name == "lm_head.weight":
                if not cfg.tie_embeddings:
                    state[name] = t
                continue  # else a tied copy
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # the causal-mask buffers older transformers saved
            name = name.removeprefix("transformer.")
            state[name] = t.t().contiguous() if name.endswith(CONV1D_SUFFIXES) else t
        return state
    ours = {v: k for k, v in LLAMA_LAYER_NAMES.items()}
    for name, t in tensors.items():
        if name == "model.embed_tokens.weight":
            state["wte.weight"] = t
        elif name == "model.norm.weight":
            state["ln_f.weight"] = t
        elif name == "lm_head.weight":
            if not cfg.tie_embeddings:
                state[name] = t
        elif name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            if rest in ours:
                state[f"h.{i}.{ours[rest]}"] = t
            elif not rest.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                                      "mlp.up_proj")):
                raise ValueError(f"unexpected tensor {name}")
        elif not name.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved
            raise ValueError(f"unexpected tensor {name}")
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        state[f"h.{i}.attn.c_attn.weight"] = torch.cat([tensors[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"])
        state[f"h.{i}.mlp.c_fc.weight"] = torch.cat([tensors[p + "mlp.gate_proj.weight"],
                                                     tensors[p + "mlp.up_proj.weight"]])
    return state
