"""The optimizer and schedule options of `train` (issue 27): Muon + AdamW, WSD, embedding decay, z-loss.

- `train.optimizer: muon`: every parameter in exactly one group, the blocks' 2-D matrices on Muon; a step equals
  torch.optim.Muon and AdamW used directly; the state survives a state_dict and an accelerate checkpoint exactly;
  FSDP is refused with one line;
- `train.lr_schedule: wsd`: warmup, stable, decay endpoints of both shapes, an extension and a branched decay;
- `train.embedding_weight_decay: false` takes the embeddings out of weight decay; `train.z_loss` adds c * log(Z)^2.
"""
from __future__ import annotations

import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from codeparrot.config import Config, ConfigError, identity, load_config
from codeparrot.model import GPT, GPTConfig
from codeparrot.optim import MUON_ADJUST_LR, MuonWithAdamW, adamw_groups, build_optimizer
from codeparrot.train import build_lr_schedule, build_optimizer as train_build_optimizer, lr_lambda, train_step

V, T, B = 64, 16, 2
HIDDEN = {f"h.{i}.{name}.weight" for i in range(2) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                  "mlp.c_proj")}
MUON = ["train.optimizer=muon", "train.learning_rate=1e-3", "train.muon_learning_rate=0.004",
        "train.muon_momentum=0.9", "train.muon_weight_decay=0.05", "train.weight_decay=0.1", "train.adam_beta2=0.99"]


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, n_positions=T, n_layer=2, n_head=2, n_embd=32))


def _batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B, T), generator=gen) for _ in range(n)]


def _train(model: GPT, optimizer, batches: list[torch.Tensor]) -> None:
    for batch in batches:
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _names(model: GPT, params) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def _assert_same_weights(a: GPT, b: GPT) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# --- the parameter groups ----------------------------------------------------------------------------------------

def test_adamw_groups_by_default_are_the_groups_of_earlier_runs():
    """train.optimizer: adamw with embedding decay on: GPT.optimizer_groups' groups, in order (old checkpoints load)."""
    model = _model()
    optimizer = build_optimizer(model, Config().train)
    assert isinstance(optimizer, torch.optim.AdamW)
    for got, want in zip(optimizer.param_groups, model.optimizer_groups(0.1)):
        assert [id(p) for p in got["params"]] == [id(p) for p in want["params"]]
        assert got["weight_decay"] == want["weight_decay"]


def test_embedding_weight_decay_false_leaves_the_embeddings_undecayed():
    model = _model()
    on, off = adamw_groups(model, 0.1), adamw_groups(model, 0.1, embedding_decay=False)
    assert {"wte.weight", "wpe.weight"} <= _names(model, on[0]["params"])
    assert _names(model, off[0]["params"]) == _names(model, on[0]["params"]) - {"wte.weight", "wpe.weight"}
    assert {"wte.weight", "wpe.weight"} <= _names(model, off[1]["params"])
    assert off[1]["weight_decay"] == 0.0


def test_muon_holds_the_blocks_matrices_and_every_parameter_is_in_exactly_one_group():
    model = _model()
    optimizer = build_optimizer(model, load_config(None, MUON).train)
    assert isinstance(optimizer, MuonWithAdamW)
    seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(seen) == len(set(seen))
    assert _names(model, optimizer.muon.param_groups[0]["params"]) == HIDDEN
    adamw = [p for group in optimizer.adamw.param_groups for p in group["params"]]
    assert not HIDDEN & _names(model, adamw)  # wte (= the tied LM head), wpe, LayerNorms and biases
    assert "wte.weight" in _names(model, adamw) and all(p.dim() == 1 for p in optimizer.adamw.param_groups[1]["params"])


# --- Muon's step and state ---------------------------------------------------------------------------------------

def _direct(model: GPT) -> tuple[torch.optim.Muon, torch.optim.AdamW]:
    """The same optimization written with torch's optimizers directly, from MUON's settings."""
    named = dict(model.named_parameters())
    muon = torch.optim.Muon([named[n] for n in named if n in HIDDEN], lr=0.004, weight_decay=0.05, momentum=0.9,
                            adjust_lr_fn="match_rms_adamw")
    rest = [p for n, p in named.items() if n not in HIDDEN]
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() == 2], "weight_decay": 0.1},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                              lr=1e-3, betas=(0.9, 0.99))
    return muon, adamw


def test_muon_steps_equal_torch_muon_and_adamw_used_directly():
    assert MUON_ADJUST_LR == "match_rms_adamw"
    ours, theirs = _model(), _model()
    optimizer = build_optimizer(ours, load_config(None, MUON).train)
    muon, adamw = _direct(theirs)
    for batch in _batches(3):  # 3 steps: the momentum buffers and Adam's moments matter
        for model in (ours, theirs):
            model(batch, labels=batch).loss.backward()
        optimizer.step()
        muon.step()
        adamw.step()
        optimizer.zero_grad()
        muon.zero_grad()
        adamw.zero_grad()
    _assert_same_weights(ours, theirs)
    assert any(not torch.equal(p, q) for p, q in zip(ours.parameters(), _model().parameters()))  # it trained


def test_muon_state_dict_round_trip_continues_identically():
    """Save after 2 steps, load into a fresh optimizer on a copy of the model: the next 2 steps are the same."""
    batches = _batches(4)
    model = _model()
    optimizer = build_optimizer(model, load_config(None, MUON).train)
    _train(model, optimizer, batches[:2])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)  # what accelerate's optimizer.bin holds
    resumed = copy.deepcopy(model)
    _train(model, optimizer, batches[2:])
    again = build_optimizer(resumed, load_config(None, MUON).train)
    buffer.seek(0)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    _train(resumed, again, batches[2:])
    _assert_same_weights(model, resumed)
    with pytest.raises(ValueError, match="train.optimizer=muon"):
        again.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_muon_resumes_exactly_through_an_accelerate_checkpoint_and_train_step(tmp_path):
    """accelerate's prepare, save_state and load_state of the wrapped optimizer, stepped by train_step: the steps
    after a resume equal those of the uninterrupted optimizer; each Muon step runs at lr x muon/adamw ratio."""
    t, batches = load_config(None, MUON).train, _batches(4)

    def prepared() -> tuple[Accelerator, torch.nn.Module, torch.optim.Optimizer]:
        acc = Accelerator(cpu=True)
        model = _model()
        return (acc, *acc.prepare(model, train_build_optimizer(model, t, acc)))

    def steps(acc, model, optimizer, which: list[torch.Tensor]) -> None:
        for k, batch in enumerate(which):
            train_step(model, optimizer, iter([batch]), acc, 1, 1.0, lr=1e-3 / (k + 1))
            groups = optimizer.param_groups
            assert [g["lr"] for g in groups] == pytest.approx([0.004 / (k + 1)] + [1e-3 / (k + 1)] * 2)

    acc, model, optimizer = prepared()
    steps(acc, model, optimizer, batches[:2])
    acc.save_state(str(tmp_path / "accelerate"))
    steps(acc, model, optimizer, batches[2:])
    acc2, resumed, again = prepared()
    acc2.load_state(str(tmp_path / "accelerate"))
    steps(acc2, resumed, again, batches[2:])
    _assert_same_weights(model, resumed)


def test_muon_under_fsdp_is_refused_in_one_line():
    fsdp = SimpleNamespace(device=torch.device("cpu"), distributed_type=DistributedType.FSDP)
    with pytest.raises(ConfigError) as e:
        train_build_optimizer(_model(), load_config(None, MUON).train, fsdp)
    assert "train.optimizer=muon" in str(e.value) and "FSDP" in str(e.value) and "\n" not in str(e.value)
    assert isinstance(train_build_optimizer(_model(), Config().train, fsdp), torch.optim.AdamW)  # AdamW still runs


def test_the_new_keys_join_a_runs_identity_only_when_set():
    """Runs saved before these keys existed keep their fingerprint; setting one changes it."""
    plain = identity(Config(), ["train"])["train"]
    for key in ("optimizer", "muon_learning_rate", "muon_momentum", "muon_weight_decay", "decay_fraction",
                "decay_shape", "embedding_weight_decay", "z_loss"):
        assert key not in plain
    assert identity(load_config(None, MUON), ["train"])["train"]["optimizer"] == "muon"
    assert identity(load_config(None, ["train.z_loss=1e-4"]), ["train"])["train"]["z_loss"] == 1e-4


