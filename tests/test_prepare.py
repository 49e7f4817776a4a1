"""`increc prepare`: every format, span boundaries, and errors that name file and line."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from components import ingest
from tests.conftest import REPO, increc


def read_spans(out: Path):
    spans = {}
    for number in ingest.span_dirs(str(out)):
        with open(out / f"span-{number}" / "interactions.csv", newline="", encoding="utf-8") as f:
            spans[number] = list(csv.DictReader(f))
    return spans


def assert_ordered_and_complete(out: Path, expected_rows):
    """Spans are time-ordered and together hold every (user, item, timestamp) exactly once."""
    spans = read_spans(out)
    assert list(spans) == list(range(1, len(spans) + 1))
    for a, b in zip(spans.values(), list(spans.values())[1:]):
        assert max(int(r["timestamp"]) for r in a) <= min(int(r["timestamp"]) for r in b)
    got = Counter((r["user_id"], r["item_id"], r["timestamp"]) for rows in spans.values() for r in rows)
    assert got == Counter(expected_rows)
    return spans


def write(path: Path, text: str, encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def test_movietweetings_keeps_leading_zeros_and_labels_at_8(tmp_path):
    src = tmp_path / "mt"
    write(src / "ratings.dat", "1::0104257::8::300\n2::0104257::7::100\n1::1074638::10::200\n3::0000001::0::400\n")
    write(src / "movies.dat", "0104257::A Few Good Men (1992)::Crime|Drama\n1074638::Untitled::\n0000001::Odd\n")
    manifest = ingest.prepare("movietweetings", str(src), str(tmp_path / "out"), spans=2)
    spans = assert_ordered_and_complete(tmp_path / "out", [("2", "0104257", "100"), ("1", "1074638", "200"),
                                                          ("1", "0104257", "300"), ("3", "0000001", "400")])
    assert [r["label"] for r in spans[1] + spans[2]] == ["0", "1", "1", "0"]
    assert "rating" not in spans[1][0]
    items = list(csv.DictReader(open(tmp_path / "out" / "items.csv")))
    assert items[0] == {"item_id": "0104257", "genres": "Crime|Drama", "year": "1992"}
    assert items[1]["year"] == "" and items[2]["genres"] == ""
    assert manifest["spans"][0]["rows"] == 2 and manifest["label_threshold"] == 8.0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_movielens_latest_csv(tmp_path):
    src = tmp_path / "ml"
    write(src / "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,50\n1,20,3.5,40\n2,10,5,60\n")
    write(src / "movies.csv", 'movieId,title,genres\n10,"Heat, The (1995)",Action|Crime\n20,X,(no genres listed)\n')
    ingest.prepare("movielens", str(src), str(tmp_path / "out"), spans=3)
    spans = assert_ordered_and_complete(tmp_path / "out", [("1", "20", "40"), ("1", "10", "50"), ("2", "10", "60")])
    assert [s[0]["label"] for s in spans.values()] == ["0", "1", "1"]
    items = {r["item_id"]: r for r in csv.DictReader(open(tmp_path / "out" / "items.csv"))}
    assert items["10"]["year"] == "1995" and items["20"]["genres"] == ""


def test_movielens_100k_with_users_and_genre_flags(tmp_path):
    src = tmp_path / "ml100k"
    write(src / "u.data", "1\t5\t4\t30\n2\t5\t2\t10\n")
    flags = "|".join(["0", "1", "0", "0", "0", "1"] + ["0"] * 13)
    write(src / "u.item", f"5|Toy Story (1995)|01-Jan-1995||http://x|{flags}\n", encoding="latin-1")
    write(src / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n", encoding="latin-1")
    ingest.prepare("movielens-100k", str(src / "u.data"), str(tmp_path / "out"), spans=1)
    assert_ordered_and_complete(tmp_path / "out", [("2", "5", "10"), ("1", "5", "30")])
    items = list(csv.DictReader(open(tmp_path / "out" / "items.csv")))
    assert items == [{"item_id": "5", "genres": "Action|Comedy", "year": "1995"}]
    users = list(csv.DictReader(open(tmp_path / "out" / "users.csv")))
    assert users[0] == {"user_id": "1", "age": "24", "gender": "M", "occupation": "technician"}, "no zip codes"


def test_movielens_1m(tmp_path):
    src = tmp_path / "ml1m"
    write(src / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n", encoding="latin-1")
    write(src / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James (1996)::Animation\n",
          encoding="latin-1")
    write(src / "users.dat", "1::F::1::10::48067\n", encoding="latin-1")
    ingest.prepare("movielens-1m", str(src), str(tmp_path / "out"), spans=2)
    spans = assert_ordered_and_complete(tmp_path / "out", [("1", "1193", "978300760"), ("1", "661", "978302109")])
    assert spans[1][0]["label"] == "1" and spans[2][0]["label"] == "0"
    users = list(csv.DictReader(open(tmp_path / "out" / "users.csv")))
    assert users == [{"user_id": "1", "age": "1", "gender": "F", "occupation": "10"}]


def test_generic_csv_keeps_features_quoting_and_side_tables(tmp_path):
    src = tmp_path / "raw"
    write(src / "interactions.csv", 'user_id,item_id,timestamp,rating,device,note\n'
                                    'u1,i1,5,4.5,phone,"hello, ""world"""\n'
                                    'u2,i2,3,1,web,"two\nlines"\n')
    write(src / "items.csv", "item_id,genres\ni1,A|B\n")
    write(src / "users.csv", "user_id,country\nu1,BE\n")
    ingest.prepare("csv", str(src / "interactions.csv"), str(tmp_path / "out"), spans=1, label_threshold=4)
    rows = read_spans(tmp_path / "out")[1]
    assert list(rows[0]) == ["user_id", "item_id", "timestamp", "label", "device", "note"]
    assert rows[0]["note"] == "two\nlines" and rows[1]["note"] == 'hello, "world"'
    assert [r["label"] for r in rows] == ["0", "1"]
    assert (tmp_path / "out" / "items.csv").read_text().startswith("item_id,genres")
    assert (tmp_path / "out" / "users.csv").exists()


