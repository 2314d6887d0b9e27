"""FunASR's runtime WebSocket protocol at the gateway's root (docs/funasr-protocol.md), on the real
gateway process in front of the session's real tritonserver. The client here is written from
FunASR's protocol document (runtime/docs/websocket_protocol.md) and behaves as its Python client
(runtime/python/websocket/funasr_wss_client.py) does: the JSON configuration, the PCM in strides of
60 * chunk_size[1] / chunk_interval ms, `{"is_speaking": false, "is_end": true}`, then messages
until the one with `is_end`, which must have `is_final` true (as FunASR's HTML5 client, which
stops at the first `is_final` true, needs too). Offline texts equal the client library's
asr_offline transcript, 2pass finals its stream's finals; keys, TLS, bad messages and a client
that drops mid-stream behave as documented."""
from __future__ import annotations

import asyncio
import io
import json
import re
import ssl
from pathlib import Path

import numpy as np
import pytest
import soxr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tritonasr.audio import decode, encode, load_audio, resample
from tritonasr.client.offline import OfflineClient
from tritonasr.client.stream import StreamingClient, split_chunks
from tritonasr.gateway.transcriptions import joined_text
from tritonasr.serving.server import free_port

from conftest import DATA
from test_e2e_gateway import KEY, Gateway, open_streams, wait_for_open_streams

pytestmark = pytest.mark.e2e

SPEECH = DATA / "pause_1s.wav"
CHUNK_SIZE = [5, 10, 5]  # FunASR's default: 600 ms, so partials every 600 ms
CHUNK_INTERVAL = 10  # the official client's: strides of 60 ms
BEARER = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    running = Gateway(server.grpc_url, "--api-key", KEY, log=tmp_path_factory.mktemp("gateway_funasr") / "log")
    yield running
    running.stop()


def pcm16(path: Path, rate: int = 16000) -> bytes:
    samples = load_audio(path).samples
    if rate != 16000:
        samples = np.clip(soxr.resample(samples, 16000, rate, quality="HQ"), -1, 1).astype(np.float32)
    return encode(samples, "pcm16")


def config(mode: str, **fields) -> dict:
    """The official client's first message."""
    return {"mode": mode, "chunk_size": CHUNK_SIZE, "chunk_interval": CHUNK_INTERVAL, "encoder_chunk_look_back": 4,
            "decoder_chunk_look_back": 0, "audio_fs": 16000, "wav_name": "demo", "wav_format": "pcm",
            "is_speaking": True, "hotwords": json.dumps({"阿里巴巴": 20}, ensure_ascii=False), "itn": True,
            **fields}


def strides(audio: bytes, rate: int = 16000) -> list[bytes]:
    stride = int(60 * CHUNK_SIZE[1] / CHUNK_INTERVAL / 1000 * rate * 2)
    return [audio[i:i + stride] for i in range(0, len(audio), stride)]


async def funasr_session(ws, first: dict, audio: bytes, rate: int = 16000, pace: bool = False) -> list[dict]:
    """One session on an open socket, as the official client runs it: the messages received
    until the end acknowledgement (is_end), which is checked to be the only is_final one."""
    messages: list[dict] = []

    async def send():
        await ws.send(json.dumps(first, ensure_ascii=False))
        for data in strides(audio, rate):
            await ws.send(data)
            await asyncio.sleep(60 * CHUNK_SIZE[1] / CHUNK_INTERVAL / 1000 if pace else 0)
        await ws.send(json.dumps({"is_speaking": False, "is_end": True}))

    sender = asyncio.ensure_future(send())
    try:
        while not (messages and messages[-1].get("is_end")):
            messages.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
        await sender
    finally:
        sender.cancel()
    assert [m["is_final"] for m in messages] == [False] * (len(messages) - 1) + [True], messages
    assert "error" not in messages[-1], messages[-1]
    for message in messages:
        assert message["wav_name"] == first.get("wav_name", "wav-default-id") and isinstance(message["text"], str)
    return messages


def run_session(url: str, first: dict, audio: bytes, *, headers=None, ssl_context=None, **kwargs) -> list[dict]:
    async def go():
        async with connect(url, subprotocols=["binary"], ping_interval=None, ssl=ssl_context, proxy=None,
                           additional_headers=headers or {}, max_size=None) as ws:
            assert ws.subprotocol == "binary"
            return await funasr_session(ws, first, audio, **kwargs)
    return asyncio.run(go())


