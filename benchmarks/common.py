"""What every benchmark does at the end: write its figures as JSON."""
from __future__ import annotations

import json
import os


def write_json(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"written {path}")


def write_report(path: str, results: dict, text: str) -> str:
    """Prints the Markdown report, writes it beside the JSON at `path`; returns the path without its extension."""
    print("\n" + text)
    write_json(path, results)
    base = os.path.splitext(path)[0]
    with open(base + ".md", "w") as f:
        f.write(text)
    return base


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def print_goals(goals) -> None:
    """(goal, figure, met) triples, one line each, against the run's own figures."""
    print("\nGoals (this run's figures):")
    for goal, figure, ok in goals:
        print(f"  {'met    ' if ok else 'NOT met'}  {goal}: {figure}")


def quiet_tensorflow() -> None:
    """Only errors from TensorFlow and absl: benchmarks print their own figures."""
    import logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
