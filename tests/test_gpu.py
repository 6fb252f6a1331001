"""The `gpu` tier: the CUDA paths of training, evaluation and generation. Every test is skipped without CUDA.

Run on a GPU machine with `bash scripts/test.sh tests/test_gpu.py -m gpu`. The shape is small (4 layers, 256 wide,
sequences of 256) so the tier takes a minute or two, torch.compile's warm-up included.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codeparrot.model import load_hf

from conftest import SUBPROCESS_ENV, build_training_corpus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 20
SMALL = [
    "corpus.valid_fraction=0.3", "tokenizer.vocab_size=1000", "tokenizer.n_examples=200",
    "data.seq_length=256", "data.pretokenized=true",
    "model.preset=tiny", "model.n_layer=4", "model.n_head=4", "model.n_embd=256", "model.dropout=0",
    "train.micro_batch_size=8", "train.warmup_steps=5", "train.learning_rate=0.001", f"train.max_steps={STEPS}",
    "train.log_interval=1", "train.eval_interval=0", f"train.save_interval={STEPS}", "train.keep_last=0",
    "train.trackers=", "eval.batch_size=8", "eval.max_batches=4", "eval.max_new_tokens=16",
]
FAST = ["train.mixed_precision=bf16", "train.compile=true", "train.fused_adamw=true", "model.loss_chunk_size=512"]
EXACT = ["train.mixed_precision=no", "train.compile=false", "train.fused_adamw=false", "model.loss_chunk_size=0",
         "train.tf32=false"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A prepared corpus (real stdlib packages email and json), its tokenizer and its token shards."""
    return build_training_corpus(tmp_path_factory.mktemp("gpu"), SMALL, pretokenize=True)


def _train(workdir: Path, run: str, *overrides: str) -> Path:
    cmd = [sys.executable, "-m", "codeparrot", "train", f"paths.workdir={workdir}", *SMALL,
           f"train.run_name={run}", *overrides]
    proc = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir / "runs" / run


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.fixture(scope="module")
def fast_run(workdir) -> Path:
    """bf16 autocast, torch.compile, fused AdamW and the chunked loss: the GPU defaults of a real run."""
    return _train(workdir, "fast", *FAST)


@pytest.fixture(scope="module")
def checkpoint(fast_run) -> Path:
    return fast_run / f"step-{STEPS}"


def test_fast_path_tracks_fp32_eager_training(workdir, fast_run):
    """20 steps of bf16 + compile + fused AdamW + chunked loss end within 2% of the fp32 eager run's loss."""
    exact = _train(workdir, "exact", *EXACT)
    fast_losses, exact_losses = _losses(fast_run), _losses(exact)
    assert sorted(fast_losses) == sorted(exact_losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in fast_losses.values())
    assert exact_losses[STEPS] < exact_losses[1]  # it trained
    assert fast_losses[STEPS] == pytest.approx(exact_losses[STEPS], rel=0.02)
    rank0 = json.loads((fast_run / "logs" / "rank0.json").read_text())
    assert rank0["device"].startswith("cuda")


def test_evaluate_runs_on_cuda_and_writes_its_result(workdir, checkpoint):
    cmd = [sys.executable, "-m", "codeparrot", "evaluate", "--checkpoint", str(checkpoint),
           f"paths.workdir={workdir}", *SMALL]
    proc = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((checkpoint.parent / "eval" / f"step-{STEPS}.json").read_text())
    assert math.isfinite(result["loss"]) and result["tokens"] > 0
    assert isinstance(result.get("completion", ""), str)


def test_generation_on_cuda_returns_text(checkpoint):
    from tokenizers import Tokenizer

    from codeparrot.evaluate import complete

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    model = load_hf(checkpoint).to("cuda").eval()
    text = complete(model, tokenizer, "def fibonacci(n):", 16, tokenizer.token_to_id("<|endoftext|>"))
    assert isinstance(text, str)
    assert next(model.parameters()).device.type == "cuda"


def test_checkpoint_loads_in_transformers_with_equal_logits_on_cuda(checkpoint):
    from transformers import GPT2LMHeadModel

    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    hf = GPT2LMHeadModel.from_pretrained(str(checkpoint)).to("cuda").eval()
    ours = load_hf(checkpoint).to("cuda").eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to("cuda")
    with torch.no_grad():
        want, got = ours(ids).logits, hf(ids).logits
    assert got.shape == want.shape == (2, 64, hf.config.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sampler_on_cuda_matches_cpu_greedy_and_samples_in_bf16(checkpoint):
    """fp32 greedy on CUDA gives the CPU's tokens (TF32 off); bf16 sampling of 8 rows runs and is seeded."""
    from codeparrot.generate import SamplingConfig, sample

    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, gpu = load_hf(checkpoint).eval(), load_hf(checkpoint).to("cuda").eval()
    prompt = list(range(1, 40))
    greedy = SamplingConfig(max_new_tokens=24)
    assert sample(gpu, [prompt], greedy)[0][0].tokens == sample(cpu, [prompt], greedy)[0][0].tokens
    cfg = SamplingConfig(n=8, max_new_tokens=24, temperature=0.8, top_p=0.95, seed=3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        first, again = sample(gpu, [prompt], cfg)[0], sample(gpu, [prompt], cfg)[0]
    assert [c.tokens for c in first] == [c.tokens for c in again] and len(first) == 8
