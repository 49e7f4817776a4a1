"""The metrics registry: TF Serving's fixed histogram buckets, so memory does not grow with traffic."""
from __future__ import annotations

import pytest


def test_histograms_keep_fixed_buckets_whatever_the_traffic():
    from serving.metrics import LATENCY_BUCKETS, REQUEST_LATENCY, Registry

    registry = Registry()
    labels = {"model_name": "m", "API": "predict", "entrypoint": "REST"}
    for value in (5, 10, 11, 1e12):
        registry.observe(REQUEST_LATENCY, labels, value)
    counts, total, count = registry.histogram(REQUEST_LATENCY, labels)
    assert len(LATENCY_BUCKETS) == 33 and LATENCY_BUCKETS[:3] == pytest.approx([10, 18, 32.4])
    assert counts[0] == 2 and counts[1] == 1 and counts[-1] == 1 and count == 4 and total == 5 + 10 + 11 + 1e12
    for i in range(100_000):
        registry.observe(REQUEST_LATENCY, labels, float(i))
    counts, _, count = registry.histogram(REQUEST_LATENCY, labels)
    assert len(counts) == 34 and count == 100_004  # memory does not grow with the number of samples


def test_render_is_prometheus_text_with_cumulative_buckets():
    from serving.metrics import REQUEST_COUNT, REQUEST_LATENCY, Registry

    registry = Registry()
    labels = {"model_name": "m", "API": "predict", "entrypoint": "REST"}
    registry.observe(REQUEST_LATENCY, labels, 5)
    registry.observe(REQUEST_LATENCY, labels, 25)
    registry.increment(REQUEST_COUNT, {"model_name": "m", "status": "OK"})
    lines = registry.render().splitlines()
    assert "# TYPE :tensorflow:serving:request_count counter" in lines
    assert ':tensorflow:serving:request_count{model_name="m",status="OK"} 1' in lines
    assert "# TYPE :tensorflow:serving:request_latency histogram" in lines
    series = ':tensorflow:serving:request_latency_bucket{model_name="m",API="predict",entrypoint="REST",le="'
    buckets = [line[len(series):] for line in lines if line.startswith(series)]
    assert buckets[:4] == ['10"} 1', '18"} 1', '32.4"} 2', '58.32"} 2']
    assert buckets[-1] == '+Inf"} 2' and len(buckets) == 34
    assert ':tensorflow:serving:request_latency_sum{model_name="m",API="predict",entrypoint="REST"} 30' in lines
    assert ':tensorflow:serving:request_latency_count{model_name="m",API="predict",entrypoint="REST"} 2' in lines
    assert not any(line.startswith("# HELP") for line in lines)
