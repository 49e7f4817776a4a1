"""Prometheus metrics with TF Serving's names, buckets and text format (tf-serving-reference.md §4).

No `# HELP` lines, only `# TYPE`; metric names are the TF monitoring names
with every character outside [A-Za-z0-9_] turned into ':'. Histograms keep
fixed bucket counts (TF Serving's Exponential(10, 1.8, 33) microseconds for
latencies), a sum and a count, so memory does not grow with traffic.
"""
from __future__ import annotations

import bisect
import re
import threading
from typing import Dict, List, Sequence, Tuple

REQUEST_COUNT = "/tensorflow/serving/request_count"
REQUEST_LATENCY = "/tensorflow/serving/request_latency"
RUNTIME_LATENCY = "/tensorflow/serving/runtime_latency"
EXAMPLE_COUNTS = "/tensorflow/serving/request_example_counts"
EXAMPLE_COUNT_TOTAL = "/tensorflow/serving/request_example_count_total"
WARMUP_LATENCY = "/tensorflow/serving/model_warmup_latency"
LOAD_ATTEMPTS = "/tensorflow/cc/saved_model/load_attempt_count"
LOAD_LATENCY = "/tensorflow/cc/saved_model/load_latency"
DEFAULT_PATH = "/monitoring/prometheus/metrics"


def exponential(scale: float, growth: float, count: int) -> List[float]:
    """TF monitoring's Buckets::Exponential: the upper bounds of `count` buckets (+Inf comes on top)."""
    return [scale * growth ** i for i in range(count)]


LATENCY_BUCKETS = exponential(10, 1.8, 33)
EXAMPLE_BUCKETS = exponential(1, 2, 15)
BUCKETS = {EXAMPLE_COUNTS: EXAMPLE_BUCKETS}  # everything else is a latency in microseconds

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


def _bound(value: float) -> str:
    """A bucket limit as TF's exporter prints a double (absl::StrCat: six significant digits)."""
    return format(value, ".6g")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Histogram:
    """Counts per fixed bucket (the last one unbounded), a sum and a count."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def add(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class Registry:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: Dict[str, Dict[Labels, float]] = {}
        self._histograms: Dict[str, Dict[Labels, Histogram]] = {}

    def increment(self, name: str, labels: Dict[str, str], amount: float = 1) -> None:
        key = tuple(labels.items())
        with self._lock:
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0) + amount

    def observe(self, name: str, labels: Dict[str, str], value: float) -> None:
        key = tuple(labels.items())
        with self._lock:
            series = self._histograms.setdefault(name, {})
            histogram = series.get(key)
            if histogram is None:
                histogram = series[key] = Histogram(BUCKETS.get(name, LATENCY_BUCKETS))
            histogram.add(value)

    def histogram(self, name: str, labels: Dict[str, str]):
        """(bucket counts, sum, count) of one series, or None."""
        with self._lock:
            found = self._histograms.get(name, {}).get(tuple(labels.items()))
            return None if found is None else (list(found.counts), found.sum, found.count)

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
                for labels, histogram in sorted(series.items()):
                    cumulative = 0
                    for bound, count in zip(histogram.bounds, histogram.counts):
                        cumulative += count
                        lines.append(f"{metric}_bucket{_labels(labels, (('le', _bound(bound)),))} {cumulative}")
                    lines.append(f"{metric}_bucket{_labels(labels, (('le', '+Inf'),))} {histogram.count}")
                    lines.append(f"{metric}_sum{_labels(labels)} {_number(histogram.sum)}")
                    lines.append(f"{metric}_count{_labels(labels)} {histogram.count}")
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
