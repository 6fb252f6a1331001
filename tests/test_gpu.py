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
    from codeparrot.sampler import SamplingConfig, sample

    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, gpu = load_hf(checkpoint).eval(), load_hf(checkpoint).to("cuda").eval()
    prompt = list(range(1, 40))
    greedy = SamplingConfig(max_new_tokens=24)
    assert sample(gpu, [prompt], greedy)[0][0].tokens == sample(cpu, [prompt], greedy)[0][0].tokens
    cfg = SamplingConfig(n=8, max_new_tokens=24, temperature=0.8, top_p=0.95, seed=3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        first, again = sample(gpu, [prompt], cfg)[0], sample(gpu, [prompt], cfg)[0]
    assert [c.tokens for c in first] == [c.tokens for c in again] and len(first) == 8


def test_packed_rows_use_varlen_attention_on_cuda_and_match_separate_forwards():
    """Packed SFT rows in bf16 on CUDA go through torch's varlen flash attention; each document's logits equal its
    forward alone (bf16 tolerance), and the loss equals the padded batch's."""
    from codeparrot import documents
    from codeparrot.model import GPT, GPTConfig
    from codeparrot.sft.collate import collate_packed, make_example, pad_examples

    assert documents.varlen_attn is not None, "this torch has no torch.nn.attention.varlen"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, n_positions=256, n_layer=2, n_head=4, n_embd=128)).cuda().eval()
    gen = torch.Generator().manual_seed(1)
    examples = [make_example(torch.randint(1, 512, (int(n),), generator=gen).tolist(), 3, 0, 256, True)
                for n in (40, 17, 90, 64, 5)]
    packed = collate_packed([examples[:3], examples[3:]], 0)
    calls = []
    original = documents.varlen_attn
    documents.varlen_attn = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            inputs = {k: v.cuda() for k, v in packed.model_inputs().items()}
            out = model(**inputs)
            padded = {k: v.cuda() for k, v in pad_examples(examples, 0).model_inputs().items()}
            unpacked = model(**padded).loss
            start = 0
            for x, _ in examples[:3]:
                alone = model(torch.tensor([x], device="cuda")).logits[0]
                torch.testing.assert_close(out.logits[0, start:start + len(x)].float(), alone.float(),
                                           rtol=2e-2, atol=2e-2)
                start += len(x)
    finally:
        documents.varlen_attn = original
    assert calls, "the varlen kernel did not run"
    assert abs(out.loss.item() - unpacked.item()) < 2e-2
