"""Per-request endpointing on the client side, without a server: the inputs each request carries
(asr_offline's, asr_stream's START, a long recording's pieces) and the command-line flags."""
import asyncio
import json
from types import SimpleNamespace

import numpy as np
import pytest

from tritonasr.cli import main
from tritonasr.client.endpointing import endpointing
from tritonasr.client.offline import OfflineClient
from tritonasr.client.stream import StreamingClient, stream_request
from tritonasr.contract import ENDPOINTING_PRESETS, EXIT_OK, EXIT_USAGE, KEEP_MODEL_VALUE, Endpointing
from tritonasr.loadtest.bench_stream import run_level
from tritonasr.loadtest.grpc_stream import run_stream

SETTINGS = Endpointing(end_silence_ms=300, max_segment_ms=15_000, speech_start_ms=60)
SENT = {"END_SILENCE_MS": 300, "MAX_SEGMENT_MS": 15_000, "SPEECH_START_MS": 60}


def _endpointing_inputs(request_inputs) -> dict:
    """{name: value} of the endpointing inputs among a request's, each checked to be INT32 [1, 1]."""
    found = {}
    for tensor in request_inputs:
        if tensor.name() in SENT:
            assert (tensor.datatype(), tensor.shape()) == ("INT32", [1, 1])
            found[tensor.name()] = int(np.frombuffer(tensor._raw_content, np.int32)[0])
    return found


def _chunk(samples: int = 1600) -> np.ndarray:
    return np.zeros(samples, np.float32)


# -- requests ------------------------------------------------------------------------------------

def test_stream_request_sends_endpointing_on_start_only():
    start = stream_request("asr_stream", 7, _chunk(), True, False, endpointing=SETTINGS)
    later = stream_request("asr_stream", 7, _chunk(), False, True, endpointing=SETTINGS)
    assert _endpointing_inputs(start["inputs"]) == SENT
    assert [i.name() for i in later["inputs"]] == ["AUDIO"]


@pytest.mark.parametrize("settings", [None, Endpointing()])
def test_unset_fields_are_sent_as_keep_the_models_value(settings):
    """All three go on every START (and asr_offline request), so requests batch alike."""
    request = stream_request("asr_stream", 7, _chunk(), True, False, endpointing=settings)
    assert _endpointing_inputs(request["inputs"]) == dict.fromkeys(SENT, KEEP_MODEL_VALUE)
    partial = stream_request("asr_stream", 7, _chunk(), True, False, endpointing=Endpointing(end_silence_ms=400))
    assert _endpointing_inputs(partial["inputs"]) == {**dict.fromkeys(SENT, KEEP_MODEL_VALUE), "END_SILENCE_MS": 400}


def test_a_live_stream_carries_its_endpointing():
    async def go():
        async with StreamingClient("localhost:1") as client:
            return [r async for r in client.stream([_chunk(), _chunk()], endpointing=SETTINGS).requests()]

    requests = asyncio.run(go())
    assert [_endpointing_inputs(r["inputs"]) for r in requests] == [SENT, {}, {}]


def test_an_offline_request_carries_its_endpointing(monkeypatch):
    sent = []
    with OfflineClient("localhost:1") as client:
        monkeypatch.setattr(client, "infer", lambda inputs: sent.append(inputs) or {"segments": []})
        client.transcribe(_chunk(16000), endpointing=SETTINGS)
        client.transcribe(_chunk(16000))
    assert [_endpointing_inputs(inputs) for inputs in sent] == [SENT, dict.fromkeys(SENT, KEEP_MODEL_VALUE)]


class _FakeStreamClient:
    """tritonclient's synchronous stream calls, keeping the requests. It answers at once, as a
    stream of silence would be: the END chunk with the end-of-stream summary, the others with an
    empty final response when asked for one."""

    def __init__(self):
        self.requests = []

    def start_stream(self, callback, headers=None):
        self.callback = callback

    def async_stream_infer(self, enable_empty_final_response=False, **request):
        self.requests.append(request)
        if request["sequence_end"]:
            self.callback(_Answer({"complete": True, "duration_ms": 3000, "segment_count": 0}), None)
        elif enable_empty_final_response:
            self.callback(_Answer(None), None)

    def stop_stream(self, cancel_requests):
        pass

    def close(self):
        pass


