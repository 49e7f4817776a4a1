"""SchemaCurator: turns the schema SchemaGen inferred on the first span into the fixed, curated one.

SchemaGen describes one span; an incremental system needs a contract that
later spans can honour. The curated schema keeps every column and its type
(a dropped column or a changed type is an anomaly) and requires the ids,
timestamp and a 0/1 label, but drops what is expected to drift: string
domains (new ids and genres arrive every span and go to OOV buckets) and
value counts of side features (an item may have no genres). It is written
into the work directory, and later spans validate against that copy.
"""

import os

import tensorflow as tf
import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import schema_pb2
from tfx.types import standard_artifacts
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component

from models import features as F

SCHEMA_FILE = "schema.pbtxt"


def curate(schema: schema_pb2.Schema) -> schema_pb2.Schema:
    curated = schema_pb2.Schema()
    curated.CopyFrom(schema)
    del curated.string_domain[:]
    required = set(F.ID_FEATURES) | set(F.NON_FEATURES)
    missing = sorted(required - {f.name for f in curated.feature})
    if missing:
        raise ValueError(f"the first span has no column(s) {', '.join(missing)}")
    for feature in curated.feature:
        feature.ClearField("domain")
        feature.ClearField("string_domain")
        feature.presence.min_fraction = 1.0
        feature.presence.min_count = 1
        if feature.name in required:
            feature.ClearField("value_count")
            feature.shape.Clear()
            feature.shape.dim.add().size = 1
        else:
            feature.ClearField("shape")
            feature.ClearField("value_count")
        if feature.name == F.LABEL:
            feature.int_domain.min = 0
            feature.int_domain.max = 1
            feature.int_domain.is_categorical = True
        for column in (F.USER_ID, F.ITEM_ID):
            if feature.name == column and feature.type != schema_pb2.BYTES:
                raise ValueError(f"{column} must be a string feature")
    return curated


@component
def SchemaCurator(
    schema: InputArtifact[standard_artifacts.Schema],
    curated_schema: OutputArtifact[standard_artifacts.Schema],
    keep_path: Parameter[str],
) -> None:
    inferred = tfdv.load_schema_text(os.path.join(schema.uri, SCHEMA_FILE))
    result = curate(inferred)
    tfdv.write_schema_text(result, os.path.join(curated_schema.uri, SCHEMA_FILE))
    tf.io.gfile.makedirs(os.path.dirname(keep_path))
    tmp = keep_path + ".tmp"
    tfdv.write_schema_text(result, tmp)
    tf.io.gfile.rename(tmp, keep_path, overwrite=True)
