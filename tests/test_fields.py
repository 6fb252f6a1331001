"""Field mapping (corpus.layout, corpus.fields) and the language/extension selection."""
from __future__ import annotations

import pytest

from codeparrot.config import ConfigError, load_config
from codeparrot.corpus.fields import FieldMap, MissingColumns, Selection, check_needed


def _corpus(*overrides: str):
    return load_config(None, list(overrides)).corpus


def test_the_bigquery_layout_passes_records_through_whole():
    fields = FieldMap.from_config(_corpus())
    record = {"content": "x", "extra": 1}
    assert fields.passthrough and fields.apply(record) is record


@pytest.mark.parametrize("layout, columns", [
    ("the-stack", {"repo_name": "max_stars_repo_name", "path": "max_stars_repo_path", "content": "content",
                   "stars": "max_stars_count", "license": "max_stars_repo_licenses", "language": "lang",
                   "size": "size"}),
    ("github-code", {"repo_name": "repo_name", "path": "path", "content": "code", "language": "language",
                     "license": "license", "size": "size"})])
def test_layout_presets_rename_and_project(layout, columns):
    fields = FieldMap.from_config(_corpus(f"corpus.layout={layout}"))
    assert not fields.passthrough and dict(fields.columns) == columns
    record = {theirs: ours.upper() for ours, theirs in columns.items()} | {"unused": 1}
    assert fields.apply(record) == {ours: ours.upper() for ours in columns}


def test_field_entries_change_add_and_remove_columns():
    fields = FieldMap.from_config(_corpus("corpus.layout=github-code", "corpus.fields=path=file_path,size=,copies=n"))
    assert dict(fields.columns) == {"repo_name": "repo_name", "path": "file_path", "copies": "n", "content": "code",
                                    "license": "license", "language": "language"}
    for bad, message in (("corpus.fields=text=code", "ours=theirs"), ("corpus.fields=content=", "cannot be removed"),
                         ("corpus.fields=content", "ours=theirs")):
        with pytest.raises(ConfigError, match=message):
            FieldMap.from_config(_corpus(bad))


def test_a_missing_column_is_one_line_listing_the_columns():
    fields = FieldMap.from_config(_corpus("corpus.layout=the-stack"))
    with pytest.raises(MissingColumns) as e:
        fields.check(["code", "repo_name", "path"], "x.parquet")
    message = str(e.value)
    assert "\n" not in message and "its columns: code, repo_name, path" in message
    assert "content ('content')" in message and "stars ('max_stars_count')" in message


@pytest.mark.parametrize("overrides, needed", [
    ((), ("content", "repo_name")),  # the train/valid split reads repo_name
    (("corpus.valid_fraction=0",), ("content",)),
    (("corpus.quality_signal=copies", "corpus.extensions=py"), ("content", "copies", "path", "repo_name"))])
def test_passthrough_needs_only_content_and_what_the_settings_read(overrides, needed):
    fields = FieldMap.from_config(_corpus(*overrides))
    assert fields.passthrough and sorted(fields.needed) == sorted(needed)
    fields.check(needed, "x.parquet")  # license, copies, size... may be missing, as from a JSON Lines record
    for name in needed:
        with pytest.raises(MissingColumns, match=rf"no column for {name} \('{name}'\)"):
            fields.check([c for c in needed if c != name], "x.parquet")
    assert fields.pairs(["ts", *reversed(needed), "extra"]) == [(c, c) for c in reversed(needed)]  # a projection


@pytest.mark.parametrize("overrides, message", [
    (("corpus.layout=the-stack", "corpus.quality_signal=copies"), "quality_signal=copies reads the 'copies'"),
    (("corpus.quality_signal=stars",), "quality_signal=stars reads the 'stars'"),
    (("corpus.languages=python",), "corpus.languages reads the 'language'"),
    (("corpus.layout=github-code", "corpus.fields=repo_name="), "corpus.valid_fraction reads the 'repo_name'")])
def test_settings_that_read_an_unmapped_field_are_refused(overrides, message):
    corpus = _corpus(*overrides)
    with pytest.raises(ConfigError, match=message):
        check_needed(corpus, FieldMap.from_config(corpus))


def test_selection_by_language_and_extension():
    keep = Selection.from_config(_corpus("corpus.languages=Python", "corpus.extensions=py,.PYW"))
    assert keep.extensions == (".py", ".pyw")
    assert keep.reason({"language": "python", "path": "a/B.PY"}) is None
    assert keep.reason({"language": "Python", "path": "a/b.pyw"}) is None
    assert keep.reason({"language": "JavaScript", "path": "a.py"}) == "language"  # the first rule that says no
    assert keep.reason({"language": None, "path": "a.py"}) == "language"
    assert keep.reason({"language": "Python", "path": "setup.cfg"}) == "extension"
    assert Selection.from_config(_corpus()).reason({}) is None
