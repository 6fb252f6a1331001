"""Compare the loss curves of two training runs (metrics.jsonl), e.g. fast bf16 settings against plain fp32:

    codeparrot train --config configs/codeparrot-small.yaml train.run_name=fast train.max_steps=200
    codeparrot train --config configs/codeparrot-small.yaml train.run_name=plain train.max_steps=200 \
        train.mixed_precision=no train.compile=false train.tf32=false model.attention_backend=math
    python scripts/compare_runs.py work/codeparrot-small/runs/fast work/codeparrot-small/runs/plain

Prints the per-step train losses side by side and the largest difference, against a tolerance (default 0.05 nats:
bf16 noise on a loss around 2-10 is a few hundredths).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def losses(run: Path) -> dict[int, float]:
    """The last logged train loss of every step (a resumed run logs some steps twice)."""
    out: dict[int, float] = {}
    for line in (run / "logs" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            out[record["step"]] = record["train/loss"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--tolerance", type=float, default=0.05, help="largest allowed |loss_a - loss_b| in nats")
    args = p.parse_args()
    a, b = losses(args.run_a), losses(args.run_b)
    steps = sorted(set(a) & set(b))
    if not steps:
        print("no common logged steps")
        return 1
    print(f"{'step':>6s} {args.run_a.name:>12s} {args.run_b.name:>12s} {'diff':>8s}")
    for step in steps:
        print(f"{step:6d} {a[step]:12.4f} {b[step]:12.4f} {a[step] - b[step]:+8.4f}")
    worst = max(abs(a[s] - b[s]) for s in steps)
    print(f"largest difference {worst:.4f} over {len(steps)} steps: "
          f"{'within' if worst <= args.tolerance else 'OUTSIDE'} tolerance {args.tolerance}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
