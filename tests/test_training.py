"""Training settings: one typed definition, carried to run_fn through the Trainer's JSON custom_config."""
from __future__ import annotations

import dataclasses
import json

import pytest

from models.training import ConfigError, TrainingRun, TrainingSettings


def a_run(**settings) -> TrainingRun:
    return TrainingRun(settings=TrainingSettings(**settings), mode="incremental", span=3, data_dir="/data",
                       replay_dir="/deployment/replay", tensorboard_dir="/deployment/tensorboard",
                       features_dir="/deployment/features")


def test_a_training_run_round_trips_through_the_trainers_json_custom_config():
    run = a_run(deep_layers=[16, 8], ignored_features=["year"], learning_rate=0.05, distillation_weight=0.25,
                flip_train_labels=True, max_steps_per_epoch=0)
    custom_config = run.to_custom_config()
    assert json.loads(json.dumps(custom_config)) == custom_config, "plain JSON values"
    back = TrainingRun.from_custom_config(json.loads(json.dumps(custom_config)))
    assert back == run and type(back.settings) is TrainingSettings
    assert back.settings.deep_layers == [16, 8] and back.span == 3
    # A scheduled run (no span) and whole-number floats survive JSON too.
    scheduled = dataclasses.replace(a_run(learning_rate=1, replay_fraction=0), span=None, mode="full")
    assert scheduled.settings.learning_rate == 1.0 and isinstance(scheduled.settings.learning_rate, float)
    assert TrainingRun.from_custom_config(json.loads(json.dumps(scheduled.to_custom_config()))) == scheduled


def test_unknown_missing_and_bad_keys_are_refused_by_name():
    custom_config = a_run().to_custom_config()
    with pytest.raises(ConfigError, match="Trainer custom_config: unknown key 'epochz'"):
        TrainingRun.from_custom_config(dict(custom_config, epochz=3))
    del custom_config["replay_dir"]
    with pytest.raises(ConfigError, match="Trainer custom_config: missing key 'replay_dir'"):
        TrainingRun.from_custom_config(custom_config)
    with pytest.raises(ConfigError, match="Trainer custom_config: epochs must be an integer >= 1, got 0"):
        TrainingRun.from_custom_config(dict(a_run().to_custom_config(), epochs=0))
    with pytest.raises(ConfigError, match="mode must be one of incremental, full"):
        TrainingRun.from_custom_config(dict(a_run().to_custom_config(), mode="partial"))
    with pytest.raises(ConfigError, match="must be a JSON object"):
        TrainingRun.from_custom_config(None)


def test_settings_are_frozen_and_checked_when_made():
    settings = TrainingSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.epochs = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match='optimizer must be one of adagrad, adam, got "sgd"'):
        TrainingSettings(optimizer="sgd")


def test_the_deployment_config_is_the_training_settings_plus_the_rest():
    from pipeline.config import IncrecConfig, defaults

    config = IncrecConfig(data_dir="d", work_dir="w", epochs=3)
    assert isinstance(config, TrainingSettings)
    for field in dataclasses.fields(TrainingSettings):
        default = TrainingSettings().__getattribute__(field.name)
        assert defaults()[field.name] == default, f"{field.name}: one default"
    run = config.training_run(4)
    assert run.settings == TrainingSettings(epochs=3) and run.replay_dir == config.replay_dir
    assert TrainingRun.from_custom_config(run.to_custom_config()) == run
    assert set(run.to_custom_config()) - set(defaults()) == {"span", "data_dir", "replay_dir", "tensorboard_dir",
                                                                      "features_dir"}


def test_examples_are_grouped_by_the_span_their_artifact_holds(tmp_path):
    """Full mode folds the feature snapshot span by span; an artifact that does not say its span
    (written before SpanExampleGen recorded it) makes the whole set one span, rather than a guess."""
    from models.records import SPAN_FILE, patterns_by_span

    patterns = []
    for artifact, span in (("12", 3), ("7", 1)):
        (tmp_path / artifact).mkdir()
        (tmp_path / artifact / SPAN_FILE).write_text(json.dumps({"span": span}))
        patterns += [str(tmp_path / artifact / "Split-train" / "*"), str(tmp_path / artifact / "Split-eval" / "*")]
    assert patterns_by_span(patterns) == {1: patterns[2:], 3: patterns[:2]}
    assert list(patterns_by_span(patterns)) == [1, 3]
    (tmp_path / "old").mkdir()
    assert patterns_by_span(patterns + [str(tmp_path / "old" / "Split-train" / "*")]) is None
