"""Reading labelled records from ``.jsonl``, ``.csv`` and ``.tsv`` files, with clear errors.

What this module is for: turning a user's data file into a list of ``{field: text}`` dicts
for training, evaluation and prediction, and turning every problem with that file into a
one-line :class:`DataError` that names the file, the line (1-based, as in a text editor) and
the field, e.g. ``data.csv:17: missing field 'text'``.

* ``.jsonl``: one JSON object per line; blank lines are skipped. Values that are not strings
  are converted with ``str()``; ``null`` counts as a missing field.
* ``.csv``: the :mod:`csv` module's default dialect (``"`` quoting, ``""`` escapes, quoted
  fields may span lines); a header row is required.
* ``.tsv``: the GLUE convention: a header row, fields split on tabs, no quoting at all (a
  ``"`` is a literal character); empty lines are skipped.

Files are UTF-8 (a leading BOM is tolerated).

:func:`read_records` reads a whole file into a list (fine for data sets of millions of short
rows); :class:`RecordReader` reads the same formats one record at a time, for streaming
(``ptedge predict``), and reports a broken record without stopping, so that its caller can
choose to skip it. Both share one parser, so a file reads the same either way.

What it is not for: it does no tokenization, type inference or label mapping (every value is
a string) and sniffs no CSV dialects. It is torch-free: the standard library only, so the
runtime and the CLI can use it without PyTorch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "DataError",
    "RecordReader",
    "Records",
    "labels_of",
    "read_records",
    "require_fields",
    "write_jsonl",
]

SUPPORTED_EXTENSIONS = (".jsonl", ".csv", ".tsv")
MAX_FIELDS_NAMED = 8  # a missing-field error names at most this many of the fields present


class DataError(ValueError):
    """A problem with a data file, for the user: ``str()`` is one line, ``path:line: message``.

    ``path``, ``line`` (1-based) and ``field`` are kept as attributes too (``None`` where they
    do not apply). ``DataError("message")`` alone works like a plain ``ValueError``.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.message = message
        prefix = ""
        if self.path is not None:
            prefix = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        # One line, whatever a path, a field name or a parser message contains.
        super().__init__(" ".join(f"{prefix}{message}".splitlines()))


class Records(list[dict[str, str]]):
    """The records of one file: a plain ``list`` of ``{field: value}`` dicts, plus

    * ``path``: the file, as given to :func:`read_records`;
    * ``lines``: ``lines[i]`` is the 1-based line on which record ``i`` starts;
    * ``fields``: the header's columns (csv/tsv), or every key in first-seen order (jsonl).

    Slicing or copying gives a plain ``list``; build a new ``Records`` to keep the lines.
    """

    def __init__(
        self,
        path: str | Path = "<records>",
        records: Iterable[dict[str, str]] = (),
        lines: Iterable[int] | None = None,
        fields: Iterable[str] | None = None,
    ) -> None:
        super().__init__(records)
        self.path = str(path)
        self.lines = list(lines) if lines is not None else list(range(1, len(self) + 1))
        if len(self.lines) != len(self):
            raise ValueError(f"{len(self)} records but {len(self.lines)} line numbers")
        if fields is None:
            fields = dict.fromkeys(k for record in self for k in record)
        self.fields = list(fields)

    def where(self, index: int) -> str:
        """``"path:line"`` of record ``index``, for messages."""
        return f"{self.path}:{self.lines[index]}"

    def __repr__(self) -> str:
        return f"Records(path={self.path!r}, n={len(self)}, fields={self.fields!r})"


def read_records(path: str | Path) -> Records:
    """Read every record of a ``.jsonl``, ``.csv`` or ``.tsv`` file (chosen by extension).

    Raises :class:`DataError` for a missing or unreadable file, an unsupported extension,
    undecodable UTF-8, a malformed line, a row whose column count differs from the header's,
    and a file with no records.
    """
    records: list[dict[str, str]] = []
    lines: list[int] = []
    with RecordReader(path) as reader:
        for number, record in reader:
            if isinstance(record, DataError):
                raise record
            records.append(record)
            lines.append(number)
        fields = reader.fields
    if not records:
        raise DataError("no records", path=reader.name)
    return Records(reader.name, records, lines, fields)


