"""What training is told: every hyper-parameter as one typed, frozen object, and the per-run inputs of run_fn.

`TrainingSettings` is the one definition of the model and training settings:
their names, types, defaults and allowed ranges. `pipeline/config.py`'s
IncrecConfig extends it, so a config file, a CLI flag and the Trainer all see
the same defaults and the same checks. `TrainingRun` is what one Trainer run
needs besides them (span, mode, where its state lives); it travels as the
Trainer's JSON custom_config and is read back, checked, by run_fn.

The checking rules live here because models/ may import nothing of increc
(docs/ARCHITECTURE.md). This module imports nothing heavy, so the CLI can
validate before TensorFlow loads.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

MODES = ("incremental", "full")
OPTIMIZERS = ("adagrad", "adam")  # what models/ranking_model.build knows
LARGEST_INT = 2**31 - 1  # TensorFlow takes most of these as int32


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the key and, where there is one, its source.

    `key` and `problem` ("must be an integer >= 1, got -1") let a caller say where the value came from.
    """

    def __init__(self, message: str, key: Optional[str] = None, problem: Optional[str] = None):
        super().__init__(message)
        self.key, self.problem = key, problem


def shown(value: Any) -> str:
    """A value as JSON would write it (strings quoted), shortened."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclasses.dataclass(frozen=True)
class Rule:
    """A field's type (`kind`, which also says how `--set` text is parsed) and what its values must satisfy."""

    kind: str  # int, optional_int, number, bool, str, optional_str, int_list, str_list, optional_str_list
    expected: str  # "an integer >= 1": completes "<key> must be ..."
    ok: Callable[[Any], bool] = lambda value: True


def int_rule(low: int, high: int = LARGEST_INT) -> Rule:
    expected = f"an integer >= {low}" if high == LARGEST_INT else f"an integer from {low} to {high}"
    return Rule("int", expected, lambda v: low <= v <= high)


def number_rule(expected: str, ok: Callable[[float], bool]) -> Rule:
    return Rule("number", f"a number {expected}", ok)


def choice_rule(options: Tuple[str, ...]) -> Rule:
    return Rule("str", "one of " + ", ".join(options), lambda v: v in options)


FRACTION = number_rule("in [0, 1)", lambda v: 0 <= v < 1)
UNIT = number_rule("in [0, 1]", lambda v: 0 <= v <= 1)
PATH = Rule("str", "a non-empty path", lambda v: v.strip() != "")
BOOL = Rule("bool", "true or false")
MODE = choice_rule(MODES)

TRAINING_RULES: Dict[str, Rule] = {
    "embedding_dim": int_rule(1),
    "side_embedding_dim": int_rule(1),
    "oov_buckets": int_rule(1),
    "cross_layers": int_rule(0),
    "deep_layers": Rule("int_list", "a list of layer widths, each an integer >= 1",
                        lambda v: all(1 <= w <= LARGEST_INT for w in v)),
    "id_bias": BOOL,
    "side_features": BOOL,
    "recent_items": BOOL,
    "ignored_features": Rule("str_list", "a list of feature names", lambda v: all(n.strip() for n in v)),
    "learning_rate": number_rule("> 0", lambda v: v > 0),
    "optimizer": choice_rule(OPTIMIZERS),
    "batch_size": int_rule(1),
    "max_steps_per_epoch": int_rule(0),
    "epochs": int_rule(1),
    "replay_fraction": number_rule(">= 0", lambda v: v >= 0),
    "replay_capacity": int_rule(0),
    "popularity_decay": number_rule("in [0, 1]", lambda v: 0 <= v <= 1),
    "distillation_weight": FRACTION,
    "seed": int_rule(0),
    "flip_train_labels": BOOL,
}


def _typed(kind: str, value: Any) -> Tuple[bool, Any]:
    """(whether value has the kind's JSON type, the value normalised: ints become floats for numbers)."""
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind == "optional_int":
        return value is None or (isinstance(value, int) and not isinstance(value, bool)), value
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return math.isfinite(value), float(value)
    if kind == "bool":
        return isinstance(value, bool), value
    if kind == "str":
        return isinstance(value, str), value
    if kind == "optional_str":
        return value is None or isinstance(value, str), value
    if kind == "int_list":
        return (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
                value)
    if kind == "str_list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value), value
    if kind == "optional_str_list":
        return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)), value
    raise AssertionError(kind)


def check_with(rules: Mapping[str, Rule], key: str, value: Any) -> Any:
    """The value, normalised, if it suits rules[key]; else ConfigError '<key> must be <expected>, got <value>'."""
    rule = rules.get(key)
    if rule is None:
        raise ConfigError(f"unknown key {key!r}", key, "is not a setting")
    typed, normalised = _typed(rule.kind, value)
    if not typed or not rule.ok(normalised):
        expected = rule.expected
        if rule.kind == "int" and typed and normalised > LARGEST_INT:
            expected = f"at most {LARGEST_INT}"
        problem = f"must be {expected}, got {shown(value)}"
        raise ConfigError(f"{key} {problem}", key, problem)
    if isinstance(normalised, list):
        normalised = list(normalised)  # a frozen object does not share a caller's list
    return normalised


