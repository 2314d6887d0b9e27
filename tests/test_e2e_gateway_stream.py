"""`WS /v1/stream` (docs/websocket-stream.md) on the real gateway process, in front of the
session's real tritonserver, spoken to by the `websockets` client library: a stream's finals equal
the client library's for the same audio (16 kHz PCM and float32, 8 kHz PCM and mu-law), partials
and text-first speakers arrive in their place; keys, origins, bad messages, a full server, the
server's own refusal and an unreachable Triton close the socket with the documented code and
reason, and the gateway serves the next stream; a client that hangs up frees the server's stream
slot at once, one gone after `end` lets the stream finish; concurrent streams keep to their own
audio."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import soxr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tritonasr.audio import encode, load_audio
from tritonasr.client.stream import SpeakerUpdate, StreamingClient, split_chunks
from tritonasr.serving.server import ServerConfig, TritonServer, free_port

from conftest import DATA
from test_e2e_gateway import KEY, Gateway, wait_for_open_streams

pytestmark = pytest.mark.e2e

FRAME_MS = 100
ORIGIN = "https://app.example.com"
FINAL_KEYS = ("index", "start_ms", "end_ms", "text", "language", "emotion", "event")


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    running = Gateway(server.grpc_url, "--api-key", KEY, "--cors-origin", ORIGIN,
                      log=tmp_path_factory.mktemp("gateway_stream") / "log")
    yield running
    running.stop()


def _frames(path, rate: int = 16000, encoding: str = "pcm16") -> list[bytes]:
    """A file's audio at `rate` in `encoding` (float32: little-endian), as messages of FRAME_MS."""
    samples = load_audio(path).samples
    if rate != 16000:
        samples = np.clip(soxr.resample(samples, 16000, rate, quality="HQ"), -1, 1).astype(np.float32)
    if encoding == "float32":
        return [chunk.astype("<f4").tobytes() for chunk in split_chunks(samples, FRAME_MS, sample_rate=rate)]
    data = encode(samples, encoding)
    return [bytes(chunk) for chunk in split_chunks(data, FRAME_MS, sample_rate=rate, encoding=encoding)]


async def _library(server, frames: list[bytes], rate: int = 16000, encoding: str = "pcm16", **options) -> dict:
    """The client library's stream of the same bytes (float32: the same samples), straight to
    Triton: finals as the gateway words them."""
    if encoding == "float32":
        frames = [np.frombuffer(frame, "<f4") for frame in frames]
    async with StreamingClient(server.grpc_url) as client:
        stream = client.stream(frames, sample_rate=rate, encoding=encoding, **options)
        items = [item async for item in stream]
    finals = [{"index": s.segment_index, "start_ms": s.start_ms, "end_ms": s.end_ms, "text": s.text,
               "language": s.language, "emotion": s.emotion, "event": s.event}
              for s in items if not isinstance(s, SpeakerUpdate) and s.final]
    return {"finals": finals, "summary": stream.summary}


def reference(server, path, rate: int = 16000, encoding: str = "pcm16", **options) -> dict:
    frames = _frames(path, rate, encoding)
    return {"frames": frames, **asyncio.run(_library(server, frames, rate, encoding, **options))}


@pytest.fixture(scope="module")
def speech(server) -> dict:
    return reference(server, DATA / "pause_1s.wav")


async def _ws(gateway, start: dict | str | bytes | None, frames=(), *, end: bool = True, headers=None,
              origin=None, pause_s: float = 0.0, timeout_s: float = 60) -> dict:
    """One socket: `start` (a dict as JSON, or raw text/bytes), the frames (`pause_s` apart), `end`;
    every message received until the server closes. {"messages", "code", "reason"}."""
    url = gateway.url.replace("http://", "ws://") + "/v1/stream"
    messages: list = []
    async with connect(url, additional_headers=headers or {}, origin=origin, proxy=None, max_size=None) as ws:
        async def send():
            if start is not None:
                await ws.send(json.dumps(start) if isinstance(start, dict) else start)
            for frame in frames:
                await ws.send(frame)
                if pause_s:
                    await asyncio.sleep(pause_s)
            if end:
                await ws.send(json.dumps({"type": "end"}))

        async def receive():
            try:
                while True:
                    messages.append(json.loads(await ws.recv()))
            except ConnectionClosed:
                pass

        sender = asyncio.ensure_future(send())
        try:
            await asyncio.wait_for(receive(), timeout_s)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        return {"messages": messages, "code": ws.close_code, "reason": ws.close_reason}


