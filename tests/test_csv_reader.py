"""The shared CSV reader: byte ranges give exactly the records of one whole-file read, with their lines."""
from __future__ import annotations

import csv
import io
import random

import pytest

from components import csv_reader


def _reference(text: str):
    """(line, fields) of every non-blank record after the header, by the csv module over the whole text."""
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader)
    records, next_line = [], reader.line_num + 1
    for fields in reader:
        start, next_line = next_line, reader.line_num + 1
        if fields and any(v.strip() for v in fields):
            records.append((start, fields))
    return records


def _field(rng: random.Random) -> str:
    return rng.choice(['a"b', "x\ny", "p,q", "", " spaced ", "é", "plain", '""', "\r\n", "0"])


@pytest.mark.parametrize("seed", range(40))
def test_ranges_of_any_size_read_every_record_once_with_its_line(tmp_path, seed):
    rng = random.Random(seed)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=rng.choice(["\n", "\r\n"]))
    writer.writerow(["a", "b", "c"])
    writer.writerows([[_field(rng) for _ in range(3)] for _ in range(rng.randint(0, 60))])
    text = buffer.getvalue() + rng.choice(["", "\n\n"])
    path = tmp_path / "span.csv"
    path.write_bytes((b"\xef\xbb\xbf" if seed % 3 == 0 else b"") + text.encode("utf-8"))

    header = csv_reader.read_header(str(path))
    assert header.columns == ["a", "b", "c"]
    expected = _reference(text)
    for range_bytes in (1, 2, 3, 7, 16, 101, 1 << 20):
        ranges = csv_reader.plan_ranges(header, range_bytes)
        where = csv_reader.positions([csv_reader.count_range(r) for r in ranges])
        got = [(line, fields) for r, p in zip(ranges, where) for line, fields, _ in csv_reader.read_range(header, r, p)]
        assert got == expected, range_bytes


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfuser_id,item_id\n1,2\n")
    header, records = csv_reader.read_file(str(path), required=["user_id"])
    assert header.columns == ["user_id", "item_id"]
    assert list(records) == [(2, ["1", "2"], "")]


def test_bad_records_name_their_line_and_reading_goes_on(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('a,b\n1,2\n1,2,3\n"multi\nline",4\n5\n6,7\n')
    _, records = csv_reader.read_file(str(path))
    assert list(records) == [(2, ["1", "2"], ""), (3, None, "expected 2 fields, found 3"),
                             (4, ["multi\nline", "4"], ""), (6, None, "expected 2 fields, found 1"),
                             (7, ["6", "7"], "")]


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"a,b\n", None),
    (b"user_id,user_id,item_id\n", "line 1: duplicate column name(s) user_id"),
    (b"user,item_id\n", "line 1: missing required column(s) user_id"),
])
def test_header_problems_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "h.csv"
    path.write_bytes(content)
    if message is None:
        header, records = csv_reader.read_file(str(path))
        assert header.columns == ["a", "b"] and list(records) == []
        return
    with pytest.raises(csv_reader.CsvError) as error:
        csv_reader.read_file(str(path), required=["user_id", "item_id"])
    assert str(path) in str(error.value) and message in str(error.value)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"a,b\n1,2\n3,caf\xe9\n")
    _, records = csv_reader.read_file(str(path))
    with pytest.raises(csv_reader.CsvError, match=r"line 3: not valid UTF-8"):
        list(records)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(csv_reader.CsvError, match="no such file"):
        csv_reader.read_header(str(tmp_path / "nope.csv"))
