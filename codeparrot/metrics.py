"""Training metrics: loss windows, throughput and MFU over training time only, peak memory; to trackers and a file.

Every record goes to `runs/<run>/logs/metrics.jsonl` (always readable, no extra package) and to the accelerate
trackers the config names (TensorBoard, wandb).
"""
from __future__ import annotations

import contextlib
import json
import logging
import resource
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

log = logging.getLogger(__name__)

DATA_WAIT_WARN = 0.05  # share of training time spent waiting for batches that earns a warning
DATA_WAIT_WINDOWS = 3  # consecutive windows above it before warning (the first window includes start-up)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, or resident in host memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLogger:
    """Accumulates per-step numbers on the device and reports a window every `log_interval` steps.

    Time spent in `paused()` (evaluation, checkpoints) is left out of the window, so tokens/s, MFU and the
    data-wait share describe training steps only. Tokens are real tokens: fine-tuning's padding is not counted.
    """

    def __init__(self, accelerator, path: Path, tokens_per_step: int, flops_per_token: float, peak_flops: float,
                 extra: Optional[Callable[[int], dict[str, Any]]] = None):
        self.acc, self.path = accelerator, path
        self.extra = extra  # more fields of every record at a step (fine-tuning: its epoch)
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self.loss_sum = torch.zeros((), device=accelerator.device)  # summed on device: no host sync per step
        self.steps = 0
        self.window_tokens = 0
        self.data_wait = 0.0
        self.paused_seconds = 0.0
        self.window_start = time.perf_counter()
        self.slow_data_windows = 0
        self.warned_data_wait = False
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, metrics: dict[str, Any], step: int) -> None:
        """Send `metrics` to the trackers and append them to metrics.jsonl (rank 0 writes)."""
        if self.extra is not None:
            metrics = {**metrics, **self.extra(step)}
        self.acc.log(metrics, step=step)
        if self.acc.is_main_process:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def add_step(self, loss: torch.Tensor, data_wait: float, tokens: Optional[int] = None) -> None:
        """Count one optimizer step: its loss (on device), seconds spent waiting for data, and its tokens when they
        vary by step (fine-tuning; else tokens_per_step)."""
        self.loss_sum += loss
        self.steps += 1
        self.window_tokens += self.tokens_per_step if tokens is None else tokens
        self.data_wait += data_wait

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the enclosed time (evaluation, a checkpoint) out of the training window."""
        self._sync()  # queued training kernels belong to the window, not to the pause
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - start

    def _sync(self) -> None:
        if self.acc.device.type == "cuda":
            torch.cuda.synchronize(self.acc.device)

    def flush(self, step: int, max_steps: int, lr: float, grad_norm: torch.Tensor, tokens_seen: int) -> None:
        """Report the window that ends at `step` and start a new one."""
        mean_loss = self.acc.reduce(self.loss_sum, reduction="mean").item() / max(self.steps, 1)  # syncs
        seconds = max(time.perf_counter() - self.window_start - self.paused_seconds, 1e-9)
        tokens_per_s = self.window_tokens / seconds
        wait_frac = self.data_wait / seconds
        world = self.acc.num_processes
        self.record({"train/loss": mean_loss, "train/lr": lr, "train/grad_norm": float(grad_norm),
                     "train/tokens_seen": tokens_seen, "train/tokens_per_s": tokens_per_s,
                     "train/step_time_s": seconds / max(self.steps, 1), "train/data_wait_frac": wait_frac,
                     "train/mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * world),
                     "train/peak_mem_gib": peak_memory_gib(self.acc.device)}, step)
        log.info("step %d/%d: loss %.4f, lr %.2e, %.0f tokens/s, data wait %.0f%%", step, max_steps, mean_loss, lr,
                 tokens_per_s, 100 * wait_frac)
        self._watch_data_wait(wait_frac)
        self.loss_sum.zero_()
        self.steps = self.window_tokens = 0
        self.data_wait = self.paused_seconds = 0.0
        self.window_start = time.perf_counter()

    def _watch_data_wait(self, wait_frac: float) -> None:
        """Warn once when the GPU keeps waiting for data: the fix is a config switch the user may not know."""
        self.slow_data_windows = self.slow_data_windows + 1 if wait_frac > DATA_WAIT_WARN else 0
        if self.slow_data_windows >= DATA_WAIT_WINDOWS and not self.warned_data_wait:
            self.warned_data_wait = True
            log.warning("training waited for data %.0f%% of the time in %d windows in a row: pretokenize and train "
                        "from token shards (data.pretokenized=true), or raise data.num_workers",
                        100 * wait_frac, DATA_WAIT_WINDOWS)
