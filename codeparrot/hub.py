"""The Hugging Face Hub: a branch per run with a commit per checkpoint, pushed in the background; artifacts;
checkpoints fetched from `hub:<repo_id>@<revision>`.

The token comes from `HF_TOKEN` or the user's `huggingface_hub` login, never from the config, and is scrubbed from
every message this module logs. Pushes run on one thread of rank 0: at most one is in flight, a newer checkpoint
replaces one still waiting, and a failed push is logged and counted, never raised into training.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import Config, ConfigError, HubConfig

log = logging.getLogger(__name__)

HUB_PREFIX = "hub:"
TRAINING_STATE = ["accelerate/*", "data_state_rank*.pt"]  # what only an exact resume needs
PUBLIC_HUB = "https://huggingface.co"


class HubError(RuntimeError):
    """A Hub call that the command cannot do without (creating the run's repo, fetching a checkpoint)."""


def endpoint(h: HubConfig) -> str:
    """hub.endpoint, else HF_ENDPOINT, else the public Hub."""
    return h.endpoint or os.environ.get("HF_ENDPOINT") or PUBLIC_HUB


def hub_api(h: HubConfig):
    """An HfApi for the endpoint, with the token of HF_TOKEN or the login (None: anonymous reads only)."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ConfigError("the Hub is needed (hub.repo_id or a hub: checkpoint) but HF_HUB_OFFLINE=1 blocks every "
                          "Hub call; unset it")
    return HfApi(endpoint=endpoint(h), token=get_token())


def scrub(text: str, api: Any) -> str:
    """`text` without the token (an error message may quote a request); it must never reach a log."""
    token = getattr(api, "token", None)
    return text.replace(token, "<token>") if isinstance(token, str) and token else text


def model_card(cfg: Config, ckpt: Path) -> str:
    """README.md of a pushed checkpoint: Hub metadata, progress, the latest evaluation and pass@k, the config."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation", "license": cfg.hub.license,
            "tags": ["code", "python", "gpt2", "codeparrot"], "datasets": list(cfg.hub.datasets)}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", f"# {cfg.train.run_name}", "",
             "A GPT-2-style Python code model trained from scratch with codeparrot.", "",
             "| | |", "|---|---|", f"| step | {state['step']} |", f"| tokens seen | {state['tokens_seen']:,} |"]
    if state.get("history"):
        last = state["history"][-1]
        lines += [f"| eval loss (step {last['step']}) | {last['loss']:.4f} |",
                  f"| perplexity | {last['perplexity']:.2f} |"]
    report = ckpt.parent / "humaneval" / ckpt.name / "pass_at_k.json"
    if report.is_file():
        lines += [f"| HumanEval {k} | {v:.4f} |" for k, v in json.loads(report.read_text()).items()
                  if k.startswith("pass@")]
    config = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    lines += ["", "## Config", "```yaml", config.rstrip(), "```", ""]
    return "\n".join(lines)


