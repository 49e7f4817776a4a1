"""The one config object that carries every knob of an increc deployment.

Defaults serve the bundled demo (MovieTweetings 100K cut into 10 spans) on a
2-core machine. Paths are resolved against the work directory, and nothing is
written outside it.

Every field is checked for its type and range when the object is made
(`check_value`), so a typo in a flag, a `--config` file or `WORK/config.json`
stops a command before anything runs, with a message that names the key.
This module imports nothing heavy: the CLI validates before TensorFlow loads.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Optional

# The training settings, their defaults and rules are defined once, in models/training.py.
from models.training import (  # noqa: F401 - ConfigError and shown are this module's API too
    BOOL, FRACTION, MODE, PATH, TRAINING_RULES, UNIT, ConfigError, Rule, TrainingRun, TrainingSettings, check_with,
    int_rule as _int, number_rule as _number, shown,
)

PER_RUN = ("mode", "force_push", "flip_train_labels")  # one-off switches: never saved with a deployment
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def is_remote(path: str) -> bool:
    """A file-system URL (gs://, s3://, hdfs://, ...) rather than a local path."""
    return "://" in path


def resolve_path(path: str) -> str:
    """Local paths become absolute; URLs stay as they are (abspath would turn gs://b into <cwd>/gs:/b)."""
    return path if is_remote(path) else os.path.abspath(path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IncrecConfig(TrainingSettings):
    data_dir: str
    work_dir: str
    model_name: str = "increc"
    mode: str = "incremental"

    # Ingestion (Beam ExampleGen)
    bad_row_budget: float = 0.001  # fraction of a span's rows that may be dropped as malformed
    eval_fraction: float = 0.1  # the last fraction of a span, by time, is its eval split...
    max_eval_rows: int = 50_000  # ...up to this many rows, so evaluation does not grow with the span

    # Model and training: the fields of TrainingSettings (models/training.py), defaults and rules included.

    # Gates
    # The paired gate (DeLong's test on the eval rows, docs/ARCHITECTURE.md): a candidate is refused when it
    # is worse than the serving model with this confidence, or worse by more than auc_tolerance whatever the
    # evidence. On ~1,000 eval rows an AUC's standard error is ~0.015, so a tighter margin refuses on noise.
    gate_confidence: float = 0.99
    auc_tolerance: float = 0.02  # the practical margin: a larger AUC drop is refused even if not significant
    # A non-inferiority margin: a drop no larger than this is not a refusal even when it is certain. DeLong's
    # test takes each model as fixed, so two trainings of the same data by different seeds (0.001-0.006
    # apart) are "worse with confidence" in a third of spans; with 0.005 every such A/A twin is blessed and
    # every flipped-label candidate refused. (With replay on, twins differed by up to 0.013 and the margin let
    # a worse candidate through; README, "Results".)
    gate_indifference: float = 0.005
    min_auc: float = 0.5  # no candidate worse than chance is blessed, baseline or not
    # Rollback: the same test on the live scores of `stable` and `previous` on span N's rows.
    rollback_confidence: float = 0.99
    rollback_tolerance: float = 0.005  # a larger live AUC drop versus the previous version rolls back
    # Live AUCs are measured on a uniform sample of at most this many of span N's rows: the server
    # scores each one, and 200k rows put an AUC's standard error near 0.001.
    max_live_rows: int = 200_000
    keep_versions: int = 5  # version directories kept on disk

    # Serving
    serving_address: str = "127.0.0.1:8500"
    force_push: bool = False  # push even when not blessed (operators and tests)

    # ML Metadata for the local runner: a sqlite file, WORK/metadata.sqlite by default. sqlite needs a
    # local file, so a work directory on a remote file system (gs://...) needs a local path here.
    metadata: Optional[str] = None

    # Beam: the in-process DirectRunner by default; any Beam pipeline args
    # (multi-processing DirectRunner, Dataflow, Flink, Spark) replace it.
    beam_args: Optional[List[str]] = None

    def __post_init__(self):
        # Every field, its type and its range (ConfigError names the key); ints for floats become floats.
        # Frozen (as TrainingSettings is): normalised values are set once, here.
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, check_value(field.name, getattr(self, field.name)))
        object.__setattr__(self, "data_dir", resolve_path(self.data_dir))
        object.__setattr__(self, "work_dir", resolve_path(self.work_dir))

    # --- the work directory layout (DESIGN.md) ---
    @property
    def pipeline_root(self) -> str:
        return os.path.join(self.work_dir, "pipeline")

    @property
    def metadata_path(self) -> str:
        return resolve_path(self.metadata) if self.metadata else os.path.join(self.work_dir, "metadata.sqlite")

    @property
    def serving_dir(self) -> str:
        return os.path.join(self.work_dir, "serving")

    @property
    def model_base_path(self) -> str:
        return os.path.join(self.serving_dir, self.model_name)

    @property
    def models_config_path(self) -> str:
        return os.path.join(self.serving_dir, "models.config")

    @property
    def tensorboard_dir(self) -> str:
        return os.path.join(self.work_dir, "tensorboard")

    @property
    def history_path(self) -> str:
        return os.path.join(self.work_dir, "history.jsonl")

    @property
    def schema_dir(self) -> str:
        return os.path.join(self.work_dir, "schema")

    @property
    def schema_path(self) -> str:
        return os.path.join(self.schema_dir, "schema.pbtxt")

    @property
    def vocab_dir(self) -> str:
        return os.path.join(self.work_dir, "vocab")

    @property
    def replay_dir(self) -> str:
        return os.path.join(self.work_dir, "replay")

    @property
    def features_dir(self) -> str:
        return os.path.join(self.work_dir, "features")

    def pipeline_name(self) -> str:
        return f"increc-{self.model_name}"

    def resolved_beam_args(self) -> List[str]:
        # In-process DirectRunner by default: on spans of ~10k rows, starting multi-processing
        # workers cost about 30 s a span on two cores and bought nothing (benchmarks/prequential.py).
        # Larger spans: ["--direct_running_mode=multi_processing", "--direct_num_workers=0"] or a real runner.
        if self.beam_args is not None:
            return list(self.beam_args)
        return ["--direct_running_mode=in_memory"]

    def training_run(self, span: Optional[int]) -> TrainingRun:
        """What the Trainer is told for `span` (None: the newest in data_dir), as its custom_config."""
        return TrainingRun(settings=self.training_settings(), mode=self.mode, span=span, data_dir=self.data_dir,
                           replay_dir=self.replay_dir, tensorboard_dir=self.tensorboard_dir,
                           features_dir=self.features_dir)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def saved_settings(self) -> Dict[str, Any]:
        """What `WORK/config.json` keeps: every field but the work directory (where the file is) and PER_RUN."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "work_dir" and k not in PER_RUN}


def defaults() -> Dict[str, Any]:
    """Every field's default (data_dir and work_dir have none)."""
    out = {}
    for field in dataclasses.fields(IncrecConfig):
        if field.default is not dataclasses.MISSING:
            out[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[field.name] = field.default_factory()  # type: ignore[misc]
    return out


def field_names() -> List[str]:
    return [field.name for field in dataclasses.fields(IncrecConfig)]


# --- checking values ---

def _address(value: str) -> bool:
    """host:port (TF Serving's gRPC address), unix:PATH, or empty for "no server"."""
    if value == "" or value.startswith("unix:"):
        return True
    host, _, port = value.rpartition(":")
    return bool(host.strip("[]")) and port.isdigit() and 1 <= int(port) <= 65535


# A one-sided confidence level: 0.5 would refuse any candidate that merely looks worse, 1 nothing ever.
CONFIDENCE = _number("in [0.5, 1)", lambda v: 0.5 <= v < 1)

RULES: Dict[str, Rule] = {
    "data_dir": PATH,
    "work_dir": PATH,
    "model_name": Rule("str", "a name of letters, digits, '.', '_' and '-' (TF Serving's model name and a "
                              "directory name)", lambda v: MODEL_NAME.fullmatch(v) is not None),
    "mode": MODE,
    "bad_row_budget": FRACTION,
    "eval_fraction": _number("in (0, 1)", lambda v: 0 < v < 1),
    "max_eval_rows": _int(1),
    "gate_confidence": CONFIDENCE,
    "auc_tolerance": UNIT,
    "gate_indifference": UNIT,
    "min_auc": UNIT,
    "rollback_confidence": CONFIDENCE,
    "rollback_tolerance": UNIT,
    "max_live_rows": _int(1),
    "keep_versions": _int(1),
    "serving_address": Rule("str", "host:port (or empty for no server)", _address),
    "force_push": BOOL,
    "metadata": Rule("optional_str", "a local file path or null", lambda v: v is None or v.strip() != ""),
    "beam_args": Rule("optional_str_list", "a list of Beam pipeline options or null"),
    **TRAINING_RULES,
}


def check_value(key: str, value: Any) -> Any:
    """The value, normalised, if it suits the field; else ConfigError '<key> must be <expected>, got <value>'."""
    return check_with(RULES, key, value)


def parse_text(key: str, text: str) -> Any:
    """A value typed on the command line (`increc config --set key=value`) as the field's type.

    Text that does not parse is returned as it is, for check_value to refuse by name.
    """
    kind = RULES[key].kind
    stripped = text.strip()
    if kind == "int":
        return int(stripped) if re.fullmatch(r"[+-]?\d+", stripped) else text
    if kind == "number":
        try:
            return float(stripped)
        except ValueError:
            return text
    if kind == "bool":
        return {"true": True, "yes": True, "on": True, "1": True,
                "false": False, "no": False, "off": False, "0": False}.get(stripped.lower(), text)
    if kind in ("optional_str", "optional_str_list") and stripped.lower() in ("", "null", "none"):
        return None
    if kind.endswith("list"):
        if stripped.startswith("["):
            try:
                return json.loads(stripped)
            except ValueError:
                return text
        items = [item.strip() for item in stripped.split(",")] if stripped else []
        if kind == "int_list":
            return [int(i) if re.fullmatch(r"[+-]?\d+", i) else i for i in items]
        return items
    return text


def check_values(values: Dict[str, Any], where: str, forbidden: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Checks a layer of settings (a --config file, WORK/config.json): known keys, each value's type and range.

    `where` names the source in every message ("--config run.json: epochs must be ..."); `forbidden`
    maps keys this source may not set to the reason.
    """
    known = field_names()
    out = {}
    for key, value in values.items():
        if key in (forbidden or {}):
            raise ConfigError(f"{where}: {key} {forbidden[key]}", key)
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} ({suggest(key, known)})", key)
        try:
            out[key] = check_value(key, value)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}", key, e.problem) from None
    return out


def suggest(key: str, known: List[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"


def parse_json_object(text: str, where: str) -> Dict[str, Any]:
    """A JSON object of settings; ConfigError naming `where`, the line and column when it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise ConfigError(f"{where}: not JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must hold a JSON object of settings ({{\"epochs\": 2, ...}}), "
                          f"not {_json_kind(value)}")
    return value


def _json_kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number")
