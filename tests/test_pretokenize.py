"""The pretokenize stage on corpus.executor: the .docs index, the same bytes on every executor, resume after a
failed task, and the Slurm job it submits."""
from __future__ import annotations

import ast
import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from codeparrot.corpus.quality import QUALITY_BUCKETS, UNKNOWN_QUALITY
from codeparrot.data.pretokenize import DOCS_DTYPE, load_meta, run_pretokenize
from codeparrot.data.pretokenize_task import work_dir
from codeparrot.tokenizer import load_tokenizer

from conftest import SUBPROCESS_ENV, read_all

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


def tokens_config(base, root: Path, *overrides: tuple[str, str, object]):
    cfg = copy.deepcopy(base)
    cfg.paths.tokens = str(root / "tokens")
    cfg.data.pretokenize_num_proc = 2
    for section, key, value in overrides:
        setattr(getattr(cfg, section), key, value)
    return cfg


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file of a tokens/ directory but its manifest (which records the time taken)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "config.yaml")}


@pytest.fixture(scope="module")
def local(trained_tokenizer, tmp_path_factory):
    """pretokenize on the local datatrove executor (the default), 2 workers."""
    cfg = tokens_config(trained_tokenizer[0], tmp_path_factory.mktemp("local"))
    assert cfg.corpus.executor == "local"
    run_pretokenize(cfg)
    return cfg


def test_docs_index_starts_and_quality_buckets(local):
    tokens, clean = local.paths.resolve("tokens"), local.paths.resolve("clean")
    meta, eos = load_meta(tokens), load_tokenizer(local.paths.resolve("tokenizer")).token_to_id("<|endoftext|>")
    for split in ("train", "valid"):
        for f in meta["splits"][split]["files"]:
            ids = np.fromfile(tokens / f["path"], dtype=np.uint16)
            docs = np.fromfile(tokens / f["docs"], dtype=DOCS_DTYPE)
            assert len(docs) == f["documents"] > 0
            # EOS only between documents (text that spells it stays text): each document starts after one
            assert docs["start"].tolist() == [0, *(np.flatnonzero(ids == eos)[:-1] + 1).tolist()]
            records = read_all(clean / f["source"])
            expected = [QUALITY_BUCKETS.index(r["quality"]) if r.get("quality") in QUALITY_BUCKETS
                        else UNKNOWN_QUALITY for r in records]
            assert docs["quality"].tolist() == expected
    assert not work_dir(local).exists()  # removed after success


def test_pool_and_one_worker_write_the_same_bytes(local, tmp_path):
    expected = files_of(local.paths.resolve("tokens"))
    for overrides in ([("corpus", "executor", "pool")], [("data", "pretokenize_num_proc", 1)]):
        cfg = tokens_config(local, tmp_path / overrides[0][1], *overrides)
        run_pretokenize(cfg)
        assert files_of(cfg.paths.resolve("tokens")) == expected, overrides


def test_a_failed_task_fails_the_stage_and_the_rerun_encodes_only_it(local, tmp_path, caplog):
    cfg = tokens_config(local, tmp_path, ("data", "pretokenize_num_proc", 1))  # in order: the others complete
    n = sum(len(s["files"]) for s in load_meta(local.paths.resolve("tokens"))["splits"].values())
    flags = work_dir(cfg).with_name(work_dir(cfg).name + ".inject-failure")
    flags.mkdir(parents=True)
    (flags / f"tokenize-{n - 1}").touch()
    with pytest.raises(RuntimeError, match=f"injected failure of tokenize task {n - 1}"):
        run_pretokenize(cfg)
    assert not cfg.paths.resolve("tokens").exists() and work_dir(cfg).is_dir()
    with caplog.at_level(logging.INFO, logger="codeparrot.corpus.engine"):
        assert run_pretokenize(cfg)["skipped"] is False
    assert f"pretokenize: tokenize, 1 of {n} tasks to run on local" in caplog.text
    assert files_of(cfg.paths.resolve("tokens")) == files_of(local.paths.resolve("tokens"))
    assert not work_dir(cfg).exists()


def test_slurm_submits_one_job_array_and_writes_nothing(local, tmp_path, monkeypatch):
    """The real SlurmPipelineExecutor against a stand-in `sbatch` that records its script."""
    from codeparrot.corpus.engine import SubmittedToSlurm

    bin_dir, script = tmp_path / "bin", tmp_path / "script"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncat "$(eval echo \\${{$#}})" >> {script}\necho "Submitted batch job 7"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cfg = tokens_config(local, tmp_path, ("corpus", "executor", "slurm"), ("corpus", "slurm_partition", "cpu"))
    with pytest.raises(SubmittedToSlurm, match="run the same `codeparrot pretokenize` again"):
        run_pretokenize(cfg)
    assert not cfg.paths.resolve("tokens").exists()
    n = sum(len(s["files"]) for s in load_meta(local.paths.resolve("tokens"))["splits"].values())
    assert "--job-name=pretokenize-tokenize" in script.read_text() and f"--array=0-{n - 1}" in script.read_text()


def import_graph(root: Path) -> dict[str, set[str]]:
    """`codeparrot.*` module -> the package modules it imports, at any depth (function-level imports included)."""
    def name_of(path: Path) -> str:
        parts = path.relative_to(root.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: up level - 1 packages from this module's own
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets.update([base, *(f"{base}.{a.name}" for a in node.names)])  # `from pkg import module`
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of the graph (its modules, the first repeated at the end), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return []


def test_the_package_has_no_import_cycles():
    """Every module imports in a fresh interpreter, and no codeparrot module imports itself through others (a
    function-level import closes a cycle as much as a top-level one: it only fails later)."""
    import codeparrot

    root = Path(codeparrot.__file__).parent
    graph = import_graph(root)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]  # the check works
    assert "codeparrot.config" in graph["codeparrot.data.pretokenize"]  # `from ..config import`, resolved
    assert "codeparrot.documents" in graph["codeparrot.model"]  # `from codeparrot.documents import`
    cycle = find_cycle(graph)
    assert not cycle, " -> ".join(cycle)
    names = sorted(n for n in graph if not n.endswith("__main__"))  # __main__ runs the command line
    script = f"import importlib\nfor name in {names!r}:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", script], env=SUBPROCESS_ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