# --- WSD ---------------------------------------------------------------------------------------------------------

def test_wsd_warms_up_holds_then_decays_linearly_to_the_floor():
    fn = lr_lambda(2, 12, "wsd", 0.1, decay_fraction=0.25, decay_shape="linear")  # decays over steps 9, 10, 11
    assert [fn(s) for s in range(2)] == [0.5, 1.0]
    assert [fn(s) for s in range(2, 9)] == [1.0] * 7
    assert [fn(s) for s in (9, 10, 11)] == pytest.approx([0.7, 0.4, 0.1])  # the last step at the floor
    assert fn(12) == fn(500) == pytest.approx(0.1)


def test_wsd_sqrt_decay_is_one_minus_the_root_of_its_progress():
    fn = lr_lambda(0, 100, "wsd", 0.0, decay_fraction=0.2, decay_shape="sqrt")  # decays over steps 80..99
    assert fn(0) == fn(79) == 1.0
    assert fn(80) == pytest.approx(1 - math.sqrt(1 / 20))
    assert fn(89) == pytest.approx(1 - math.sqrt(0.5))
    assert fn(99) == pytest.approx(0.0)
    assert lr_lambda(0, 100, "wsd", 0.0, 0.0)(99) == 1.0  # decay_fraction 0: never decays
    with pytest.raises(ValueError, match="linear or sqrt"):
        lr_lambda(0, 100, "wsd", 0.0, 0.2, "cosine")


def test_wsd_extension_continues_stable_and_a_branch_decays_from_its_checkpoint():
    """max_steps 100 -> 200 on resume: steps 100..159 train at the peak again, 160..199 decay. A decay branched off
    a stable checkpoint (step-40 of either) with max_steps = 40 / (1 - 0.2) = 50 starts right after it."""
    cfg = lambda m: load_config(None, ["train.lr_schedule=wsd", "train.learning_rate=2.0",  # noqa: E731
                                       "train.warmup_steps=10", f"train.max_steps={m}"]).train
    first, extended, branch = build_lr_schedule(cfg(100)), build_lr_schedule(cfg(200)), build_lr_schedule(cfg(50))
    assert first(99) == pytest.approx(0.0) and first(79) == 2.0
    assert [extended(s) for s in (100, 159)] == [2.0, 2.0]
    assert extended(160) == pytest.approx(2.0 * (1 - 1 / 40)) and extended(199) == pytest.approx(0.0)
    assert [branch(s) for s in range(40)] == [first(s) for s in range(40)] == [extended(s) for s in range(40)]
    assert branch(40) < 2.0 and branch(49) == pytest.approx(0.0)


# --- z-loss ------------------------------------------------------------------------------------------------------

def test_train_step_passes_z_loss_only_when_set():
    """z_loss 0 calls the forward exactly as before (nothing extra computed); > 0 hands the coefficient over."""
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, input_ids, labels=None, **kwargs):
            calls.append(kwargs)
            return SimpleNamespace(loss=self.w * 1.0)

    acc, model = Accelerator(cpu=True), Recorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for z in (0.0, 1e-4):
        train_step(model, optimizer, iter(_batches(1)), acc, 1, 1.0, 0.1, z_loss=z)
    assert calls == [{}, {"z_loss": 1e-4}]


@pytest.mark.parametrize("loss_chunk_size", [0, 5])
def test_z_loss_adds_its_coefficient_times_the_mean_squared_log_normaliser(loss_chunk_size):
    """loss = cross-entropy + c * mean over targets of logsumexp(logits)^2, in value and gradient, chunked too."""
    c, batch = 0.5, _batches(1)[0]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, n_positions=T, n_layer=2, n_head=2, n_embd=32,
                          loss_chunk_size=loss_chunk_size))
    got = model(batch, labels=batch, z_loss=c).loss
    got.backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(batch).logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))
    want = ce + c * logits.logsumexp(-1).square().mean()
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for g, p in zip(got_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
