"""model.arch=llama: RoPE, RMSNorm, SwiGLU, GQA, QK-norm, untied head; against transformers' Llama and Qwen3, the
KV-cached decode, per-document positions, config, init, optimizer groups and FLOPs."""
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json

import pytest
import torch

from codeparrot.config import ModelConfig
from codeparrot.sampler import SamplingConfig, sample
from codeparrot.model import GPT, GPTConfig, KVCache, RMSNorm, generate, load_hf, resolve_model_config, save_hf


def llama_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=97, n_positions=32, n_layer=2, n_head=4, n_embd=32, arch="llama", intermediate_size=80,
                rope_theta=500.0)  # a small theta: every rotation frequency matters within 32 positions
    base.update(overrides)
    return GPTConfig(**base)


def make_llama(seed: int = 0, **overrides) -> GPT:
    """A random llama with O(1) logits (larger than the init's weights, norm weights away from 1), so that a
    wrong layout or convention shows far above the tolerance."""
    torch.manual_seed(seed)
    model = GPT(llama_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
            else:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.eval()


def random_ids(vocab: int = 97, B: int = 2, T: int = 20, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


def assert_same_weights(a: GPT, b: GPT) -> None:
    """Equal tensors, but for the vocabulary's padding rows (never predicted, never saved: zeros once loaded)."""
    assert a.state_dict().keys() == b.state_dict().keys()
    V = a.config.vocab_size
    for name, t in a.state_dict().items():
        assert torch.equal(b.state_dict()[name][:V] if name in ("wte.weight", "lm_head.weight") else
                           b.state_dict()[name], t[:V] if name in ("wte.weight", "lm_head.weight") else t), name


@pytest.mark.parametrize("options, hf_class", [
    ({}, "LlamaForCausalLM"),
    ({"n_kv_head": 2}, "LlamaForCausalLM"),  # GQA
    ({"n_kv_head": 1, "tie_embeddings": True, "vocab_pad_multiple": 64}, "LlamaForCausalLM"),  # MQA, tied, padded
    ({"qk_norm": True}, "Qwen3ForCausalLM"),
    ({"qk_norm": True, "n_kv_head": 2, "norm_eps": 1e-6}, "Qwen3ForCausalLM"),
], ids=["mha", "gqa", "mqa_tied_padded", "qk_norm", "qk_norm_gqa"])
def test_export_matches_transformers_and_loads_back(tmp_path, options, hf_class):
    import transformers  # in the dev extra: a missing install must fail, not skip
    model = make_llama(**options)
    save_hf(model, tmp_path, eos_token_id=3)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["architectures"] == [hf_class] and "auto_map" not in hf_cfg  # no custom code
    ids = random_ids()
    with torch.no_grad():
        ours = model(ids).logits
        assert ours.abs().max() > 1.0  # logits large enough for the tolerance to mean something
        for impl in ("sdpa", "eager"):
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl).eval()
            assert type(hf).__name__ == hf_class
            assert hf.config.tie_word_embeddings == model.config.tie_embeddings
            assert hf.config.num_key_value_heads == model.config.n_kv_head and hf.config.eos_token_id == 3
            torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=0)
            # transformers' own position_ids agree too (restarting halfway, no document mask on its side)
            pos = torch.arange(20).repeat(2, 1)
            torch.testing.assert_close(hf(ids, position_ids=pos).logits, model(ids, position_ids=pos).logits,
                                       atol=1e-4, rtol=0)

    loaded = load_hf(tmp_path)
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.wte.weight) == model.config.tie_embeddings
    assert_same_weights(model, loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
def test_loads_what_transformers_saves(tmp_path, qk_norm):
    import transformers
    cls, cfg_cls = ((transformers.Qwen3ForCausalLM, transformers.Qwen3Config) if qk_norm
                    else (transformers.LlamaForCausalLM, transformers.LlamaConfig))
    cfg = cfg_cls(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=32, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.15) if p.dim() == 2 else p.copy_(1.0 + 0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert (ours.config.arch, ours.config.qk_norm, ours.config.n_kv_head, ours.config.rope_theta) == \
        ("llama", qk_norm, 2, 1000.0)
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_unsupported_llama_options_are_refused(tmp_path):
    model = make_llama()
    save_hf(model, tmp_path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    hf_cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}
    hf_cfg["attention_bias"] = True
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(ValueError, match="rope_type, attention_bias"):
        load_hf(tmp_path)


@pytest.mark.parametrize("options", [{}, {"n_kv_head": 2, "qk_norm": True}, {"reorder_and_upcast_attn": True}],
                         ids=["mha", "gqa_qk_norm", "upcast"])
def test_kv_cached_decode_equals_full_forward(options):
    model = make_llama(seed=2, **options)
    full = random_ids(B=1, T=24)[0].tolist()
    with torch.no_grad():
        ref = model(torch.tensor([full])).logits[0]  # [T, V]
        # as generate.py: prefill (here in two chunks: the second has start_pos > 0 and T > 1), then one at a time
        cache = KVCache(model.config.n_layer, len(full))
        a = model(torch.tensor([full[:5]]), kv_cache=cache).logits[0]
        b = model(torch.tensor([full[5:9]]), kv_cache=cache, start_pos=5).logits[0]
        torch.testing.assert_close(torch.cat([a, b]), ref[:9], atol=1e-5, rtol=0)
        cache.repeat_rows(2)  # generate.py's n samples of one prompt
        for pos in range(9, len(full)):
            step = model(torch.tensor([[full[pos]]] * 2), kv_cache=cache, start_pos=pos).logits[:, -1]
            torch.testing.assert_close(step, ref[pos].expand(2, -1), atol=1e-5, rtol=0)
    assert cache.k[0].shape == (2, model.config.n_kv_head, len(full), model.config.head_dim)  # k/v heads only


def test_sampler_greedy_equals_uncached_loop():
    model = make_llama(seed=3, n_kv_head=2)
    prompt = random_ids(B=1, T=6)[0].tolist()
    old = generate(model, torch.tensor([prompt]), 20)[0, len(prompt):].tolist()  # re-runs the whole window
    completions = sample(model, [prompt], SamplingConfig(n=2, max_new_tokens=20))[0]
    assert [c.tokens for c in completions] == [old, old]


def test_position_ids_restart_per_document_as_separate_forwards():
    model = make_llama(seed=4, n_kv_head=2, qk_norm=True)
    docs = [random_ids(B=1, T=n, seed=n)[0] for n in (7, 5, 8)]  # packed into one row of 20
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    document_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids, document_ids=document_ids).logits[0]
        separate = torch.cat([model(d[None]).logits[0] for d in docs])
        torch.testing.assert_close(packed, separate, atol=1e-5, rtol=0)
        # RoPE is relative: inside a document a constant shift of its positions changes nothing but rounding
        shifted = model(ids, document_ids=document_ids).logits[0]
        torch.testing.assert_close(shifted, separate, atol=1e-4, rtol=0)
        # across documents (no mask) the restarted positions are what the keys of earlier documents are seen at
        unmasked = model(ids, position_ids=position_ids).logits[0]
        assert not torch.allclose(unmasked[7:], model(ids).logits[0, 7:], atol=1e-3)


def test_gradient_checkpointing_matches():
    ids = random_ids()
    results = []
    for ckpt in (False, True):
        model = make_llama(seed=5, n_kv_head=2, qk_norm=True, dropout=0.1, gradient_checkpointing=ckpt).train()
        torch.manual_seed(5)  # same dropout masks in both runs; checkpoint replays the RNG state
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=0, msg=name)


