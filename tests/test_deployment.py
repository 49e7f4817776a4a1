"""The deployment's one owner: pushes and rollbacks that a crash or a concurrent change cannot half-apply."""
from __future__ import annotations

import json

import pytest
import tensorflow as tf

from components.deployment import DeploymentChanged, DeploymentState, RollbackRefused
from serving import model_config


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    tf.saved_model.save(tf.Module(), str(path))
    return str(path)


def test_pushes_are_atomic_strictly_increasing_and_keep_the_previous_version(tmp_path, saved_model):
    state = DeploymentState(str(tmp_path / "serving"), "m")
    pushed = []
    for _ in range(4):
        pushed.append(state.push(saved_model, state.current(), keep_versions=3).version)
    assert pushed == sorted(set(pushed))
    assert state.current().labels == {"stable": pushed[3], "previous": pushed[2]}
    assert state.versions_on_disk() == pushed[1:], "pruned to keep_versions, labelled ones spared"
    assert not [p for p in (tmp_path / "serving" / "m").iterdir() if not p.name.isdigit()], "no staging left"
    with pytest.raises(ValueError, match="saved_model.pb is missing"):
        state.push(str(tmp_path), state.current(), keep_versions=3)


def test_a_push_planned_against_another_deployment_changes_nothing(tmp_path, saved_model):
    state = DeploymentState(str(tmp_path / "serving"), "m")
    first = state.push(saved_model, None, keep_versions=5)
    planned = state.current()
    second = state.push(saved_model, planned, keep_versions=5)
    config = (tmp_path / "serving" / "models.config").read_text()
    with pytest.raises(DeploymentChanged, match=f"were v{first.version}/vNone, now v{second.version}/v{first.version}"):
        state.push(saved_model, planned, keep_versions=5)  # a run that started before the second push
    assert (tmp_path / "serving" / "models.config").read_text() == config
    assert state.versions_on_disk() == [first.version, second.version]


def test_a_version_a_crashed_push_left_behind_is_removed_before_the_next_push(tmp_path, saved_model):
    state = DeploymentState(str(tmp_path / "serving"), "m")
    stable = state.push(saved_model, None, keep_versions=5).version
    orphan = stable + 100  # copied in, but the push died before models.config named it
    tf.io.gfile.makedirs(str(tmp_path / "serving" / "m" / str(orphan)))
    pushed = state.push(saved_model, state.current(), keep_versions=5).version
    assert state.versions_on_disk() == [stable, pushed], "one new version, however often a push was retried"


def test_rollback_restores_the_previous_version_marks_the_bad_one_and_refuses_nonsense(tmp_path, saved_model):
    state = DeploymentState(str(tmp_path / "serving"), "m")
    with pytest.raises(RollbackRefused, match="nothing is deployed"):
        state.roll_back()
    v1 = state.push(saved_model, None, keep_versions=5).version
    with pytest.raises(RollbackRefused, match="no previous version"):
        state.roll_back()
    v2 = state.push(saved_model, state.current(), keep_versions=5).version
    done = state.roll_back(reason="test", span=3)
    assert (done.bad_version, done.restored_version) == (v2, v1)
    assert state.current().labels == {"stable": v1}
    assert state.rolled_back()[v2]["reason"] == "test" and state.rolled_back()[v2]["span"] == 3
    with pytest.raises(RollbackRefused, match="is not restored again"):
        state.roll_back(to_version=v2)
    with pytest.raises(RollbackRefused, match="unknown version 7"):
        state.roll_back(to_version=7)


def test_a_deployment_on_a_remote_file_system_keeps_its_urls(saved_model):
    """Pushes, models.config and history on TensorFlow's ram:// file system, which stands in for gs:// offline."""
    from pipeline.config import IncrecConfig
    from pipeline.local_runner import append_history, read_history, run_span

    config = IncrecConfig(data_dir="ram://increc-data", work_dir="ram://increc-work")
    assert config.work_dir == "ram://increc-work", "a URL must not become <cwd>/ram:/..."
    assert config.models_config_path == "ram://increc-work/serving/models.config"
    state = DeploymentState(config.serving_dir, config.model_name)
    pushed = [state.push(saved_model, state.current(), keep_versions=2).version for _ in range(3)]
    assert state.versions_on_disk() == pushed[1:]
    deployment = model_config.read_deployment(config.models_config_path, config.model_name)
    assert (deployment.stable, deployment.previous) == (pushed[2], pushed[1])
    assert deployment.base_path == "ram://increc-work/serving/increc"
    state.roll_back(reason="remote")
    assert json.loads(tf.io.gfile.GFile(f"{config.serving_dir}/rolled_back.json").read())[str(pushed[2])]
    for span in (1, 2):
        append_history(config, {"span": span, "status": "ok"})
    assert [r["span"] for r in read_history(config.work_dir)] == [1, 2]
    # sqlite cannot live on a remote file system: the local runner says so before doing anything.
    with pytest.raises(ValueError, match="must be local"):
        run_span(config, 1)


def test_versions_named_as_tf_serving_names_them_are_found_and_pruned(tmp_path, saved_model):
    """A directory `00000123` is version 123, as in TF Serving's own example models."""
    import shutil

    state = DeploymentState(str(tmp_path / "serving"), "m")
    shutil.copytree(saved_model, tmp_path / "serving" / "m" / "00000123")
    assert state.versions_on_disk() == [123] and state.version_dir(123).endswith("00000123")
    pushed = [state.push(saved_model, state.current(), keep_versions=1).version for _ in range(2)]
    assert state.versions_on_disk() == pushed, "the zero-padded version was pruned like any other"
