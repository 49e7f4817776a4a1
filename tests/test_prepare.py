"""`increc prepare`: every format, span cuts and boundaries, side tables, and errors that name file and line.

Each test writes its own few-line raw files into tmp_path, so what is being
checked sits next to the data it is checked on.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from components import history, ingest
from tests.conftest import increc


def prepare(*args, **kwargs):
    """ingest.prepare on these tests' toy logs, whose seconds count from 1970 (1, 2, 86400, ...)."""
    return ingest.prepare(*args, allow_old_timestamps=True, **kwargs)



def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return path


def read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_spans(out: Path):
    """{span: rows}, each span's part files read in file-name order (which is time order)."""
    return {n: [row for path in ingest.span_files(str(out), n) for row in read_csv(Path(path))]
            for n in ingest.span_dirs(str(out))}


def assert_ordered_and_complete(out: Path, expected_rows):
    """Spans are numbered 1..K, time-ordered, and together hold every (user, item, timestamp) exactly once."""
    spans = read_spans(out)
    assert list(spans) == list(range(1, len(spans) + 1))
    assert all(spans.values()), "no span is empty"
    for earlier, later in zip(list(spans.values()), list(spans.values())[1:]):
        assert max(int(r["timestamp"]) for r in earlier) <= min(int(r["timestamp"]) for r in later)
    got = Counter((r["user_id"], r["item_id"], r["timestamp"]) for rows in spans.values() for r in rows)
    assert got == Counter(expected_rows)
    return spans


def labels(spans):
    """{(user, item): label} over all spans."""
    return {(r["user_id"], r["item_id"]): r["label"] for rows in spans.values() for r in rows}


# --- formats ---

def test_movietweetings_keeps_leading_zeros_labels_at_8_and_no_twitter_ids(tmp_path):
    src = tmp_path / "mt"
    write(src / "ratings.dat", "1::0104257::8::300\n2::0104257::7::100\n1::1074638::10::200\n3::0000001::0::400\n")
    write(src / "movies.dat", "0104257::A Few Good Men (1992)::Crime|Drama\n"
                              "1074638::Untitled::\n"
                              "0000001::Odd (2013)\n")
    write(src / "users.dat", "1::177651718\n2::555000111\n3::123456789\n")
    out = tmp_path / "out"
    manifest = prepare("movietweetings", str(src), str(out), spans=2)

    spans = assert_ordered_and_complete(out, [("2", "0104257", "100"), ("1", "1074638", "200"),
                                              ("1", "0104257", "300"), ("3", "0000001", "400")])
    assert labels(spans) == {("2", "0104257"): "0", ("1", "1074638"): "1", ("1", "0104257"): "1",
                             ("3", "0000001"): "0"}
    assert list(spans[1][0]) == ["user_id", "item_id", "timestamp", "label", *ingest.HISTORY_COLUMNS], \
        "the rating is not a column"
    assert read_csv(out / "items.csv") == [
        {"item_id": "0104257", "genres": "Crime|Drama", "year": "1992"},
        {"item_id": "1074638", "genres": "", "year": ""},
        {"item_id": "0000001", "genres": "", "year": "2013"},
    ]
    assert not (out / "users.csv").exists()
    assert "177651718" not in "".join(p.read_text() for p in out.rglob("*.csv")), "Twitter ids stay out"
    columns = ["user_id", "item_id", "timestamp", "label", *ingest.HISTORY_COLUMNS]
    assert manifest == {
        "format": "movietweetings", "source": str(src), "label_threshold": 8.0, "columns": columns,
        "spans": [{"span": 1, "rows": 2, "positives": 1, "min_timestamp": 100, "max_timestamp": 200,
                   "files": ["span-1/interactions-00000.csv"]},
                  {"span": 2, "rows": 2, "positives": 1, "min_timestamp": 300, "max_timestamp": 400,
                   "files": ["span-2/interactions-00000.csv"]}],
        "rows": 4, "items_table": True, "users_table": False, "history_features": ingest.HISTORY_COLUMNS,
        "history_state": "history/after-span-2",
        "ingests": [{"format": "movietweetings", "source": str(src), "label_threshold": 8.0, "spans": [1, 2],
                     "rows": 4}]}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in out.iterdir()) == ["history", "items.csv", "manifest.json", "span-1", "span-2"], \
        "no staging left behind"


