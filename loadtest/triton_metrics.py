"""Triton's Prometheus metrics, per model: how many requests, how they were batched, how long
they queued."""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

COUNTERS = {  # our name: Triton's counter
    "requests": "nv_inference_request_success",
    "inferences": "nv_inference_count",  # batch items
    "executions": "nv_inference_exec_count",  # model runs: inferences / executions = mean batch size
    "queue_us": "nv_inference_queue_duration_us",
    "compute_us": "nv_inference_compute_infer_duration_us",
}


def parse(text: str) -> dict[str, dict[str, float]]:
    """{model: {our counter name: value}} from the metrics endpoint's text."""
    wanted = {triton: ours for ours, triton in COUNTERS.items()}
    models: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # The parser names counter samples with the _total suffix Triton leaves out.
            ours = wanted.get(sample.name.removesuffix("_total"))
            if ours is not None and "model" in sample.labels:
                counters = models.setdefault(sample.labels["model"], dict.fromkeys(COUNTERS, 0.0))
                counters[ours] += sample.value
    return models


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, dict[str, float]]:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - a URL the user gave
        return parse(response.read().decode())


def counter_deltas(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """What each model's counters grew by between two scrapes (models that did nothing left out)."""
    deltas = {}
    for model, counters in after.items():
        delta = {name: value - before.get(model, {}).get(name, 0.0) for name, value in counters.items()}
        if delta["requests"] > 0 or delta["executions"] > 0:
            deltas[model] = delta
    return deltas


def gauge_sum(url: str, name: str, timeout_s: float = 5.0) -> float:
    """The sum over all label sets of one metric (e.g. tritonasr_open_streams of every instance)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - a URL the user gave
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name)