def commit_description(ckpt: Path) -> str:
    """The commit's description: the step and the latest evaluation, for `hub list`."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    last = state["history"][-1] if state.get("history") else {}
    return f"step: {state['step']}\ntokens_seen: {state['tokens_seen']}\neval_loss: {last.get('loss', 'none')}"


class CheckpointPusher:
    """Pushes checkpoints to the run's branch on a background thread; rank 0 only."""

    def __init__(self, cfg: Config, api: Any) -> None:
        self.cfg, self.api, self.h = cfg, api, cfg.hub
        self.repo_id, self.branch = cfg.hub.repo_id, cfg.hub.branch or cfg.train.run_name
        self.pushed: list[int] = []
        self.failed: list[int] = []
        self._cond = threading.Condition()
        self._waiting: Optional[tuple[Path, int, bool]] = None
        self._pushing: Optional[Path] = None
        self._offers = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="hub-push", daemon=True)

    def start(self) -> "CheckpointPusher":
        """Create the repo and the run's branch (failure stops the run now, not hours later), start the thread."""
        try:
            self.api.create_repo(self.repo_id, private=self.h.private, exist_ok=True)
            self.api.create_branch(self.repo_id, branch=self.branch, exist_ok=True)
        except Exception as e:
            raise HubError(f"hub: cannot create {self.repo_id}@{self.branch} on {endpoint(self.h)}: "
                           f"{scrub(f'{type(e).__name__}: {e}', self.api)}") from None
        log.info("hub: pushing checkpoints to %s, branch %s", self.repo_id, self.branch)
        self._thread.start()
        return self

    def offer(self, ckpt: Path, step: int, last: bool) -> None:
        """Queue a saved checkpoint (every hub.push_every-th, and the last); it replaces one still waiting."""
        self._offers += 1
        if not last and self._offers % max(1, self.h.push_every) != 0:
            return
        with self._cond:
            if self._waiting is not None:
                log.info("hub: step %d replaces step %d, which was still waiting to be pushed", step, self._waiting[1])
            self._waiting = (ckpt, step, last)
            self._cond.notify_all()

    def protected(self) -> set[Path]:
        """Checkpoints waiting or being pushed: pruning must leave them alone."""
        with self._cond:
            return {p for p in (self._waiting and self._waiting[0], self._pushing) if p is not None}

    def _run(self) -> None:
        # Below the training thread in the OS scheduler: on a busy CPU host the upload's hashing and encoding
        # must not take cores from training (Linux schedules threads, so this is per thread).
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while True:
            with self._cond:
                while self._waiting is None and not self._closed:
                    self._cond.wait()
                if self._waiting is None:
                    return
                (ckpt, step, last), self._waiting = self._waiting, None
                self._pushing = ckpt
            # the last checkpoint gets one retry; any other's retry is the next checkpoint
            if not self._push(ckpt, step) and last and not self._push(ckpt, step):
                log.warning("hub: the final checkpoint (step %d) was not pushed; `codeparrot hub push %s` retries it",
                            step, ckpt)
            with self._cond:
                self._pushing = None
                self._cond.notify_all()

    def _push(self, ckpt: Path, step: int) -> bool:
        """One commit `step N` on the branch; False (logged, counted) when it fails."""
        start = time.perf_counter()
        try:
            (ckpt / "README.md").write_text(model_card(self.cfg, ckpt))
            self.api.upload_folder(repo_id=self.repo_id, folder_path=str(ckpt), revision=self.branch,
                                   commit_message=f"step {step}", commit_description=commit_description(ckpt),
                                   ignore_patterns=None if self.h.include_training_state else TRAINING_STATE)
        except Exception as e:
            if step not in self.failed:  # a retry that fails again is still one checkpoint not pushed
                self.failed.append(step)
            log.warning("hub: push of step %d failed (%s); training goes on", step,
                        scrub(f"{type(e).__name__}: {e}", self.api)[:300])
            return False
        self.pushed.append(step)
        log.info("hub: pushed step %d to %s@%s in %.1f s", step, self.repo_id, self.branch,
                 time.perf_counter() - start)
        return True

    def finish(self) -> dict[str, Any]:
        """Wait for the pushes (at most hub.final_wait seconds); what was pushed and what failed."""
        start = time.perf_counter()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(self.h.final_wait)
        waited = time.perf_counter() - start
        if self._thread.is_alive():
            log.warning("hub: a push was still running after hub.final_wait=%s s; not waiting longer",
                        self.h.final_wait)
        return {"hub_pushed": list(self.pushed), "hub_failed": list(self.failed),
                "hub_final_wait_s": round(waited, 2)}


def start_pusher(cfg: Config, accelerator: Any) -> Optional[CheckpointPusher]:
    """The run's pusher on the main process when hub.repo_id is set, else None; a failure stops every rank."""
    if not cfg.hub.repo_id:
        return None
    pusher, error = None, None
    if accelerator.is_main_process:
        try:
            pusher = CheckpointPusher(cfg, hub_api(cfg.hub)).start()
        except (HubError, ConfigError) as e:
            error = str(e)
    if accelerator.num_processes > 1:  # the other ranks must not go on into collectives rank 0 will never join
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error:
        raise HubError(error)
    return pusher


def parse_hub_spec(spec: str) -> tuple[str, str]:
    """`hub:<repo_id>@<revision>` -> (repo_id, revision); the revision defaults to main."""
    body = spec.removeprefix(HUB_PREFIX)
    repo_id, _, revision = body.partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ValueError(f"{spec!r} is not hub:<namespace>/<name>[@<branch, tag or commit>]")
    return repo_id, revision or "main"


def checkpoint_dir(spec: str, into: Path) -> Path:
    """Where the checkpoint `hub:<repo_id>@<revision>` is fetched to: `into/<namespace>--<name>@<revision>/`."""
    repo_id, revision = parse_hub_spec(spec)
    return into / f"{repo_id.replace('/', '--')}@{revision.replace('/', '--')}"


