"""Prometheus metrics with TF Serving's names and text format (tf-serving-reference.md §4).

No `# HELP` lines, only `# TYPE`; metric names are the TF monitoring names
with every character outside [A-Za-z0-9_] turned into ':'.
"""
from __future__ import annotations

import re
import threading
from typing import Dict, List, Tuple

REQUEST_COUNT = "/tensorflow/serving/request_count"
REQUEST_LATENCY = "/tensorflow/serving/request_latency"
EXAMPLE_COUNT_TOTAL = "/tensorflow/serving/request_example_count_total"
LOAD_ATTEMPTS = "/tensorflow/cc/saved_model/load_attempt_count"
LOAD_LATENCY = "/tensorflow/cc/saved_model/load_latency"
# Exponential(10, 1.8, 33) microsecond buckets, as TF Serving's request_latency.
LATENCY_BUCKETS = [10 * 1.8 ** i for i in range(33)]
DEFAULT_PATH = "/monitoring/prometheus/metrics"

Labels = Tuple[Tuple[str, str], ...]


def prometheus_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", ":", name)


def _labels(labels: Labels, extra: Tuple[Tuple[str, str], ...] = ()) -> str:
    items = list(labels) + list(extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Registry:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: Dict[str, Dict[Labels, float]] = {}
        self._histograms: Dict[str, Dict[Labels, List[float]]] = {}

    def increment(self, name: str, labels: Dict[str, str], amount: float = 1) -> None:
        key = tuple(labels.items())
        with self._lock:
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0) + amount

    def observe(self, name: str, labels: Dict[str, str], value: float) -> None:
        key = tuple(labels.items())
        with self._lock:
            series = self._histograms.setdefault(name, {})
            series.setdefault(key, []).append(value)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, series in sorted(self._counters.items()):
                metric = prometheus_name(name)
                lines.append(f"# TYPE {metric} counter")
                for labels, value in sorted(series.items()):
                    lines.append(f"{metric}{_labels(labels)} {_number(value)}")
            for name, series in sorted(self._histograms.items()):
                metric = prometheus_name(name)
                lines.append(f"# TYPE {metric} histogram")
                for labels, values in sorted(series.items()):
                    for bound in LATENCY_BUCKETS:
                        count = sum(1 for v in values if v <= bound)
                        lines.append(f"{metric}_bucket{_labels(labels, (('le', _number(bound)),))} {count}")
                    lines.append(f"{metric}_bucket{_labels(labels, (('le', '+Inf'),))} {len(values)}")
                    lines.append(f"{metric}_sum{_labels(labels)} {_number(sum(values))}")
                    lines.append(f"{metric}_count{_labels(labels)} {len(values)}")
        return "\n".join(lines) + "\n"


def parse_monitoring_config(path: str) -> Tuple[bool, str]:
    """(enabled, path) from a text MonitoringConfig file.

    The pip package of tensorflow-serving-api ships no monitoring_config_pb2,
    so the two fields that matter are read from the text form directly.
    """
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"#.*", "", f.read())
    block = re.search(r"prometheus_config\s*:?\s*\{([^}]*)\}", text)
    if block is None:
        return False, DEFAULT_PATH
    enable = re.search(r"\benable\s*:\s*(\w+)", block.group(1))
    where = re.search(r'\bpath\s*:\s*"([^"]*)"', block.group(1))
    enabled = enable is not None and enable.group(1).lower() in ("true", "1")
    return enabled, (where.group(1) if where and where.group(1) else DEFAULT_PATH)
