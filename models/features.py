"""Feature names and how each raw column is treated.

The raw columns are fixed by the data contract (DESIGN.md): user_id, item_id,
timestamp, label, and any other column is a feature. Which of those are
categorical or numeric is read from the curated schema, so nothing here is
specific to one data set.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

USER_ID = "user_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
LABEL = "label"
ID_FEATURES = (USER_ID, ITEM_ID)
NON_FEATURES = (TIMESTAMP, LABEL)

# Transformed feature that says whether the user was unknown before this span
# (the Evaluator slices on it).
USER_IS_NEW = "user_is_new"
MULTI_VALUE_SEPARATOR = "|"
# Lists of item ids (`prepare`'s history features): categorical whatever the ids look like, so a span
# whose users each have at most one numeric-looking item does not type the column as a number.
USER_RECENT_ITEMS = "user_recent_items"
RECENT_ITEMS = 10  # item ids it holds
ITEM_LIST_FEATURES = (USER_RECENT_ITEMS,)


def item_rows_name(feature: str) -> str:
    """Transformed name of an item-list feature's values as rows of the item_id vocabulary (the retrieval
    query tower pools the candidate tower's embeddings of them)."""
    return f"{feature}_item_index"


def index_name(feature: str) -> str:
    return f"{feature}_index"


def numeric_name(feature: str) -> str:
    return f"{feature}_z"


def vocab_asset_name(feature: str) -> str:
    return f"{feature}.vocab"


def split_columns(schema) -> Tuple[List[str], List[str]]:
    """Side-feature columns of a schema_pb2.Schema as (categorical, numeric), ids excluded."""
    from tensorflow_metadata.proto.v0 import schema_pb2

    categorical, numeric = [], []
    for feature in schema.feature:
        if feature.name in ID_FEATURES or feature.name in NON_FEATURES:
            continue
        if feature.type == schema_pb2.BYTES:
            categorical.append(feature.name)
        elif feature.type in (schema_pb2.INT, schema_pb2.FLOAT):
            numeric.append(feature.name)
    return sorted(categorical), sorted(numeric)


def describe(schema) -> Dict[str, List[str]]:
    categorical, numeric = split_columns(schema)
    return {"ids": list(ID_FEATURES), "categorical": categorical, "numeric": numeric}
