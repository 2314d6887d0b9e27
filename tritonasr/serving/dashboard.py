"""The Grafana dashboard of the GPU deployment, and the metric names its PromQL queries: the
end-to-end tests check that the server exports every one of them."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from tritonasr.paths import deploy_files

DASHBOARD = deploy_files() / "grafana" / "dashboards" / "tritonasr.json"

# PromQL words that are neither metrics nor followed by "(": binary and set operators, modifiers.
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "atan2", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")  # label matchers (strings already gone)
_RANGE = re.compile(r"\[[^\[\]]*\]")  # range and subquery selectors: [1m], [5m:30s], [$__rate_interval]
# Label lists of aggregations and vector matching: sum by (le) (…), … / on (model) group_left (kind) …
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")  # Grafana's template variables
_DURATION = re.compile(r"\b\d+(?:\.\d+)?(?:ms|[smhdwy])\b")  # offset 5m
_IDENTIFIER = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?")


def expressions(dashboard: dict) -> Iterator[str]:
    """Every PromQL expression of the dashboard's panels (rows' nested panels included)."""
    def walk(node) -> Iterator[str]:
        if isinstance(node, dict):
            for target in node.get("targets", []) or []:
                if isinstance(target, dict) and target.get("expr"):
                    yield target["expr"]
            for key, value in node.items():
                if key != "targets":
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    yield from walk(dashboard.get("panels", []))


def expression_metrics(expr: str) -> set[str]:
    """The metric names one PromQL expression selects, exactly as written (histogram series keep
    their _bucket, _sum or _count suffix). Functions, aggregations, label names, keywords,
    numbers and Grafana variables are left out."""
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    text = _DURATION.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue  # a function or an aggregation, or an operator
        names.add(name)
    return names


def metric_names(dashboard_json_path: str | Path = DASHBOARD) -> set[str]:
    """Every metric name the dashboard's PromQL expressions query."""
    dashboard = json.loads(Path(dashboard_json_path).read_text())
    names: set[str] = set()
    for expr in expressions(dashboard):
        names |= expression_metrics(expr)
    return names