def ws_stream(gateway, start, frames=(), **kwargs) -> dict:
    return asyncio.run(_ws(gateway, start, frames, **kwargs))


def _finals(messages: list[dict]) -> list[dict]:
    return [{key: m[key] for key in FINAL_KEYS} for m in messages if m["type"] == "final"]


def _start(**options) -> dict:
    return {"type": "start", "api_key": KEY, **options}


def test_finals_equal_the_client_librarys(gateway, speech):
    result = ws_stream(gateway, {"type": "start", "language": "auto"}, speech["frames"],
                       headers={"Authorization": f"Bearer {KEY}", "X-Request-ID": "ws-caller-7"})
    messages = result["messages"]
    assert result["code"] == 1000, result
    assert messages[0] == {"type": "started", "request_id": "ws-caller-7", "sample_rate": 16000, "encoding": "pcm16",
                           "max_frame_bytes": 64000}
    assert len(speech["finals"]) >= 2
    assert _finals(messages) == speech["finals"]
    assert messages[-1] == {"type": "summary", "duration_ms": speech["summary"].duration_ms,
                            "segment_count": speech["summary"].segment_count}
    final = next(m for m in messages if m["type"] == "final")
    assert final["speaker"]["label"] and final["speaker_pending"] is False and final["words"] is None
    # The server's part of each final's latency, as the gateway timed it.
    assert all(m["triton_ms"] > 0 for m in messages if m["type"] == "final")
    assert {m["type"] for m in messages} == {"started", "final", "summary"}  # no partials unless asked
    # One log line per stream: its id, close code and finals (written once the socket is closed).
    gateway.wait_for_log(rf"ws-caller-7 WS /v1/stream 1000 .* {len(speech['finals'])} finals")


def test_partials_come_before_the_final_of_their_segment(gateway, speech):
    messages = ws_stream(gateway, _start(partials_ms=300), speech["frames"])["messages"]
    assert _finals(messages) == speech["finals"]
    partials = [i for i, m in enumerate(messages) if m["type"] == "partial"]
    assert partials
    for i in partials:
        partial = messages[i]
        assert set(partial) == {"type", "index", "start_ms", "end_ms", "text"}
        final_at = next(j for j, m in enumerate(messages) if m["type"] == "final" and m["index"] == partial["index"])
        assert final_at > i
    assert {messages[i]["index"] for i in partials} <= {f["index"] for f in speech["finals"]}


@pytest.mark.parametrize("rate, encoding, frame_bytes", [(8000, "pcm16", 1600), (8000, "mulaw", 800),
                                                       (16000, "float32", 6400)])
def test_telephony_and_float32_streams(gateway, server, rate, encoding, frame_bytes):
    """8 kHz bytes as a phone line carries them, and Web Audio's float32 samples: what the client
    library gets for the same audio."""
    expected = reference(server, DATA / "pause_1s.wav", rate, encoding)
    assert len(expected["frames"][0]) == frame_bytes
    result = ws_stream(gateway, _start(sample_rate=rate, encoding=encoding), expected["frames"])
    assert result["code"] == 1000 and result["messages"][0]["max_frame_bytes"] == frame_bytes * 20
    assert _finals(result["messages"]) == expected["finals"] and expected["finals"]


def test_text_first_sends_speakers_after_their_finals(gateway, speech):
    messages = ws_stream(gateway, _start(text_first=True), speech["frames"])["messages"]
    assert _finals(messages) == speech["finals"]
    pending = [m["index"] for m in messages if m["type"] == "final" and m["speaker_pending"]]
    assert pending and all(m["speaker"] is None for m in messages if m["type"] == "final" and m["speaker_pending"])
    speakers = [(i, m) for i, m in enumerate(messages) if m["type"] == "speaker"]
    assert [m["index"] for _, m in speakers] == pending
    for i, update in speakers:
        assert update["speaker"]["label"]
        assert i > next(j for j, m in enumerate(messages) if m["type"] == "final" and m["index"] == update["index"])
    assert messages[-1]["type"] == "summary"


