"""The training maths on CPU, black-box through `codeparrot train` and its artifacts.

- gradient accumulation: G micro-batches of B train exactly as one batch of G*B (model level and end to end);
- data parallelism: 2 gloo processes at micro-batch B train exactly as 1 process at 2*B;
- the learning rate each step trained with follows the schedule of the config in force, also after a resume that
  extends train.max_steps;
- a resume with dropout on reproduces the uninterrupted losses (the RNG state is restored);
- checkpoints written through torch.compile, FSDP2 (configs/accelerate/fsdp.yaml) and DDP (ddp.yaml) load in
  transformers' GPT2LMHeadModel with the logits of codeparrot.model.load_hf.

Token shards (data.pretokenized=true) are used throughout: a single process reads blocks 0, 1, 2, ... of the
(shuffled) block order, and consumer c of C reads positions c, c+C, ..., so 2 ranks at micro-batch 4 see between
them exactly the blocks 1 process sees at micro-batch 8, and micro-batches 2+2 the blocks of one batch of 4.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codeparrot.model import GPT, GPTConfig, load_hf

from conftest import SUBPROCESS_ENV, build_training_corpus, free_port, run_cli

REPO = Path(__file__).resolve().parents[1]
LR = 0.003
WARMUP = 2
TINY = [
    "corpus.valid_fraction=0.3", "tokenizer.vocab_size=400", "tokenizer.n_examples=200",
    "data.seq_length=32", "data.num_of_sequences=8", "data.pretokenized=true",
    "model.preset=tiny", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.dropout=0",
    "train.micro_batch_size=4", f"train.warmup_steps={WARMUP}", f"train.learning_rate={LR}",
    "train.log_interval=1", "train.eval_interval=3", "train.save_interval=3", "train.keep_last=0",
    "train.mixed_precision=no", "train.trackers=", "eval.batch_size=4", "eval.max_batches=2", "eval.prompt=",
]
STEPS = 3  # optimizer steps of the comparison runs: enough for Adam's moments to matter, cheap on 2 cores


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A prepared corpus (real stdlib packages email and json), its tokenizer and its token shards."""
    return build_training_corpus(tmp_path_factory.mktemp("math"), TINY, pretokenize=True)


def _accelerate(*args: str) -> list[str]:
    """`accelerate launch ARGS -m` on a free port (other test sessions may run beside this one)."""
    return [sys.executable, "-m", "accelerate.commands.launch", *args, "--main_process_port", str(free_port()), "-m"]


