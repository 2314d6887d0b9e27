"""The Helm chart's balancer as it runs in a pod: the chart's rendered nginx configuration, run by
Debian's nginx, in front of three real tritonservers on 127.0.0.1-3 speaking TLS with API keys.
It finds them as the pod does, by asking a DNS server (dnslib, standing in for the cluster's DNS)
for the servers' headless Service name, which answers with the ready pods' addresses. Each call
goes to one of them at random (nginx rotates the answer at random per lookup), so the shares are
checked against bounds that a fair spread misses once in tens of thousands of runs, not ±20%;
a pod that leaves the answer (not ready, draining) stops getting calls."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from tritonasr.audio import load_audio
from tritonasr.client.connection import Credentials
from tritonasr.client.offline import OfflineClient
from tritonasr.client.stream import StreamingClient, split_chunks
from tritonasr.serving.server import ServerConfig, TlsFiles, TritonServer, free_port

from conftest import DATA
from test_e2e_balancer import MODELS, Nginx, _metric, _successes
from test_kubernetes import NAMESPACE, one, render

pytestmark = pytest.mark.e2e

KEY = "kubernetes-balancer-test-key"
ADDRESSES = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
SERVERS_HOST = f"asr-tritonasr-servers.{NAMESPACE}.svc"


class ServiceDns(BaseResolver):
    """A records of the servers' headless Service: the addresses of the ready pods, 5 s TTL."""

    def __init__(self, addresses: list[str]):
        self.addresses = list(addresses)

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        if name != SERVERS_HOST:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            for address in self.addresses:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=5))
        return reply  # other types of the name (AAAA): no records


class ChartBalancer(Nginx):
    """Nginx with the chart's configuration (the ConfigMap's template as the image's entrypoint
    fills it in), listening on a port of its own; the servers' port is the test's."""

    def __init__(self, binary, directory, tls, dns_port: int, servers_port: int, credentials: Credentials):
        template = one(render(), "ConfigMap")["data"]["tritonasr.conf.template"]
        self.binary, self.directory, self.process, self.credentials = binary, directory, None, credentials
        self.port = free_port()
        config = (template.replace("${NGINX_LOCAL_RESOLVERS}", f"127.0.0.1:{dns_port}")
                  .replace("grpcs://$tritonasr_servers:8001", f"grpcs://$tritonasr_servers:{servers_port}")
                  .replace("listen 8443 ssl http2;", f"listen 127.0.0.1:{self.port} ssl http2;")
                  .replace("listen 8081;", f"listen 127.0.0.1:{free_port()};")
                  .replace("/tls/tls.crt", str(tls / "server.crt")).replace("/tls/tls.key", str(tls / "server.key"))
                  .replace("/tls/ca.crt", str(tls / "ca.crt")))
        assert "${" not in config and f":{self.port} ssl" in config
        self.write_config(config)


@pytest.fixture(scope="module")
def pods(model_repository, tmp_path_factory, nginx, make_certs):
    tls = make_certs(tmp_path_factory.mktemp("tls"), SERVERS_HOST)
    port = free_port()  # every pod's gRPC port is the same, as in the chart
    servers = [TritonServer(ServerConfig(model_repository, port, free_port(), free_port(), models=MODELS,
                                         grpc_host=address, tls=TlsFiles(tls / "server.crt", tls / "server.key"),
                                         api_keys=[KEY], extra_args=["--exit-timeout-secs=5"]))
               for address in ADDRESSES]
    dns = ServiceDns(ADDRESSES)
    dns_port = free_port()
    dns_server = DNSServer(dns, port=dns_port, address="127.0.0.1", logger=DNSLogger(logf=lambda _: None))
    dns_server.start_thread()
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda server: server.start(), servers))
        credentials = Credentials(api_key=KEY, tls_ca=tls / "ca.crt")
        balancer = ChartBalancer(nginx, tmp_path_factory.mktemp("nginx"), tls, dns_port, port, credentials).start()
        try:
            yield servers, dns, balancer, credentials
        finally:
            balancer.stop()
    finally:
        dns_server.stop()
        for server in servers:
            server.stop()


def test_offline_requests_are_spread_over_the_ready_pods(pods):
    """90 requests, 30 each on average: fewer than 12 on one pod would be 4 standard deviations off."""
    servers, _, balancer, credentials = pods
    samples = load_audio(DATA / "one_phrase.wav").samples
    seconds = samples.size / 16000
    before = _successes(servers, seconds)
    with OfflineClient(balancer.url, timeout_s=60, credentials=credentials) as client:  # one channel, TLS
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: client.transcribe(samples), range(90)))
    counts = [round(after - was) for after, was in zip(_successes(servers, seconds), before)]
    assert sum(counts) == 90 and min(counts) >= 12, counts
    assert all(result == results[0] and result["segments"] for result in results)


def test_live_streams_are_spread_over_the_ready_pods(pods):
    servers, _, balancer, credentials = pods
    samples = load_audio(DATA / "pause_1s.wav").samples
    before = [_metric(server, "tritonasr_requests", model="asr_stream") for server in servers]

    async def run():
        async with StreamingClient(balancer.url, credentials=credentials, finish_timeout_s=60) as client:
            async def one_stream():
                return [s.text async for s in client.stream(split_chunks(samples, 100)) if s.final]
            return await asyncio.gather(*(one_stream() for _ in range(24)))

    finals = asyncio.run(run())
    assert all(stream == finals[0] and stream for stream in finals)
    counts = [_metric(server, "tritonasr_requests", model="asr_stream") - was for server, was in zip(servers, before)]
    assert sum(counts) == 24 and min(counts) >= 1, counts


def test_a_pod_that_leaves_the_service_gets_no_more_calls(pods):
    """The third pod is no longer ready (its address leaves the Service's DNS answer): once the
    balancer's cached answer expires (5 s), every call goes to the other two."""
    servers, dns, balancer, credentials = pods
    samples = load_audio(DATA / "one_phrase.wav").samples
    seconds = samples.size / 16000
    dns.addresses = ADDRESSES[:2]
    try:
        time.sleep(6)
        before = _successes(servers, seconds)
        with OfflineClient(balancer.url, timeout_s=60, credentials=credentials) as client:
            for _ in range(12):
                client.transcribe(samples)
        counts = [round(after - was) for after, was in zip(_successes(servers, seconds), before)]
        assert counts[2] == 0 and counts[0] + counts[1] == 12, counts
    finally:
        dns.addresses = list(ADDRESSES)