class RecordReader:
    """The records of one data file, or of JSON lines on stdin (``"-"``), one at a time.

    Iterating yields ``(line, record)``. A record that cannot be read (invalid JSON or
    UTF-8, a wrong column count, malformed CSV) comes as ``(line, DataError)`` and
    reading goes on after it; what ends the file raises :class:`DataError` (no such file,
    an unsupported extension, a broken header, a quoted CSV field never closed). Holds one
    record at a time, so memory stays bounded on files of any size.

    ``fields``: the header's columns (csv/tsv; available once opened), None for jsonl.
    ``position`` and ``size``: bytes read so far and the file's size (None for a pipe).
    """

    def __init__(self, path: str | Path, stream: BinaryIO | None = None) -> None:
        self.position = 0
        if str(path) == "-":
            self.name, suffix = "<stdin>", ".jsonl"
            self._file, self._owned = stream or sys.stdin.buffer, False
        else:
            self.name, suffix = str(path), Path(path).suffix.lower()
            if suffix not in SUPPORTED_EXTENSIONS:
                shown = repr(suffix) if suffix else "(no extension)"
                raise DataError(
                    f"unsupported file type {shown}; supported: {', '.join(SUPPORTED_EXTENSIONS)}",
                    path=self.name,
                )
            self._file, self._owned = _open(Path(path), self.name), True
        try:
            st = os.fstat(self._file.fileno())
            self.size = st.st_size if stat.S_ISREG(st.st_mode) else None
        except (OSError, ValueError, io.UnsupportedOperation):
            self.size = None
        parse = {".jsonl": self._jsonl, ".csv": self._csv, ".tsv": self._tsv}[suffix]
        self._rows = parse()
        self.fields: list[str] | None = None
        if suffix != ".jsonl":
            try:
                first = next(self._rows, None)  # the header, if the file has one
            except BaseException:
                self.close()
                raise
            self.fields = first[1] if first is not None else []

    def __iter__(self) -> Iterator[tuple[int, dict[str, str] | DataError]]:
        return self._rows

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owned:
            self._file.close()

    def _lines(self) -> Iterator[tuple[int, str | DataError]]:
        """(number, text with its line end) per line, or a DataError for invalid UTF-8."""
        for number, raw in enumerate(self._file, start=1):
            self.position += len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                byte = raw[e.start : e.start + 1].hex()
                yield (
                    number,
                    DataError(
                        f"not valid UTF-8 (byte 0x{byte} at column {e.start + 1}); "
                        "save the file as UTF-8",
                        path=self.name,
                        line=number,
                    ),
                )
                continue
            yield number, text[1:] if number == 1 and text.startswith("\ufeff") else text

    def _jsonl(self) -> Iterator[tuple[int, dict[str, str] | DataError]]:
        for number, text in self._lines():
            if isinstance(text, DataError):
                yield number, text
            elif text.strip():
                yield number, _jsonl_record(text.removesuffix("\n"), self.name, number)

    def _tsv(self) -> Iterator[tuple[int | None, dict[str, str] | list[str] | DataError]]:
        header: list[str] | None = None
        header_line = 0
        for number, text in self._lines():
            if isinstance(text, DataError):
                if header is None:
                    raise text
                yield number, text
                continue
            text = text[:-1] if text.endswith("\n") else text
            text = text[:-1] if text.endswith("\r") else text
            if not text:
                continue
            row = text.split("\t")
            if header is None:
                _check_header(row, self.name, number)
                header, header_line = row, number
                yield None, header
            elif len(row) != len(header):
                yield (
                    number,
                    DataError(
                        f"expected {len(header)} tab-separated columns as in the header "
                        f"(line {header_line}), found {len(row)}",
                        path=self.name,
                        line=number,
                    ),
                )
            else:
                yield number, dict(zip(header, row, strict=True))

    def _csv(self) -> Iterator[tuple[int | None, dict[str, str] | list[str] | DataError]]:
        bad: list[DataError] = []  # undecodable lines the csv reader was given as blank

        def texts() -> Iterator[str]:
            for _, text in self._lines():
                if isinstance(text, DataError):
                    bad.append(text)
                    yield "\n"
                else:
                    yield text

        reader = csv.reader(texts(), strict=True)
        header: list[str] | None = None
        header_line = 0
        start = 1  # the line the next row starts on
        while True:
            try:
                row: list[str] | DataError = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                if "unexpected end of data" in str(e):
                    raise DataError(
                        "a quoted field opened on this line is never closed",
                        path=self.name,
                        line=start,
                    ) from None
                row = DataError(f"malformed CSV ({e})", path=self.name, line=reader.line_num)
            number, start = start, reader.line_num + 1
            if bad:
                row = bad[0]
                bad.clear()
            if isinstance(row, DataError):
                if header is None:
                    raise row
                yield number, row
            elif not row:  # an empty line
                continue
            elif header is None:
                _check_header(row, self.name, number)
                header, header_line = row, number
                yield None, header
            elif len(row) != len(header):
                yield (
                    number,
                    DataError(
                        f"expected {len(header)} columns as in the header (line {header_line}), "
                        f"found {len(row)}",
                        path=self.name,
                        line=number,
                    ),
                )
            else:
                yield number, dict(zip(header, row, strict=True))