def test_movietweetings_accepts_the_ratings_file_and_a_threshold_override(tmp_path):
    src = tmp_path / "mt"
    write(src / "ratings.dat", "1::0000042::6::10\n2::0000042::5::20\n")
    manifest = prepare("movietweetings", str(src / "ratings.dat"), str(tmp_path / "out"), spans=1,
                              label_threshold=6)
    spans = assert_ordered_and_complete(tmp_path / "out", [("1", "0000042", "10"), ("2", "0000042", "20")])
    assert [r["label"] for r in spans[1]] == ["1", "0"]
    assert manifest["label_threshold"] == 6.0 and manifest["source"] == str(src / "ratings.dat")
    assert manifest["items_table"] is False and not (tmp_path / "out" / "items.csv").exists()


def test_movielens_latest_csv(tmp_path):
    src = tmp_path / "ml"
    write(src / "ratings.csv", "userId,movieId,rating,timestamp\n"
                               "1,10,4.0,50\n1,20,3.5,40\n2,10,5,60\n2,30,3.99,70\n")
    write(src / "movies.csv", "movieId,title,genres\n"
                              '10,"Heat, The (1995)",Action|Crime\n'
                              "20,Babylon 5,(no genres listed)\n"
                              "30,Superman/Doomsday (2007) ,Animation\n")
    manifest = prepare("movielens", str(src), str(tmp_path / "out"), spans=2)
    spans = assert_ordered_and_complete(tmp_path / "out", [("1", "20", "40"), ("1", "10", "50"),
                                                           ("2", "10", "60"), ("2", "30", "70")])
    assert labels(spans) == {("1", "20"): "0", ("1", "10"): "1", ("2", "10"): "1", ("2", "30"): "0"}
    assert "rating" not in spans[1][0]
    assert read_csv(tmp_path / "out" / "items.csv") == [
        {"item_id": "10", "genres": "Action|Crime", "year": "1995"},
        {"item_id": "20", "genres": "", "year": ""},
        {"item_id": "30", "genres": "Animation", "year": "2007"},
    ]
    assert manifest["label_threshold"] == 4.0 and not manifest["users_table"]