def refused(url: str, *messages, headers=None) -> dict:
    """Sends `messages` (dicts as JSON, str, bytes) and reads until the server closes."""
    async def go():
        async with connect(url, ping_interval=None, proxy=None, additional_headers=headers or {}) as ws:
            received = []
            for message in messages:
                await ws.send(json.dumps(message) if isinstance(message, dict) else message)
            try:
                while True:
                    received.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            except ConnectionClosed:
                pass
            return {"messages": received, "code": ws.close_code, "reason": ws.close_reason}
    return asyncio.run(go())


def ws_url(gateway, query: str = "") -> str:
    return gateway.url.replace("http", "ws", 1) + "/" + query


def _pairs(message: dict) -> list[list[int]]:
    pairs = json.loads(message["timestamp"])  # FunASR's: a JSON string
    assert all(len(pair) == 2 and pair[0] <= pair[1] for pair in pairs)
    assert all(a[1] <= b[0] for a, b in zip(pairs, pairs[1:]))
    return pairs


def _check_sentences(message: dict, pairs: list[list[int]]) -> None:
    sentences = message["stamp_sents"]
    assert [p for s in sentences for p in s["ts_list"]] == pairs
    for s in sentences:
        assert set(s) == {"text_seg", "punc", "start", "end", "ts_list"}
        assert len(s["text_seg"].split(" ")) == len(s["ts_list"]) >= 1
        assert (s["start"], s["end"]) == (s["ts_list"][0][0], s["ts_list"][-1][1])


@pytest.fixture(scope="module")
def offline_reference(server) -> dict:
    with OfflineClient(server.grpc_url, timeout_s=120) as client:
        return {engine: client.transcribe_file(SPEECH, engine=engine, use_itn=True, with_speaker=False)
                for engine in ("sensevoice", "parakeet")}


def test_offline_mode_is_one_message_with_the_transcript(gateway, offline_reference):
    segments = offline_reference["sensevoice"]["segments"]
    assert len(segments) >= 2
    messages = run_session(ws_url(gateway), config("offline"), pcm16(SPEECH), headers=BEARER)
    assert len(messages) == 1
    message = messages[0]
    assert message["mode"] == "offline" and message["is_end"] is True
    assert message["text"] == joined_text(segments)
    pairs = _pairs(message)
    assert pairs[0][0] >= segments[0]["start_ms"] and pairs[-1][1] <= segments[-1]["end_ms"]
    _check_sentences(message, pairs)
    assert {s["start"] for s in message["stamp_sents"]} >= {s["start_ms"] for s in segments if s["text"].strip()}


def test_offline_mode_takes_files(gateway, offline_reference):
    expected = joined_text(offline_reference["sensevoice"]["segments"])
    wav = SPEECH.read_bytes()
    # A file named by its format, and FunASR's HTML5 client's way: a .wav's bytes as "PCM".
    for fields in ({"wav_format": "wav"}, {"wav_format": "PCM", "audio_fs": 16000}):
        messages = run_session(ws_url(gateway), config("offline", **fields), wav, headers=BEARER)
        assert [m["text"] for m in messages] == [expected]
    bad = refused(ws_url(gateway), {**config("offline", wav_format="mp3"), "api_key": KEY}, b"not audio at all",
                  {"is_speaking": False})
    assert bad["code"] == 1007 and "not a readable audio file" in bad["reason"]
    assert bad["messages"][-1]["is_end"] is True and bad["messages"][-1]["error"].startswith("unsupported_format")


def test_offline_word_timestamps_from_parakeet(gateway, offline_reference):
    segments = offline_reference["parakeet"]["segments"]
    words = [w for s in segments for w in s["words"]]
    assert words
    messages = run_session(ws_url(gateway), config("offline", engine="parakeet"), pcm16(SPEECH), headers=BEARER)
    message = messages[0]
    assert message["text"] == joined_text(segments)
    pairs = _pairs(message)
    _check_sentences(message, pairs)
    # Each word's units (its runs of letters and digits) share the word's span.
    expected = []
    for word in words:
        units = len(re.findall(r"[\w'’]+", word["text"]))
        for k in range(units):
            duration = word["end_ms"] - word["start_ms"]
            expected.append([word["start_ms"] + round(duration * k / units),
                             word["start_ms"] + round(duration * (k + 1) / units)])
    assert pairs == expected


@pytest.fixture(scope="module")
def stream_reference(server) -> list[dict]:
    """The client library's finals for the same PCM, straight to Triton."""
    async def go():
        async with StreamingClient(server.grpc_url) as client:
            stream = client.stream(split_chunks(pcm16(SPEECH), 100, encoding="pcm16"), encoding="pcm16",
                                   use_itn=True, with_speaker=False)
            return [{"text": s.text, "start_ms": s.start_ms, "end_ms": s.end_ms} async for s in stream if s.final]
    return asyncio.run(go())