def test_resolve_llama_config_defaults_and_presets():
    cfg = resolve_model_config(ModelConfig(arch="llama"), vocab_size=8192, seq_length=128)  # tiny: 128 wide
    assert (cfg.arch, cfg.n_kv_head, cfg.intermediate_size, cfg.rope_theta) == ("llama", 4, 512, 10000.0)
    assert not cfg.tie_embeddings and not cfg.qk_norm and cfg.norm_eps == 1e-5
    assert resolve_model_config(ModelConfig(), 8192, 128).tie_embeddings  # gpt2 keeps its tied head
    cfg = resolve_model_config(ModelConfig(arch="llama", preset="small", n_kv_head=4, qk_norm=True,
                                           tie_embeddings=True, intermediate_size=3000, rope_theta=5e5),
                               vocab_size=32768, seq_length=1024)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_kv_head) == (12, 12, 768, 4)
    assert (cfg.intermediate_size, cfg.rope_theta, cfg.qk_norm, cfg.tie_embeddings) == (3000, 5e5, True, True)
    assert GPTConfig(vocab_size=10, n_positions=8, n_layer=1, n_head=12, n_embd=768, arch="llama").intermediate_size \
        == 2048  # 8/3 x 768, already a multiple of 256
    large = resolve_model_config(ModelConfig(arch="llama", preset="large", n_kv_head=5), 32768, 1024)
    assert (large.n_head, large.n_kv_head, large.head_dim, large.intermediate_size) == (25, 5, 64, 4352)


