"""Bad input is refused before anything runs: exit 2 (1 for a busy work directory), one line naming the flag,
key, file, line or column, no traceback, and nothing written.

Every case here fails before TensorFlow or TFX is imported, so the file runs
in seconds: the real CLI in subprocesses for what a user types, and, for the
saved config's lifecycle (which only a run that passes every check reaches),
the CLI in this process with the pipeline run replaced by a stub.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from tests.conftest import increc, write_span

GOOD_ROWS = [[f"u{i % 5}", f"i{i % 7}", 1_700_000_000 + i, i % 2] for i in range(30)]
SCHEMA = "".join(f'feature {{ name: "{name}" type: {kind} }}\n' for name, kind in [
    ("user_id", "BYTES"), ("item_id", "BYTES"), ("timestamp", "INT"), ("label", "INT"),
    ("genres", "BYTES"), ("year", "INT")])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """DATA: spans 1-2 of good rows and an items table (genres, year)."""
    data = tmp_path_factory.mktemp("data")
    for span in (1, 2):
        write_span(data, span, GOOD_ROWS)
    (data / "items.csv").write_text("item_id,genres,year\n" + "".join(f"i{i},Drama,200{i}\n" for i in range(7)))
    return data


@pytest.fixture
def deployment(tmp_path, data) -> Path:
    """WORK of a deployment that ran span 1: saved settings and the curated schema."""
    work = tmp_path / "work"
    (work / "schema").mkdir(parents=True)
    (work / "schema" / "schema.pbtxt").write_text(SCHEMA)
    (work / "config.json").write_text(json.dumps({"data_dir": str(data), "epochs": 2, "serving_address": ""},
                                                 indent=2, sort_keys=True) + "\n")
    return work


def refused(*args: str, status: int = 2) -> str:
    """Runs `increc ARGS`; asserts it was refused with `status`, one line and no traceback; returns the line."""
    result = increc(*args, check=False, timeout=120)
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def run_args(data: Path, work: Path, *extra: str):
    return ("run", "--data", str(data), "--work", str(work), "--span", "1", "--no-progress", *extra)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"settings-{len(list(tmp_path.glob('settings-*.json')))}.json"
    path.write_text(text)
    return path


# --- flags and --config: each refused with its name, and no work directory made ---

@pytest.mark.parametrize("flags,message", [
    (["--epochs", "-1"], "--epochs must be an integer >= 1, got -1"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--learning-rate", "0"], "--learning-rate must be a number > 0"),
    (["--learning-rate", "nan"], "--learning-rate must be a number > 0, got NaN"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--replay-fraction", "-0.5"], "--replay-fraction must be a number >= 0"),
    (["--bad-row-budget", "1.5"], "--bad-row-budget must be a number in [0, 1)"),
    (["--auc-tolerance", "inf"], "--auc-tolerance must be a number in [0, 1]"),
    (["--gate-confidence", "1"], "--gate-confidence must be a number in [0.5, 1), got 1.0"),
    (["--gate-confidence", "0.3"], "--gate-confidence must be a number in [0.5, 1), got 0.3"),
    (["--rollback-confidence", "nan"], "--rollback-confidence must be a number in [0.5, 1), got NaN"),
    (["--gate-confidence", "high"], "argument --gate-confidence: invalid float value: 'high'"),
    (["--keep-versions", "0"], "--keep-versions must be an integer >= 1"),
    (["--serving-address", "nowhere"], "--serving-address must be host:port"),
    (["--model-name", "../other"], "--model-name must be a name of letters"),
    (["--optimizer", "sgd"], "--optimizer must be one of adagrad, adam"),
    (["--epochs", "2.5"], "argument --epochs: invalid int value: '2.5'"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
    (["--epochs", "99999999999"], "--epochs must be at most 2147483647, got 99999999999"),
    (["--config", ""], "argument --config: must be a non-empty path"),
])
def test_bad_flags_are_refused_by_name(data, tmp_path, flags, message):
    work = tmp_path / "work"
    assert message in refused(*run_args(data, work, *flags))
    assert not work.exists(), "a refused run creates nothing"


@pytest.mark.parametrize("text,message", [
    ('{"epochs": "two"}', 'epochs must be an integer >= 1, got "two"'),
    ('{"epochs": true}', "epochs must be an integer >= 1, got true"),
    ('{"epochs": -1}', "epochs must be an integer >= 1, got -1"),
    ('{"learning_rate": 0}', "learning_rate must be a number > 0, got 0"),
    ('{"learning_rate": NaN}', "learning_rate must be a number > 0, got NaN"),
    ('{"deep_layers": [64, 0]}', "deep_layers must be a list of layer widths"),
    ('{"deep_layers": 64}', "deep_layers must be a list of layer widths"),
    ('{"eval_fraction": 1}', "eval_fraction must be a number in (0, 1)"),
    ('{"distillation_weight": 1}', "distillation_weight must be a number in [0, 1)"),
    ('{"id_bias": "yes"}', 'id_bias must be true or false, got "yes"'),
    ('{"beam_args": "--runner=X"}', "beam_args must be a list of Beam pipeline options or null"),
    ('{"mode": "fast"}', 'mode must be one of incremental, full, got "fast"'),
    ('{"seed": -3}', "seed must be an integer >= 0"),
    ('{"gate_confidence": 1.5}', "gate_confidence must be a number in [0.5, 1), got 1.5"),
    ('{"gate_confidence": 0}', "gate_confidence must be a number in [0.5, 1), got 0"),
    ('{"rollback_confidence": "high"}', 'rollback_confidence must be a number in [0.5, 1), got "high"'),
    ('{"epoch": 2}', "unknown key 'epoch' (did you mean 'epochs'?)"),
    ('{"data_dir": "/elsewhere"}', "data_dir is given by --data"),
    ('{"work_dir": "/elsewhere"}', "work_dir is given by --work"),
    ("[1, 2]", "must hold a JSON object of settings"),
    ('"epochs"', "must hold a JSON object of settings"),
    ("epochs: 2\n", "not JSON (line 1, column 1: Expecting value)"),
    ('{"epochs": 2,\n "seed": }', "not JSON (line 2, column 10: Expecting value)"),
    ("", "not JSON (line 1, column 1"),
])
def test_bad_config_files_name_the_file_and_the_key(data, tmp_path, text, message):
    path = write_config(tmp_path, text)
    line = refused(*run_args(data, tmp_path / "work", "--config", str(path)))
    assert line.startswith(f"increc: --config {path}: ") and message in line, line
    assert not (tmp_path / "work").exists()


def test_config_file_that_cannot_be_read(data, tmp_path):
    assert "no such file" in refused(*run_args(data, tmp_path / "work", "--config", str(tmp_path / "none.json")))
    assert "is a directory" in refused(*run_args(data, tmp_path / "work", "--config", str(tmp_path)))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"model_name": "caf\xe9"}')
    assert f"--config {latin}: not UTF-8 text" in refused(*run_args(data, tmp_path / "work", "--config", str(latin)))


# --- the data directory, its spans and columns ---

def test_data_and_spans_must_exist(data, tmp_path):
    work = tmp_path / "work"
    assert "argument --data: must be a non-empty path" in refused(*run_args("", work))
    assert "argument --work: must be a non-empty path" in refused(*run_args(data, ""))
    assert f"--data {tmp_path / 'none'}: no such directory" in refused(*run_args(tmp_path / "none", work))
    assert "no span 5 (span-<N>/ directories there: 1-2)" in refused(
        "run", "--data", str(data), "--work", str(work), "--span", "5")
    assert "no spans 3-4 (span-<N>/ directories there: 1-2)" in refused(
        "backfill", "--data", str(data), "--work", str(work), "--spans", "1-4")
    assert "argument --span: must be a span number >= 1, got 0" in refused(
        "run", "--data", str(data), "--work", str(work), "--span", "0")
    assert "argument --spans: span range '3-1'" in refused(
        "backfill", "--data", str(data), "--work", str(work), "--spans", "3-1")
    assert not work.exists()


def test_span_files_are_checked_before_tfx(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    (data / "span-1").mkdir(parents=True)
    assert "no *.csv files in span 1" in refused(*run_args(data, work))
    path = write_span(data, 1, [["u", "i", "1700000000"]], header=("user_id", "item_id", "timestamp"))
    assert f"{path}, line 1: missing required column(s) label" in refused(*run_args(data, work))
    path.write_text("")
    assert f"{path}: the file is empty" in refused(*run_args(data, work))
    path.write_text("user_id,item_id,timestamp,label,x,x\nu,i,1700000000,1,a,b\n")
    assert f"{path}, line 1: duplicate column name(s) x" in refused(*run_args(data, work))
    path.write_text("user_id,item_id,timestamp,label\n")
    assert "span 1 has no rows" in refused(*run_args(data, work))
    assert not work.exists()


def test_columns_must_match_the_deployments_schema(data, deployment, tmp_path):
    saved = (deployment / "config.json").read_bytes()
    other = tmp_path / "other"
    (other / "items.csv").parent.mkdir()
    (other / "items.csv").write_text((data / "items.csv").read_text())
    extra = write_span(other, 1, [r + ["web"] for r in GOOD_ROWS], header=("user_id", "item_id", "timestamp",
                                                                              "label", "device"))
    line = refused(*run_args(other, deployment))
    assert f"{extra}, line 1: column 'device' is not in the schema ({deployment / 'schema' / 'schema.pbtxt'})" in line
    (other / "items.csv").write_text("item_id,genres\ni1,Drama\n")  # the catalog lost its year
    write_span(other, 1, GOOD_ROWS)
    assert "line 1: no column 'year', which the schema" in refused(*run_args(other, deployment))
    (other / "users.csv").write_text("user_id,age\nu1,30\n")
    (other / "items.csv").write_text((data / "items.csv").read_text())
    assert f"{other / 'users.csv'}, line 1: column 'age' is not in the schema" in refused(*run_args(other, deployment))
    assert (deployment / "config.json").read_bytes() == saved


def test_spans_of_a_first_backfill_must_share_the_first_spans_columns(data, tmp_path):
    other = tmp_path / "other"
    write_span(other, 1, GOOD_ROWS)
    path = write_span(other, 2, [r + ["web"] for r in GOOD_ROWS], header=("user_id", "item_id", "timestamp",
                                                                         "label", "device"))
    line = refused("backfill", "--data", str(other), "--work", str(tmp_path / "work"), "--spans", "1-2")
    assert f"{path}, line 1: column 'device' is not in span 1's columns" in line


@pytest.mark.parametrize("table,message", [
    ("item,genres\ni1,Drama\n", "items.csv, line 1: missing required column(s) item_id"),
    ("item_id,genres\ni1,Drama\ni2,Comedy\ni1,Horror\n",
     "items.csv, line 4, column item_id: duplicate item_id 'i1' (first on line 2)"),
    ("item_id,genres\ni1,Drama\n ,Comedy\n", "items.csv, line 3, column item_id: empty item_id"),
    ("item_id,genres\ni1,Drama,extra\n", "items.csv, line 2: expected 2 fields, found 3"),
])
def test_side_tables_are_read_before_tfx(tmp_path, table, message):
    data = tmp_path / "data"
    write_span(data, 1, GOOD_ROWS)
    (data / "items.csv").write_text(table)
    assert message in refused(*run_args(data, tmp_path / "work"))


def test_ignored_features_must_name_features(data, tmp_path):
    path = write_config(tmp_path, '{"ignored_features": ["yeer"]}')
    assert "ignored_features names 'yeer', which is not a side feature of the data (features: genres, year)" in \
        refused(*run_args(data, tmp_path / "work", "--config", str(path)))


def test_paths_a_run_writes_are_checked_first(data, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert f"--work {a_file}: exists and is not a directory" in refused(*run_args(data, a_file))
    assert f"--work {a_file / 'work'}: cannot be created ({a_file} is not a directory)" in \
        refused(*run_args(data, a_file / "work"))
    assert "argument --report: must be a non-empty path" in refused(
        "backfill", "--data", str(data), "--work", str(tmp_path / "work"), "--spans", "1-2", "--report", "")
    assert f"--report {tmp_path}: is a directory" in refused(
        "backfill", "--data", str(data), "--work", str(tmp_path / "work"), "--spans", "1-2", "--report", str(tmp_path))
    path = write_config(tmp_path, '{"metadata": "gs://bucket/metadata.sqlite"}')
    assert "metadata must be a local file path" in refused(*run_args(data, tmp_path / "w2", "--config", str(path)))
    assert not (tmp_path / "work").exists() and not (tmp_path / "w2").exists()


# --- the saved settings: bad ones named, never changed by a refused run ---

def test_a_broken_saved_config_is_named(data, deployment):
    path = deployment / "config.json"
    path.write_text('{"epochs": 0}')
    assert f"{path}: epochs must be an integer >= 1, got 0" in refused(*run_args(data, deployment))
    path.write_text('{"epochs": 2,')
    assert f"{path}: not JSON (line 1, column 14" in refused(*run_args(data, deployment))
    path.write_text('{"mode": "full"}')
    assert f"{path}: mode is a per-run setting and is never saved" in refused(*run_args(data, deployment))
    assert f"{path}: mode is a per-run setting" in refused("status", "--work", str(deployment))


def test_a_refused_run_leaves_the_saved_config_as_it_was(data, deployment, tmp_path):
    saved = (deployment / "config.json").read_bytes()
    refused(*run_args(data, deployment, "--epochs", "-1"))
    refused(*run_args(tmp_path / "missing", deployment, "--epochs", "7"))
    refused(*run_args(data, deployment, "--config", str(write_config(tmp_path, '{"epochs": "two"}'))))
    assert (deployment / "config.json").read_bytes() == saved
    assert sorted(p.name for p in deployment.iterdir()) == ["config.json", "schema"]


def test_a_run_refused_by_the_lock_changes_nothing(data, deployment):
    saved = (deployment / "config.json").read_bytes()
    with open(deployment / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds the deployment
        line = refused(*run_args(data, deployment, "--epochs", "7"), status=1)
        assert f"another increc command holds {deployment}" in line
        assert "holds" in refused("config", "--work", str(deployment), "--set", "epochs=3", status=1)
    assert (deployment / "config.json").read_bytes() == saved


# --- commands that read a deployment refuse a missing one and create nothing ---

@pytest.mark.parametrize("command", [
    ["status"], ["history"], ["rollback"], ["up"], ["down"], ["predict", "--user", "1", "--item", "2"],
    ["recommend", "--user", "1"], ["config"], ["config", "--set", "epochs=3"], ["tensorboard"],
])
def test_reading_commands_refuse_a_missing_work_directory(tmp_path, command):
    work = tmp_path / "no-such-work"
    line = refused(command[0], "--work", str(work), *command[1:])
    assert f"--work {work}: no such directory (nothing is deployed there)" in line
    assert not work.exists()


def test_other_flags_of_reading_commands(deployment):
    assert "argument --port: must be a port from 1 to 65535, got 70000" in refused(
        "up", "--work", str(deployment), "--port", "70000")
    assert "--port and --rest-port are both 8600" in refused(
        "up", "--work", str(deployment), "--port", "8600", "--rest-port", "8600")
    assert "--address must be host:port" in refused(
        "predict", "--work", str(deployment), "--user", "1", "--item", "2", "--address", "nowhere")
    assert "--address must be host:port" in refused(
        "recommend", "--work", str(deployment), "--user", "1", "--address", "nowhere")
    for k in ("0", "1001", "ten"):
        assert "argument -k: must be an integer from 1 to 1000, got" in refused(
            "recommend", "--work", str(deployment), "--user", "1", "-k", k)
    assert "argument --to: must be a version number >= 0, got -1" in refused(
        "rollback", "--work", str(deployment), "--to", "-1")
    assert f"--data {deployment / 'gone'}: no such directory" in refused(
        "up", "--work", str(deployment), "--data", str(deployment / "gone"))


# --- increc config ---

def test_config_shows_the_settings_and_which_are_defaults(deployment, data):
    out = increc("config", "--work", str(deployment)).stdout
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.startswith("  ")}
    assert lines["epochs"].split()[1:] == ["2", "(default)"]
    assert lines["data_dir"].split()[1:] == [json.dumps(str(data))]
    assert "(default: not in config.json)" in lines["learning_rate"]
    assert "mode" not in lines and "work_dir" not in lines
    assert json.loads(increc("config", "--work", str(deployment), "--json").stdout)["epochs"] == 2


def test_config_set_checks_each_value_and_writes_the_file_whole(deployment, data):
    path = deployment / "config.json"
    out = increc("config", "--work", str(deployment), "--set", "epochs=3", "--set", "deep_layers=16,8",
                 "--set", "learning_rate=0.05", "--set", "beam_args=null", "--set", "id_bias=false").stdout
    assert "epochs: 2 -> 3" in out and "deep_layers: [64, 32] -> [16, 8]" in out
    saved = json.loads(path.read_text())
    assert (saved["epochs"], saved["deep_layers"], saved["learning_rate"], saved["id_bias"]) == (3, [16, 8], 0.05,
                                                                                                   False)
    assert saved["data_dir"] == str(data) and "mode" not in saved and "work_dir" not in saved
    before = path.read_bytes()
    for setting, message in [
        ("epoch=3", "--set epoch=3: unknown key 'epoch' (did you mean 'epochs'?)"),
        ("epochs=-3", "--set epochs=-3: epochs must be an integer >= 1, got -3"),
        ("epochs=two", '--set epochs=two: epochs must be an integer >= 1, got "two"'),
        ("learning_rate=0", "--set learning_rate=0: learning_rate must be a number > 0"),
        ("serving_address=nowhere", "serving_address must be host:port"),
        ("mode=full", "--set mode=full: mode is a per-run setting and is never saved"),
        ("force_push=true", "force_push is a per-run setting"),
        ("work_dir=/x", "the work directory is where config.json lives"),
        ("epochs", "--set epochs: expected key=value"),
        (f"data_dir={deployment / 'gone'}", f"--set data_dir {deployment / 'gone'}: no such directory"),
    ]:
        assert message in refused("config", "--work", str(deployment), "--set", setting), setting
    assert path.read_bytes() == before, "a refused --set writes nothing"


def test_config_set_needs_a_deployment_that_ran(tmp_path):
    (tmp_path / "fresh").mkdir()
    assert "the first run or backfill" in refused("config", "--work", str(tmp_path / "fresh"), "--set", "epochs=3")
    assert "no settings saved" in increc("config", "--work", str(tmp_path / "fresh")).stdout
    assert sorted(os.listdir(tmp_path / "fresh")) == []


# --- increc prepare: flags and the input's header, before Beam ---

def test_prepare_flags_and_header_are_checked_before_beam(tmp_path):
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("user_id,item_id,timestamp,label\nu,i,1700000000,1\n")
    out = tmp_path / "out"
    common = ("prepare", "--out", str(out))
    assert f"{labelled}, line 1: has a 'label' column already; --label-threshold turns ratings into labels" in \
        refused(*common, "--format", "csv", "--input", str(labelled), "--label-threshold", "4")
    assert "--label-threshold must be a finite number, got nan" in refused(
        *common, "--format", "movietweetings", "--input", str(labelled), "--label-threshold", "nan")
    assert f"--input {tmp_path / 'none'}: no such file or directory" in refused(
        *common, "--format", "movietweetings", "--input", str(tmp_path / "none"))
    assert "--spans must be at least 1, got 0" in refused(*common, "--format", "csv", "--input", str(labelled),
                                                          "--spans", "0")
    assert "--start 1704067200000 looks like milliseconds; give seconds since 1970-01-01 UTC (1704067200)" in \
        refused(*common, "--format", "synthetic", "--start", "1704067200000")
    assert "--start -5 is negative" in refused(*common, "--format", "synthetic", "--start", "-5")
    assert "--start 86400 is before 1990-01-01 (631152000); if the log really is that old, pass " \
           "--allow-old-timestamps" in refused(*common, "--format", "synthetic", "--start", "86400")
    assert "the log would run past 2100-01-01" in refused(*common, "--format", "synthetic", "--start", "4102000000")
    assert "--days must be a positive number, got inf" in refused(*common, "--format", "synthetic", "--days", "inf")
    assert "--rows must be at least 1, got 0" in refused(*common, "--format", "synthetic", "--rows", "0")
    assert "argument --out: must be a non-empty path" in refused("prepare", "--format", "synthetic", "--out", "")
    rated = tmp_path / "rated.csv"
    rated.write_text("user_id,item_id,timestamp,rating\nu,i,1700000000,4\n")
    assert "has ratings but no labels; pass --label-threshold" in refused(
        *common, "--format", "csv", "--input", str(rated))
    assert not out.exists()


# --- a run that passes every check: the settings' lifecycle (the pipeline run itself stubbed) ---

@pytest.fixture
def stub_runs(monkeypatch):
    """Replaces the pipeline run in this process's CLI; returns the configs the runs would have used."""
    from pipeline import cli

    seen = []

    def run_spans(config, spans, show_progress=True, **options):
        seen.append(config)
        return [{"span": span, "status": "ok", "live_auc": None} for span in spans]

    monkeypatch.setattr(cli, "run_spans", run_spans)
    return seen


