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

What it is not for: it does no tokenization, type inference or label mapping (every value is
a string), sniffs no CSV dialects, and reads a whole file into memory (fine for data sets of
millions of short rows, not for streaming). It is torch-free: the standard library only, so
the runtime and the CLI can use it without PyTorch.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "DataError",
    "Records",
    "labels_of",
    "read_records",
    "require_fields",
    "write_jsonl",
]

SUPPORTED_EXTENSIONS = (".jsonl", ".csv", ".tsv")


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
    name = str(path)
    suffix = Path(path).suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        shown = repr(suffix) if suffix else "(no extension)"
        raise DataError(
            f"unsupported file type {shown}; supported: {', '.join(SUPPORTED_EXTENSIONS)}",
            path=name,
        )
    text = _read_text(Path(path), name)
    if suffix == ".jsonl":
        records = _parse_jsonl(text, name)
    elif suffix == ".csv":
        records = _parse_csv(text, name)
    else:
        records = _parse_tsv(text, name)
    if not records:
        raise DataError("no records", path=name)
    return records


def require_fields(
    records: Sequence[dict[str, str]], fields: Iterable[str], *, reason: str | None = None
) -> None:
    """Raise :class:`DataError` at the first record that lacks one of ``fields``.

    The message names the record's file and line and the field, e.g.
    ``train.jsonl:3: missing field 'sub_label' (template needs it)`` when called with
    ``reason="template needs it"``. An empty string counts as present (it is valid text).
    """
    wanted = [fields] if isinstance(fields, str) else list(fields)
    for i, record in enumerate(records):
        for field in wanted:
            if field not in record:
                suffix = f" ({reason})" if reason else ""
                path, line = _location(records, i)
                raise DataError(
                    f"missing field {field!r}{suffix}", path=path, line=line, field=field
                )


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


def _read_text(path: Path, name: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("no such file", path=name) from None
    except IsADirectoryError:
        raise DataError("is a directory, not a data file", path=name) from None
    except OSError as e:
        raise DataError(f"cannot read ({e.strerror or e})", path=name) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        byte = raw[e.start : e.start + 1].hex()
        raise DataError(
            f"not valid UTF-8 (byte 0x{byte} at column {column}); save the file as UTF-8",
            path=name,
            line=line,
        ) from None


def _parse_jsonl(text: str, name: str) -> Records:
    records: list[dict[str, str]] = []
    lines: list[int] = []
    fields: dict[str, None] = {}
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends verbatim.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"invalid JSON ({e.msg} at column {e.colno})", path=name, line=number
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"expected a JSON object, got {_json_type(obj)}", path=name, line=number
            )
        record = {k: v if isinstance(v, str) else str(v) for k, v in obj.items() if v is not None}
        fields.update(dict.fromkeys(record))
        records.append(record)
        lines.append(number)
    return Records(name, records, lines, fields)


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


def _parse_csv(text: str, name: str) -> Records:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_line = 0
    records: list[dict[str, str]] = []
    lines: list[int] = []
    start = 1  # the line the next row starts on
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise DataError(
                    "a quoted field opened on this line is never closed", path=name, line=start
                ) from None
            raise DataError(f"malformed CSV ({e})", path=name, line=reader.line_num) from None
        number, start = start, reader.line_num + 1
        if not row:  # an empty line
            continue
        if header is None:
            header, header_line = row, number
            _check_header(header, name, number)
            continue
        if len(row) != len(header):
            raise DataError(
                f"expected {len(header)} columns as in the header (line {header_line}), "
                f"found {len(row)}",
                path=name,
                line=number,
            )
        records.append(dict(zip(header, row, strict=True)))
        lines.append(number)
    return Records(name, records, lines, header or [])


def _parse_tsv(text: str, name: str) -> Records:
    header: list[str] | None = None
    header_line = 0
    records: list[dict[str, str]] = []
    lines: list[int] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.endswith("\r"):
            line = line[:-1]
        if not line:
            continue
        row = line.split("\t")
        if header is None:
            header, header_line = row, number
            _check_header(header, name, number)
            width = len(header)
            continue
        if len(row) != width:
            raise DataError(
                f"expected {width} tab-separated columns as in the header "
                f"(line {header_line}), found {len(row)}",
                path=name,
                line=number,
            )
        records.append(dict(zip(header, row, strict=True)))
        lines.append(number)
    return Records(name, records, lines, header or [])