def fetch_checkpoint(spec: str, h: HubConfig, into: Path, training_state: bool = False) -> Path:
    """Download the checkpoint `spec` names into checkpoint_dir: weights, config and tokenizer, and with
    `training_state` also the optimizer, RNG and data state (TRAINING_STATE) an exact resume needs; its local path."""
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_hub_spec(spec)
    api = hub_api(h)
    local = checkpoint_dir(spec, into)
    try:
        snapshot_download(repo_id, revision=revision, local_dir=str(local), endpoint=endpoint(h), token=api.token,
                          ignore_patterns=None if training_state else TRAINING_STATE)
    except Exception as e:
        raise HubError(f"cannot fetch {spec} from {endpoint(h)}: {scrub(f'{type(e).__name__}: {e}', api)}") from None
    log.info("hub: fetched %s into %s", spec, local)
    return local


def fetch_checkpoint_once(spec: str, h: HubConfig, into: Path, training_state: bool = False) -> Path:
    """fetch_checkpoint on the main process of each node only: the others wait for it, then take its directory
    without asking the Hub. A failure stops every process (none waits for a download that never comes)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    local = checkpoint_dir(spec, into)  # a bad spec fails on every process alike, before any collective
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # what Accelerator() reads
    failure: Optional[Exception] = None
    if state.is_local_main_process:
        try:
            fetch_checkpoint(spec, h, into, training_state)
        except Exception as e:  # held until every process knows, or the others would wait at the gather forever
            failure = e
    # a collective, so also the barrier: no process reads the directory before its node's download is done
    errors = [e for e in gather_object([None if failure is None else str(failure)]) if e]
    if failure is not None:
        raise failure
    if errors:
        raise HubError(f"{errors[0]} (on the main process of a node)")
    return local


def resolve_checkpoint(checkpoint: str, h: HubConfig, into: Path) -> str:
    """A local checkpoint directory for `checkpoint`: itself, or the weights-only download of a `hub:` one."""
    if not checkpoint.startswith(HUB_PREFIX):
        return checkpoint
    return str(fetch_checkpoint_once(checkpoint, h, into))


def dataset_card(clean: Path) -> str:
    """README.md of a pushed clean corpus: both splits as one dataset (the chapter used two repos), the report."""
    meta = {"configs": [{"config_name": "default", "data_files": [
        {"split": split, "path": f"{split}/*.json.gz"} for split in ("train", "valid")]}],
        "tags": ["code", "python", "codeparrot"]}
    report = clean / "report.json"
    counts = json.loads(report.read_text()) if report.is_file() else {}
    summary = {k: v for k, v in counts.items() if not isinstance(v, (dict, list))}
    return "\n".join(["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---",
                      "# Python files, cleaned and deduplicated by codeparrot `prepare`", "",
                      "BigQuery's GitHub Python files after the quality filters, exact and near deduplication. "
                      "`report.json` and `manifest.json` say what was dropped and why.", "", "```json",
                      json.dumps(summary, indent=2), "```", ""])


def artifact_kind(path: Path) -> str:
    """"checkpoint", "clean" or "tokenizer": what `hub push` publishes, told by the directory's own files."""
    from .artifacts import read_manifest

    if (path / "trainer_state.json").is_file():
        return "checkpoint"
    stage = (read_manifest(path) or {}).get("stage")
    if stage in ("prepare", "train-tokenizer"):
        return {"prepare": "clean", "train-tokenizer": "tokenizer"}[stage]
    raise ValueError(f"{path} is not a checkpoint (step-N/), a cleaned corpus (clean/) or a tokenizer (tokenizer/)")


def push_artifact(cfg: Config, path: Path, repo_id: str, branch: str = "main") -> dict[str, Any]:
    """Publish a checkpoint or tokenizer (model repo) or a clean corpus (dataset repo) as one commit."""
    kind = artifact_kind(path)
    repo_type = "dataset" if kind == "clean" else "model"
    api = hub_api(cfg.hub)
    if kind == "clean":
        (path / "README.md").write_text(dataset_card(path))
    elif kind == "checkpoint":
        (path / "README.md").write_text(model_card(cfg, path))
    step = json.loads((path / "trainer_state.json").read_text())["step"] if kind == "checkpoint" else None
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=cfg.hub.private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, repo_type=repo_type, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(path), repo_type=repo_type, revision=branch,
                                 commit_message=f"step {step}" if step is not None else f"{kind} from {path.name}",
                                 commit_description=commit_description(path) if step is not None else None,
                                 ignore_patterns=None if cfg.hub.include_training_state else TRAINING_STATE)
    except Exception as e:
        raise HubError(f"hub push {path} -> {repo_id}@{branch}: {scrub(f'{type(e).__name__}: {e}', api)}") from None
    log.info("hub: pushed %s %s to %s@%s", kind, path, repo_id, branch)
    return {"kind": kind, "repo": repo_id, "repo_type": repo_type, "revision": branch, "commit": info.oid}


