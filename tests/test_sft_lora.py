"""LoRA: only the adapters train, step 0 is the base model, merging is exact and loads in transformers."""
from __future__ import annotations

import pytest
import torch

from codeparrot.model import GPT, GPTConfig, save_hf
from codeparrot.sft.lora import LoRALinear, adapter_state, apply_lora, merge_lora

TARGETS = ["attn.c_attn", "attn.c_proj"]


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=96, n_positions=32, n_layer=2, n_head=2, n_embd=32))


def train_a_step(model: GPT, ids: torch.Tensor) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids, labels=ids).loss.backward()
    optimizer.step()


def test_only_the_adapters_train_and_step_zero_is_the_base_model():
    model, ids = tiny_gpt(), torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids).logits
    names = apply_lora(model, TARGETS, rank=4, alpha=8, dropout=0.0)
    assert names == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.1.attn.c_attn", "h.1.attn.c_proj"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.lora_{ab}" for n in names for ab in "ab")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # B = 0: exactly the base
    train_a_step(model, ids)
    for key, value in model.state_dict().items():  # every base weight is untouched
        if "lora_" not in key:
            assert torch.equal(value, base[key.replace(".base.", ".")]), key
    assert any(v.abs().sum() > 0 for k, v in adapter_state(model).items() if k.endswith("lora_b"))


def test_merged_model_equals_the_adapted_one_and_loads_in_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    model, ids = tiny_gpt(), torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    apply_lora(model, [*TARGETS, "mlp.c_fc"], rank=4, alpha=8, dropout=0.1)
    train_a_step(model, ids)
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
        merged = merge_lora(model)(ids).logits
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    save_hf(model, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, merged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", ["lm_head", "wte"])
def test_the_tied_head_and_embedding_are_refused(target):
    with pytest.raises(ValueError, match="tied to the token embedding"):
        apply_lora(tiny_gpt(), [target], rank=4, alpha=8, dropout=0.0)
    with pytest.raises(ValueError, match="match no Linear layer"):
        apply_lora(tiny_gpt(), ["attn.nope"], rank=4, alpha=8, dropout=0.0)


def test_parity_with_peft_on_the_same_weights():
    """peft (the oracle) and our LoRA give the same logits for the same base and adapter weights."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    ours, ids = tiny_gpt(), torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    theirs = copy.deepcopy(ours)
    names = apply_lora(ours, TARGETS, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # a trained-looking adapter: B no longer zero
        for n in names:
            ours.get_submodule(n).lora_b.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=r".*\.attn\.(c_attn|c_proj)")
    theirs = inject_adapter_in_model(config, theirs)
    with torch.no_grad():
        for n in names:
            layer, mine = theirs.get_submodule(n), ours.get_submodule(n)
            layer.lora_A["default"].weight.copy_(mine.lora_a)
            layer.lora_B["default"].weight.copy_(mine.lora_b)
        ours.eval(), theirs.eval()
        want = theirs(ids).logits
        assert not torch.allclose(want, GPT.forward(tiny_gpt().eval(), ids).logits, atol=1e-3)  # adapters matter
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-5, atol=1e-5)