def test_2pass_mode_gives_online_partials_and_offline_finals(gateway, stream_reference):
    finals = [f for f in stream_reference if f["text"].strip()]
    assert len(finals) >= 2
    messages = run_session(ws_url(gateway), config("2pass"), pcm16(SPEECH), headers=BEARER)
    modes = [m["mode"] for m in messages]
    assert set(modes) <= {"2pass-online", "2pass-offline", "2pass"}
    offline = [m for m in messages if m["mode"] == "2pass-offline"]
    # Each final as the client shows it: the concatenation is the transcript.
    assert [m["text"].strip() for m in offline] == [f["text"].strip() for f in finals]
    assert "".join(m["text"] for m in offline) == joined_text(finals)
    for message, final in zip(offline, finals):
        pairs = _pairs(message)
        assert final["start_ms"] <= pairs[0][0] and pairs[-1][1] <= final["end_ms"]
        _check_sentences(message, pairs)
    # Partials: each segment's online texts come before its offline text.
    assert modes.index("2pass-online") < modes.index("2pass-offline")
    assert all(m["text"] for m in messages if m["mode"] == "2pass-online")


def test_online_mode_sends_online_texts(gateway, stream_reference):
    finals = [f for f in stream_reference if f["text"].strip()]
    messages = run_session(ws_url(gateway), config("online", itn=1, svs_lang="auto"), pcm16(SPEECH),
                           headers=BEARER, pace=True)
    assert {m["mode"] for m in messages} == {"online"}
    texts = [m["text"] for m in messages]
    assert all(texts[:-1]) and len(texts) > len(finals)  # partials' additions, then each final's rest
    shown = "".join(texts)
    # Each final's last word is shown (a final ends with its segment's rest, or its correction).
    for final in finals:
        assert final["text"].split()[-1] in shown


def test_8khz_pcm_and_several_sessions_on_one_socket(gateway, server, offline_reference):
    """8 kHz PCM goes to the server as it is; after a session's end the socket takes the next one,
    configured on top of the last (as FunASR's servers keep a connection's settings)."""
    audio = pcm16(SPEECH, 8000)

    async def library():
        async with StreamingClient(server.grpc_url) as client:
            stream = client.stream(split_chunks(audio, 100, sample_rate=8000, encoding="pcm16"), sample_rate=8000,
                                   encoding="pcm16", use_itn=True, with_speaker=False)
            return [s.text for s in [s async for s in stream] if s.final and s.text.strip()]

    async def sessions():
        async with connect(ws_url(gateway), additional_headers=BEARER, proxy=None, max_size=None) as ws:
            first = await funasr_session(ws, config("2pass", audio_fs=8000, wav_name="call"), audio, rate=8000)
            second = await funasr_session(ws, {"mode": "offline", "wav_name": "call"}, audio, rate=8000)
            return first, second

    first, second = asyncio.run(sessions())
    assert [m["text"].strip() for m in first if m["mode"] == "2pass-offline"] == asyncio.run(library())
    with OfflineClient(server.grpc_url, timeout_s=120) as client:
        samples = load_audio(io.BytesIO(audio_wav(audio, 8000)), keep_rates=(8000,)).samples
        expected = client.transcribe(samples, 8000, use_itn=True, with_speaker=False)
    assert [m["text"] for m in second] == [joined_text(expected["segments"])]


def test_other_rates_are_resampled_by_the_gateway(gateway, server):
    """48 kHz PCM (a browser's rate) is resampled to 16 kHz in the gateway, in pieces: the finals
    are the library's for the same audio resampled whole."""
    audio = pcm16(SPEECH, 48000)
    whole = resample(decode(audio, "pcm16"), 48000)

    async def library():
        async with StreamingClient(server.grpc_url) as client:
            stream = client.stream(split_chunks(whole, 100), use_itn=True, with_speaker=False)
            return [s.text for s in [s async for s in stream] if s.final and s.text.strip()]

    messages = run_session(ws_url(gateway), config("2pass", audio_fs=48000), audio, rate=48000, headers=BEARER)
    finals = asyncio.run(library())
    assert finals and [m["text"].strip() for m in messages if m["mode"] == "2pass-offline"] == finals


@pytest.mark.parametrize("mode, last", [
    ("offline", {"mode": "offline", "text": "", "timestamp": "[]", "stamp_sents": []}),
    ("2pass", {"mode": "2pass", "text": ""}),
    ("online", {"mode": "online", "text": ""}),
])
def test_a_session_without_audio_ends_with_an_empty_result(gateway, mode, last):
    messages = run_session(ws_url(gateway), config(mode), b"", headers=BEARER)
    assert messages == [{"wav_name": "demo", **last, "is_final": True, "is_end": True}]


