"""Dataset files -> records, each with the `file:line` it came from.

  .txt       one record: the whole file's text (a document)
  .jsonl     one JSON object per line (blank lines skipped)
  .json      an array of objects (each record's line is where it starts), or one object
  .parquet   rows of the table (needs pyarrow; `pip install pyarrow`)
A folder holds any of these (searched recursively, read in sorted path order).

A record that is not what its dataset kind needs (bad JSON, not an object, a missing or mistyped
field) raises DatasetError naming file:line, unless `skip_bad_lines`: then it is counted in
`ReadStats.bad` and reading goes on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ...errors import ReftError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


class DatasetError(ReftError):
    """A dataset path or record that cannot be used, named by file (and line)."""


class BadRecord(ValueError):
    """What is wrong with one record (turned into a DatasetError naming file:line)."""


@dataclass
class ReadStats:
    files: int = 0
    records: int = 0
    bad: int = 0                        # malformed records skipped (skip_bad_lines)
    first_bad: list[str] = field(default_factory=list)   # where the first few were, for the log


def dataset_files(path: str | Path, suffixes=SUFFIXES) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix not in suffixes:
            raise DatasetError(f"{p}: unsupported file type {p.suffix or '(none)'}; expected {', '.join(suffixes)}")
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes and not f.name.startswith("."))
    if not files:
        raise DatasetError(f"{p}: the folder holds no {', '.join(suffixes)} files")
    return files


def _json_array(text: str, where: Path) -> Iterator[tuple[int, Any]]:
    """(line, element) of a top-level JSON array, each element's line being where it starts."""
    dec = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        try:
            yield 1, json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}:{e.lineno}: invalid JSON: {e.msg}") from None
        return
    i += 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise DatasetError(f"{where}: the JSON array is not closed")
        if text[i] == "]":
            return
        line = text.count("\n", 0, i) + 1
        try:
            value, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}:{e.lineno}: invalid JSON: {e.msg}") from None
        yield line, value


def _raw_records(f: Path) -> Iterator[tuple[int, Any]]:
    """(line, value) pairs; a value is a str (text file), a parsed object, or a BadRecord."""
    if f.suffix == ".parquet":
        yield from _parquet_rows(f)
        return
    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DatasetError(f"{f}: cannot read ({e.strerror or e})") from None
    if f.suffix == ".txt":
        yield 1, text
    elif f.suffix == ".json":
        yield from _json_array(text, f)
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, BadRecord(f"invalid JSON: {e.msg} (column {e.colno})")


def _parquet_rows(f: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{f}: reading parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(f)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError family
        raise DatasetError(f"{f}: cannot read parquet: {e}") from None
    for n, row in enumerate(table.to_pylist(), 1):
        yield n, row


def read_records(path: str | Path, check: Callable[[Any], Any], *, skip_bad_lines: bool = False,
                 stats: ReadStats | None = None) -> Iterator[tuple[str, Any]]:
    """(where, checked record) for every record of the file(s) at `path`; `check` turns a raw value
    into what the dataset kind uses or raises BadRecord."""
    stats = stats if stats is not None else ReadStats()
    for f in dataset_files(path):
        stats.files += 1
        for line, raw in _raw_records(f):
            where = f"{f}:{line}" if f.suffix != ".txt" else str(f)
            try:
                if isinstance(raw, BadRecord):
                    raise raw
                rec = check(raw)
            except BadRecord as e:
                if not skip_bad_lines:
                    raise DatasetError(f"{where}: {e} (--skip-bad-lines to skip such records)") from None
                stats.bad += 1
                if len(stats.first_bad) < 3:
                    stats.first_bad.append(f"{where}: {e}")
                continue
            stats.records += 1
            yield where, rec