def step_commits(api: Any, repo_id: str, branch: str) -> list[dict[str, Any]]:
    """The `step N` commits of a branch, newest first: id, step, eval loss (from the description), date."""
    rows = []
    for c in api.list_repo_commits(repo_id, revision=branch):
        m = re.fullmatch(r"step (\d+)", c.title.strip())
        if m:
            loss = re.search(r"eval_loss: (\S+)", c.message or "")
            rows.append({"commit": c.commit_id, "step": int(m.group(1)), "eval_loss": loss and loss.group(1),
                         "date": c.created_at.isoformat(timespec="seconds")})
    return rows


def list_runs(cfg: Config, branch: str = "") -> dict[str, list[dict[str, Any]]]:
    """Branch -> its step commits, for hub.repo_id (one branch, or every branch but main)."""
    api = hub_api(cfg.hub)
    refs = api.list_repo_refs(cfg.hub.repo_id)
    names = [branch] if branch else [b.name for b in refs.branches if b.name != "main"]
    return {name: step_commits(api, cfg.hub.repo_id, name) for name in names}


def repo_tree(api: Any, repo_id: str, revision: str) -> dict[str, str]:
    """path -> blob id of every file at a revision but .gitattributes (main keeps its own): what a checkpoint holds."""
    from huggingface_hub import RepoFile

    return {f.path: f.blob_id for f in api.list_repo_tree(repo_id, revision=revision, recursive=True)
            if isinstance(f, RepoFile) and f.path != ".gitattributes"}


def promote(cfg: Config, branch: str, step: Optional[int] = None) -> dict[str, Any]:
    """Make `main` hold a run's checkpoint (its latest step, or `step`), and tag it `<branch>-step-<N>`.

    Idempotent: promoting a step again commits only if main moved on since, and keeps its tag."""
    from huggingface_hub import CommitOperationCopy, CommitOperationDelete

    api, repo_id = hub_api(cfg.hub), cfg.hub.repo_id
    commits = step_commits(api, repo_id, branch)
    chosen = next((c for c in commits if step is None or c["step"] == step), None)
    if chosen is None:
        raise ValueError(f"{repo_id}@{branch} has no commit 'step {step}'" if step is not None
                         else f"{repo_id}@{branch} has no step commits")
    tag = f"{branch}-step-{chosen['step']}"
    refs = api.list_repo_refs(repo_id)
    tagged = next((t.target_commit for t in refs.tags if t.name == tag), None)
    head = next(b.target_commit for b in refs.branches if b.name == "main")
    source = repo_tree(api, repo_id, chosen["commit"])
    # checked before main is touched: a refusal after the commit would leave main promoted but untagged
    if tagged is not None and repo_tree(api, repo_id, tagged) != source:
        raise HubError(f"tag {tag} of {repo_id} holds another checkpoint than {branch} step {chosen['step']} "
                       f"(commit {chosen['commit'][:12]}), e.g. of an earlier run of that branch; main is unchanged. "
                       f"Delete the tag to promote this one: hf repos tag delete {repo_id} {tag}")
    commit, on_main = head, repo_tree(api, repo_id, head)
    if on_main != source:
        # the Hub has no server-side merge: a commit on main that copies the checkpoint's files (and drops the rest)
        ops = [CommitOperationDelete(path) for path in sorted(set(on_main) - set(source))] + [
            CommitOperationCopy(src_path_in_repo=path, path_in_repo=path, src_revision=chosen["commit"])
            for path in sorted(source)]
        commit = api.create_commit(repo_id, ops, commit_message=f"promote {branch} step {chosen['step']}",
                                   revision="main", parent_commit=head).oid  # fails if main moved since read
    if tagged is None:
        api.create_tag(repo_id, tag=tag, revision=commit, tag_message=f"{branch} at step {chosen['step']}")
    log.info("hub: promoted %s step %d onto main of %s (tag %s)", branch, chosen["step"], repo_id, tag)
    return {"repo": repo_id, "branch": branch, "step": chosen["step"], "commit": commit, "tag": tag,
            "tag_commit": tagged or commit}