@pytest.mark.parametrize("span_by,expected", [("day", [2, 1]), ("hour", [1, 1, 1])])
def test_span_by_day_and_hour(tmp_path, span_by, expected):
    src = write(tmp_path / "i.csv", "user_id,item_id,timestamp,label\n"
                                    "a,x,0,1\nb,x,7200,0\nc,y,86400,1\n")
    manifest = ingest.prepare("csv", str(src), str(tmp_path / span_by), span_by=span_by)
    assert [s["rows"] for s in manifest["spans"]] == expected


def test_equal_size_spans_differ_by_at_most_one(tmp_path):
    src = write(tmp_path / "i.csv", "user_id,item_id,timestamp,label\n" +
                "".join(f"u{i},i{i % 3},{1000 - i},{i % 2}\n" for i in range(23)))
    manifest = ingest.prepare("csv", str(src), str(tmp_path / "out"), spans=4)
    assert sorted(s["rows"] for s in manifest["spans"]) == [5, 6, 6, 6]
    assert_ordered_and_complete(tmp_path / "out", [(f"u{i}", f"i{i % 3}", str(1000 - i)) for i in range(23)])


@pytest.mark.parametrize("body,message", [
    ("user_id,item_id,label\nu,i,1\n", r"i\.csv, line 1: missing required column\(s\) timestamp"),
    ("user_id,item_id,timestamp,label\nu,i,noon,1\n", r"i\.csv, line 2, column timestamp: 'noon'"),
    ("user_id,item_id,timestamp,label\nu,i,1,1\nu,i,2,yes\n", r"i\.csv, line 3, column label: 'yes' is not 0 or 1"),
    ("user_id,item_id,timestamp,label\nu,i,1\n", r"i\.csv, line 2: expected 4 fields, found 3"),
    ("user_id,item_id,timestamp,label\n,i,1,1\n", r"i\.csv, line 2, column user_id: empty user_id"),
    ("user_id,item_id,timestamp,rating\nu,i,1,great\n", r"i\.csv, line 2, column rating: 'great' is not a number"),
])
def test_errors_name_file_line_and_column(tmp_path, body, message):
    src = write(tmp_path / "i.csv", body)
    with pytest.raises(ingest.IngestError, match=message):
        ingest.prepare("csv", str(src), str(tmp_path / "out"), spans=1, label_threshold=3)


def test_refuses_to_overwrite_spans_and_bad_arguments(tmp_path):
    src = write(tmp_path / "i.csv", "user_id,item_id,timestamp,label\nu,i,1,1\nv,i,2,0\n")
    ingest.prepare("csv", str(src), str(tmp_path / "out"), spans=2)
    with pytest.raises(ingest.IngestError, match="--overwrite"):
        ingest.prepare("csv", str(src), str(tmp_path / "out"), spans=2)
    assert ingest.prepare("csv", str(src), str(tmp_path / "out"), spans=1, overwrite=True)["spans"][0]["rows"] == 2
    assert ingest.span_dirs(str(tmp_path / "out")) == [1]
    with pytest.raises(ingest.IngestError, match="cannot cut 2 rows into 3 spans"):
        ingest.prepare("csv", str(src), str(tmp_path / "o2"), spans=3)
    with pytest.raises(ingest.IngestError, match="unknown format"):
        ingest.prepare("parquet", str(src), str(tmp_path / "o3"), spans=1)
    with pytest.raises(ingest.IngestError, match="label-threshold"):
        ingest.prepare("csv", str(write(tmp_path / "r.csv", "user_id,item_id,timestamp,rating\nu,i,1,4\n")),
                       str(tmp_path / "o4"), spans=1)


def test_bundled_movietweetings_through_the_cli(tmp_path):
    out = tmp_path / "data"
    result = increc("prepare", "--format", "movietweetings", "--input", str(REPO / "data" / "movietweetings-100k"),
                    "--out", str(out), "--spans", "10")
    assert "100000 rows in 10 spans" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["spans"]] == [10000] * 10
    ordered = [(s["min_timestamp"], s["max_timestamp"]) for s in manifest["spans"]]
    assert all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:]))
    total = sum(1 for line in open(REPO / "data" / "movietweetings-100k" / "ratings.dat") if line.strip())
    assert sum(s["rows"] for s in manifest["spans"]) == total
    bad = increc("prepare", "--format", "movietweetings", "--input", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "x"), check=False)
    assert bad.returncode == 2 and "nowhere: no such file or directory" in bad.stderr