def require_fields(
    records: Sequence[dict[str, str]], fields: Iterable[str], *, reason: str | None = None
) -> None:
    """Raise :class:`DataError` at the first record that lacks one of ``fields``.

    The message names the record's file and line and the field, e.g.
    ``train.jsonl:3: missing field 'sub_label' (template needs it)`` when called with
    ``reason="template needs it"``, followed by the fields the record has. An empty string
    counts as present (it is valid text).
    """
    wanted = [fields] if isinstance(fields, str) else list(fields)
    for i, record in enumerate(records):
        for field in wanted:
            if field not in record:
                path, line = _location(records, i)
                raise DataError(
                    missing_field(field, record, reason), path=path, line=line, field=field
                )


def missing_field(field: str, record: dict[str, str], reason: str | None = None) -> str:
    """The message for a record without ``field``, naming the fields it has, e.g.
    ``missing field 'text' (template needs it); the record has 'sentence', 'label'``."""
    suffix = f" ({reason})" if reason else ""
    names = [repr(k) for k in record]
    has = ", ".join(names[:MAX_FIELDS_NAMED]) or "no fields"
    if len(names) > MAX_FIELDS_NAMED:
        has += f" and {len(names) - MAX_FIELDS_NAMED} more"
    return f"missing field {field!r}{suffix}; the record has {has}"


def labels_of(records: Sequence[dict[str, str]], field: str) -> list[str]:
    """The value of label ``field`` of every record, in record order, unchanged.

    A record whose label is missing, empty or only whitespace raises :class:`DataError`
    naming its file, line and the field.
    """
    labels: list[str] = []
    for i, record in enumerate(records):
        value = record.get(field)
        if value is None or not value.strip():
            what = "missing" if value is None else "empty"
            path, line = _location(records, i)
            raise DataError(f"{what} label field {field!r}", path=path, line=line, field=field)
        labels.append(value)
    return labels


def write_jsonl(path: str | Path, records: Iterable[dict[str, str]]) -> None:
    """Write records as UTF-8 JSON lines (what :func:`read_records` reads back unchanged)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# -- internals ----------------------------------------------------------------------------


def _location(records: Sequence[dict[str, str]], index: int) -> tuple[str, int]:
    if isinstance(records, Records):
        return records.path, records.lines[index]
    return "<records>", index + 1


def _open(path: Path, name: str) -> BinaryIO:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise DataError("no such file", path=name) from None
    except IsADirectoryError:
        raise DataError("is a directory, not a data file", path=name) from None
    except OSError as e:
        raise DataError(f"cannot read ({e.strerror or e})", path=name) from None


def _jsonl_record(text: str, name: str, number: int) -> dict[str, str] | DataError:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return DataError(f"invalid JSON ({e.msg} at column {e.colno})", path=name, line=number)
    if not isinstance(obj, dict):
        return DataError(f"expected a JSON object, got {_json_type(obj)}", path=name, line=number)
    return {k: v if isinstance(v, str) else str(v) for k, v in obj.items() if v is not None}


def _json_type(obj: object) -> str:
    if isinstance(obj, list):
        return "an array"
    if isinstance(obj, str):
        return "a string"
    if isinstance(obj, bool):
        return "a boolean"
    if obj is None:
        return "null"
    return "a number"


def _check_header(header: list[str], name: str, number: int) -> None:
    seen: set[str] = set()
    for column in header:
        if column in seen:
            raise DataError(
                f"duplicate column {column!r} in the header", path=name, line=number, field=column
            )
        seen.add(column)
