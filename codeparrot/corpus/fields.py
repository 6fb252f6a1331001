"""Which input columns are our fields (`corpus.layout`, `corpus.fields`), and which files are wanted at all
(`corpus.languages`, `corpus.extensions`).

Our field names are BigQuery's (`repo_name, path, copies, size, content, license`) plus `stars` and `language`.
A layout maps them to the columns of a known corpus; `corpus.fields` entries `ours=theirs` change or add one
(`ours=` removes it). With the bigquery layout and no entries, JSON Lines records pass through whole, as they always
did, and a Parquet or Avro shard gives BigQuery's six columns, those it has (a column of a type JSON cannot hold, a
TIMESTAMP, would otherwise reach clean/); a passthrough shard must have only `content` and the fields the settings
read (`needed`), as a JSON Lines record. Otherwise a record holds the mapped fields only, renamed to ours (The Stack
has ~30 columns the stage never uses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

FIELD_NAMES = ("repo_name", "path", "copies", "size", "content", "license", "stars", "language")
LAYOUTS: dict[str, dict[str, str]] = {
    "bigquery": {name: name for name in ("repo_name", "path", "copies", "size", "content", "license")},
    # bigcode/the-stack(-dedup), as published: a file's most-starred repository names it; licenses is list<string>
    "the-stack": {"repo_name": "max_stars_repo_name", "path": "max_stars_repo_path", "size": "size",
                  "content": "content", "license": "max_stars_repo_licenses", "stars": "max_stars_count",
                  "language": "lang"},
    "github-code": {"repo_name": "repo_name", "path": "path", "size": "size", "content": "code",
                    "license": "license", "language": "language"},
}
# what each config choice reads: corpus.quality_signal, corpus.languages, corpus.extensions, and the train/valid
# split (by repository) whenever corpus.valid_fraction > 0
NEEDED_BY = {"quality_signal=copies": "copies", "quality_signal=stars": "stars", "languages": "language",
             "extensions": "path", "valid_fraction": "repo_name"}


class MissingColumns(ValueError):
    """A shard lacks columns that the mapping reads."""


def _config_error(message: str) -> Exception:
    from ..config import ConfigError

    return ConfigError(message)


@dataclass(frozen=True)
class FieldMap:
    """Our field -> the input's column, in our order; `passthrough`: records are used as read (bigquery layout)."""

    columns: tuple[tuple[str, str], ...]
    passthrough: bool
    layout: str = "bigquery"
    needed: tuple[str, ...] = ("content",)  # our fields the settings read: all a passthrough shard must have

    @classmethod
    def from_config(cls, corpus: Any) -> FieldMap:
        """From corpus.layout and corpus.fields; ConfigError for an unknown field, layout or a missing content."""
        if corpus.layout not in LAYOUTS:
            raise _config_error(f"corpus.layout: {corpus.layout!r} is not one of {', '.join(LAYOUTS)}")
        mapping = dict(LAYOUTS[corpus.layout])
        for entry in corpus.fields:
            ours, eq, theirs = entry.partition("=")
            ours, theirs = ours.strip(), theirs.strip()
            if not eq or ours not in FIELD_NAMES:
                raise _config_error(f"corpus.fields: {entry!r} is not ours=theirs with ours one of "
                                    f"{', '.join(FIELD_NAMES)}")
            mapping[ours] = theirs
        mapping = {k: v for k, v in mapping.items() if v}
        if "content" not in mapping:
            raise _config_error("corpus.fields: content cannot be removed (it is what the stage reads)")
        passthrough = corpus.layout == "bigquery" and not corpus.fields
        return cls(tuple((name, mapping[name]) for name in FIELD_NAMES if name in mapping), passthrough,
                   corpus.layout, needed_fields(corpus))

    @property
    def input_columns(self) -> list[str]:
        """The input's columns that the mapping reads, without repeats."""
        return list(dict.fromkeys(theirs for _, theirs in self.columns))

    def has(self, ours: str) -> bool:
        return any(name == ours for name, _ in self.columns)

    def apply(self, record: dict[str, Any]) -> dict[str, Any]:
        """A record with our field names (the mapped fields present in it); as read when passthrough."""
        if self.passthrough:
            return record
        return {ours: record[theirs] for ours, theirs in self.columns if theirs in record}

    def pairs(self, have: Iterable[str]) -> list[tuple[str, str]]:
        """(ours, theirs) to read from a columnar shard with columns `have`: the mapped ones; when passthrough,
        those of BigQuery's columns it has, in its order (a projection: nothing else is read)."""
        if not self.passthrough:
            return list(self.columns)
        ours = set(self.input_columns)
        return [(name, name) for name in have if name in ours]

    def check(self, columns: Iterable[str], where: str) -> None:
        """MissingColumns, one line naming the columns `where` has, when a column it must have is not among them:
        every mapped one, or when passthrough the `needed` ones (JSON Lines records need no more)."""
        have = list(columns)
        must = [(o, t) for o, t in self.columns if o in self.needed] if self.passthrough else self.columns
        missing = [f"{ours} ({theirs!r})" for ours, theirs in must if theirs not in have]
        if missing:
            raise MissingColumns(f"{where} has no column for {', '.join(missing)} (corpus.layout={self.layout}); "
                                 f"its columns: {', '.join(have)}. Set corpus.layout or corpus.fields=ours=theirs")


def _uses(corpus: Any, setting: str) -> bool:
    """Whether a NEEDED_BY setting (`key=value`, or `key` for any true value) is in effect."""
    key, _, value = setting.partition("=")
    return getattr(corpus, key) == value if value else bool(getattr(corpus, key))


def needed_fields(corpus: Any) -> tuple[str, ...]:
    """Our fields that the stage reads under these settings: content, and those of NEEDED_BY's settings in use."""
    return tuple(dict.fromkeys(["content"] + [ours for setting, ours in NEEDED_BY.items() if _uses(corpus, setting)]))


def check_needed(corpus: Any, fields: FieldMap) -> None:
    """ConfigError when a setting reads a field the mapping does not give (copies on The Stack, say)."""
    for setting, ours in NEEDED_BY.items():
        key, _, value = setting.partition("=")
        if _uses(corpus, setting) and not fields.has(ours):
            raise _config_error(f"corpus.{setting if value else key} reads the {ours!r} field, which "
                                f"corpus.layout={corpus.layout} does not map; add corpus.fields={ours}=<column>")


@dataclass(frozen=True)
class Selection:
    """The wanted files: a language among `languages` and a path ending in one of `extensions` (empty: any)."""

    languages: frozenset[str]
    extensions: tuple[str, ...]

    @classmethod
    def from_config(cls, corpus: Any) -> Selection:
        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in corpus.extensions)
        return cls(frozenset(lang.lower() for lang in corpus.languages), exts)

    def reason(self, record: dict[str, Any]) -> str | None:
        """Why a record is not wanted ("language", "extension"), or None when it is; compared case-insensitively."""
        if self.languages:
            language = record.get("language")
            if not isinstance(language, str) or language.lower() not in self.languages:
                return "language"
        if self.extensions:
            path = record.get("path")
            if not isinstance(path, str) or not path.lower().endswith(self.extensions):
                return "extension"
        return None