@pytest.mark.parametrize("options, message", [
    ({"arch": "gpt2", "n_kv_head": 2}, "n_kv_head: llama only"),
    ({"arch": "gpt2", "qk_norm": True}, "qk_norm: llama only"),
    ({"n_kv_head": 3}, "divisible by n_kv_head"),
    ({"scale_attn_by_inverse_layer_idx": True}, "gpt2 only"),
    ({"n_head": 32}, "even head dimension"),
    ({"arch": "mamba"}, "arch 'mamba'"),
])
def test_invalid_combinations_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        llama_config(**options)


def test_llama_modules_init_and_optimizer_groups():
    n_layer = 8
    torch.manual_seed(0)
    model = GPT(llama_config(n_layer=n_layer, n_embd=256, n_head=4, n_kv_head=2, qk_norm=True,
                             intermediate_size=512))
    names = dict(model.named_parameters())
    assert not any(n.endswith(".bias") for n in names) and model.wpe is None
    assert model.lm_head.weight is not model.wte.weight and "lm_head.weight" in names
    block = model.h[0]
    assert isinstance(block.ln_1, RMSNorm) and isinstance(block.attn.q_norm, RMSNorm)
    assert block.attn.c_attn.weight.shape == ((4 + 2 * 2) * 64, 256)  # q: 4 heads, k and v: 2 heads each
    assert block.mlp.c_fc.weight.shape == (2 * 512, 256)  # gate and up
    resid_std = 0.02 / math.sqrt(2 * n_layer)
    for block in model.h:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(resid_std, rel=0.1)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(resid_std, rel=0.1)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.all(block.ln_1.weight == 1) and torch.all(block.attn.k_norm.weight == 1)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)

    decay, no_decay = model.optimizer_groups(0.1)
    ids = {id(p): n for n, p in names.items()}
    no_decay_names = {ids[id(p)] for p in no_decay["params"]}
    assert no_decay_names == {n for n in names if "ln_" in n or "_norm" in n}
    assert {"wte.weight", "lm_head.weight"} <= {ids[id(p)] for p in decay["params"]}

    # on meta (no allocation), then materialised as FSDP does: to_empty + init_weights
    with torch.device("meta"):
        meta = GPT(llama_config(qk_norm=True))
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert torch.all(meta.ln_f.weight == 1) and torch.all(meta.h[0].attn.q_norm.weight == 1)


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_counts_matmuls(tie):
    cfg = llama_config(n_layer=3, n_head=8, n_kv_head=2, n_embd=64, intermediate_size=160, tie_embeddings=tie,
                       vocab_pad_multiple=64)
    with torch.device("meta"):
        model = GPT(cfg)
    C, D, V = 64, 8, 128  # V: the padded rows are multiplied too
    per_layer = C * (8 + 2 * 2) * D + 8 * D * C + 3 * C * 160 + 2 * C  # qkv, o, gate + up + down, two norms
    n = 3 * per_layer + C + V * C  # final norm, the LM head (untied: wte is only looked up)
    assert model.num_parameters() == n + (0 if tie else V * C)
    assert model.flops_per_token(32) == pytest.approx(6 * n + 12 * 3 * 8 * D * 32)


def test_small_llama_parameter_count_on_meta():
    cfg = resolve_model_config(ModelConfig(arch="llama", preset="small", n_kv_head=4), 32768, 1024)
    with torch.device("meta"):
        model = GPT(cfg)
    per_layer = 768 * (768 + 2 * 256) + 768 * 768 + 3 * 768 * 2048 + 2 * 768
    assert model.num_parameters() == 12 * per_layer + 768 + 2 * 32768 * 768
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - 32768 * 768


def test_gpt2_untied_head_round_trips(tmp_path):
    import transformers
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_positions=32, n_layer=2, n_head=4, n_embd=32, tie_embeddings=False,
                          vocab_pad_multiple=64)).eval()
    assert model.lm_head.weight is not model.wte.weight
    save_hf(model, tmp_path)
    ids = random_ids()
    with torch.no_grad():
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    loaded = load_hf(tmp_path)
    assert loaded.config == model.config and loaded.lm_head.weight is not loaded.wte.weight
    assert_same_weights(model, loaded)
