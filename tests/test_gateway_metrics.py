"""The gateway's own Prometheus metrics (gateway/metrics.py), on the real application: requests
counted by their route's template, method and status, with their durations; the levels read when
scraped; served on a port of their own and never on the API's. Triton is not asked for anything
(none listens), nor the jobs database opened (no lifespan)."""
from __future__ import annotations

import argparse
import re
import urllib.request

import pytest
from starlette.testclient import TestClient

from tritonasr.gateway import cli as gateway_cli
from tritonasr.gateway.app import create_app
from tritonasr.gateway.drain import Drain
from tritonasr.gateway.settings import GatewaySettings
from tritonasr.serving.server import free_port

KEY = "metrics-test-key"


def sample(text: str, name: str, **labels: str) -> float:
    """The value of `name`'s one series with these labels (and any others), or 0 when there is none."""
    total, found = 0.0, False
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if not match:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total, found = total + float(match.group(2)), True
    return total if found else 0.0


@pytest.fixture
def gateway():
    drain = Drain(0)
    app = create_app(GatewaySettings(triton_url="127.0.0.1:1", api_keys=(KEY,), max_inflight=3), drain)
    return app, TestClient(app), drain  # (no lifespan: no database, no workers)


def test_requests_are_counted_by_route_template_method_and_status(gateway):
    app, client, _ = gateway
    metrics = app.state.metrics
    assert client.get("/healthz").status_code == 200
    assert client.get("/no/such/thing/42").status_code == 404
    assert client.get("/v1/jobs/abc123").status_code == 401  # no key
    assert client.get("/v1/jobs/def456").status_code == 401
    assert client.get("/v1/audio/transcriptions").status_code == 405  # POST only
    text = metrics.exposition()

    requests = "tritonasr_gateway_requests_total"
    assert sample(text, requests, route="/healthz", method="GET", status="200") == 1
    assert sample(text, requests, route="other", method="GET", status="404") == 1
    assert sample(text, requests, route="/v1/jobs/{job_id}", method="GET", status="401") == 2
    assert sample(text, requests, route="/v1/audio/transcriptions", method="GET", status="405") == 1
    # Never a raw path with its ids: every route label is a template (or "other").
    routes = set(re.findall(r'route="([^"]*)"', text))
    assert not any(name in route for route in routes for name in ("abc123", "def456", "42"))

    seconds = "tritonasr_gateway_request_seconds"
    assert sample(text, f"{seconds}_count", route="/v1/jobs/{job_id}") == 2
    assert sample(text, f"{seconds}_count", route="other") == 1
    assert sample(text, f"{seconds}_bucket", route="/healthz", le="+Inf") == 1
    assert sample(text, f"{seconds}_sum", route="/healthz") > 0
    assert "# HELP tritonasr_gateway_requests_total" in text

    # The API port has no /metrics: callers never see them.
    assert client.get("/metrics").status_code == 404
    assert "tritonasr_gateway" not in client.get("/metrics").text


def test_a_request_refused_before_routing_keeps_its_route(gateway):
    """Draining refuses a transcription before the router sees it: still its route, not "other"."""
    app, client, drain = gateway
    drain.begin()
    assert client.post("/v1/audio/transcriptions", headers={"Authorization": f"Bearer {KEY}"}).status_code == 503
    text = app.state.metrics.exposition()
    assert sample(text, "tritonasr_gateway_requests_total", route="/v1/audio/transcriptions", method="POST",
                  status="503") == 1


def test_levels_are_read_when_scraped(gateway):
    app, client, drain = gateway
    metrics = app.state.metrics
    text = metrics.exposition()
    for name, value in (("open_work", 0), ("draining", 0), ("offline_waiting", 0), ("offline_inflight", 0),
                        ("max_inflight", 3)):
        assert sample(text, f"tritonasr_gateway_{name}") == value, name
    for route in ("/v1/stream", "/"):  # there from the start, at 0
        assert f'tritonasr_gateway_open_sockets{{route="{route}"}} 0.0' in text
    for result in ("done", "failed", "retried", "discarded"):
        assert f'tritonasr_gateway_job_files_total{{result="{result}"}} 0.0' in text

    drain.open += 2
    drain.begin()
    metrics.job_file("done")
    text = metrics.exposition()
    assert sample(text, "tritonasr_gateway_open_work") == 2
    assert sample(text, "tritonasr_gateway_draining") == 1
    assert sample(text, "tritonasr_gateway_job_files_total", result="done") == 1


def test_an_open_socket_is_counted_by_its_route(gateway):
    app, client, _ = gateway
    metrics = app.state.metrics
    with client.websocket_connect("/v1/stream") as socket:
        text = metrics.exposition()
        assert sample(text, "tritonasr_gateway_open_sockets", route="/v1/stream") == 1
        assert sample(text, "tritonasr_gateway_open_work") == 1
        socket.close()
    text = metrics.exposition()
    assert sample(text, "tritonasr_gateway_open_sockets", route="/v1/stream") == 0
    assert sample(text, "tritonasr_gateway_open_work") == 0


def test_two_apps_count_apart():
    first, second = (create_app(GatewaySettings(triton_url="127.0.0.1:1")) for _ in range(2))
    TestClient(first).get("/healthz")
    assert sample(first.state.metrics.exposition(), "tritonasr_gateway_requests_total", route="/healthz") == 1
    assert sample(second.state.metrics.exposition(), "tritonasr_gateway_requests_total", route="/healthz") == 0


def test_the_metrics_port_serves_prometheus_text(gateway):
    app, client, _ = gateway
    client.get("/healthz")
    port = free_port()
    server = app.state.metrics.serve("127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert sample(text, "tritonasr_gateway_requests_total", route="/healthz", status="200") == 1


def test_metrics_flags(monkeypatch, capsys):
    monkeypatch.delenv("TRITONASR_API_KEY", raising=False)
    parser = argparse.ArgumentParser()
    gateway_cli.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.metrics_host, args.metrics_port) == ("127.0.0.1", 8082)
    for flags, message in ((["--metrics-port", "-1"], "--metrics-port must be a port"),
                           (["--port", "9000", "--metrics-port", "9000"], "is the API's --port")):
        assert gateway_cli.main(parser.parse_args(flags)) == 2
        assert message in capsys.readouterr().err