def _train(workdir: Path, *overrides: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """`codeparrot train` on the tiny config (two CPU processes when `launcher` is an accelerate launch)."""
    cmd = (launcher or [sys.executable, "-m"]) + ["codeparrot", "train", f"paths.workdir={workdir}", *TINY,
                                                 *overrides]
    env = {**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "1"} if launcher else SUBPROCESS_ENV
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _logged(run: Path, key: str, first: bool = False) -> dict[int, float]:
    """step -> the value of `key` logged last (or first) for that step; a resumed run logs some steps again."""
    out: dict[int, float] = {}
    for r in _records(run):
        if key in r and not (first and r["step"] in out):
            out[r["step"]] = r[key]
    return out


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def _assert_weights_close(got: Path, want: Path, atol: float) -> None:
    a, b = _weights(got), _weights(want)
    assert sorted(a) == sorted(b)
    worst = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
    assert worst[0] <= atol, f"{got} and {want} differ by {worst[0]:.3g} in {worst[1]} (atol {atol})"


def _assert_world_size(run: Path, world: int) -> list[dict]:
    ranks = [json.loads((run / "logs" / f"rank{r}.json").read_text()) for r in range(world)]
    assert [r["world_size"] for r in ranks] == [world] * world
    return ranks


def _assert_loads_in_transformers(ckpt: Path) -> None:
    """GPT2LMHeadModel.from_pretrained(ckpt) gives the logits of load_hf(ckpt) on the same tokens."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(ckpt)).eval()
    ours = load_hf(ckpt).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, hf.config.n_positions), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ours(ids).logits, hf(ids).logits
    assert got.shape == want.shape == (2, hf.config.n_positions, hf.config.vocab_size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def reference(workdir) -> Path:
    """One process, micro-batch 8, no accumulation, fp32 eager: the run the others are compared with."""
    _train(workdir, "train.run_name=ref8", f"train.max_steps={STEPS}", "train.micro_batch_size=8")
    return workdir / "runs" / "ref8"


# --- 1. gradient accumulation ---------------------------------------------------------------------

@pytest.mark.parametrize("loss_chunk_size", [0, 7])
def test_accumulated_micro_batch_gradients_equal_the_full_batch_gradient(loss_chunk_size):
    """Sum over G micro-batches of grad(loss_g / G) == grad(loss of the G*B batch), for both loss paths."""
    G, B, T, V = 4, 2, 16, 101
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, n_positions=T, n_layer=2, n_head=2, n_embd=32, vocab_pad_multiple=64,
                          loss_chunk_size=loss_chunk_size))
    ids = torch.randint(0, V, (G * B, T), generator=torch.Generator().manual_seed(1))

    full = model(ids, labels=ids).loss
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    losses = []
    for micro in ids.split(B):
        loss = model(micro, labels=micro).loss
        (loss / G).backward()
        losses.append(loss.detach())
    assert torch.stack(losses).mean().item() == pytest.approx(full.item(), rel=1e-6)
    for name, p in model.named_parameters():
        scale = want[name].abs().max().item()
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-6 * max(scale, 1e-3), msg=name)


def _rows_of_different_lengths(n: int, V: int) -> list[tuple[list[int], int]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randint(1, V, (int(length),), generator=gen).tolist(), 3)
            for length in (5, 9, 20, 27)[:n]]


@pytest.mark.parametrize("loss_chunk_size", [0, 7])
def test_token_weighted_accumulation_of_2x2_equals_a_batch_of_4(loss_chunk_size):
    """train_step weights each micro-batch by its target tokens: 2 micro-batches of 2 rows of different lengths
    (hence different target counts) make the step of one batch of 4; a mean per micro-batch would not."""
    from accelerate import Accelerator

    from codeparrot.sft.collate import collate
    from codeparrot.train import train_step

    V = 101
    items = _rows_of_different_lengths(4, V)
    acc = Accelerator(cpu=True)

    def step(batches: list) -> tuple[dict[str, torch.Tensor], float]:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=V, n_positions=32, n_layer=2, n_head=2, n_embd=32,
                              loss_chunk_size=loss_chunk_size))
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        result = train_step(model, optimizer, iter(b.model_inputs() for b in batches), acc, len(batches), 1e9, 1.0)
        return {n: p.detach().clone() for n, p in model.named_parameters()}, result.loss.item()

    whole, whole_loss = step([collate(items, 0, 32, mask_prompt=True)])
    parts = [collate(items[:2], 0, 32, mask_prompt=True), collate(items[2:], 0, 32, mask_prompt=True)]
    assert parts[0].target_tokens != parts[1].target_tokens  # else weighting could not show
    split, split_loss = step(parts)
    assert split_loss == pytest.approx(whole_loss, rel=1e-6)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(0)  # the control: the plain mean of the two micro-batch means
    model = GPT(GPTConfig(vocab_size=V, n_positions=32, n_layer=2, n_head=2, n_embd=32))
    mean_of_means = sum(model(**p.model_inputs()).loss.item() for p in parts) / 2
    assert abs(mean_of_means - whole_loss) > 1e-4


@pytest.mark.slow
def test_accumulation_trains_exactly_as_the_full_batch(workdir):
    """micro-batch 2 x accumulation 2 == micro-batch 4 x accumulation 1: same losses, same weights after k steps."""
    _train(workdir, "train.run_name=acc2x2", f"train.max_steps={STEPS}", "train.micro_batch_size=2",
           "train.gradient_accumulation_steps=2")
    _train(workdir, "train.run_name=acc4x1", f"train.max_steps={STEPS}", "train.micro_batch_size=4",
           "train.gradient_accumulation_steps=1")
    accumulated, full = workdir / "runs" / "acc2x2", workdir / "runs" / "acc4x1"
    got, want = _logged(accumulated, "train/loss"), _logged(full, "train/loss")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    assert _logged(accumulated, "train/tokens_seen") == _logged(full, "train/tokens_seen")
    _assert_weights_close(accumulated / f"step-{STEPS}", full / f"step-{STEPS}", atol=1e-5)


# --- 2. data parallelism --------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "fsdp"])
def test_two_gloo_processes_train_exactly_as_one_at_the_same_global_batch(workdir, reference, launch):
    """2 ranks x micro-batch 4 == 1 process x micro-batch 8, fp32: same blocks, same mean gradient, so the same
    losses and weights; with DDP (`--multi_gpu`) and with FSDP2 (fsdp.yaml, its bf16 overridden by
    train.mixed_precision=no)."""
    args = (["--multi_gpu"] if launch == "ddp"
            else ["--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--mixed_precision", "no"])
    _train(workdir, f"train.run_name={launch}2x4", f"train.max_steps={STEPS}", "train.micro_batch_size=4",
           launcher=_accelerate(*args, "--num_processes", "2"))
    run = workdir / "runs" / f"{launch}2x4"
    ranks = _assert_world_size(run, 2)
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-12)
    assert ranks[0]["first_batch_sha1"] != ranks[1]["first_batch_sha1"]
    got, want = _logged(run, "train/loss"), _logged(reference, "train/loss")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    _assert_weights_close(run / f"step-{STEPS}", reference / f"step-{STEPS}", atol=1e-5)


# --- 3. the learning rate of each step -------------------------------------------------------------

def _expected_lr(step_index: int, max_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup over WARMUP steps, then cosine to min_ratio at max_steps (0-based step index)."""
    if step_index < WARMUP:
        return LR * (step_index + 1) / WARMUP
    progress = min(1.0, (step_index - WARMUP) / (max_steps - WARMUP))
    return LR * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.slow  # 9 s of training runs: the fast lane stays under 3 minutes
def test_lr_follows_the_schedule_in_force_also_after_a_resume_that_extends_max_steps(workdir):
    """Steps 1..6 of a max_steps=6 run, then 7..12 resumed with max_steps=12: each logged train/lr is the lr of
    its step under the schedule its process ran with (steps 7..12: the cosine of max_steps=12), and the first
    resumed step really trained (its weights moved; at the old schedule's lr, 0, they would not)."""
    _train(workdir, "train.run_name=extend", "train.max_steps=6", "train.eval_interval=0")
    run = workdir / "runs" / "extend"
    _train(workdir, "train.run_name=extend", "train.max_steps=12", "train.eval_interval=0", "train.save_interval=1")
    lrs = _logged(run, "train/lr")
    assert sorted(lrs) == list(range(1, 13))
    want = {step: _expected_lr(step - 1, 6) for step in range(1, 7)}
    want.update({step: _expected_lr(step - 1, 12) for step in range(7, 13)})
    wrong = {step: (lrs[step], want[step]) for step in want if lrs[step] != pytest.approx(want[step], rel=1e-9,
                                                                                       abs=1e-12)}
    assert not wrong, f"logged lr != expected lr at steps {wrong}"
    moved = max((a - b).abs().max().item() for a, b in zip(_weights(run / "step-7").values(),
                                                             _weights(run / "step-6").values()))
    assert moved > 1e-4, "the first resumed step left the weights unchanged (trained at lr 0?)"


# --- 4. exact resume with dropout ------------------------------------------------------------------

@pytest.mark.slow  # 9 s of training runs: the fast lane stays under 3 minutes
def test_resume_with_dropout_reproduces_the_uninterrupted_losses(workdir):
    """model.dropout=0.1: a run resumed from step 3 (after the eval and save there) logs the losses of steps 4..6
    that the uninterrupted run logged; the dropout masks depend on the RNG state, so it must be restored."""
    overrides = ("train.run_name=dropout", "train.max_steps=6", "model.dropout=0.1")
    _train(workdir, *overrides)
    run = workdir / "runs" / "dropout"
    assert json.loads((run / "step-6" / "config.json").read_text())["resid_pdrop"] == 0.1
    uninterrupted = _logged(run, "train/loss", first=True)
    assert sorted(uninterrupted) == list(range(1, 7))
    shutil.rmtree(run / "step-6")  # as if killed after step 6 trained but before its checkpoint landed
    _train(workdir, *overrides)
    steps = [r["step"] for r in _records(run) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 4, 5, 6], "the second run did not resume from step-3"
    resumed = _logged(run, "train/loss")
    differ = {s: (resumed[s], uninterrupted[s]) for s in (4, 5, 6)
              if resumed[s] != pytest.approx(uninterrupted[s], rel=1e-6)}
    assert not differ, f"resumed losses (resumed, uninterrupted) differ at steps {differ}"


@pytest.mark.slow  # 9 s of training runs
def test_muon_with_wsd_resumes_to_the_uninterrupted_losses_at_wsd_rates(workdir):
    """train.optimizer=muon, lr_schedule=wsd: resumed from step-3 (the checkpoint holds both optimizers' state),
    steps 4..6 log the uninterrupted run's losses; every step's lr is WSD's (stable to 3, then down to 0 at 6)."""
    overrides = ("train.run_name=muon", "train.max_steps=6", "train.optimizer=muon", "train.lr_schedule=wsd",
                 "train.decay_fraction=0.5", "train.embedding_weight_decay=false")
    _train(workdir, *overrides)
    run = workdir / "runs" / "muon"
    uninterrupted = _logged(run, "train/loss", first=True)
    shutil.rmtree(run / "step-6")
    _train(workdir, *overrides)
    assert [r["step"] for r in _records(run) if "train/loss" in r] == [1, 2, 3, 4, 5, 6, 4, 5, 6]
    resumed = _logged(run, "train/loss")
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([uninterrupted[s] for s in (4, 5, 6)], rel=1e-6)
    want = [LR / 2, LR, LR, LR * 2 / 3, LR / 3, 0.0]
    assert [_logged(run, "train/lr")[s] for s in range(1, 7)] == pytest.approx(want, abs=1e-12)


# --- 5, 6. checkpoints through torch.compile, FSDP2 and DDP ------------------------------------------

@pytest.mark.slow
def test_checkpoint_written_through_torch_compile_loads_in_transformers(workdir, reference):
    """train.compile=true on CPU (inductor): the checkpoint has the eager run's weights and loads in transformers."""
    _train(workdir, "train.run_name=compiled", f"train.max_steps={STEPS}", "train.micro_batch_size=8",
           "train.compile=true")
    ckpt = workdir / "runs" / "compiled" / f"step-{STEPS}"
    _assert_weights_close(ckpt, reference / f"step-{STEPS}", atol=1e-4)
    _assert_loads_in_transformers(ckpt)


def _eval_loss(workdir: Path, ckpt: Path) -> float:
    run_cli("evaluate", "--checkpoint", str(ckpt), f"paths.workdir={workdir}", *TINY)
    return json.loads((ckpt.parent / "eval" / f"{ckpt.name}.json").read_text())["loss"]


@pytest.mark.slow
def test_fsdp_config_as_shipped_trains_in_bf16_and_its_checkpoint_loads_in_transformers(workdir, reference):
    """configs/accelerate/fsdp.yaml as shipped (only --num_processes 2 and a free port added) on two gloo processes,
    with train.mixed_precision=auto taking the config's bf16. On a CPU accelerate runs it as data parallel
    (MULTI_CPU; FSDP2 itself is tested in test_train.py with tests/fsdp_worker.py): the checkpoint loads in
    transformers with load_hf's logits, and it is the trained model (its validation loss is the fp32
    single-process run's, up to bf16 noise)."""
    fsdp = str(REPO / "configs" / "accelerate" / "fsdp.yaml")
    _train(workdir, "train.run_name=fsdp-bf16", f"train.max_steps={STEPS}", "train.micro_batch_size=4",
           "train.mixed_precision=auto", launcher=_accelerate("--config_file", fsdp, "--num_processes", "2"))
    run = workdir / "runs" / "fsdp-bf16"
    ranks = _assert_world_size(run, 2)
    assert {(r["mixed_precision"], r["distributed_type"]) for r in ranks} == {("bf16", "MULTI_CPU")}
    ckpt = run / f"step-{STEPS}"
    _assert_loads_in_transformers(ckpt)
    got, want = _logged(run, "train/loss"), _logged(reference, "train/loss")
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=2e-3), step
    _assert_weights_close(ckpt, reference / f"step-{STEPS}", atol=2e-2)
    start = _logged(reference, "eval/loss")[0]
    fsdp_loss, ref_loss = _eval_loss(workdir, ckpt), _eval_loss(workdir, reference / f"step-{STEPS}")
    assert start - ref_loss > 0.05  # training moved the loss far more than the tolerance below
    assert fsdp_loss == pytest.approx(ref_loss, abs=0.01)


@pytest.mark.slow
def test_ddp_config_as_shipped_trains_in_bf16_on_two_processes(workdir, reference):
    """configs/accelerate/ddp.yaml as shipped (bf16; only --num_processes 2 and a free port added): two gloo
    processes stay in sync, follow the fp32 single-process losses up to bf16 noise, and the checkpoint loads in
    transformers."""
    ddp = str(REPO / "configs" / "accelerate" / "ddp.yaml")
    _train(workdir, "train.run_name=ddp-bf16", f"train.max_steps={STEPS}", "train.micro_batch_size=4",
           "train.mixed_precision=auto", launcher=_accelerate("--config_file", ddp, "--num_processes", "2"))
    run = workdir / "runs" / "ddp-bf16"
    ranks = _assert_world_size(run, 2)
    assert {r["mixed_precision"] for r in ranks} == {"bf16"}  # auto takes ddp.yaml's precision
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-12)
    got, want = _logged(run, "train/loss"), _logged(reference, "train/loss")
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=2e-3), step
    _assert_weights_close(run / f"step-{STEPS}", reference / f"step-{STEPS}", atol=2e-2)
    _assert_loads_in_transformers(run / f"step-{STEPS}")