def _refused(result: dict, code: int, error: str, reason: str) -> None:
    assert result["code"] == code, result
    assert result["messages"][-1]["type"] == "error" and result["messages"][-1]["code"] == error, result
    assert reason in result["reason"] and reason in result["messages"][-1]["message"], result


def test_keys_are_checked(gateway):
    _refused(ws_stream(gateway, {"type": "start"}), 1008, "invalid_api_key", "an API key is required")
    _refused(ws_stream(gateway, _start(api_key="wrong-key")), 1008, "invalid_api_key", "not valid")
    _refused(ws_stream(gateway, {"type": "start"}, headers={"Authorization": "Bearer wrong-key"}),
             1008, "invalid_api_key", "not valid")
    # A browser page from an origin the gateway does not serve; one it does (no audio: an empty stream).
    _refused(ws_stream(gateway, _start(), origin="https://evil.example"), 1008, "origin_not_allowed", "evil.example")
    empty = ws_stream(gateway, _start(), origin=ORIGIN)
    assert empty["code"] == 1000 and [m["type"] for m in empty["messages"]] == ["started", "summary"]
    assert empty["messages"][-1] == {"type": "summary", "duration_ms": 0, "segment_count": 0}


@pytest.mark.parametrize("start, frames, code, error, reason", [
    (_start(language="xx"), [], 1007, "invalid_option", "`language` must be one of"),
    (_start(languge="en"), [], 1007, "invalid_option", "unknown field in the start message: 'languge'"),
    (_start(endpointing="fast"), [], 1007, "invalid_option", "unknown endpointing preset"),
    ('{"type": "start", ', [], 1007, "invalid_json", "must be a JSON object"),
    (b"\x00\x01" * 800, [], 1003, "start_required", "audio before the start message"),
    ({"type": "end"}, [], 1008, "start_required", "the first message must be"),
    (_start(), [b"\x00" * 1600, b"\x00" * 1601], 1007, "invalid_audio", "1601 bytes of pcm16 does not hold whole"),
    (_start(encoding="float32"), [np.array([0, np.nan], "<f4").tobytes()], 1007, "invalid_audio", "1 NaN"),
    (_start(), [b"\x00" * 64002], 1009, "frame_too_large", "at most 2000 ms"),
    (_start(sample_rate=8000, encoding="mulaw"), [b"\xff" * 16001], 1009, "frame_too_large", "16000 bytes"),
    (_start(), ['{"type": "pause"}'], 1008, "unexpected_message", '"pause"'),
    # (told once the server has finished the stream: it is not cancelled after `end`)
    (_start(), [b"\x00" * 3200] * 5 + ['{"type": "end"}'] * 2, 1008, "unexpected_message", '"end" after end'),
], ids=["language", "unknown-field", "endpointing", "json", "binary-first", "end-first", "odd-pcm16", "nan-float32",
        "too-large", "too-large-mulaw", "unknown-type", "second-end"])
def test_bad_messages_close_with_their_code(gateway, start, frames, code, error, reason):
    _refused(ws_stream(gateway, start, frames, end=False), code, error, reason)


def test_the_gateway_serves_on_after_refusals(gateway, speech):
    """(After the refusals above, in this module's order) a whole stream still works."""
    result = ws_stream(gateway, _start(), speech["frames"])
    assert result["code"] == 1000 and _finals(result["messages"]) == speech["finals"]


def _settled(server) -> float:
    """No stream open on the server: those the tests before cancelled are freed (about a second
    after their cancel)."""
    wait_for_open_streams(server, 0, 10)
    return 0


def test_a_client_that_hangs_up_frees_the_servers_stream(gateway, server, speech):
    before = _settled(server)

    async def hang_up():
        url = gateway.url.replace("http://", "ws://") + "/v1/stream"
        async with connect(url, proxy=None) as ws:
            await ws.send(json.dumps(_start()))
            assert json.loads(await ws.recv())["type"] == "started"
            for frame in speech["frames"][:20]:
                await ws.send(frame)
            # The stream is open on the server (its START went out with `started`).
            await asyncio.to_thread(wait_for_open_streams, server, before + 1, 10)
            ws.transport.abort()  # no close frame: the connection is simply lost

    asyncio.run(hang_up())
    # Freed about a second after the hang-up; the test server's idle timeout (4 s) would take longer.
    assert wait_for_open_streams(server, before, 10) < 3
    gateway.wait_for_log(r"WS /v1/stream 100[56] ")


