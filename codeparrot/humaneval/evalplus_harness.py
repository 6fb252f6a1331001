"""EvalPlus's differential check, as a program that runs INSIDE the sandbox (standard library only; numpy if there).

This file is not imported to score: evalplus.py sends its source, plus a JSON payload, to the sandbox as one program.
It restates evalplus (github.com/evalplus/evalplus @ 26d6d00) where scoring is decided:
- `trusted_exec` (evalplus/gen/util/__init__.py): the canonical solution's outputs on deep copies of the inputs, and
  its time per input; for MBPP_OUTPUT_NOT_NONE_TASKS only whether each output is not None;
- `unsafe_execute` (evalplus/eval/__init__.py) with fast_check (evaluate's default): the candidate's output on each
  input must equal the expected one; the special oracles of Mbpp/164, 295, 581, 558, MBPP_OUTPUT_SET_EQ_TASKS and
  MBPP_OUTPUT_NOT_NONE_TASKS, and HumanEval/32's |poly(x)| <= atol; else atol (1e-6 for floats when 0; once set it
  stays set for the later inputs, as there) with rtol 1e-7, after checking type and length;
- per-input time limit max(4 s, 4 x the canonical's time), a set's limit min(60 s, their sum) + 1 (untrusted_check);
- `mbpp_deserialize_inputs` (evalplus/data/mbpp.py): MBPP+ inputs stored as JSON lists turned back into tuples etc.
Each set prints `<marker> <set> <pass|fail|timeout>` as soon as it is decided; the marker is the caller's secret.
"""
import contextlib
import copy
import io
import json
import math
import signal
import time

MIN_TIME_LIMIT, GT_TIME_LIMIT_FACTOR, TASK_TIMEOUT = 4.0, 4.0, 60.0  # evalplus/config.py, untrusted_check
MBPP_OUTPUT_NOT_NONE_TASKS = ["check_str", "text_match_three", "text_starta_endb"]
MBPP_OUTPUT_SET_EQ_TASKS = ["similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly",
                            "larg_nnum", "intersection_array", "find_dissimilar", "Diff"]
# evalplus/data/mbpp.py: which MBPP+ tasks store tuples, sets or complex numbers as JSON lists or strings, and how
TUPLE_ARGS = {2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630, 726, 740,
              744, 809}
TUPLE_ITEMS_OF_ARGS = {63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780}
TUPLE_ITEMS_OF_FIRST = {75, 413, 444, 753}
TUPLE_SECOND = {106, 750}
TUPLE_FIRST = {250, 405, 446, 617, 720, 763, 808}
TUPLE_ITEMS_THEN_ARGS = {259, 401, 445}
ALL_TUPLES = {580, 615, 791}

try:  # EvalPlus compares with numpy; a sandbox interpreter without it gets np.allclose restated below
    import numpy
except ImportError:
    numpy = None


class TimeoutException(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    def handler(signum, frame):
        raise TimeoutException("Timed out!")

    signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.signal(signal.SIGALRM, handler)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


@contextlib.contextmanager
def swallow_io():
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _poly(xs, x):
    return sum([coeff * math.pow(x, i) for i, coeff in enumerate(xs)])


def _surface_Area(base_edge, height):
    slant_height = math.sqrt((base_edge / 2) ** 2 + height**2)
    return round(base_edge**2 + 4 * (base_edge * slant_height) / 2)


def _digit_distance_nums(num1, num2):
    s1, s2 = str(num1), str(num2)
    width = max(len(s1), len(s2))
    return sum(abs(int(a) - int(b)) for a, b in zip(s1.zfill(width), s2.zfill(width)))


def is_floats(x):
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    if numpy is not None and isinstance(x, numpy.ndarray):
        return x.dtype == numpy.float64 or x.dtype == numpy.float32
    return False


def _isclose(a, b, atol, rtol):
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_isclose(x, y, atol, rtol) for x, y in zip(a, b)))
    if a == b:  # also inf == inf
        return True
    if isinstance(a, str) or isinstance(b, str) or math.isinf(a) or math.isinf(b):
        return False
    return abs(a - b) <= atol + rtol * abs(b)  # nan: False, as numpy


def allclose(out, exp, atol):
    if numpy is not None:
        return numpy.allclose(out, exp, rtol=1e-07, atol=atol)
    return _isclose(out, exp, atol, 1e-07)


def _tuples(x):
    return tuple(_tuples(i) for i in x) if isinstance(x, list) else x