def test_the_first_run_saves_the_settings_and_later_flags_are_one_off(data, tmp_path, stub_runs, capsys):
    from pipeline import cli

    work = tmp_path / "work"
    first = write_config(tmp_path, '{"epochs": 1, "replay_fraction": 0.0, "flip_train_labels": true}')
    assert cli.main([*run_args(data, work, "--config", str(first), "--learning-rate", "0.05", "--force",
                               "--mode", "full")]) == 0
    saved = json.loads((work / "config.json").read_text())
    assert (saved["epochs"], saved["replay_fraction"], saved["learning_rate"]) == (1, 0.0, 0.05)
    assert saved["data_dir"] == str(data)
    assert not {"mode", "force_push", "flip_train_labels", "work_dir"} & set(saved), "one-off switches stay one-off"
    assert stub_runs[-1].force_push and stub_runs[-1].flip_train_labels and stub_runs[-1].mode == "full"
    assert "settings are saved in" in capsys.readouterr().err

    before = (work / "config.json").read_bytes()
    assert cli.main([*run_args(data, work, "--epochs", "7", "--config",
                               str(write_config(tmp_path, '{"seed": 3}')))]) == 0
    assert (stub_runs[-1].epochs, stub_runs[-1].seed, stub_runs[-1].learning_rate) == (7, 3, 0.05)
    assert not stub_runs[-1].force_push and stub_runs[-1].mode == "incremental"
    assert cli.main(["backfill", "--data", str(data), "--work", str(work), "--spans", "1-2", "--no-progress"]) == 0
    assert stub_runs[-1].epochs == 1, "the saved settings again"
    assert (work / "config.json").read_bytes() == before, "later runs never write the settings"


