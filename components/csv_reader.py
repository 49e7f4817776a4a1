"""The one CSV reader: `increc prepare` and SpanExampleGen both read interaction CSVs through it.

- The header is checked (required columns, duplicates) and a UTF-8 byte-order
  mark is dropped, so it never becomes part of the first column's name.
- Quoted fields may hold commas and newlines; every record carries the
  1-based line where it starts, so errors name file and line.
- Lines end at "\\n" only (str.splitlines() would also break at U+0085 and
  shift every line number).
- Big files are read as byte ranges that Beam workers parse independently
  (docs/ARCHITECTURE.md, "Streaming ingestion"). A range owns the records
  that start inside it. Where a record starts is decided by quote parity: a
  newline ends a record exactly when an even number of `"` precede it in the
  file (RFC 4180 doubles quotes inside quoted fields, so parity is exact).
  One cheap pass counts newlines and quotes per range; their running sums
  give each range its first line number and its quote parity.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

BOM = b"\xef\xbb\xbf"
DEFAULT_RANGE_BYTES = 16 << 20  # ~200k rows of a typical span: enough work per range to amortise its set-up
HEADER_PROBE_BYTES = 1 << 20


class CsvError(ValueError):
    """A CSV file that cannot be read at all; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Header:
    path: str
    columns: List[str]
    data_start: int  # byte offset of the first data record
    data_line: int  # its 1-based line number


@dataclasses.dataclass(frozen=True)
class ByteRange:
    """Bytes [start, end) of a file's data; the range owns the records that start in it."""

    path: str
    index: int
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class RangePosition:
    """Where a range begins in the file: lines and quotes before its first byte (from the data start)."""

    lines_before: int
    quotes_before: int


# Local files through plain file calls, so the CLI's checks run without loading TensorFlow; URLs
# (gs://, s3://, ...) through TensorFlow's file systems.

def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def _remote(path: str) -> bool:
    return "://" in path


def _exists(path: str) -> bool:
    return _gfile().exists(path) if _remote(path) else os.path.isfile(path)


def _size(path: str) -> int:
    return _gfile().stat(path).length if _remote(path) else os.path.getsize(path)


def _open(path: str):
    if not _remote(path) and os.path.isdir(path):
        raise CsvError(f"{path}: is a directory, not a CSV file")
    if not _exists(path):
        raise CsvError(f"{path}: no such file")
    try:
        return _gfile().GFile(path, "rb") if _remote(path) else open(path, "rb")
    except OSError as e:
        raise CsvError(f"{path}: cannot be read ({e.strerror or e})") from None


def read_header(path: str, required: Sequence[str] = ()) -> Header:
    """The header row of a CSV file, checked; raises CsvError naming the file and line 1."""
    with _open(path) as f:
        probe = f.read(HEADER_PROBE_BYTES)
    offset = len(BOM) if probe.startswith(BOM) else 0
    consumed: List[int] = []  # byte length of each line the csv reader took

    def lines() -> Iterator[bytes]:
        for raw in _lines(io.BytesIO(probe[offset:])):
            consumed.append(len(raw))
            yield raw

    reader = csv.reader(_decoded(path, lines(), 1), strict=False)
    try:
        columns = [c.strip() for c in next(reader)]
    except StopIteration:
        raise CsvError(f"{path}: the file is empty (a header row is required)") from None
    except csv.Error as e:
        raise CsvError(f"{path}, line 1: unparseable CSV header ({e})") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise CsvError(f"{path}, line 1: missing required column(s) {', '.join(missing)} "
                       f"(header: {', '.join(columns)})")
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise CsvError(f"{path}, line 1: duplicate column name(s) {', '.join(duplicated)}")
    return Header(path, columns, offset + sum(consumed), len(consumed) + 1)


def plan_ranges(header: Header, range_bytes: int = DEFAULT_RANGE_BYTES) -> List[ByteRange]:
    size = _size(header.path)
    starts = list(range(header.data_start, max(size, header.data_start + 1), max(1, int(range_bytes))))
    return [ByteRange(header.path, i, start, min(size, start + range_bytes)) for i, start in enumerate(starts)]


def count_range(byte_range: ByteRange) -> Tuple[int, int]:
    """(newlines, quotes) in a range: the cheap pass that positions the ranges after it."""
    with _open(byte_range.path) as f:
        f.seek(byte_range.start)
        data = f.read(byte_range.end - byte_range.start)
    return data.count(b"\n"), data.count(b'"')


def positions(counts: Sequence[Tuple[int, int]]) -> List[RangePosition]:
    """Running sums of count_range over a file's ranges, in range order."""
    out, lines, quotes = [], 0, 0
    for newlines, quote_count in counts:
        out.append(RangePosition(lines, quotes))
        lines, quotes = lines + newlines, quotes + quote_count
    return out


