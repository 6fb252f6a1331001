"""The README's promise: every command of a block marked `# on the demo's artifacts` (README.md and docs/) runs as
printed, in a directory holding what the demo leaves (`work/tiny/` with configs/tiny.yaml's run names and steps)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SUBPROCESS_ENV

REPO = Path(__file__).resolve().parents[1]
MARK = "# on the demo's artifacts"
# What makes the demo's pipeline quick here without changing its names: few files, one-row batches, short evals and
# a short fine-tuning. configs/tiny.yaml's run names, 600 steps and save interval stay, so `step-600` exists.
QUICK = ["train.micro_batch_size=1", "eval.max_batches=1", "eval.batch_size=2", "humaneval.limit=1", "humaneval.n=2",
         "sft.epochs=1", "sft.batch_size=4", "sft.max_new_tokens=4",
         "sft.eval_batches=1", "tokenizer.n_examples=200", "tokenizer.report_valid_files=20"]


def marked_commands() -> list[str]:
    """The command lines (backslash continuations joined) of every marked ```bash block of README.md and docs/."""
    commands = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            lines = block.replace("\\\n", " ").splitlines()
            if lines and lines[0].strip() == MARK:
                commands += [line.strip() for line in lines[1:] if line.strip() and not line.startswith("#")]
    return commands


COMMANDS = marked_commands()


def test_the_docs_mark_the_commands_a_newcomer_runs_next():
    assert len(COMMANDS) >= 6 and all(c.startswith("codeparrot ") for c in COMMANDS), COMMANDS
    assert {c.split()[1] for c in COMMANDS} >= {"generate", "evaluate", "humaneval", "plot", "config"}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A directory as the demo leaves it: `codeparrot pipeline --config tiny` over the first 400 files of the
    interpreter's own installation (enough docstring pairs for every sft split)."""
    cwd = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, "-m", "codeparrot", "pipeline", "--config", "tiny", "corpus.local_max_files=400", *QUICK]
    p = subprocess.run(cmd, cwd=cwd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (cwd / "work" / "tiny" / "runs" / "tiny" / "step-600").is_dir()
    assert (cwd / "work" / "tiny" / "runs" / "sft" / "final").is_dir()
    return cwd


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_a_documented_command_runs_as_printed(demo_dir, command):
    env = {**SUBPROCESS_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{SUBPROCESS_ENV.get('PATH', '')}"}
    p = subprocess.run(["bash", "-c", command], cwd=demo_dir, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{command}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr
