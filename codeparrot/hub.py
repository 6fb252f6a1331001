"""The Hugging Face Hub: a branch per run with a commit per checkpoint, pushed in the background; artifacts;
checkpoints fetched from `hub:<repo_id>@<revision>`.

The token comes from `HF_TOKEN` or the user's `huggingface_hub` login, never from the config, and is scrubbed from
every message this module logs. Pushes run on one thread of rank 0: at most one is in flight, a newer checkpoint
replaces one still waiting, and a failed push is logged and counted, never raised into training.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

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


def _connection_errors() -> tuple[type[BaseException], ...]:
    """The errors of a Hub that cannot be reached, from each HTTP client huggingface_hub has used (httpx2 now)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"),
                         ("requests", "Timeout")):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


def _causes(e: BaseException) -> Iterator[BaseException]:
    """`e` and what it was raised from: huggingface_hub hides a refused connection under LocalEntryNotFoundError."""
    seen: set[int] = set()
    current: Optional[BaseException] = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def one_line(e: BaseException, limit: int = 200) -> str:
    """`Type: message` on one line (the client's messages span lines: request id, advice), cut at `limit`."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _http_status(e: BaseException) -> Optional[int]:
    """The HTTP status of an error answer, when the error carries its response."""
    return getattr(getattr(e, "response", None), "status_code", None)


def hub_failure(e: BaseException, h: HubConfig, repo_id: str, revision: str = "", repo_key: str = "hub.repo_id"
                ) -> Optional[str]:
    """What went wrong with a Hub call and which setting fixes it, in one line; None when `e` is no Hub failure.

    `repo_key` is what the user set the repo with (hub.repo_id, --repo, a hub: checkpoint), so the advice names it.
    """
    from huggingface_hub import errors as hf

    where = endpoint(h)
    for cause in _causes(e):  # the most specific type first: a gated repo is also a missing one
        if isinstance(cause, hf.OfflineModeIsEnabled):
            return "HF_HUB_OFFLINE=1 blocks every Hub call; unset it"
        if isinstance(cause, hf.GatedRepoError):
            return (f"{repo_id} on {where} is gated: accept its terms on its Hub page and set HF_TOKEN to a token "
                    "of that account")
        if isinstance(cause, hf.RepositoryNotFoundError):
            return (f"no repo {repo_id} on {where}, or one the token cannot see: check {repo_key}, hub.endpoint "
                    "(or HF_ENDPOINT), and HF_TOKEN for a private repo")
        if isinstance(cause, hf.RevisionNotFoundError):
            which = f" {revision}" if revision else " asked for"
            return (f"{repo_id} on {where} has no branch, tag or commit{which}: `codeparrot hub list "
                    f"hub.repo_id={repo_id}` lists its runs")
        if isinstance(cause, hf.LocalTokenNotFoundError):
            return "no Hub token: set HF_TOKEN or run `hf auth login`"
        if isinstance(cause, hf.HFValidationError):
            return f"{repo_id!r} is not a repo id (<namespace>/<name>): fix {repo_key}"
        if isinstance(cause, hf.HfHubHTTPError) and _http_status(cause) in (401, 403):
            return (f"{where} refused the request (HTTP {_http_status(cause)}): set HF_TOKEN to a token with "
                    f"access to {repo_id} (write access to push or promote)")
        if isinstance(cause, hf.HfHubHTTPError):
            return (f"{where} answered HTTP {_http_status(cause)} ({one_line(cause, 160)}); retry, or check "
                    "hub.endpoint (or HF_ENDPOINT)")
        if isinstance(cause, _connection_errors()):
            return (f"cannot reach the Hub at {where} ({one_line(cause, 120)}): set hub.endpoint or HF_ENDPOINT to "
                    "a reachable Hub, or check the network and proxy")
    if isinstance(e, hf.LocalEntryNotFoundError):  # raised without the connection error it stands for
        return (f"cannot reach the Hub at {where} and no copy is cached: set hub.endpoint or HF_ENDPOINT to a "
                "reachable Hub, or check the network and proxy")
    return None


@contextlib.contextmanager
def hub_errors(what: str, h: HubConfig, repo_id: str, api: Any = None, revision: str = "",
               repo_key: str = "hub.repo_id") -> Iterator[None]:
    """Within: a Hub failure becomes HubError(`what: why and what to fix`), one line without the token; any other
    error (a bug) goes on as it is."""
    try:
        yield
    except HubError:
        raise
    except Exception as e:
        why = hub_failure(e, h, repo_id, revision, repo_key)
        if why is None:
            raise
        raise HubError(scrub(f"{what}: {why}", api)) from None  # the cause may quote a request


def model_card(cfg: Config, ckpt: Path) -> str:
    """README.md of a pushed checkpoint: Hub metadata, progress, the latest evaluation and pass@k, the config."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    arch = json.loads((ckpt / "config.json").read_text()).get("model_type", "gpt2")  # gpt2, llama or qwen3
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation", "license": cfg.hub.license,
            "tags": ["code", "python", arch, "codeparrot"], "datasets": list(cfg.hub.datasets)}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", f"# {cfg.train.run_name}", "",
             f"A Python code model ({'GPT-2' if arch == 'gpt2' else 'Llama'}-style) trained from scratch with "
             "codeparrot.", "",
             "| | |", "|---|---|", f"| step | {state['step']} |", f"| tokens seen | {state['tokens_seen']:,} |"]
    if state.get("history"):
        last = state["history"][-1]
        lines += [f"| eval loss (step {last['step']}) | {last['loss']:.4f} |",
                  f"| perplexity | {last['perplexity']:.2f} |"]
        lines += [f"| {key.removesuffix('_pass@1')} greedy pass@1 (step {last['step']}, during training) | "
                  f"{value:.4f} |" for key, value in last.items() if key.endswith("_pass@1")]  # eval.code_benchmark
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
        except Exception as e:  # any failure: the run must not start without the repo it was told to push to
            why = hub_failure(e, self.h, self.repo_id) or f"{one_line(e)} (on {endpoint(self.h)})"
            raise HubError(scrub(f"hub: cannot create {self.repo_id}@{self.branch}: {why}", self.api)) from None
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


