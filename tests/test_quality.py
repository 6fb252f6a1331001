"""Quality buckets: from BigQuery's `copies` and from the filters' heuristic signals, exact at the thresholds, and
the config that sets them."""
from __future__ import annotations

import pytest

from codeparrot.config import ConfigError, CorpusConfig, load_config
from codeparrot.corpus.filters import FilterSettings, QualityFilter, Signals, is_config_or_test
from codeparrot.corpus.quality import (HIGH, LOW, MEDIUM, QUALITY_BUCKETS, QualityRule, copies_bucket,
                                       heuristics_bucket, parse_copies, parse_stars, shown_signals)

# A kept-looking file with none of the signals: keywords, 12 "=" (more than quality_few_assignments=10), no
# "config"/"test" anywhere.
CLEAN = "".join(f"def f{i}(x):\n    y = x + {i}\n    return y\n\n\n" for i in range(12))
TEST_HEADER = "# unit tests for the parser\n"  # a config/test marker in the first lines


def rule(**overrides) -> QualityRule:
    return QualityRule.from_config(CorpusConfig(**overrides))


@pytest.mark.parametrize("value, expected", [
    ("1", 1), ("12", 12), (" 7 ", 7), (3, 3), ("0", None), (0, None), ("-3", None), (-3, None), ("3.0", None),
    (3.0, None), ("", None), ("many", None), ("²", None), (None, None), (True, None), ([2], None)])
def test_parse_copies(value, expected):
    assert parse_copies(value) == expected


def test_copies_buckets_at_the_thresholds():
    assert [copies_bucket(n, (2, 10)) for n in (None, 1, 2, 9, 10, 11, 10_000)] == [
        LOW, LOW, MEDIUM, MEDIUM, HIGH, HIGH, HIGH]
    assert [copies_bucket(n, (3, 3)) for n in (2, 3)] == [LOW, HIGH]  # equal thresholds: no medium bucket
    assert [copies_bucket(n, (1, 5)) for n in (None, 1)] == [LOW, MEDIUM]  # only an unknown value is low


def test_grade_by_copies_and_unknown_values():
    r = rule(quality_signal="copies")
    assert r.grade({"copies": "10"}, Signals("")) == (HIGH, True)
    assert r.grade({"copies": "9"}, Signals("")) == (MEDIUM, True)
    assert r.grade({"copies": "1"}, Signals("")) == (LOW, True)
    for bad in ({}, {"copies": None}, {"copies": "n/a"}, {"copies": "0"}):
        assert r.grade(bad, Signals("")) == (LOW, False)
    assert rule(quality_signal="copies", quality_copies_thresholds=[3, 50]).grade({"copies": 49}, Signals("")) == (
        MEDIUM, True)


@pytest.mark.parametrize("value, expected", [
    (0, 0), (7, 7), (7.0, 7), ("12", 12), (" 3 ", 3), (None, None), (float("nan"), None), (-1, None), (2.5, None),
    ("many", None), (True, None), ([3], None)])
def test_parse_stars(value, expected):
    assert parse_stars(value) == expected


def test_stars_buckets_exact_on_crafted_records():
    """The Stack's max_stars_count (int64, null for a file no starred repository holds), as `stars`."""
    r = rule(quality_signal="stars")
    assert r.stars_thresholds == (10, 100)
    graded = [r.grade({"stars": n}, Signals("")) for n in (None, 0, 9, 10, 99, 100, 5000, float("nan"), -2)]
    assert graded == [(LOW, False), (LOW, True), (LOW, True), (MEDIUM, True), (MEDIUM, True), (HIGH, True),
                      (HIGH, True), (LOW, False), (LOW, False)]
    r = rule(quality_signal="stars", quality_stars_thresholds=[0, 1])
    assert [r.grade({"stars": n}, Signals(""))[0] for n in (None, 0, 1)] == [LOW, MEDIUM, HIGH]


def test_heuristic_signals_exact():
    names = ("config_or_test", "no_keywords", "few_assignments")
    assert CLEAN.count("=") == 12 and not is_config_or_test(CLEAN)
    assert shown_signals(Signals(CLEAN), names, 10) == 0
    assert shown_signals(Signals(CLEAN), names, 12) == 1  # exactly 12 "=": at most 12 shows few_assignments
    assert shown_signals(Signals(CLEAN), names, 11) == 0
    assert shown_signals(Signals(TEST_HEADER + CLEAN), names, 10) == 1
    no_keywords = "x = 1\n" * 3  # no def/class/for/while, 3 "=", 3 newlines: any "test" is over int(0.05 * 3) = 0
    assert shown_signals(Signals(no_keywords), names, 10) == 2
    assert shown_signals(Signals(no_keywords + "# test\n"), names, 10) == 3
    assert shown_signals(Signals(no_keywords + "# test\n"), ("no_keywords",), 10) == 1  # only the named ones count