def test_another_data_directory_is_one_off_with_a_note(data, deployment, tmp_path, stub_runs, capsys):
    from pipeline import cli

    other = tmp_path / "other"
    write_span(other, 1, GOOD_ROWS)
    (other / "items.csv").write_text((data / "items.csv").read_text())
    before = (deployment / "config.json").read_bytes()
    assert cli.main([*run_args(other, deployment)]) == 0
    assert stub_runs[-1].data_dir == str(other)
    err = capsys.readouterr().err
    assert f"note: --data {other} is used for this command only; the deployment's data directory is {data}" in err
    assert (deployment / "config.json").read_bytes() == before


def test_a_backfill_holds_the_lock_across_its_spans(data, tmp_path, monkeypatch):
    from pipeline import cli
    from pipeline.local_runner import work_lock

    work = tmp_path / "work"
    held = []

    def run_spans(config, spans, show_progress=True, **options):
        for span in spans:
            with work_lock(config.work_dir):  # each span's run takes the lock again, re-entrant in this process
                with open(work / ".lock", "w") as other, pytest.raises(BlockingIOError):
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(span)
        return [{"span": span, "status": "ok", "live_auc": None} for span in spans]

    monkeypatch.setattr(cli, "run_spans", run_spans)
    assert cli.main(["backfill", "--data", str(data), "--work", str(work), "--spans", "1-2", "--no-progress",
                     "--report", str(tmp_path / "reports" / "r.json")]) == 0
    assert held == [1, 2] and json.loads((tmp_path / "reports" / "r.json").read_text())["spans"]
    with open(work / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at the end


def test_an_incremental_run_keeps_the_models_shape(data, deployment, tmp_path, stub_runs, capsys):
    from pipeline import cli

    wider = write_config(tmp_path, '{"embedding_dim": 64}')
    assert "embedding_dim 64 differs from the deployment's 32, which the serving model was trained with" in \
        refused(*run_args(data, deployment, "--config", str(wider)))
    assert "oov_buckets 8 differs" in refused(*run_args(data, deployment, "--config",
                                                       str(write_config(tmp_path, '{"oov_buckets": 8}'))))
    assert cli.main([*run_args(data, deployment, "--config", str(wider), "--mode", "full")]) == 0
    assert stub_runs[-1].embedding_dim == 64 and stub_runs[-1].mode == "full"
    capsys.readouterr()
    assert cli.main(["config", "--work", str(deployment), "--set", "embedding_dim=64"]) == 0
    assert "embedding_dim changed the model's shape" in capsys.readouterr().err


def test_every_setting_has_a_rule():
    from pipeline.config import RULES, IncrecConfig, defaults, field_names

    assert set(RULES) == set(field_names()), "a new field needs its type and range in RULES"
    IncrecConfig(data_dir="d", work_dir="w", **defaults())  # the defaults pass their own rules


def test_a_broken_history_file_is_named(deployment):
    (deployment / "history.jsonl").write_text('{"span": 1, "status": "ok"}\n{"span": 2, \n')
    assert f"{deployment / 'history.jsonl'}, line 2: not a JSON record" in refused("history", "--work", str(deployment))
    assert "line 2: not a JSON record" in refused("status", "--work", str(deployment))