def audio_wav(pcm: bytes, rate: int) -> bytes:
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes(pcm)
    return out.getvalue()


def test_keys(gateway, offline_reference):
    expected = joined_text(offline_reference["sensevoice"]["segments"])
    for no_key in (refused(ws_url(gateway), config("2pass")),
                   refused(ws_url(gateway), config("2pass"), headers={"Authorization": "Bearer wrong"}),
                   refused(ws_url(gateway, "?api_key=wrong"), config("2pass")),
                   refused(ws_url(gateway), {**config("2pass"), "api_key": "wrong"})):
        assert no_key["code"] == 1008, no_key
        assert "API key" in no_key["reason"] and no_key["messages"][-1]["error"].startswith("invalid_api_key")
    # The key in the URL, or in the first message (FunASR's clients set no headers).
    for url, first in ((ws_url(gateway, f"?api_key={KEY}"), config("offline")),
                       (ws_url(gateway), {**config("offline"), "api_key": KEY})):
        assert run_session(url, first, pcm16(SPEECH))[0]["text"] == expected


@pytest.mark.parametrize("messages, code, reason", [
    (["this is not JSON"], 1007, "JSON object"),
    ([[1, 2]], 1007, "JSON object"),
    ([b"\x00\x01" * 800], 1008, "audio before the configuration"),
    ([{"mode": "3pass", "api_key": KEY}], 1007, "`mode` must be offline, online or 2pass"),
    ([{"mode": "2pass", "chunk_size": [5, 0, 5], "api_key": KEY}], 1007, "`chunk_size`"),
    ([{"mode": "2pass", "audio_fs": 44, "api_key": KEY}], 1007, "`audio_fs`"),
    ([{"mode": "online", "wav_format": "mp3", "api_key": KEY}, b"\x00\x00"], 1007, "PCM only"),
])
def test_bad_first_messages_close_clearly(gateway, messages, code, reason):
    result = refused(ws_url(gateway), *[json.dumps(m) if isinstance(m, list) else m for m in messages])
    assert result["code"] == code and reason in result["reason"], result
    assert result["messages"][-1]["is_end"] is True and result["messages"][-1]["is_final"] is False


def test_the_gateway_serves_on_after_refusals(gateway, offline_reference):
    refused(ws_url(gateway), "garbage")
    refused(ws_url(gateway), b"\x00")
    messages = run_session(ws_url(gateway), config("offline"), pcm16(SPEECH), headers=BEARER)
    assert messages[0]["text"] == joined_text(offline_reference["sensevoice"]["segments"])


def test_a_client_that_drops_mid_stream_frees_the_servers_stream(gateway, server):
    before = open_streams(server)
    audio = strides(pcm16(SPEECH))

    async def drop():
        ws = await connect(ws_url(gateway), additional_headers=BEARER, proxy=None)
        await ws.send(json.dumps(config("2pass")))
        for data in audio[:10]:
            await ws.send(data)
        await asyncio.to_thread(wait_for_open_streams, server, before + 1, 10)
        ws.transport.abort()  # the connection lost, no close handshake

    asyncio.run(drop())
    assert wait_for_open_streams(server, before, 10) < 3


def test_an_unreachable_triton_is_told_as_try_again_later(tmp_path):
    running = Gateway(f"127.0.0.1:{free_port()}", log=tmp_path / "log")  # nothing listens there
    try:
        for mode in ("2pass", "offline"):
            result = refused(ws_url(running), config(mode), pcm16(DATA / "one_phrase.wav")[:32000],
                             {"is_speaking": False})
            assert result["code"] == 1013, result
            assert result["messages"][-1]["error"].startswith("triton_unavailable")
    finally:
        running.stop()


def test_wss_with_the_gateways_certificate(server, make_certs, tmp_path, offline_reference):
    certs = make_certs(tmp_path / "tls", "localhost")
    running = Gateway(server.grpc_url, "--api-key", KEY, log=tmp_path / "log", certs=certs)
    try:
        url = running.url.replace("https", "wss", 1) + "/"
        messages = run_session(url, config("offline"), pcm16(SPEECH), headers=BEARER, ssl_context=running.context)
        assert messages[0]["text"] == joined_text(offline_reference["sensevoice"]["segments"])
        with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust the CA
            run_session(url, config("offline"), b"", headers=BEARER, ssl_context=ssl.create_default_context())
    finally:
        running.stop()