def _snapshot(spec: str, h: HubConfig, into: Optional[Path], training_state: bool, api: Any,
              cached_only: bool = False) -> Path:
    """snapshot_download of `spec` into checkpoint_dir(spec, into), or with `into` None into the Hub's own cache
    (HF_HUB_CACHE; `cached_only`: the copy already there, without a request); its local directory."""
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_hub_spec(spec)
    local_dir = None if into is None else str(checkpoint_dir(spec, into))
    return Path(snapshot_download(repo_id, revision=revision, local_dir=local_dir, endpoint=endpoint(h),
                                  token=api.token if api is not None else None, local_files_only=cached_only,
                                  ignore_patterns=None if training_state else TRAINING_STATE))


def fetch_checkpoint(spec: str, h: HubConfig, into: Optional[Path], training_state: bool = False) -> Path:
    """Download the checkpoint `spec` names into checkpoint_dir (`into` None: the Hub's cache): weights, config
    and tokenizer, and with `training_state` also the optimizer, RNG and data state (TRAINING_STATE) an exact
    resume needs; its local path."""
    repo_id, revision = parse_hub_spec(spec)
    api = hub_api(h)
    try:
        local = _snapshot(spec, h, into, training_state, api)
    except Exception as e:  # any failure: other processes wait on this one (fetch_checkpoint_once)
        why = hub_failure(e, h, repo_id, revision, repo_key=spec) or f"{one_line(e)} (from {endpoint(h)})"
        raise HubError(scrub(f"cannot fetch {spec}: {why}", api)) from None
    log.info("hub: fetched %s into %s%s", spec, local, " (the Hub's cache, HF_HUB_CACHE)" if into is None else "")
    return local


def fetch_checkpoint_once(spec: str, h: HubConfig, into: Optional[Path], training_state: bool = False) -> Path:
    """fetch_checkpoint on the main process of each node only: the others wait for it, then take its directory
    without asking the Hub. A failure stops every process (none waits for a download that never comes)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object, parse_flag_from_env

    parse_hub_spec(spec)  # a bad spec fails on every process alike, before any collective
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # what Accelerator() reads
    failure: Optional[Exception] = None
    local: Optional[Path] = None
    if state.is_local_main_process:
        try:
            local = fetch_checkpoint(spec, h, into, training_state)
        except Exception as e:  # held until every process knows, or the others would wait at the gather forever
            failure = e
    # a collective, so also the barrier: no process reads the directory before its node's download is done
    errors = [e for e in gather_object([None if failure is None else str(failure)]) if e]
    if failure is not None:
        raise failure
    if errors:
        raise HubError(f"{errors[0]} (on the main process of a node)")
    if local is None:  # the node's main process fetched it: its path, found without a request
        local = checkpoint_dir(spec, into) if into is not None else _snapshot(spec, h, None, training_state, None,
                                                                              cached_only=True)
    return local


def resolve_checkpoint(checkpoint: str, h: HubConfig, into: Optional[Path]) -> str:
    """A local checkpoint directory for `checkpoint`: itself, or the weights-only download of a `hub:` one (into
    `into`; None: the Hub's own cache)."""
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
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: give clean/, tokenizer/ or runs/<run>/step-<N>")
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
    except Exception as e:  # a failure the Hub reports (a bug would be one too: the upload is the client's)
        why = hub_failure(e, cfg.hub, repo_id, branch, repo_key="--repo or hub.repo_id") or one_line(e)
        raise HubError(scrub(f"hub push {path} -> {repo_id}@{branch}: {why}", api)) from None
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
    with hub_errors(f"cannot list the runs of {cfg.hub.repo_id}", cfg.hub, cfg.hub.repo_id, api, branch):
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
    api, repo_id = hub_api(cfg.hub), cfg.hub.repo_id
    with hub_errors(f"cannot promote {repo_id}@{branch}", cfg.hub, repo_id, api, branch):
        return _promote(api, repo_id, branch, step)


def _promote(api: Any, repo_id: str, branch: str, step: Optional[int]) -> dict[str, Any]:
    """promote's Hub calls."""
    from huggingface_hub import CommitOperationCopy, CommitOperationDelete

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
