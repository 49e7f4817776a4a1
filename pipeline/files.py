"""Small files of the work directory (config, history) on a local disk or any TensorFlow file system.

Local paths use plain file calls, so commands that only read the work
directory start without importing TensorFlow; URLs (gs://, s3://, ...) go
through tf.io.gfile. Writes go to a temporary name and are renamed into
place, so a reader never sees half a file.
"""
from __future__ import annotations

import os
from typing import Optional

from pipeline.config import is_remote


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def exists(path: str) -> bool:
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def read_text(path: str) -> Optional[str]:
    """The file's text, or None when it does not exist."""
    if not exists(path):
        return None
    if is_remote(path):
        with _gfile().GFile(path) as f:
            return f.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    if is_remote(path):
        gfile = _gfile()
        gfile.makedirs(os.path.dirname(path))
        with gfile.GFile(tmp, "w") as f:
            f.write(text)
        gfile.rename(tmp, path, overwrite=True)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
