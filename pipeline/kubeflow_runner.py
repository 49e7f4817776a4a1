"""Compiles the increc pipeline into a Kubeflow Pipelines v2 spec (KubeflowV2DagRunner).

The compiled pipeline is the steady-state shape: it reads the newest span in
`data_dir`, validates it against the curated schema kept in `work_dir`, and
warm-starts from and gates against the model serving now. `first_span=True`
compiles the bootstrap shape (schema inference, no baseline) for the very
first run. On a cluster, `data_dir` and `work_dir` are shared storage (for
example gs:// paths) that every step's container can reach, and the image is
built from the repository's Dockerfile.
"""
from __future__ import annotations

import os

from tfx import v1 as tfx

from pipeline.config import IncrecConfig
from pipeline.pipeline import create_pipeline


def compile_pipeline(config: IncrecConfig, output: str, image: str, first_span: bool = False) -> str:
    output = os.path.abspath(output)
    pipeline = create_pipeline(config, span=None, with_baseline=not first_span,
                               first_span=first_span,
                               metadata_connection_config=None, orchestrator="kubeflow")
    runner = tfx.orchestration.experimental.KubeflowV2DagRunner(
        config=tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(default_image=image),
        output_dir=os.path.dirname(output),
        output_filename=os.path.basename(output),
    )
    runner.run(pipeline, write_out=True)
    return output