class _Answer:
    """A final response (`triton_final_response`), with a RESULT when given a payload."""

    def __init__(self, payload: dict | None):
        self.payload = payload

    def get_response(self):
        return SimpleNamespace(parameters={"triton_final_response": SimpleNamespace(bool_param=True)})

    def as_numpy(self, name: str):
        return None if self.payload is None else np.array([json.dumps(self.payload).encode()], np.object_)


def test_a_recording_sent_in_pieces_carries_its_endpointing_on_start():
    with OfflineClient("localhost:1", pieces_above_s=1.0) as client:
        client._client.close()
        client._client = fake = _FakeStreamClient()
        assert client.transcribe(_chunk(3 * 16000), endpointing=SETTINGS) == {"duration_ms": 3000, "segments": []}
    assert [_endpointing_inputs(r["inputs"]) for r in fake.requests] == [SENT, {}, {}]


def test_a_load_test_stream_carries_its_endpointing():
    fake = _FakeStreamClient()
    run_stream(fake, _chunk(3200), chunk_ms=100, realtime=False, endpointing=SETTINGS)
    assert [_endpointing_inputs(r["inputs"]) for r in fake.requests] == [SENT, {}, {}]


def test_the_stream_benchmark_streams_with_its_preset(monkeypatch):
    opened = []

    class Client:
        def __init__(self, url):
            pass

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            pass

        def stream(self, chunks, **options):
            opened.append(options["endpointing"])
            return Stream()

    class Stream(Client):
        def __init__(self):
            pass

        async def __aiter__(self):
            return
            yield

    monkeypatch.setattr("tritonasr.client.stream.StreamingClient", Client)
    args = SimpleNamespace(seconds=1.0, gap_ms=1000, chunk_ms=100, partials=0, stagger_ms=0, endpointing="assistant",
                           no_speaker=False, text_first=False)
    level = asyncio.run(run_level("localhost:1", [_chunk(16000)], 2, args))
    assert level["errors"] == 0 and opened == [ENDPOINTING_PRESETS["assistant"]] * 2


# -- command line --------------------------------------------------------------------------------

def test_a_flag_overrides_its_field_of_the_preset():
    assert endpointing("assistant", end_silence_ms=400) == Endpointing(end_silence_ms=400, max_segment_ms=15_000)
    assert endpointing("dictation", end_silence_ms=None) == ENDPOINTING_PRESETS["dictation"]
    assert endpointing() == Endpointing()


@pytest.mark.parametrize("command, runner, target", [
    (["stream", "a.wav"], "run_stream", "tritonasr.client.stream_cli.run_stream"),
    (["transcribe", "a.wav"], "run_transcribe", "tritonasr.client.transcribe.run_transcribe"),
])
def test_the_commands_pass_preset_and_overrides_on(monkeypatch, command, runner, target):
    passed = {}
    monkeypatch.setattr(target, lambda *args, **options: passed.update(options) or EXIT_OK)
    assert main([*command, "--endpointing", "assistant", "--end-silence-ms", "400"]) == EXIT_OK
    assert passed["endpointing"] == Endpointing(end_silence_ms=400, max_segment_ms=15_000)
    assert main(command) == EXIT_OK
    assert passed["endpointing"] == Endpointing()


@pytest.mark.parametrize("flag, value, limits", [
    ("--end-silence-ms", "5", "from 100 to 10000"),
    ("--max-segment-ms", "60001", "from 1000 to 60000"),
    ("--speech-start-ms", "ten", "from 20 to 200"),
])
def test_an_out_of_range_value_is_a_usage_error(capsys, flag, value, limits):
    with pytest.raises(SystemExit) as exited:
        main(["stream", "a.wav", flag, value])
    assert exited.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"argument {flag}: must be a whole number of ms {limits}, got '{value}'" in err
    assert "Traceback" not in err


def test_stream_help_lists_the_presets(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["stream", "--help"])
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "assistant (end silence 300 ms, max segment 15000 ms)" in out
    assert all(f"{name} (" in out for name in ENDPOINTING_PRESETS)
    assert "100..10000 ms" in out and "1000..60000 ms" in out and "20..200 ms" in out