def test_heuristics_buckets_at_the_thresholds():
    assert [heuristics_bucket(n, (1, 0)) for n in range(4)] == [HIGH, MEDIUM, LOW, LOW]
    assert [heuristics_bucket(n, (2, 1)) for n in range(4)] == [HIGH, HIGH, MEDIUM, LOW]
    assert [heuristics_bucket(n, (0, 0)) for n in range(2)] == [HIGH, LOW]
    r = rule()  # the defaults: heuristics, [1, 0], all three signals, few_assignments 10
    assert [QUALITY_BUCKETS[r.grade({}, Signals(c))[0]] for c in (
        CLEAN, TEST_HEADER + CLEAN, "x = 1\n" * 3)] == ["high", "medium", "low"]
    assert r.grade({"copies": "n/a"}, Signals(CLEAN)) == (HIGH, True)  # heuristics never read copies


def test_heuristics_reuse_what_the_filters_computed():
    """The filters fill the file's Signals on the way; the bucket then reads them without scanning again."""
    signals = Signals(CLEAN)
    chain = QualityFilter(FilterSettings(drop_config_test_p=1.0, drop_no_keywords_p=1.0))  # every check evaluated
    assert chain.reason(CLEAN, signals=signals) is None
    assert {"config_or_test", "no_keywords", "assignments"} <= set(vars(signals))
    # planted values are what the score reads back: nothing was computed again
    signals.__dict__.update(config_or_test=True, no_keywords=True, assignments=0)
    assert shown_signals(signals, ("config_or_test", "no_keywords", "few_assignments"), 10) == 3


def test_defaults_and_overrides_from_the_config():
    c = load_config(None).corpus
    assert (c.quality_signal, c.quality_copies_thresholds, c.quality_heuristics_thresholds) == (
        "heuristics", [2, 10], [1, 0])
    assert QualityRule.from_config(c) == QualityRule("heuristics", (2, 10), (10, 100), (
        "config_or_test", "no_keywords", "few_assignments"), (1, 0), 10)
    c = load_config(None, ["corpus.quality_signal=copies", "corpus.quality_copies_thresholds=3,20",
                           "corpus.quality_heuristics_signals=[no_keywords]"]).corpus
    r = QualityRule.from_config(c)
    assert (r.signal, r.copies_thresholds, r.heuristics_signals) == ("copies", (3, 20), ("no_keywords",))
    assert not rule(quality_signal="none").enabled and rule().enabled


@pytest.mark.parametrize("overrides, message", [
    ({"quality_copies_thresholds": [10, 2]}, r"corpus.quality_copies_thresholds: .*medium <= high.*\[10, 2\]"),
    ({"quality_copies_thresholds": [0, 2]}, r"quality_copies_thresholds: expected two integers >= 1"),
    ({"quality_copies_thresholds": [2]}, r"quality_copies_thresholds: expected two integers"),
    ({"quality_copies_thresholds": [2, 10, 20]}, r"quality_copies_thresholds: expected two integers"),
    ({"quality_heuristics_thresholds": [0, 1]}, r"quality_heuristics_thresholds: .*medium >= high"),
    ({"quality_heuristics_thresholds": [1, -1]}, r"quality_heuristics_thresholds: expected two integers >= 0"),
    ({"quality_heuristics_signals": ["stars"]}, r"unknown or repeated signal.*valid signals: config_or_test"),
    ({"quality_heuristics_signals": ["no_keywords", "no_keywords"]}, r"unknown or repeated"),
    ({"quality_heuristics_signals": []}, r"quality_heuristics_signals is empty.*quality_signal=none"),
    ({"quality_few_assignments": -1}, r"quality_few_assignments: expected an integer >= 0"),
    ({"quality_signal": "likes"}, r"corpus.quality_signal: 'likes' is not one of copies, stars, heuristics, none"),
    ({"quality_stars_thresholds": [100, 10]}, r"corpus.quality_stars_thresholds: .*medium <= high.*\[100, 10\]"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        rule(**overrides)


def test_unusable_values_fail_when_the_config_is_loaded_or_the_stage_starts():
    with pytest.raises(ConfigError, match="corpus.quality_signal: 'likes' is not one of copies, stars, heuristics"):
        load_config(None, ["corpus.quality_signal=likes"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["corpus.quality_copies_thresholds=2,many"])
    assert rule(quality_signal="copies", quality_heuristics_signals=[]).signal == "copies"  # unused: not an error
