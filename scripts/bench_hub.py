"""Training tokens/s with Hub pushing off and on, in one run, against the loopback test Hub slowed to N s per commit.

    python scripts/bench_hub.py                 # configs/tiny.yaml, 200 steps, a checkpoint every 25, 2 s/commit
    python scripts/bench_hub.py --steps 400 --save-interval 50 --commit-delay 2

Needs the tiny config's corpus, tokenizer and token shards (`bash scripts/demo.sh` makes them). Both runs train the
same steps under fresh run names; the pushing run sends every checkpoint to a branch of the test server
(tests/loopback_hub.py: real bare git repos behind the real huggingface_hub client), run as its own process at the
lowest CPU priority, as a remote Hub's work would not be on this machine. Prints tokens/s of both, their ratio, the
pushes and the final wait.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_bench_token"


def train(name: str, steps: int, save_interval: int, extra: list[str], env: dict[str, str]) -> dict[str, str]:
    """One `codeparrot train` run of the tiny config; its summary."""
    cmd = [sys.executable, "-m", "codeparrot", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"train.run_name={name}", f"train.max_steps={steps}", f"train.save_interval={save_interval}",
           f"train.eval_interval={steps}", "train.keep_last=2", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    block = proc.stdout.split("== train ==", 1)[1]
    return dict(line.strip().split(": ", 1) for line in block.splitlines() if ": " in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save-interval", type=int, default=25)
    parser.add_argument("--commit-delay", type=float, default=2.0, help="seconds the server takes per commit")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN)
    stamp = time.strftime("%H%M%S")
    with tempfile.TemporaryDirectory() as d:
        # The server runs in its own process at the lowest CPU priority: a real Hub's work is not on this machine.
        server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "loopback_hub.py"), f"{d}/hub", TOKEN,
                                   str(args.commit_delay)], stdout=subprocess.PIPE, text=True,
                                  preexec_fn=lambda: os.nice(19))
        try:
            endpoint = server.stdout.readline().strip()
            runs = [f"paths.runs={d}/runs"]  # the runs are thrown away with the server
            off = train(f"bench-hub-off-{stamp}", args.steps, args.save_interval, runs, env)
            on = train(f"bench-hub-on-{stamp}", args.steps, args.save_interval,
                       [*runs, "hub.repo_id=bench/tiny", f"hub.endpoint={endpoint}"], env)
            from huggingface_hub import HfApi, constants

            constants.HF_HUB_OFFLINE = False
            commits = len(HfApi(endpoint=endpoint, token=TOKEN).list_repo_commits(
                "bench/tiny", revision=f"bench-hub-on-{stamp}")) - 1  # minus main's initial commit
        finally:
            server.kill()
    t_off, t_on = float(off["tokens_per_s"]), float(on["tokens_per_s"])
    print(f"tiny config, {args.steps} steps, a checkpoint every {args.save_interval}, server {args.commit_delay:g} s "
          f"per commit")
    print(f"  pushing off: {t_off:>10.0f} tokens/s  ({off['seconds']} s)")
    print(f"  pushing on:  {t_on:>10.0f} tokens/s  ({on['seconds']} s)")
    print(f"  on / off:    {t_on / t_off:>10.3f}")
    print(f"  pushed steps {on['hub_pushed']}, failed {on['hub_failed']}, {commits} commits on the branch, "
          f"final wait {on['hub_final_wait_s']} s")


if __name__ == "__main__":
    main()