def test_a_client_gone_after_end_lets_the_stream_finish(gateway, server):
    """After `end` the server finishes what it has (not cancelled while it does: Triton 2.51 could
    crash), its results going nowhere, and the slot is given back."""
    long = reference(server, DATA / "pause_3s.wav")
    before = _settled(server)

    async def send_and_leave():
        url = gateway.url.replace("http://", "ws://") + "/v1/stream"
        async with connect(url, proxy=None) as ws:
            await ws.send(json.dumps(_start()))
            for frame in long["frames"]:
                await ws.send(frame)
            await ws.send(json.dumps({"type": "end"}))
        # (the close frame follows `end` at once, before the server is done)

    asyncio.run(send_and_leave())
    wait_for_open_streams(server, before, 10)
    gateway.wait_for_log(rf"WS /v1/stream 1000 client closed .* {len(long['finals'])} finals", timeout_s=10)


@pytest.fixture(scope="module")
def one_slot(model_repository, tmp_path_factory):
    """A server with room for one stream, and a gateway (without keys) in front of it."""
    view = tmp_path_factory.mktemp("one_slot_models")
    for name in ("vad", "sensevoice", "asr_stream"):
        (view / name).symlink_to(model_repository / name, target_is_directory=True)
    config = ServerConfig(view, free_port(), free_port(), free_port(), max_streams=1,
                          extra_args=["--exit-timeout-secs=5"])
    with TritonServer(config) as limited:
        running = Gateway(limited.grpc_url, log=tmp_path_factory.mktemp("one_slot_gateway") / "log")
        yield limited, running
        running.stop()


def test_a_full_server_is_told_as_busy(one_slot, speech):
    """The one slot held by another stream: the gateway's stream is refused, once the client
    library's own retries are done (each new try goes out with the audio that follows), with
    server_busy and 1013."""
    limited, gateway = one_slot

    async def run():
        release = asyncio.Event()

        async def held_chunks():
            for frame in speech["frames"][:5]:
                yield frame
            await release.wait()

        async with StreamingClient(limited.grpc_url) as client:
            held = asyncio.ensure_future(_consume(client.stream(held_chunks(), encoding="pcm16")))
            await asyncio.to_thread(wait_for_open_streams, limited, 1, 10)
            began = time.monotonic()
            refused = await _ws(gateway, {"type": "start"}, speech["frames"], end=False, pause_s=0.05)
            took = time.monotonic() - began
            release.set()
            await held
        return refused, took

    refused, took = asyncio.run(run())
    _refused(refused, 1013, "server_busy", "at its limit of 1 open streams")
    assert refused["messages"][0]["type"] == "started" and took < 5
    # The slot free again, the gateway's next stream is served.
    wait_for_open_streams(limited, 0, 10)
    served = ws_stream(gateway, {"type": "start"}, speech["frames"])
    assert served["code"] == 1000 and _finals(served["messages"]) == speech["finals"]
    # The server's own refusal of the stream (INVALID_ARGUMENT): its message, and 1007.
    _refused(ws_stream(gateway, {"type": "start", "engine": "parakeet"}, speech["frames"][:3], end=False),
             1007, "invalid_argument", "unknown ASR engine 'parakeet'")


async def _consume(stream) -> list:
    return [item async for item in stream]


def test_an_unreachable_triton_is_told(tmp_path):
    gateway = Gateway(f"127.0.0.1:{free_port()}", log=tmp_path / "log")
    try:
        _refused(ws_stream(gateway, {"type": "start"}, end=False), 1013, "triton_unavailable", "cannot reach")
    finally:
        gateway.stop()


def test_concurrent_streams_keep_to_their_own_audio(gateway, server, speech):
    other = reference(server, DATA / "pause_3s.wav")
    assert other["finals"] != speech["finals"]

    async def both():
        return await asyncio.gather(_ws(gateway, _start(), speech["frames"], pause_s=0.005),
                                    _ws(gateway, _start(), other["frames"], pause_s=0.005))

    first, second = asyncio.run(both())
    assert first["code"] == second["code"] == 1000
    assert _finals(first["messages"]) == speech["finals"]
    assert _finals(second["messages"]) == other["finals"]
