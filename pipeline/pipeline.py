"""create_pipeline(config, span): the TFX pipeline for one span.

    SpanExampleGen (examples + statistics) -> [SchemaGen -> SchemaCurator | ImportSchemaGen]
      -> ExampleValidator -> DeploymentGuard -> Transform -> Trainer -> Evaluator -> PairedGate -> ServingPusher

The first span infers and curates the schema; every later span is validated
against the curated copy kept in the work directory. The DeploymentGuard
hands the model serving now to Trainer (warm start) and PairedGate (the model
the candidate is compared with on the same eval rows, DeLong's test).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import tensorflow_model_analysis as tfma
# Module by module rather than `tfx.v1`, whose extensions pull in the Google Cloud AI Platform client
# (seconds of start-up for every run).
from tfx.components import Evaluator, ExampleValidator, SchemaGen, Trainer, Transform
from tfx.components.schema_gen.import_schema_gen.component import ImportSchemaGen
from tfx.dsl.components.common.resolver import Resolver
from tfx.dsl.input_resolution.strategies.span_range_strategy import SpanRangeStrategy
from tfx.orchestration import metadata
from tfx.orchestration import pipeline as tfx_pipeline
from tfx.proto import range_config_pb2, trainer_pb2
from tfx.types import channel, standard_artifacts

from components.deployment import DeploymentState
from components.deployment_guard import DeploymentGuard
from components.example_gen import SpanExampleGen
from components.paired_gate import PairedGate
from components.schema_curator import SchemaCurator
from components.serving_pusher import ServingPusher
from models import features as F
from pipeline.config import IncrecConfig

CANDIDATE = "candidate"
SLICES = [tfma.SlicingSpec(), tfma.SlicingSpec(feature_keys=[F.USER_IS_NEW])]


def eval_config(config: IncrecConfig) -> tfma.EvalConfig:
    """AUC, log loss and calibration, overall and new vs returning users, of the candidate alone.

    TFMA keeps the metrics, the slices and the better-than-chance check
    (`min_auc`); the comparison with the serving model is the PairedGate's
    paired test, so TFMA neither loads nor scores the serving model.
    """
    # TFMA blesses nothing without a threshold, so even the first span has one: better than chance.
    threshold = tfma.MetricThreshold(value_threshold=tfma.GenericValueThreshold(
        lower_bound={"value": config.min_auc}))
    auc_thresholds = [tfma.PerSliceMetricThreshold(slicing_specs=[tfma.SlicingSpec()], threshold=threshold)]
    model_specs = [tfma.ModelSpec(name=CANDIDATE, signature_name="regress", label_key=F.LABEL,
                                  preprocessing_function_names=["transform_features"])]
    return tfma.EvalConfig(
        model_specs=model_specs,
        slicing_specs=SLICES,
        metrics_specs=[tfma.MetricsSpec(metrics=[
            tfma.MetricConfig(class_name="ExampleCount"),
            tfma.MetricConfig(class_name="AUC", per_slice_thresholds=auc_thresholds),
            tfma.MetricConfig(class_name="BinaryCrossentropy"),
            # Mean prediction / mean label. TFMA's cost is per example, metric and model, so the
            # separate mean label and mean prediction it is made of are left out.
            tfma.MetricConfig(class_name="Calibration"),
        ])],
    )


def has_serving_model(config: IncrecConfig) -> bool:
    deployment = DeploymentState(config.serving_dir, config.model_name).current()
    return deployment is not None and deployment.stable is not None


def create_pipeline(config: IncrecConfig, span: Optional[int], with_baseline: Optional[bool] = None,
                    first_span: Optional[bool] = None, metadata_connection_config=None,
                    orchestrator: str = "local") -> tfx_pipeline.Pipeline:
    """The pipeline for one span (span None: the newest span in the data directory).

    By default its shape follows the work directory: the first span infers the
    schema, and a baseline exists once a version is serving.
    """
    if with_baseline is None:
        with_baseline = has_serving_model(config)
    if first_span is None:
        first_span = not os.path.exists(config.schema_path)

    example_gen = SpanExampleGen(config.data_dir, span, config.eval_fraction, config.bad_row_budget,
                                 config.max_eval_rows)
    statistics = example_gen.outputs["statistics"]  # TFDV statistics computed while the span was encoded
    nodes = [example_gen]
    if first_span:
        schema_gen = SchemaGen(statistics=statistics,
                                              infer_feature_shape=True)
        curator = SchemaCurator(schema=schema_gen.outputs["schema"], keep_path=config.schema_path)
        schema = curator.outputs["curated_schema"]
        nodes += [schema_gen, curator]
    else:
        importer = ImportSchemaGen(schema_file=config.schema_path)
        schema = importer.outputs["schema"]
        nodes.append(importer)

    validator = ExampleValidator(statistics=statistics, schema=schema)
    guard = DeploymentGuard(examples=example_gen.outputs["examples"],
                            anomalies=validator.outputs["anomalies"],
                            schema=schema,
                            serving_dir=config.serving_dir,
                            model_name=config.model_name,
                            serving_address=config.serving_address,
                            rollback_tolerance=config.rollback_tolerance,
                            rollback_confidence=config.rollback_confidence,
                            max_live_rows=config.max_live_rows)
    transform = Transform(
        examples=example_gen.outputs["examples_parquet"],
        schema=schema,
        preprocessing_fn="models.preprocessing.preprocessing_fn",
        materialize=False,
        disable_statistics=True,
        # The cache serves re-analysing the same input; each span is analysed once, and extending the
        # vocabularies across spans is models/vocabulary.py's. Writing it cost ~2 s of a 10k-row span.
        disable_analyzer_cache=True,
        # span None (a scheduled run): the newest span in data_dir, as SpanExampleGen picks it.
        custom_config={"vocab_dir": config.vocab_dir, "span": span, "data_dir": config.data_dir,
                       "settings": dataclasses.asdict(config.training_settings())},
    )
    # Nothing downstream may start before the guard: an anomaly must stop the run before Transform.
    transform.add_upstream_node(guard)
    nodes += [validator, guard, transform]

    train_examples = example_gen.outputs["examples"]
    if config.mode == "full" and span != 1:
        # Earlier spans come from MLMD (any run of this pipeline), newest ingestion of each;
        # a channel tied to this run's ExampleGen would only ever see the current span.
        if span is None:
            earlier = range_config_pb2.RangeConfig(rolling_range=range_config_pb2.RollingRange(
                start_span_number=1, num_spans=1_000_000))
        else:
            earlier = range_config_pb2.RangeConfig(static_range=range_config_pb2.StaticRange(
                start_span_number=1, end_span_number=span - 1))
        history = Resolver(
            strategy_class=SpanRangeStrategy,
            config={"range_config": earlier},
            examples=channel.Channel(type=standard_artifacts.Examples,
                                     producer_component_id=example_gen.id, output_key="examples"),
        ).with_id("earlier_spans_resolver")
        train_examples = channel.union([history.outputs["examples"], example_gen.outputs["examples"]])
        nodes.append(history)

    trainer_config = config.training_run(span).to_custom_config()  # read back by models.training.TrainingRun
    trainer_kwargs = {}
    if with_baseline and config.mode == "incremental":
        trainer_kwargs["base_model"] = guard.outputs["serving_model"]
    trainer = Trainer(
        run_fn="models.trainer.run_fn",
        examples=train_examples,
        transform_graph=transform.outputs["transform_graph"],
        schema=schema,
        train_args=trainer_pb2.TrainArgs(splits=["train"]),
        eval_args=trainer_pb2.EvalArgs(splits=["eval"]),
        custom_config=trainer_config,
        **trainer_kwargs,
    )
    evaluator = Evaluator(
        examples=example_gen.outputs["examples"],
        model=trainer.outputs["model"],
        schema=schema,
        example_splits=["eval"],
        eval_config=eval_config(config),
    )
    # The guard's serving_model is empty when nothing serves: the gate then leaves the verdict to TFMA.
    gate = PairedGate(
        examples=example_gen.outputs["examples"],
        model=trainer.outputs["model"],
        baseline_model=guard.outputs["serving_model"],
        value_blessing=evaluator.outputs["blessing"],
        confidence=config.gate_confidence,
        margin=config.auc_tolerance,
        indifference=config.gate_indifference,
    )
    pusher = ServingPusher(
        model=trainer.outputs["model"],
        model_blessing=gate.outputs["blessing"],
        live_evaluation=guard.outputs["live_evaluation"],
        model_name=config.model_name,
        serving_dir=config.serving_dir,
        keep_versions=config.keep_versions,
        serving_address=config.serving_address,
        force=int(config.force_push),
    )
    nodes += [trainer, evaluator, gate, pusher]

    if orchestrator == "local" and metadata_connection_config is None:
        metadata_connection_config = metadata.sqlite_metadata_connection_config(
            config.metadata_path)
    return tfx_pipeline.Pipeline(
        pipeline_name=config.pipeline_name(),
        pipeline_root=config.pipeline_root,
        components=nodes,
        metadata_connection_config=metadata_connection_config,  # Kubeflow brings its own MLMD
        beam_pipeline_args=config.resolved_beam_args(),
        enable_cache=False,
    )
