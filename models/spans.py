"""Per-span snapshots of the state a run carries forward (vocabularies, replay reservoir).

A run for span N reads the snapshot left by the newest earlier span and writes
its own, `after-span-N`, never touching earlier ones. So rerunning span N after
any crash starts from the same base and writes the same snapshot as one clean
run (docs/ARCHITECTURE.md, "Deployment state").
"""
from __future__ import annotations

import os
import re
from typing import List, Optional

import tensorflow as tf

SNAPSHOT = re.compile(r"after-span-(\d+)/?$")
SPAN_DIR = re.compile(r"span-(\d+)/?$")


def newest_span(data_dir: str) -> int:
    """The highest N of the data directory's span-<N> directories (what a scheduled run processes)."""
    spans = [int(m.group(1)) for m in map(SPAN_DIR.match, _listdir(data_dir)) if m]
    if not spans:
        raise ValueError(f"no span-<N> directory in {data_dir}")
    return max(spans)


def span_of(config: dict) -> int:
    """The span a Transform or Trainer run is for: config["span"], or the newest one in config["data_dir"]."""
    return int(config["span"]) if config.get("span") is not None else newest_span(config["data_dir"])


def snapshots(store: str) -> List[int]:
    return sorted(int(m.group(1)) for m in map(SNAPSHOT.match, _listdir(store)) if m)


def snapshot_dir(store: str, span: int) -> str:
    return os.path.join(store, f"after-span-{span}")


def base_snapshot(store: str, span: int) -> Optional[str]:
    """The snapshot a run for `span` starts from: the newest of an earlier span, or None."""
    earlier = [s for s in snapshots(store) if s < span]
    return snapshot_dir(store, earlier[-1]) if earlier else None


def prune(store: str, span: int, keep: int) -> None:
    """Deletes snapshots older than the `keep` newest up to `span` (a rerun needs only the one before it)."""
    for old in [s for s in snapshots(store) if s <= span][:-keep]:
        tf.io.gfile.rmtree(snapshot_dir(store, old))


def _listdir(path: str) -> List[str]:
    return tf.io.gfile.listdir(path) if tf.io.gfile.isdir(path) else []