def deserialize_mbpp(task_id, inputs):
    n = int(task_id.split("/")[-1])
    if n in TUPLE_ARGS:
        return [[tuple(lst) for lst in inp] for inp in inputs]
    if n in TUPLE_ITEMS_OF_ARGS:
        return [[[tuple(lst) for lst in lst_lst] for lst_lst in inp] for inp in inputs]
    if n in TUPLE_ITEMS_OF_FIRST:
        return [[[tuple(lst) for lst in inp[0]]] + [inp[1]] for inp in inputs]
    if n in TUPLE_SECOND:
        return [[inp[0]] + [tuple(inp[1])] for inp in inputs]
    if n == 115:
        return [[[set(item) if isinstance(item, list) and len(item) else {} for item in inp[0]]] for inp in inputs]
    if n == 124:
        return [(float(inp[0]), complex(inp[1])) for inp in inputs]
    if n in TUPLE_FIRST:
        return [[tuple(inp[0])] + [inp[1]] for inp in inputs]
    if n in TUPLE_ITEMS_THEN_ARGS:
        inner = [[[tuple(lst) for lst in lst_lst] for lst_lst in inp] for inp in inputs]
        return [[tuple(lst) for lst in inp] for inp in inner]
    if n == 278:
        inner = [[[tuple(item) if isinstance(item, list) else item for item in inp[0]]] for inp in inputs]
        return [[tuple(lst) for lst in inp] for inp in inner]
    if n == 307:
        return [[tuple(inp[0])] + [inp[1], inp[2]] for inp in inputs]
    if n == 722:
        return [[{key: tuple(value) for key, value in inp[0].items()}] + inp[1:] for inp in inputs]
    if n == 252:
        return [[complex(inp[0])] for inp in inputs]
    if n in ALL_TUPLES:
        return [_tuples(inp) for inp in inputs]
    return inputs


def trusted_exec(code, inputs, entry_point, output_not_none):
    globs = {}
    exec(code, globs)
    fn = globs[entry_point]
    outputs, times = [], []
    for inp in inputs:
        inp = copy.deepcopy(inp)
        start = time.time()
        outputs.append(fn(*inp))
        times.append(time.time() - start)
    if output_not_none:
        outputs = [o is not None for o in outputs]
    return outputs, times


def matches(dataset, entry_point, inp, out, exp, atol):
    """(whether `out` is right for `inp`, the atol that later inputs use): unsafe_execute's test, as an assert."""
    exact_match = out == exp
    if dataset == "mbpp":
        if entry_point == "are_equivalent":  # Mbpp/164
            exact_match = True
        elif entry_point == "sum_div":  # Mbpp/295
            exact_match = exact_match or out == 0
        elif entry_point == "surface_Area":  # Mbpp/581
            exact_match = exact_match or abs(out - _surface_Area(*inp)) <= atol
        elif entry_point == "digit_distance_nums":  # Mbpp/558
            exact_match = exact_match or out == _digit_distance_nums(*inp)
        elif entry_point in MBPP_OUTPUT_SET_EQ_TASKS:
            exact_match = set(out) == set(exp)
        elif entry_point in MBPP_OUTPUT_NOT_NONE_TASKS:
            exact_match = out == exp if isinstance(out, bool) else exp == (out is not None)
    if dataset == "humaneval" and entry_point == "find_zero":
        assert abs(_poly(*inp, out)) <= atol
        return atol
    if atol == 0 and is_floats(exp):
        atol = 1e-6
    if not exact_match and atol != 0:
        assert type(out) == type(exp)
        if isinstance(exp, (list, tuple)):
            assert len(out) == len(exp)
        assert allclose(out, exp, atol)
    else:
        assert exact_match
    return atol


def check_set(p, code, inputs, expected, ref_times):
    """A set's status as untrusted_check gives it: pass, fail (first wrong input) or timeout."""
    limits = [max(MIN_TIME_LIMIT, GT_TIME_LIMIT_FACTOR * t) for t in ref_times]
    deadline = time.monotonic() + min(TASK_TIMEOUT, sum(limits)) + 1
    atol, globs = p["atol"], {}
    try:
        with time_limit(max(0.001, deadline - time.monotonic())), swallow_io():
            exec(code, globs)
        fn = globs[p["entry_point"]]
        for inp, exp, limit in zip(inputs, expected, limits):
            # the set's own limit cuts an input's short, as untrusted_check's process timeout does
            with time_limit(max(0.001, min(limit, deadline - time.monotonic()))), swallow_io():
                out = fn(*inp)
            atol = matches(p["dataset"], p["entry_point"], inp, out, exp, atol)
            if time.monotonic() > deadline:
                return "timeout"
    except TimeoutException:
        return "timeout" if time.monotonic() >= deadline - 0.01 else "fail"
    except BaseException:
        return "fail"
    return "pass"


def main(payload):
    p = json.loads(payload)
    sets = [(name, p[name + "_input"]) for name in ("base", "plus")]
    if p["dataset"] == "mbpp":
        sets = [(name, deserialize_mbpp(p["task_id"], inputs)) for name, inputs in sets]
    not_none = p["dataset"] == "mbpp" and p["entry_point"] in MBPP_OUTPUT_NOT_NONE_TASKS
    oracle = {name: trusted_exec(p["reference"], inputs, p["entry_point"], not_none) for name, inputs in sets}
    print(p["marker"], "reference", "ok", flush=True)
    for name, inputs in sets:
        status = check_set(p, p["solution"], inputs, *oracle[name])
        print(p["marker"], name, status, flush=True)