def test_movielens_100k_genre_flags_title_year_and_users_without_zip(tmp_path):
    src = tmp_path / "ml100k"
    write(src / "u.data", "1\t5\t4\t30\n2\t5\t3\t10\n2\t6\t5\t20\n")
    action_comedy = "|".join(["0", "1", "0", "0", "0", "1"] + ["0"] * 13)
    unknown_only = "|".join(["1"] + ["0"] * 18)
    # \x85 is a latin-1 character that str.splitlines() would take for a line break.
    write(src / "u.item", f"5|Toy Story (1995)|01-Jan-1995||http://x|{action_comedy}\n"
                          f"6|Caf\xe9 \x85 Noir|||http://y|{unknown_only}\n", encoding="latin-1")
    write(src / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n", encoding="latin-1")
    out = tmp_path / "out"
    manifest = prepare("movielens-100k", str(src / "u.data"), str(out), spans=3)

    spans = assert_ordered_and_complete(out, [("2", "5", "10"), ("2", "6", "20"), ("1", "5", "30")])
    assert labels(spans) == {("2", "5"): "0", ("2", "6"): "1", ("1", "5"): "1"}
    assert read_csv(out / "items.csv") == [{"item_id": "5", "genres": "Action|Comedy", "year": "1995"},
                                           {"item_id": "6", "genres": "", "year": ""}]
    assert read_csv(out / "users.csv") == [
        {"user_id": "1", "age": "24", "gender": "M", "occupation": "technician"},
        {"user_id": "2", "age": "53", "gender": "F", "occupation": "other"},
    ]
    assert "85711" not in (out / "users.csv").read_text(), "no zip codes"
    assert manifest["items_table"] and manifest["users_table"]


def test_movielens_1m_latin1_users_and_occupation_names(tmp_path):
    src = tmp_path / "ml1m"
    write(src / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978300761\n")
    write(src / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                              "661::Caf\xe9 Society (1996)::Animation|Children's\n", encoding="latin-1")
    write(src / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n", encoding="latin-1")
    out = tmp_path / "out"
    prepare("movielens-1m", str(src), str(out), spans=2)

    spans = assert_ordered_and_complete(out, [("1", "1193", "978300760"), ("2", "1193", "978300761"),
                                              ("1", "661", "978302109")])
    assert [len(rows) for rows in spans.values()] == [2, 1]
    assert labels(spans) == {("1", "1193"): "1", ("2", "1193"): "1", ("1", "661"): "0"}
    assert read_csv(out / "items.csv") == [
        {"item_id": "1193", "genres": "Drama", "year": "1975"},
        {"item_id": "661", "genres": "Animation|Children's", "year": "1996"},
    ]
    assert read_csv(out / "users.csv") == [
        {"user_id": "1", "age": "1", "gender": "F", "occupation": "K-12 student"},
        {"user_id": "2", "age": "56", "gender": "M", "occupation": "self-employed"},
    ]
    assert "48067" not in (out / "users.csv").read_text(), "no zip codes"


def test_generic_csv_keeps_features_quoting_ids_and_side_tables(tmp_path):
    src = tmp_path / "raw"
    write(src / "interactions.csv", 'user_id,item_id,timestamp,rating,device,note\n'
                                    'u1,007,5,4.5,phone,"hello, ""world"""\n'
                                    'u2,i2,3,1,web,"two\nlines"\n'
                                    'u1,i2,4,4,web,\n')
    write(src / "items.csv", 'item_id,genres,blurb\n007,A|B,"spy, British"\ni2,,\n')
    write(src / "users.csv", "country,user_id\nBE,u1\nFR,u2\n")
    out = tmp_path / "out"
    manifest = prepare("csv", str(src / "interactions.csv"), str(out), spans=1, label_threshold=4)

    rows = read_spans(out)[1]
    assert list(rows[0]) == ["user_id", "item_id", "timestamp", "label", "device", "note", *ingest.HISTORY_COLUMNS]
    assert [(r["user_id"], r["item_id"], r["label"], r["device"], r["note"]) for r in rows] == [
        ("u2", "i2", "0", "web", "two\nlines"),
        ("u1", "i2", "1", "web", ""),
        ("u1", "007", "1", "phone", 'hello, "world"'),
    ]
    assert read_csv(out / "items.csv") == [{"item_id": "007", "genres": "A|B", "blurb": "spy, British"},
                                           {"item_id": "i2", "genres": "", "blurb": ""}]
    assert read_csv(out / "users.csv") == [{"country": "BE", "user_id": "u1"}, {"country": "FR", "user_id": "u2"}]
    assert manifest["items_table"] and manifest["users_table"] and manifest["label_threshold"] == 4.0


def test_generic_csv_with_labels_needs_no_threshold(tmp_path):
    src = write(tmp_path / "log.csv", "\ufeffuser_id,item_id,timestamp,label\nu,i,2,1\nv,i,1,0\n")
    manifest = prepare("csv", str(src), str(tmp_path / "out"), spans=2)
    spans = assert_ordered_and_complete(tmp_path / "out", [("v", "i", "1"), ("u", "i", "2")])
    assert labels(spans) == {("v", "i"): "0", ("u", "i"): "1"}
    assert manifest["label_threshold"] is None and manifest["spans"][1]["positives"] == 1
    assert not manifest["items_table"] and not manifest["users_table"]


# --- cutting spans ---

def test_equal_size_spans_follow_array_split(tmp_path):
    rows = [(f"u{i}", f"i{i % 3}", str(1000 - i)) for i in range(23)]
    src = write(tmp_path / "i.csv", "user_id,item_id,timestamp,label\n" +
                "".join(f"{u},{it},{ts},{i % 2}\n" for i, (u, it, ts) in enumerate(rows)))
    manifest = prepare("csv", str(src), str(tmp_path / "out"), spans=4)
    assert [s["rows"] for s in manifest["spans"]] == [6, 6, 6, 5]
    spans = assert_ordered_and_complete(tmp_path / "out", rows)
    assert [len(r) for r in spans.values()] == [6, 6, 6, 5]
    assert [(s["min_timestamp"], s["max_timestamp"]) for s in manifest["spans"]] == [
        (978, 983), (984, 989), (990, 995), (996, 1000)]
    assert sum(s["positives"] for s in manifest["spans"]) == 11


def test_equal_timestamps_keep_source_order_across_a_cut(tmp_path):
    # 60 rows at two timestamps, listed out of time order: a stable sort keeps each
    # timestamp's rows in file order, so the cut falls at a predictable row.
    lines = [f"u{i},i,{200 if i % 2 else 100},1\n" for i in range(60)]
    src = write(tmp_path / "i.csv", "user_id,item_id,timestamp,label\n" + "".join(lines))
    prepare("csv", str(src), str(tmp_path / "out"), spans=3)
    spans = read_spans(tmp_path / "out")
    order = [r["user_id"] for rows in spans.values() for r in rows]
    assert order == [f"u{i}" for i in range(0, 60, 2)] + [f"u{i}" for i in range(1, 60, 2)]
    assert [r["user_id"] for r in spans[2]][:2] == ["u40", "u42"]


@pytest.mark.parametrize("span_by,timestamps,expected", [
    # Last second of a UTC day and first of the next fall apart; days without data make no span.
    ("day", [86399, 0, 86400, 5 * 86400 + 7, 86400 + 3600], [[0, 86399], [86400, 90000], [432007]]),
    ("hour", [3599, 3600, 0, 7199, 36000], [[0, 3599], [3600, 7199], [36000]]),
])
def test_span_by_day_and_hour_boundaries(tmp_path, span_by, timestamps, expected):
    src = write(tmp_path / "i.csv", "user_id,item_id,timestamp,label\n" +
                "".join(f"u{i},x,{t},1\n" for i, t in enumerate(timestamps)))
    manifest = prepare("csv", str(src), str(tmp_path / span_by), span_by=span_by)
    spans = assert_ordered_and_complete(tmp_path / span_by, [(f"u{i}", "x", str(t))
                                                             for i, t in enumerate(timestamps)])
    assert [[int(r["timestamp"]) for r in rows] for rows in spans.values()] == expected
    assert [s["span"] for s in manifest["spans"]] == list(range(1, len(expected) + 1))
    assert [(s["min_timestamp"], s["max_timestamp"]) for s in manifest["spans"]] == [(e[0], e[-1]) for e in expected]


def test_overwrite_is_refused_then_replaces_every_old_span(tmp_path):
    src = write(tmp_path / "i.csv", "user_id,item_id,timestamp,label\nu,i,1,1\nv,i,2,0\nw,i,3,0\n")
    out = tmp_path / "out"
    prepare("csv", str(src), str(out), spans=3)
    with pytest.raises(ingest.IngestError, match=r"already holds spans \[1, 2, 3\]; pass --overwrite"):
        prepare("csv", str(src), str(out), spans=1)
    assert ingest.span_dirs(str(out)) == [1, 2, 3], "a refused run changes nothing"
    assert prepare("csv", str(src), str(out), spans=1, overwrite=True)["spans"][0]["rows"] == 3
    assert ingest.span_dirs(str(out)) == [1], "no stale span-2/span-3 left behind"
    assert json.loads((out / "manifest.json").read_text())["rows"] == 3


def test_out_dir_without_spans_is_used_and_created(tmp_path):
    src = write(tmp_path / "i.csv", "user_id,item_id,timestamp,label\nu,i,1,1\n")
    write(tmp_path / "existing" / "notes.txt", "mine\n")
    prepare("csv", str(src), str(tmp_path / "existing"), spans=1)
    prepare("csv", str(src), str(tmp_path / "new" / "deeper"), spans=1)
    assert (tmp_path / "existing" / "notes.txt").read_text() == "mine\n"
    assert ingest.span_dirs(str(tmp_path / "new" / "deeper")) == [1]


def test_span_dirs_lists_numbers_sorted(tmp_path):
    for name in ("span-10", "span-2", "span-1", "span-x", "spans-3"):
        (tmp_path / name).mkdir()
    write(tmp_path / "span-4", "a file, not a span\n")
    assert ingest.span_dirs(str(tmp_path)) == [1, 2, 10]
    assert ingest.span_dirs(str(tmp_path / "missing")) == []


# --- errors name the file, the line and the column ---

HEADER = "user_id,item_id,timestamp,label\n"


@pytest.mark.parametrize("body,message", [
    ("user_id,item_id,label\nu,i,1\n", r"i\.csv, line 1: missing required column\(s\) timestamp"),
    ("user_id,item_id,timestamp\nu,i,1\n", r"i\.csv, line 1: needs a 'label' \(0/1\) or a 'rating' column"),
    ("user_id,item_id,timestamp,label,x,x\nu,i,1,1,a,b\n", r"i\.csv, line 1: duplicate column name\(s\) x"),
    (HEADER + "u,i,noon,1\n", r"i\.csv, line 2, column timestamp: 'noon' is not an integer"),
    (HEADER + "u,i,1.5,1\n", r"i\.csv, line 2, column timestamp: '1\.5' is not an integer"),
    (HEADER + "u,i,1,1\nu,i,2,yes\n", r"i\.csv, line 3, column label: 'yes' is not 0 or 1"),
    (HEADER + "u,i,1,1\nu,i,2,2\n", r"i\.csv, line 3, column label: '2' is not 0 or 1"),
    (HEADER + "u,i,1\n", r"i\.csv, line 2: expected 4 fields, found 3"),
    (HEADER + "u,i,1,1,extra\n", r"i\.csv, line 2: expected 4 fields, found 5"),
    (HEADER + ",i,1,1\n", r"i\.csv, line 2, column user_id: empty user_id"),
    (HEADER + "u, ,1,1\n", r"i\.csv, line 2, column item_id: empty item_id"),
    ("user_id,item_id,timestamp,rating\nu,i,1,great\n", r"i\.csv, line 2, column rating: 'great' is not a number"),
    ("user_id,item_id,timestamp,rating\nu,i,1,nan\n", r"i\.csv, line 2, column rating: 'nan' is not a number"),
    # Records on lines 2-3 and 4-5 hold a newline; the error names the line the bad one starts on.
    ("user_id,item_id,timestamp,label,note\nu,i,1,1,\"a\nb\"\nu,i,x,1,\"c\nd\"\n", r"i\.csv, line 4, column timestamp"),
])
def test_generic_csv_errors_name_file_line_and_column(tmp_path, body, message):
    src = write(tmp_path / "i.csv", body)
    with pytest.raises(ingest.IngestError, match=message):
        prepare("csv", str(src), str(tmp_path / "out"), spans=1,
                label_threshold=3 if "rating" in body.split("\n")[0] else None)
    assert not (tmp_path / "out").exists(), "nothing is written for bad input"


@pytest.mark.parametrize("fmt,files,message", [
    ("movietweetings", {"ratings.dat": "1::0000001::8::5\n1::0000002::8\n"},
     r"ratings\.dat, line 2: expected 4 fields separated by '::', found 3"),
    ("movietweetings", {"ratings.dat": "1::0000001::8::5\n\n1::0000002::8::soon\n"},
     r"ratings\.dat, line 3, column timestamp: 'soon'"),
    ("movietweetings", {"ratings.dat": "1::0000001::8::5\n", "movies.dat": "0000001::A (2000)::Drama::x\n"},
     r"movies\.dat, line 1: expected 2 or 3 fields"),
    ("movietweetings", {"ratings.dat": "1::0000001::8::5\n",
                        "movies.dat": "0000001::A (2000)::Drama\n0000001::B (2001)::Drama\n"},
     r"movies\.dat, line 2, column item_id: duplicate item_id '0000001' \(first on line 1\)"),
    ("movielens", {"ratings.csv": "userId,movieId,rating,timestamp\n1,2,four,3\n"},
     r"ratings\.csv, line 2, column rating: 'four' is not a number"),
    ("movielens", {"ratings.csv": "userId,movieId,rating\n1,2,4\n"},
     r"ratings\.csv, line 1: missing required column\(s\) timestamp"),
    ("movielens", {"ratings.csv": "userId,movieId,rating,timestamp\n1,2,4,3\n", "movies.csv": "movieId,title\n"},
     r"movies\.csv, line 1: missing required column\(s\) genres"),
    ("movielens-100k", {"u.data": "1\t2\t4\t3\n1\t\t4\t3\n"}, r"u\.data, line 2, column item_id: empty item_id"),
    ("movielens-100k", {"u.data": "1\t2\t4\t3\n", "u.user": "1|24|M|technician\n"},
     r"u\.user, line 1: expected 5 fields separated by '\|', found 4"),
    ("movielens-1m", {"ratings.dat": "1::2::4::3\n1::2::x::3\n"}, r"ratings\.dat, line 2, column rating: 'x'"),
    ("movielens-1m", {"ratings.dat": "1::2::4::3\n", "users.dat": "1::F::1::10::48067\n::M::1::1::1\n"},
     r"users\.dat, line 2, column user_id: empty user_id"),
    ("csv", {"interactions.csv": HEADER + "u,i,1,1\n", "items.csv": "id,genres\ni,A\n"},
     r"items\.csv, line 1: missing required column\(s\) item_id"),
    ("csv", {"interactions.csv": HEADER + "u,i,1,1\n", "users.csv": "user_id,age\nu,1\nv,2\nu,3\n"},
     r"users\.csv, line 4, column user_id: duplicate user_id 'u' \(first on line 2\)"),
])
def test_adapter_errors_name_file_line_and_column(tmp_path, fmt, files, message):
    for name, text in files.items():
        write(tmp_path / "src" / name, text)
    with pytest.raises(ingest.IngestError, match=message):
        prepare(fmt, str(tmp_path / "src"), str(tmp_path / "out"), spans=1)


def test_argument_errors(tmp_path):
    src = write(tmp_path / "i.csv", HEADER + "u,i,1,1\nv,i,2,0\n")
    out = str(tmp_path / "out")
    with pytest.raises(ingest.IngestError, match="unknown format 'parquet'"):
        prepare("parquet", str(src), out, spans=1)
    with pytest.raises(ingest.IngestError, match="--spans must be at least 1, got 0"):
        prepare("csv", str(src), out, spans=0)
    with pytest.raises(ingest.IngestError, match="cannot cut 2 rows into 3 spans"):
        prepare("csv", str(src), out, spans=3)
    with pytest.raises(ingest.IngestError, match="either --spans or --span-by, not both"):
        prepare("csv", str(src), out, spans=1, span_by="day")
    with pytest.raises(ingest.IngestError, match="--span-by must be day or hour, got 'week'"):
        prepare("csv", str(src), out, span_by="week")
    with pytest.raises(ingest.IngestError, match="r\\.csv: has ratings but no labels; pass --label-threshold"):
        prepare("csv", str(write(tmp_path / "r.csv", "user_id,item_id,timestamp,rating\nu,i,1,4\n")),
                       out, spans=1)
    with pytest.raises(ingest.IngestError, match="nowhere: no such file or directory"):
        prepare("movietweetings", str(tmp_path / "nowhere"), out, spans=1)
    with pytest.raises(ingest.IngestError, match="no ratings.csv in this directory"):
        prepare("movielens", str(tmp_path), out, spans=1)
    with pytest.raises(ingest.IngestError, match="exists and is not a directory"):
        prepare("csv", str(src), str(src), spans=1)
    assert not (tmp_path / "out").exists()


# --- the command line ---

def prepare_command(*argv: str) -> int:
    """`increc prepare ARGV` in this process: the command's own parser and code, without a new interpreter."""
    from pipeline import cli

    args = cli.build_parser().parse_args(["prepare", *argv])
    return args.func(args)


def test_cli_prints_the_cut_appends_and_exits_2_on_bad_input(tmp_path, capsys):
    src = write(tmp_path / "mt" / "ratings.dat", "1::0000001::8::5\n2::0000002::9::86405\n")
    result = increc("prepare", "--format", "movietweetings", "--input", str(src.parent),
                    "--out", str(tmp_path / "data"), "--spans", "2", "--allow-old-timestamps")
    assert "2 rows in 2 spans" in result.stdout and "run 1/1" in result.stderr, "progress goes to stderr"
    assert ingest.span_dirs(str(tmp_path / "data")) == [1, 2]
    write(tmp_path / "more" / "ratings.dat", "3::0000003::8::86405\n4::0000001::2::90000\n")
    assert prepare_command("--append", "--format", "movietweetings", "--input", str(tmp_path / "more"),
                           "--out", str(tmp_path / "data"), "--spans", "1", "--allow-old-timestamps") == 0
    out = capsys.readouterr().out
    assert "span 3: 2 rows, 1 positive" in out and "2 rows in 1 spans under" in out and "3 spans in all" in out
    write(src, "1::0000001::8\n")
    from pipeline import cli

    assert cli.main(["prepare", "--format", "movietweetings", "--input", str(src), "--out", str(tmp_path / "x")]) == 2
    assert "ratings.dat, line 1: expected 4 fields" in capsys.readouterr().err, "a message, not a traceback"


# --- history features ---

def history_of(rows):
    return [[r[c] for c in ingest.HISTORY_COLUMNS] for r in rows]


def test_history_features_see_only_strictly_earlier_interactions(tmp_path):
    src = write(tmp_path / "log.csv", "user_id,item_id,timestamp,rating\n"
                                      "u2,i1,25,4\nu1,i1,10,5\nu1,i2,20,1\nu1,i3,20,2\n")
    prepare("csv", str(src), str(tmp_path / "out"), spans=1, label_threshold=3)
    rows = read_spans(tmp_path / "out")[1]
    assert [(r["user_id"], r["item_id"]) for r in rows] == [("u1", "i1"), ("u1", "i2"), ("u1", "i3"), ("u2", "i1")]
    assert history_of(rows) == [
        ["0.0000", "", "0.0000", "", ""],  # nothing known yet: no count, no mean, no recent item
        # Seen: u1's rating of 5 at t=10 (prior 5), of i1. The other t=20 row is not seen.
        ["0.6931", "5.0000", "0.0000", "5.0000", "i1"],
        ["0.6931", "5.0000", "0.0000", "5.0000", "i1"],
        # Seen: ratings 5, 1, 2 (prior 8/3); i1 once with 5: (5 + 5 * 8/3) / (1 + 5). u2 has no items yet.
        ["0.0000", "2.6667", "0.6931", "3.0556", ""],
    ]
    snapshot = history.newest_snapshot(str(tmp_path / "out"))
    assert snapshot.path == str(tmp_path / "out" / "history" / "after-span-1")
    assert (snapshot.globals.seen, snapshot.globals.total, snapshot.globals.last_timestamp) == (4, 12.0, 25)
    assert snapshot.stats("user", "u1") == (3, 8.0, "i1|i2|i3") and snapshot.stats("item", "i1") == (2, 9.0, "")
    # A client asking about u1 and i1 now gets what the state says after the last interaction.
    assert snapshot.features("u1", "i1") == [
        "1.3863", f"{(8 + 2 * 3) / (3 + 2):.4f}", "1.0986", f"{(9 + 5 * 3) / (2 + 5):.4f}", "i1|i2|i3"]


def test_history_features_average_labels_when_there_are_no_ratings(tmp_path):
    src = write(tmp_path / "log.csv", "user_id,item_id,timestamp,label\nu,a,1,1\nu,b,2,0\nu,c,3,1\n")
    prepare("csv", str(src), str(tmp_path / "out"), spans=1)
    rows = read_spans(tmp_path / "out")[1]
    assert [r["user_history_mean"] for r in rows] == ["", "1.0000", f"{(1 + 2 * 0.5) / (2 + 2):.4f}"]


def test_history_features_can_be_left_out_and_never_overwrite_a_column(tmp_path):
    src = write(tmp_path / "log.csv", "user_id,item_id,timestamp,label\nu,a,1,1\n")
    manifest = prepare("csv", str(src), str(tmp_path / "out"), spans=1, history=False)
    assert list(read_spans(tmp_path / "out")[1][0]) == ["user_id", "item_id", "timestamp", "label"]
    assert manifest["history_features"] == [] and not (tmp_path / "out" / "history").exists()

    clash = write(tmp_path / "clash.csv", "user_id,item_id,timestamp,label,user_history\nu,a,1,1,7\n")
    with pytest.raises(ingest.IngestError, match=r"already has column\(s\) user_history; pass --no-history-features"):
        prepare("csv", str(clash), str(tmp_path / "out2"), spans=1)
    assert not (tmp_path / "out2").exists(), "nothing is written on bad input"
    assert prepare_command("--format", "csv", "--input", str(clash), "--out", str(tmp_path / "out3"),
                           "--spans", "1", "--no-history-features", "--allow-old-timestamps") == 0
    assert read_spans(tmp_path / "out3")[1][0]["user_history"] == "7"


def test_clients_send_the_history_features_as_they_stand_now(tmp_path):
    from pipeline.config import IncrecConfig
    from pipeline.serving_ops import inputs_for

    src = write(tmp_path / "log.csv", "user_id,item_id,timestamp,label\nu,a,1,1\nu,b,2,0\nv,a,3,1\n")
    prepare("csv", str(src), str(tmp_path / "data"), spans=1)
    inputs = inputs_for(IncrecConfig(data_dir=str(tmp_path / "data"), work_dir=str(tmp_path / "work")),
                        [("u", "a"), ("new-user", "new-item")])
    assert set(ingest.HISTORY_COLUMNS) <= set(inputs)
    assert inputs["user_history"].tolist() == pytest.approx([1.0986, 0.0], abs=1e-4)  # u: 2 interactions so far
    assert inputs["item_history_mean"][0] == pytest.approx((2 + 5 * 2 / 3) / (2 + 5), abs=1e-4)
    assert inputs["user_history_mean"][1] == pytest.approx(2 / 3, abs=1e-4), "unknown: the global mean"


# --- timestamps: seconds from 1990 to 2100; other units recognised, the rest refused ---

def test_millisecond_and_microsecond_logs_become_seconds_with_a_note(tmp_path):
    notes = []
    ms = write(tmp_path / "ms.csv", "user_id,item_id,timestamp,label\n"
                                    "u,i,1700000000123,1\nv,i,1700000001999,0\nw,i,1700000005000,1\n")
    manifest = ingest.prepare("csv", str(ms), str(tmp_path / "ms"), spans=1, progress=notes.append)
    assert [r["timestamp"] for r in read_spans(tmp_path / "ms")[1]] == ["1700000000", "1700000001", "1700000005"]
    assert f"note: {ms}, column timestamp: the values are milliseconds since 1970-01-01 UTC; divided by 1,000 " \
           f"to seconds" in notes
    assert manifest["timestamp_unit"] == "milliseconds" and manifest["spans"][0]["max_timestamp"] == 1700000005

    notes.clear()
    src = write(tmp_path / "mt" / "ratings.dat", "1::0000001::8::1700000000000000\n2::0000002::9::1700086400000000\n")
    manifest = ingest.prepare("movietweetings", str(src.parent), str(tmp_path / "us"), spans=2, progress=notes.append)
    assert [s["min_timestamp"] for s in manifest["spans"]] == [1700000000, 1700086400]
    assert manifest["ingests"][-1]["timestamp_unit"] == "microseconds"
    assert any("microseconds since 1970-01-01 UTC; divided by 1,000,000" in n for n in notes)


@pytest.mark.parametrize("stamp,message", [
    ("1700000000000", r"line 2, column timestamp: 1700000000000 looks like milliseconds, but the column's first "
                      r"value \(line 1\) is in seconds; give every timestamp in the same unit"),
    ("-5", r"line 2, column timestamp: -5 is negative; timestamps are seconds since 1970-01-01 UTC"),
    ("12345678901234567890", r"line 2, column timestamp: 12345678901234567890 is not a time between 1990-01-01 "
                             r"and 2100-01-01 in seconds"),
    ("5000000000", r"line 2, column timestamp: 5000000000 is not a time between 1990-01-01 and 2100-01-01"),
    ("86400", r"line 2, column timestamp: 86400 is before 1990-01-01 \(631152000\); if the log really is that old, "
              r"pass --allow-old-timestamps"),
])
def test_timestamps_out_of_range_or_in_another_unit_are_refused(tmp_path, stamp, message):
    src = write(tmp_path / "mt" / "ratings.dat", f"1::0000001::8::1700000000\n2::0000002::9::{stamp}\n")
    with pytest.raises(ingest.IngestError, match=r"ratings\.dat, " + message):
        ingest.prepare("movietweetings", str(src.parent), str(tmp_path / "out"), spans=1)
    assert not (tmp_path / "out").exists()


def test_the_streamed_csv_refuses_a_mix_of_units_naming_the_line(tmp_path):
    src = write(tmp_path / "i.csv", "user_id,item_id,timestamp,label\nu,i,1700000000,1\nv,i,1700000000000,0\n"
                                    "w,i,-1,0\n")
    with pytest.raises(ingest.IngestError, match=r"i\.csv, line 3, column timestamp: 1700000000000 looks like "
                                                 r"milliseconds(.|\n)*i\.csv, line 4, column timestamp: -1 is negative"):
        ingest.prepare("csv", str(src), str(tmp_path / "out"), spans=1)
    assert not (tmp_path / "out").exists()


def test_old_timestamps_pass_with_the_flag_and_a_label_column_takes_no_threshold(tmp_path):
    src = write(tmp_path / "mt" / "ratings.dat", "1::0000001::8::86400\n2::0000002::9::0\n")
    manifest = ingest.prepare("movietweetings", str(src.parent), str(tmp_path / "out"), spans=1,
                              allow_old_timestamps=True)
    assert (manifest["spans"][0]["min_timestamp"], manifest["spans"][0]["max_timestamp"]) == (0, 86400)
    with pytest.raises(ingest.IngestError, match=r"-1 is negative"):  # negative ones never
        ingest.prepare("movietweetings", str(write(tmp_path / "neg" / "ratings.dat", "1::0000001::8::-1\n").parent),
                       str(tmp_path / "neg-out"), spans=1, allow_old_timestamps=True)
    labelled = write(tmp_path / "l.csv", "user_id,item_id,timestamp,label\nu,i,1700000000,1\n")
    with pytest.raises(ingest.IngestError, match=r"l\.csv, line 1: has a 'label' column already; --label-threshold "
                                                 r"turns ratings into labels"):
        ingest.prepare("csv", str(labelled), str(tmp_path / "l"), spans=1, label_threshold=4)
    with pytest.raises(ingest.IngestError, match=r"--start 1704067200000 looks like milliseconds"):
        ingest.prepare("synthetic", None, str(tmp_path / "s"), spans=1,
                       synthetic_spec=ingest.synthetic.Spec(rows=10, users=2, items=2, start=1704067200000))


def test_recent_items_with_commas_and_quotes_read_back_whole(tmp_path):
    src = write(tmp_path / "log.csv", 'user_id,item_id,timestamp,label\nu,"a,1",1,1\nu,"say ""hi""",2,0\nu,c,3,1\n')
    prepare("csv", str(src), str(tmp_path / "out"), spans=1)
    rows = read_spans(tmp_path / "out")[1]
    assert [r["user_recent_items"] for r in rows] == ["", "a,1", 'a,1|say "hi"']
