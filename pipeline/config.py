"""The one config object that carries every knob of an increc deployment.

Defaults serve the bundled demo (MovieTweetings 100K cut into 10 spans) on a
2-core machine. Paths are resolved against the work directory, and nothing is
written outside it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

MODES = ("incremental", "full")


def is_remote(path: str) -> bool:
    """A file-system URL (gs://, s3://, hdfs://, ...) rather than a local path."""
    return "://" in path


def resolve_path(path: str) -> str:
    """Local paths become absolute; URLs stay as they are (abspath would turn gs://b into <cwd>/gs:/b)."""
    return path if is_remote(path) else os.path.abspath(path)


@dataclasses.dataclass
class IncrecConfig:
    data_dir: str
    work_dir: str
    model_name: str = "increc"
    mode: str = "incremental"

    # Ingestion (Beam ExampleGen)
    bad_row_budget: float = 0.001  # fraction of a span's rows that may be dropped as malformed
    eval_fraction: float = 0.1  # the last fraction of a span, by time, is its eval split...
    max_eval_rows: int = 50_000  # ...up to this many rows, so evaluation does not grow with the span

    # Model and training
    embedding_dim: int = 32
    side_embedding_dim: int = 8
    oov_buckets: int = 16
    cross_layers: int = 2
    deep_layers: List[int] = dataclasses.field(default_factory=lambda: [64, 32])
    id_bias: bool = True  # a learnt bias per user and per item (the wide part beside the cross and deep towers)
    side_features: bool = True  # use the categorical and numeric side features (False: ids only)
    ignored_features: List[str] = dataclasses.field(default_factory=list)  # side features the model leaves out
    # Adagrad, as in the online-learning literature: per-weight step sizes let rare ids' embeddings
    # and biases move far on the few examples they get (Adam at 0.01: 0.06-0.07 lower mean live AUC).
    learning_rate: float = 0.1
    optimizer: str = "adagrad"
    batch_size: int = 256
    # Large spans train in larger batches so an epoch takes at most this many steps: a step's cost is
    # mostly fixed (op dispatch), so 1M rows at 256 a batch cost ~4x what they cost at 1000 (0: no cap).
    max_steps_per_epoch: int = 1000
    epochs: int = 2
    replay_fraction: float = 0.2  # replay sample size, as a fraction of span N's training rows
    replay_capacity: int = 50_000  # reservoir size (examples kept from earlier spans)
    distillation_weight: float = 0.0  # blend of the serving model's probability into the training target
    seed: int = 7

    # Gates
    auc_tolerance: float = 0.002  # candidate AUC may be this much below the serving model's
    min_auc: float = 0.5  # no candidate worse than chance is blessed, baseline or not
    rollback_tolerance: float = 0.005  # live AUC drop versus the previous version that rolls back
    keep_versions: int = 5  # version directories kept on disk

    # Serving
    serving_address: str = "127.0.0.1:8500"
    force_push: bool = False  # push even when not blessed (operators and tests)

    # Fault injection for tests of the gates: train on flipped labels.
    flip_train_labels: bool = False

    # ML Metadata for the local runner: a sqlite file, WORK/metadata.sqlite by default. sqlite needs a
    # local file, so a work directory on a remote file system (gs://...) needs a local path here.
    metadata: Optional[str] = None

    # Beam: the in-process DirectRunner by default; any Beam pipeline args
    # (multi-processing DirectRunner, Dataflow, Flink, Spark) replace it.
    beam_args: Optional[List[str]] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.bad_row_budget < 1:
            raise ValueError("bad_row_budget must be a fraction in [0, 1)")
        if not 0 < self.eval_fraction < 1:
            raise ValueError("eval_fraction must be in (0, 1)")
        if self.replay_fraction < 0:
            raise ValueError("replay_fraction must be >= 0")
        if not 0 <= self.distillation_weight < 1:
            raise ValueError("distillation_weight must be in [0, 1)")
        self.data_dir = resolve_path(self.data_dir)
        self.work_dir = resolve_path(self.work_dir)

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

    def pipeline_name(self) -> str:
        return f"increc-{self.model_name}"

    def resolved_beam_args(self) -> List[str]:
        # In-process DirectRunner by default: on spans of ~10k rows, starting multi-processing
        # workers cost about 30 s a span on two cores and bought nothing (benchmarks/prequential.py).
        # Larger spans: ["--direct_running_mode=multi_processing", "--direct_num_workers=0"] or a real runner.
        if self.beam_args is not None:
            return list(self.beam_args)
        return ["--direct_running_mode=in_memory"]

    def trainer_config(self) -> Dict[str, Any]:
        """The knobs that run_fn reads (passed as Trainer custom_config)."""
        return {
            "embedding_dim": self.embedding_dim,
            "side_embedding_dim": self.side_embedding_dim,
            "oov_buckets": self.oov_buckets,
            "cross_layers": self.cross_layers,
            "deep_layers": list(self.deep_layers),
            "id_bias": self.id_bias,
            "side_features": self.side_features,
            "ignored_features": list(self.ignored_features),
            "distillation_weight": self.distillation_weight,
            "learning_rate": self.learning_rate,
            "optimizer": self.optimizer,
            "batch_size": self.batch_size,
            "max_steps_per_epoch": self.max_steps_per_epoch,
            "epochs": self.epochs,
            "mode": self.mode,
            "replay_fraction": self.replay_fraction,
            "replay_capacity": self.replay_capacity,
            "replay_dir": self.replay_dir,
            "tensorboard_dir": self.tensorboard_dir,
            "seed": self.seed,
            "flip_train_labels": self.flip_train_labels,
        }

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)
