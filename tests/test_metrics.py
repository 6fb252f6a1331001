"""The metrics logger: windows over training time only, peak memory, metrics.jsonl."""
from __future__ import annotations

import json
import logging

import torch


def test_throughput_windows_leave_out_eval_and_checkpoint_time(tmp_path):
    import time

    from accelerate import Accelerator

    from codeparrot.metrics import MetricsLogger

    metrics = MetricsLogger(Accelerator(cpu=True), tmp_path / "metrics.jsonl", tokens_per_step=1000,
                            flops_per_token=1.0, peak_flops=1e6)
    metrics.add_step(torch.tensor(2.0), data_wait=0.0)
    with metrics.paused():
        time.sleep(0.5)  # an evaluation, say
    metrics.flush(1, 1, lr=0.1, grad_norm=torch.tensor(1.0), tokens_seen=1000)
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["train/loss"] == 2.0 and record["train/step_time_s"] < 0.25
    assert record["train/tokens_per_s"] > 4000 and record["train/peak_mem_gib"] > 0


def test_a_data_starved_run_is_warned_once(tmp_path, caplog):
    import time

    from accelerate import Accelerator

    from codeparrot.metrics import MetricsLogger

    metrics = MetricsLogger(Accelerator(cpu=True), tmp_path / "metrics.jsonl", tokens_per_step=10,
                            flops_per_token=1.0, peak_flops=1e6)
    with caplog.at_level(logging.WARNING, logger="codeparrot.metrics"):
        for step in range(1, 7):
            time.sleep(0.02)
            metrics.add_step(torch.tensor(1.0), data_wait=0.015)  # ~75% of the window
            metrics.flush(step, 6, lr=0.1, grad_norm=torch.tensor(1.0), tokens_seen=10 * step)
    warnings = [r for r in caplog.records if "waited for data" in r.getMessage()]
    assert len(warnings) == 1 and "data.pretokenized=true" in warnings[0].getMessage()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(x)["train/data_wait_frac"] > 0.05 for x in lines)
