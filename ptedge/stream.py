"""Streaming predictions: records in, JSON lines out, in input order, in bounded memory.

``predict_stream`` reads records one at a time (``ptedge.data.RecordReader``), gathers
them into chunks, predicts a chunk (``Predictor.predict`` sorts it by length into
batches, for less padding) and writes its lines, in input order, before reading on.
The first chunk is one record, so the first line comes out at once; then one batch,
doubling up to ``CHUNK`` records. Memory holds one chunk, whatever the input's size.

A broken record (unreadable, or lacking a field the template reads) is handled by the
error policy: ``stop`` (default) writes every line before it, then raises its
``DataError`` (file, line, field); ``skip`` leaves it out, counts it and goes on
(``StreamReport`` says how many and where). ``Progress`` shows records and records/s
on stderr without tqdm, which the runtime does not install.

Torch-free. Not responsible for: parsing files (``ptedge.data``), running the model
(``ptedge.runtime``), the command line (``ptedge.cli``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

from ptedge.data import DataError, RecordReader, missing_field
from ptedge.template import record_fields

ON_ERROR = ("stop", "skip")
CHUNK = 1024  # records per chunk once the stream is going
SHOWN = 5  # skipped records named in the report


@dataclass
class StreamReport:
    """What a stream wrote and what it skipped (``on_error="skip"``)."""

    written: int = 0
    skipped: int = 0
    first_skipped: list[str] = field(default_factory=list)  # the first SHOWN messages

    def skip(self, error: DataError) -> None:
        self.skipped += 1
        if len(self.first_skipped) < SHOWN:
            self.first_skipped.append(str(error))

    def summary(self) -> str:
        """One line: how many records were skipped, and the first of them."""
        more = "; ..." if self.skipped > len(self.first_skipped) else ""
        return (
            f"skipped {self.skipped} broken record(s) of {self.written + self.skipped}: "
            + "; ".join(self.first_skipped)
            + more
        )


class Progress:
    """Records, records/s and the share of the input read, on one stderr line, redrawn at
    most every ``every`` seconds; silent when not ``enabled``."""

    def __init__(self, enabled: bool, out: TextIO | None = None, every: float = 0.5):
        self.enabled, self.out, self.every = enabled, out or sys.stderr, every
        self.start = self.last = time.perf_counter()
        self.drawn = False

    def update(self, n: int, position: int, size: int | None, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.every and not force):
            return
        self.last = now
        rate = n / max(now - self.start, 1e-9)
        share = f", {100 * position / size:.0f}% of the input" if size else ""
        self.out.write(f"\rpredict: {n:,} records, {rate:,.0f} records/s{share}")
        self.out.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.out.flush()


def chunks(
    reader: RecordReader,
    fields: list[str],
    *,
    on_error: str,
    report: StreamReport,
    batch: int,
    most: int = CHUNK,
) -> Iterator[list[dict[str, str]]]:
    """Good records in input order, in chunks of one record (its line comes out at once),
    then of ``batch`` records, doubling up to ``most``.

    A broken record: with ``stop``, the chunk before it comes out, then its DataError is
    raised; with ``skip``, it is counted in ``report`` and left out.
    """
    pending: list[dict[str, str]] = []
    size = 1
    for line, record in reader:
        if not isinstance(record, DataError):
            missing = next((f for f in fields if f not in record), None)
            if missing is not None:
                record = DataError(
                    missing_field(missing, record, "the template reads it"),
                    path=reader.name,
                    line=line,
                    field=missing,
                )
        if isinstance(record, DataError):
            if on_error == "stop":
                if pending:
                    yield pending
                raise record
            report.skip(record)
            continue
        pending.append(record)
        if len(pending) >= size:
            yield pending
            pending, size = [], min(max(batch, 2 * size), most)
    if pending:
        yield pending


def predict_stream(
    predictor,
    reader: RecordReader,
    out: TextIO,
    *,
    task: str | None = None,
    batch_size: int = 32,
    on_error: str = "stop",
    progress: Progress | None = None,
) -> StreamReport:
    """Write one JSON line per good record of ``reader`` to ``out``, as they are computed.

    ``predictor``: a ``ptedge.runtime.Predictor`` (or anything with its ``task`` and
    ``predict``). A csv/tsv header without a field the template reads is refused before
    anything is written.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error {on_error!r}: choose one of {', '.join(ON_ERROR)}")
    name, spec = predictor.task(task)
    fields = record_fields(spec["template"])
    for f in fields if reader.fields is not None else ():
        if f not in reader.fields:
            raise DataError(
                f"no column {f!r} in the header (the template of task {name!r} reads it)",
                path=reader.name,
                field=f,
            )
    report = StreamReport()
    progress = progress or Progress(enabled=False)
    try:
        for chunk in chunks(reader, fields, on_error=on_error, report=report, batch=batch_size):
            results = predictor.predict(chunk, name, batch_size)
            out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
            out.flush()
            report.written += len(chunk)
            progress.update(report.written, reader.position, reader.size)
        progress.update(report.written, reader.position, reader.size, force=True)
    finally:
        progress.close()
    return report