Record = Tuple[int, Optional[List[str]], str]  # (line, fields or None, why the record is unreadable)


def read_range(header: Header, byte_range: ByteRange,
               position: RangePosition = RangePosition(0, 0)) -> Iterator[Record]:
    """Every record that starts in the range: (line, fields, '') or (line, None, reason).

    Blank lines are skipped. The last record may run past the range's end; the
    next range skips it, because it starts before that range.
    """
    start, end = byte_range.start, byte_range.end
    with _open(byte_range.path) as f:
        starts_a_record = start <= header.data_start
        if not starts_a_record:
            f.seek(start - 1)
            starts_a_record = f.read(1) == b"\n" and position.quotes_before % 2 == 0
        f.seek(start)
        chunk = f.read(end - start)
        first = 0
        if not starts_a_record:
            first = _boundary_after(chunk, position.quotes_before)
            if first is None or first >= len(chunk):
                return  # no record starts in this range
        line = header.data_line + position.lines_before + chunk.count(b"\n", 0, first)
        data = chunk[first:] + _rest_of_record(f, chunk, end, position.quotes_before + chunk.count(b'"'))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_line = line + data.count(b"\n", 0, e.start)
        raise CsvError(f"{byte_range.path}, line {bad_line}: not valid UTF-8 ({e.reason})") from None
    reader = csv.reader(_with_newlines(text), strict=False)
    width = len(header.columns)
    consumed = 0  # lines the reader has taken before the current record
    while True:
        try:
            for fields in reader:
                record_line = line + consumed
                consumed = reader.line_num
                if len(fields) == width and fields[0].strip():
                    yield record_line, fields, ""
                elif not fields or all(not v.strip() for v in fields):
                    continue  # a blank line is not a record
                elif len(fields) != width:
                    yield record_line, None, f"expected {width} fields, found {len(fields)}"
                else:
                    yield record_line, fields, ""
            return
        except csv.Error as e:
            yield line + consumed, None, f"unparseable CSV: {e}"
            consumed = reader.line_num


def read_file(path: str, required: Sequence[str] = ()) -> Tuple[Header, Iterator[Record]]:
    """A whole (small) file as one range: its checked header and its records."""
    header = read_header(path, required)
    size = _size(path)
    return header, read_range(header, ByteRange(path, 0, header.data_start, max(size, header.data_start)))


def rows_as_dicts(header: Header, records: Iterator[Record]) -> Iterator[Tuple[int, Optional[Dict[str, str]], str]]:
    for line, fields, reason in records:
        yield line, (dict(zip(header.columns, fields)) if fields is not None else None), reason


# --- internals ---

READ_BLOCK = 4 << 20


def _lines(f, block: int = READ_BLOCK) -> Iterator[bytes]:
    """Physical lines of a binary stream, each with its "\\n" (the last may lack one)."""
    rest = b""
    while True:
        data = f.read(block)
        if not data:
            break
        pieces = (rest + data).split(b"\n")
        rest = pieces.pop()
        for piece in pieces:
            yield piece + b"\n"
    if rest:
        yield rest


def _decoded(path: str, lines: Iterator[bytes], first_line: int) -> Iterator[str]:
    for number, raw in enumerate(lines, start=first_line):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CsvError(f"{path}, line {number}: not valid UTF-8 ({e.reason})") from None


def _with_newlines(text: str) -> Iterator[str]:
    """The lines of text split at "\\n" only, each with its newline, for the csv module."""
    lines = text.split("\n")
    last = lines.pop()
    for line in lines:
        yield line + "\n"
    if last:
        yield last


def _boundary_after(data: bytes, quotes: int) -> Optional[int]:
    """Index just past the first newline of data that an even number of quotes precede, or None.

    `quotes` counts the quotes before data.
    """
    at = 0
    while True:
        newline = data.find(b"\n", at)
        if newline < 0:
            return None
        quotes += data.count(b'"', at, newline)
        if quotes % 2 == 0:
            return newline + 1
        at = newline + 1


def _rest_of_record(f, chunk: bytes, end: int, quotes: int) -> bytes:
    """The bytes after `end` up to where the range's last record ends (f is positioned at `end`).

    `quotes` counts the quotes before `end`.
    """
    if not chunk or (chunk.endswith(b"\n") and quotes % 2 == 0):
        return b""
    tail = []
    while True:
        block = f.read(1 << 16)
        if not block:
            break
        cut = _boundary_after(block, quotes)
        if cut is not None:
            tail.append(block[:cut])
            break
        tail.append(block)
        quotes += block.count(b'"')
    return b"".join(tail)
