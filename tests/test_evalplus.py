"""EvalPlus's comparison rules as the sandboxed harness restates them (evalplus eval/__init__.py, data/mbpp.py
@ 26d6d00), checked on literal values here, and how the host reads a run's verdict lines."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from codeparrot.humaneval.evalplus import HARNESS, verdict
from codeparrot.sandbox import Result

# The harness is a program for the sandbox; its functions are loaded here only to test them on our own values.
spec = importlib.util.spec_from_file_location("evalplus_harness", HARNESS)
harness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(harness)


def passes(out, exp, atol=0, dataset="humaneval", entry_point="f", inp=()) -> bool:
    """Whether `matches` accepts out for exp (it asserts, as unsafe_execute does)."""
    try:
        harness.matches(dataset, entry_point, inp, out, exp, atol)
        return True
    except AssertionError:
        return False


def test_outputs_match_exactly_or_within_atol_as_evalplus_compares_them():
    assert passes([1, 2], [1, 2]) and not passes([1, 2], (1, 2)) and not passes("a", "b")
    assert passes(1 / 3 + 1e-7, 1 / 3) and not passes(1 / 3 + 1e-5, 1 / 3)  # atol 0 on floats: 1e-6
    assert passes([0.1 + 0.2], [0.3]) and not passes([0.3, 0.3], [0.3])  # lengths must agree
    assert not passes(2, 2.0000001, atol=1e-4)  # not equal, so the types must agree
    assert passes(2.00001, 2.0, atol=1e-4) and not passes(2.001, 2.0, atol=1e-4)


def test_atol_once_set_for_a_float_stays_set_for_the_later_inputs():
    """unsafe_execute assigns atol = 1e-6 inside its loop, so the inputs after a float one compare with it too."""
    assert harness.matches("humaneval", "f", (), 0.5, 0.5, 0) == 1e-6
    assert harness.matches("humaneval", "f", (), 3, 3, 0) == 0


def test_the_special_oracles():
    assert passes(2.0, 7.0, atol=1e-4, entry_point="find_zero", inp=([-2, 1],))  # poly(x) = -2 + x: root 2
    assert not passes(2.5, 2.0, atol=1e-4, entry_point="find_zero", inp=([-2, 1],))
    assert passes([3, 1], [1, 3], dataset="mbpp", entry_point="similar_elements")  # set equality
    assert passes("a match", True, dataset="mbpp", entry_point="check_str")  # only "not None" is known
    assert not passes(None, True, dataset="mbpp", entry_point="check_str")
    assert passes(0, 5, dataset="mbpp", entry_point="sum_div") and passes(1, 2, dataset="mbpp",
                                                                          entry_point="are_equivalent")


@pytest.mark.parametrize("a, b, atol", [(1.0, 1.0 + 1e-7, 0), (1.0, 1.1, 0.05), ([1.0, 2.0], [1.0, 2.0 + 1e-9], 0),
                                        (float("inf"), float("inf"), 1e-6), (float("nan"), float("nan"), 1e-6),
                                        (float("inf"), 1e308, 1e-6), ([[1.0, 2.0]], [[1.0, 2.0001]], 1e-3),
                                        (0, -0.0, 0)])
def test_allclose_without_numpy_agrees_with_numpy(a, b, atol):
    """The sandbox's interpreter may have no numpy: the plain-Python np.allclose gives numpy's answers."""
    assert harness._isclose(a, b, atol, 1e-07) == bool(np.allclose(a, b, rtol=1e-07, atol=atol))


def test_mbpp_plus_inputs_are_turned_back_into_their_types():
    """mbpp_deserialize_inputs: JSON lists back to tuples, sets and complex numbers where the task wants them."""
    assert harness.deserialize_mbpp("Mbpp/2", [[[3, 4], [5, 4]]]) == [[(3, 4), (5, 4)]]
    assert harness.deserialize_mbpp("Mbpp/124", [[1, "(1+2j)"]]) == [(1.0, 1 + 2j)]
    assert harness.deserialize_mbpp("Mbpp/115", [[[[1, 2], []]]]) == [[[{1, 2}, {}]]]
    assert harness.deserialize_mbpp("Mbpp/580", [[[1, [2, 3]], 4]]) == [((1, (2, 3)), 4)]
    assert harness.deserialize_mbpp("Mbpp/3", [[7]]) == [[7]]


def test_the_host_reads_only_the_marked_lines_of_its_run():
    """A candidate's own prints cannot pass for the harness's: the lines must carry this run's secret marker."""
    out = "base pass\nplus pass\nm reference ok\nm base pass\n"
    r = verdict(Result(False, "timed out", "wall-clock limit", 130.0, out), "m")
    assert (r["base_status"], r["plus_status"], r["base_passed"], r["passed"]) == ("pass", "timeout", True, False)
    r = verdict(Result(False, "failed", "NameError: x", 0.1, "base pass\nplus pass\n"), "m")
    assert r["result"].startswith("unscorable: the reference solution failed") and not r["passed"]


def test_a_reference_that_did_not_run_makes_the_sample_unscorable_not_a_fail():
    """The canonical solution stopped by a limit (under load): the candidate was never checked, so its row says so
    (it still counts as not passed, and the report counts these apart)."""
    r = verdict(Result(False, "killed", "memory limit", 3.0, ""), "m")
    assert (r["base_status"], r["plus_status"], r["base_passed"], r["passed"]) == \
        ("unscorable", "unscorable", False, False)
    assert "reference solution failed (killed: memory limit)" in r["result"]
