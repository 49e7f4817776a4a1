"""The pieces the pipeline is built from, on small inputs: fast, no TFX run."""
from __future__ import annotations


import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from components.schema_curator import curate
from models import replay, vocabulary, warm_start
from models.metrics import auc
from serving import model_config


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) + labels * 0.3, 1)  # many ties
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert auc([1, 1], [0.2, 0.3]) is None


def test_vocabulary_merge_appends_new_values_most_frequent_first():
    merged = vocabulary.merge(["a", "b"], [(b"c", 1), (b"b", 9), (b"d", 5), (b"e", 5), (b"bad\nvalue", 7)])
    assert merged == ["a", "b", "d", "e", "c"]


def _batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def test_reservoir_is_bounded_uniform_and_snapshotted_per_span(tmp_path):
    store = str(tmp_path / "replay")
    for span in range(1, 11):
        r = replay.Reservoir.before(store, span, capacity=100, seed=1)
        r.absorb(_batches([f"{span}:{i}".encode() for i in range(100)], 37))
        r.save(store, span)
    assert len(r) == 100 and r.seen == 1000
    reloaded = replay.Reservoir.before(store, 11, capacity=100, seed=1)
    assert reloaded.examples == r.examples and reloaded.seen == 1000
    assert len(set(reloaded.sample(30, seed=3))) == 30
    assert [p.name for p in sorted((tmp_path / "replay").iterdir())] == ["after-span-10", "after-span-8",
                                                                         "after-span-9"], "older snapshots pruned"
    # A rerun of span 10 (after a crash, say) starts from span 9's snapshot and writes the same reservoir.
    again = replay.Reservoir.before(store, 10, capacity=100, seed=1)
    again.absorb(_batches([f"10:{i}".encode() for i in range(100)], 37))
    again.save(store, 10)
    assert replay.Reservoir.before(store, 11, capacity=100, seed=1).examples == r.examples
    # Uniform: over many reservoirs every span holds capacity / spans examples on average, however batched.
    per_span = np.zeros(10)
    for seed in range(20):
        r = replay.Reservoir(capacity=100, seed=seed)
        for span in range(10):
            r.absorb(_batches([f"{span}:{i}".encode() for i in range(100)], 1 + seed))
        per_span += np.bincount([int(e.split(b":")[0]) for e in r.examples], minlength=10)
    np.testing.assert_allclose(per_span / 20, 10, atol=2.0)


def test_warm_start_copies_rows_by_index_and_keeps_new_rows():
    new = {"emb": tf.Variable(np.full((5, 2), 7.0, np.float32)), "dense": tf.Variable(np.zeros(3, np.float32))}
    report = warm_start.copy_into(new, {"emb": tf.constant(np.arange(6, dtype=np.float32).reshape(3, 2)),
                                        "dense": tf.constant(np.ones(3, np.float32))})
    np.testing.assert_array_equal(new["emb"].numpy()[:3], np.arange(6).reshape(3, 2))
    np.testing.assert_array_equal(new["emb"].numpy()[3:], np.full((2, 2), 7.0))
    assert report["dense"] == "copied" and "3 rows" in report["emb"]
    with pytest.raises(ValueError, match="shape"):
        warm_start.copy_into({"emb": tf.Variable(np.zeros((2, 2), np.float32))},
                             {"emb": tf.constant(np.zeros((3, 2), np.float32))})


def test_curated_schema_requires_ids_and_relaxes_drifting_constraints():
    from tensorflow_metadata.proto.v0 import schema_pb2
    from google.protobuf import text_format

    schema = text_format.Parse("""
      feature { name: "user_id" type: BYTES shape { dim { size: 1 } } }
      feature { name: "item_id" type: BYTES domain: "item_id" }
      feature { name: "timestamp" type: INT }
      feature { name: "label" type: INT }
      feature { name: "genres" type: BYTES domain: "genres" value_count { min: 1 max: 5 } }
      string_domain { name: "item_id" value: "a" }
      string_domain { name: "genres" value: "Drama" }
    """, schema_pb2.Schema())
    curated = {f.name: f for f in curate(schema).feature}
    assert not curate(schema).string_domain
    assert curated["item_id"].shape.dim[0].size == 1 and not curated["item_id"].HasField("domain")
    assert not curated["genres"].HasField("value_count") and not curated["genres"].HasField("shape")
    assert curated["label"].int_domain.max == 1
    del schema.feature[3]
    with pytest.raises(ValueError, match="label"):
        curate(schema)


def test_models_config_round_trips_versions_and_labels(tmp_path):
    path = str(tmp_path / "models.config")
    deployment = model_config.Deployment("m", str(tmp_path / "m"), [10, 11], {"stable": 11, "previous": 10})
    model_config.write_config(path, model_config.build_config(deployment))
    read = model_config.read_deployment(path, "m")
    assert read.versions == [11, 10] and read.stable == 11 and read.previous == 10
    (tmp_path / "bad.config").write_text("model_config_list { nonsense")
    with pytest.raises(ValueError, match="bad.config"):
        model_config.read_config(str(tmp_path / "bad.config"))


def test_beam_looks_up_each_dofn_methods_arguments_once(monkeypatch):
    """The per-span child's Beam set-up (cache_beam_signatures): same answers as Beam's, one lookup per function."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to
    from apache_beam.transforms import core

    from pipeline.local_runner import cache_beam_signatures

    cache_beam_signatures()  # conftest applied it already; applying it twice must not stack
    looked_up = []
    plain = core.get_signature
    monkeypatch.setattr(core, "get_signature", lambda f: looked_up.append(f) or plain(f))

    class Scale(beam.DoFn):
        def process(self, element, factor=2, *extra, side=None):
            yield element * factor

    class Call:
        def __call__(self, a, b=1):
            return a

    first = core.get_function_args_defaults(Scale().process)
    assert first == (["element", "factor"], [2])
    first[0].append("changed")  # callers get copies
    assert core.get_function_args_defaults(Scale().process) == (["element", "factor"], [2])  # another instance
    assert len(looked_up) == 1
    assert core.get_function_args_defaults(Call()) == (["a", "b"], [1])
    assert core.get_function_args_defaults(Call()) == (["a", "b"], [1])
    assert len(looked_up) == 3  # callable objects are looked up by Beam each time
    with beam.Pipeline() as p:  # and a pipeline still runs its DoFns with their defaults
        result = p | beam.Create([1, 2]) | beam.ParDo(Scale())
        assert_that(result, equal_to([2, 4]))
