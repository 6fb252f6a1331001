"""Where a benchmark's problems come from: a local file in its published format, or `hub:<dataset>[@revision]`
read with `datasets`. Nothing is downloaded unless a `hub:` spec asks for it."""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Optional

from ..artifacts import read_json_lines
from ..config import ConfigError, HubConfig
from ..hub import HUB_PREFIX, HubError, endpoint, hub_api, parse_hub_spec, scrub

log = logging.getLogger(__name__)


class MissingBenchmark(FileNotFoundError):
    """No problems where humaneval.problems points; the message names both ways to supply them."""


def missing(benchmark: str, files: str, hub: str, why: str) -> MissingBenchmark:
    """The one-line error of a benchmark without its problems: the local file, or the Hub copy."""
    return MissingBenchmark(f"humaneval.benchmark={benchmark}: {why}; give humaneval.problems=<path of {files}> "
                            f"(the published file) or humaneval.problems=hub:{hub} (the Hub copy, read with datasets)")


def read_local(path: Path) -> list[Any]:
    """The records of a .json file (one JSON array, as sanitized-mbpp.json) or a .jsonl(.gz) file."""
    if path.name.endswith(".json"):
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json problems file holds one JSON array of problems")
        return rows
    return [row for _, row in read_json_lines(path)]


def read_hub(spec: str, hub: Optional[HubConfig], config_name: Optional[str]) -> list[dict[str, Any]]:
    """The test split (of `config_name`, if given) of a Hub dataset at `spec`'s revision."""
    from huggingface_hub import snapshot_download

    try:
        import datasets
    except ImportError:
        raise ConfigError(f"humaneval.problems={spec} is read with the `datasets` library, which is not installed: "
                          "pip install 'codeparrot[sft]'") from None
    h = hub or HubConfig()
    repo_id, revision = parse_hub_spec(spec)
    api = hub_api(h)
    # huggingface_hub downloads (it takes the endpoint as an argument; datasets reads HF_ENDPOINT once, at import)
    try:
        local = snapshot_download(repo_id, repo_type="dataset", revision=revision, endpoint=endpoint(h),
                                  token=api.token)
    except Exception as e:  # connection refused, no such repo or revision, offline mode
        raise HubError(f"humaneval.problems={spec}: cannot download dataset {repo_id}@{revision} from "
                       f"{endpoint(h)}: {scrub(f'{type(e).__name__}: {e}', api)}") from None
    with tempfile.TemporaryDirectory() as scratch:  # datasets' Arrow cache is scratch: the problems stay in memory
        try:
            rows = datasets.load_dataset(local, config_name, split="test", cache_dir=scratch).to_list()
        except Exception as e:  # no such config or split, an unreadable file
            raise ValueError(f"humaneval.problems={spec}: datasets cannot read the test split"
                             f"{f' of config {config_name}' if config_name else ''}: {type(e).__name__}: {e}") from None
    log.info("humaneval: %d problems from %s@%s%s", len(rows), repo_id, revision,
             f" ({config_name})" if config_name else "")
    return rows


def read_problems(spec: str, benchmark: str, files: str, hub_repo: str, hub: Optional[HubConfig],
                  config_name: Optional[str] = None) -> list[Any]:
    """The raw records `spec` names (a path or hub:...), or the one-line error naming both ways to give them."""
    if spec.startswith(HUB_PREFIX):
        return read_hub(spec, hub, config_name)
    if not spec:
        raise missing(benchmark, files, hub_repo, "no problems given (nothing is downloaded at run time)")
    path = Path(spec)
    if not path.is_file():
        raise missing(benchmark, files, hub_repo, f"no such file {path}")
    return read_local(path)