def _check_fields(obj: Any, rules: Mapping[str, Rule]) -> None:
    """Checks and normalises every field of a frozen dataclass in place (ConfigError names the key)."""
    for field in dataclasses.fields(obj):
        object.__setattr__(obj, field.name, check_with(rules, field.name, getattr(obj, field.name)))


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """Every hyper-parameter of the model and its training, with the deployment defaults."""

    embedding_dim: int = 32
    side_embedding_dim: int = 8
    oov_buckets: int = 16
    cross_layers: int = 2
    deep_layers: List[int] = dataclasses.field(default_factory=lambda: [64, 32])
    id_bias: bool = True  # a learnt bias per user and per item (the wide part beside the cross and deep towers)
    side_features: bool = True  # use the categorical and numeric side features (False: ids only)
    ignored_features: List[str] = dataclasses.field(default_factory=list)  # side features the model leaves out
    # Use `user_recent_items` (the user's last 10 items) in the ranking model and the retrieval query. Off:
    # in the prequential benchmark it moved mean live AUC by -0.0011 / +0.0005 and recall@10 by +0.0037 /
    # -0.0029 (MovieTweetings / MovieLens), no gain either way (README, "Results").
    recent_items: bool = False
    # Adagrad, as in the online-learning literature: per-weight step sizes let rare ids' embeddings
    # and biases move far on the few examples they get (Adam at 0.01: 0.06-0.07 lower mean live AUC).
    learning_rate: float = 0.1
    optimizer: str = "adagrad"
    batch_size: int = 256
    # Large spans train in larger batches so an epoch takes at most this many steps: a step's cost is
    # mostly fixed (op dispatch), so 1M rows at 256 a batch cost ~4x what they cost at 1000 (0: no cap).
    max_steps_per_epoch: int = 1000
    epochs: int = 2
    # Replay sample size, as a fraction of span N's training rows (the reservoir is kept either way). Off:
    # replaying the Trainer over the prequential runs, 0.2 lowered MovieTweetings' mean live AUC by 0.0055
    # and left MovieLens' unchanged (-0.0001), and it made two seeds of the same candidate differ by up to
    # 0.013 AUC instead of 0.003, which the gate cannot tell from a worse model (README, "Results").
    replay_fraction: float = 0.0
    replay_capacity: int = 50_000  # reservoir size (examples kept from earlier spans)
    # recommend's popularity prior counts an earlier span's interactions at this weight per span since
    # (1: all history alike, 0: the newest span alone). Measured on the bundled data sets' spans, the
    # items with the most positives decayed 0.25 a span find 1.6x (MovieTweetings) and 1.2x (MovieLens)
    # the next span's positives that all-history counts find (README, "How recommend picks").
    popularity_decay: float = 0.25
    distillation_weight: float = 0.0  # blend of the serving model's probability into the training target
    seed: int = 7
    # Fault injection for tests of the gates: train on flipped labels.
    flip_train_labels: bool = False

    def __post_init__(self):
        _check_fields(self, TRAINING_RULES)

    def model_uses(self, feature: str) -> bool:
        """Whether the models read side feature `feature`; Transform leaves out the ones they do not."""
        from models.features import ITEM_LIST_FEATURES

        return (self.side_features and feature not in self.ignored_features
                and (self.recent_items or feature not in ITEM_LIST_FEATURES))

    def training_settings(self) -> "TrainingSettings":
        """Just the training settings (of a subclass such as IncrecConfig, too)."""
        return TrainingSettings(**{name: getattr(self, name) for name in TRAINING_RULES})


RUN_RULES: Dict[str, Rule] = {
    "mode": MODE,
    "span": Rule("optional_int", "an integer >= 1 or null (the newest span in data_dir)",
                 lambda v: v is None or 1 <= v <= LARGEST_INT),
    "data_dir": PATH,
    "replay_dir": PATH,
    "tensorboard_dir": PATH,
    "features_dir": PATH,
}


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """One Trainer run: the settings plus what is particular to this run (run_fn reads nothing else)."""

    settings: TrainingSettings
    mode: str  # incremental: warm start + replay; full: from scratch on every span given
    span: Optional[int]  # None: a scheduled run, for the newest span in data_dir
    data_dir: str
    replay_dir: str  # per-span reservoir snapshots (docs/ARCHITECTURE.md, "Deployment state")
    tensorboard_dir: str
    features_dir: str  # per-span feature snapshots a version looks ids up in (models/feature_snapshot.py)

    def __post_init__(self):
        if type(self.settings) is not TrainingSettings:
            object.__setattr__(self, "settings", self.settings.training_settings())
        for key in RUN_RULES:
            object.__setattr__(self, key, check_with(RUN_RULES, key, getattr(self, key)))

    def to_custom_config(self) -> Dict[str, Any]:
        """A flat JSON object: every setting and every run field, by name."""
        out = {name: getattr(self.settings, name) for name in TRAINING_RULES}
        out.update({name: getattr(self, name) for name in RUN_RULES})
        return json.loads(json.dumps(out))  # plain JSON values, as the Trainer stores them

    @classmethod
    def from_custom_config(cls, custom_config: Optional[Mapping[str, Any]]) -> "TrainingRun":
        """The run the Trainer's custom_config describes; ConfigError naming an unknown, missing or bad key."""
        where = "Trainer custom_config"
        if not isinstance(custom_config, Mapping):
            raise ConfigError(f"{where}: must be a JSON object of training settings, got {shown(custom_config)}")
        expected = list(TRAINING_RULES) + list(RUN_RULES)
        unknown = sorted(k for k in custom_config if k not in expected)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}", unknown[0])
        missing = [k for k in expected if k not in custom_config]
        if missing:
            raise ConfigError(f"{where}: missing key {missing[0]!r}", missing[0])
        try:
            settings = TrainingSettings(**{k: custom_config[k] for k in TRAINING_RULES})
            return cls(settings=settings, **{k: custom_config[k] for k in RUN_RULES})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}", e.key, e.problem) from None
