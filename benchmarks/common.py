"""What every benchmark does at the end: write its figures as JSON."""
from __future__ import annotations

import json
import os


def write_json(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"written {path}")
