"""Tests for codeparrot.model: shapes, config resolution, init, optimizer groups, HF round trip, generation."""
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

from codeparrot.config import ModelConfig
from codeparrot.model import (
    GPT,
    PRESETS,
    GPTConfig,
    generate,
    load_hf,
    resolve_model_config,
    save_hf,
)


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=97, n_positions=32, n_layer=2, n_head=4, n_embd=32)
    base.update(overrides)
    return GPTConfig(**base)


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


def random_ids(vocab: int, B: int = 2, T: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


def test_forward_shapes_and_initial_loss():
    model = make_model(vocab_size=256, n_embd=64).eval()
    ids = random_ids(256, B=4, T=32)
    logits, loss = model(ids, labels=ids)
    assert logits.shape == (4, 32, 256)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(256)) < 0.1 * math.log(256)
    out = model(ids)
    assert out.loss is None and out.logits.shape == (4, 32, 256)


def test_too_long_input_is_rejected():
    model = make_model()
    with pytest.raises(ValueError, match="n_positions"):
        model(random_ids(97, T=33))


def test_labels_are_shifted_inside():
    model = make_model().eval()
    ids = random_ids(97)
    labels = ids.clone()
    labels[0, 5] = -100  # ignored position
    logits, loss = model(ids, labels=labels)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)


def test_resolve_model_config_presets_and_overrides():
    cfg = resolve_model_config(ModelConfig(preset="small"), vocab_size=32768, seq_length=1024)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (12, 12, 768)
    assert (cfg.vocab_size, cfg.n_positions) == (32768, 1024)

    cfg = resolve_model_config(
        ModelConfig(preset="tiny", n_layer=3, n_positions=64, vocab_size=500, dropout=0.1, reorder_and_upcast_attn=True),
        vocab_size=1000,
        seq_length=128,
    )
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (3, PRESETS["tiny"]["n_head"], PRESETS["tiny"]["n_embd"])
    assert (cfg.vocab_size, cfg.n_positions, cfg.dropout) == (500, 64, 0.1)
    assert cfg.reorder_and_upcast_attn and not cfg.gradient_checkpointing

    large = resolve_model_config(ModelConfig(preset="large"), vocab_size=32768, seq_length=1024)
    assert (large.n_layer, large.n_head, large.n_embd) == (48, 25, 1600)


def test_resolve_model_config_errors():
    with pytest.raises(ValueError, match="tiny, small, large"):
        resolve_model_config(ModelConfig(preset="huge"), vocab_size=100, seq_length=32)
    with pytest.raises(ValueError, match="divisible"):
        resolve_model_config(ModelConfig(preset="tiny", n_head=3), vocab_size=100, seq_length=32)


def test_small_preset_parameter_count_on_meta():
    cfg = resolve_model_config(ModelConfig(preset="small"), vocab_size=32768, seq_length=1024)
    with torch.device("meta"):
        model = GPT(cfg)
    n = model.num_parameters()
    assert 105_000_000 < n < 115_000_000
    assert model.lm_head.weight is model.wte.weight
    assert model.num_parameters(exclude_embeddings=True) == n - 32768 * 768 - 1024 * 768
    # PaLM estimate: 6N + 12*L*H*Q*T with N excluding wpe
    assert model.flops_per_token(1024) == pytest.approx(6 * (n - 1024 * 768) + 12 * 12 * 12 * 64 * 1024)


def test_optimizer_groups_split():
    model = make_model()
    decay, no_decay = model.optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert not decay_names & no_decay_names
    assert decay_names | no_decay_names == set(names.values())
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    for name in no_decay_names:
        assert name.endswith(".bias") or ".ln_" in name or name.startswith("ln_f"), name
    for name in decay_names:
        assert name.endswith(".weight") and ".ln_" not in name and not name.startswith("ln_f"), name
    assert "wte.weight" in decay_names and "wpe.weight" in decay_names
    torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3)  # accepted by the optimizer


def test_residual_projection_init_is_scaled():
    n_layer, n_embd = 8, 256
    model = make_model(n_layer=n_layer, n_embd=n_embd, n_head=4)
    resid_std = 0.02 / math.sqrt(2 * n_layer)
    for block in model.h:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(resid_std, rel=0.1)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(resid_std, rel=0.1)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.all(block.attn.c_attn.bias == 0) and torch.all(block.mlp.c_proj.bias == 0)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize(
    "options",
    [{}, {"scale_attn_by_inverse_layer_idx": True}, {"reorder_and_upcast_attn": True}],
    ids=["plain", "inverse_layer_idx", "reorder_and_upcast"],
)
def test_hf_round_trip(tmp_path, options):
    import transformers  # in the dev extra: a missing install must fail, not skip
    model = make_model(**options).eval()
    save_hf(model, tmp_path, eos_token_id=3)
    ids = random_ids(97)
    with torch.no_grad():
        ours = model(ids).logits
        # sdpa is transformers' default; eager is the only path where it honours reorder_and_upcast_attn
        for impl in ("sdpa", "eager"):
            hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation=impl).eval()
            assert hf.config.eos_token_id == 3
            torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=0)

    loaded = load_hf(tmp_path)
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.wte.weight
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours)


def test_gradient_checkpointing_matches():
    ids = random_ids(97)
    results = []
    for ckpt in (False, True):
        model = make_model(seed=0, dropout=0.1, gradient_checkpointing=ckpt).train()
        torch.manual_seed(5)  # same dropout masks in both runs; checkpoint replays the RNG state
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=0, msg=name)


def test_greedy_generate():
    model = make_model().train()
    prompt = random_ids(97, B=2, T=5)
    out = generate(model, prompt, max_new_tokens=40)  # past n_positions=32: the context is cropped
    assert out.shape == (2, 45) and out.dtype == torch.long
    assert torch.equal(out[:, :5], prompt)
    assert torch.equal(out, generate(model, prompt, max_new_tokens=40))
    assert model.training  # mode restored
    # stopping: choose the first greedy token as EOS, so one step is taken
    first = out[:1, 5].item()
    stopped = generate(model, prompt[:1], max_new_tokens=10, eos_token_id=first)
    assert stopped.shape == (1, 6) and stopped[0, -1].item() == first


def test_padded_vocab_is_never_predicted_and_round_trips(tmp_path):
    import transformers  # in the dev extra: a missing install must fail, not skip
    model = make_model(vocab_pad_multiple=64).eval()  # vocab 97 -> 128 embedding rows
    assert model.wte.weight.shape[0] == 128 and model.config.padded_vocab_size == 128
    ids = random_ids(97)
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits.shape[-1] == 97  # the 31 padding rows never reach the logits
    save_hf(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.config.vocab_size == 97
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, out.logits, atol=1e-4, rtol=0)
    loaded = load_hf(tmp_path)
    assert loaded.config == model.config and loaded.wte.weight.shape[0] == 128
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, out.logits)


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_cross_entropy_matches_plain_loss_and_grads(chunk):
    ids = random_ids(97, B=3, T=20)
    labels = ids.clone()
    labels[0, 5] = -100  # an ignored position must stay ignored
    results = []
    for loss_chunk_size in (0, chunk):
        model = make_model(seed=3, vocab_pad_multiple=64, loss_chunk_size=loss_chunk_size)
        loss = model(ids, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_attention_backend_choice():
    ids = random_ids(97)
    with torch.no_grad():
        auto = make_model(seed=4).eval()(ids).logits
        math_ = make_model(seed=4, attention_backend="math").eval()(ids).logits
    torch.testing.assert_close(math_, auto, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention_backend"):
        make_model(attention_backend="fastest")
