"""The "per-session in-process" baseline of the load tests: the design of a typical low-latency
voice-assistant ASR server, one worker per session running FunASR's `AutoModel` (FSMN-VAD +
SenseVoiceSmall, PyTorch) with no batching across sessions, behind a WebSocket front.

    python -m tritonasr.loadtest.per_session --sensevoice-dir DIR --vad-dir DIR --port 6006 \\
        [--host 127.0.0.1] [--torch-threads 1]

Endpoints (one process serves both):
- any path but `/stream`: sherpa-onnx's offline websocket protocol (offline-websocket-server-impl.cc),
  so one client drives this server and sherpa-onnx's. Binary messages carry int32 LE sample rate,
  int32 LE byte count, then float32 LE samples, over as many messages as needed; once the count is
  reached the session's worker runs AutoModel (VAD + SenseVoice) on the whole file and answers with
  one text message, {"text", "segments": [{"start_ms", "end_ms", "text"}]}. The client may send
  another file; the text "Done" closes the connection normally.
- `/stream`: binary float32 LE 16 kHz mono chunks of any size (at most 2 s each), in real time,
  then the text "Done". Each chunk goes through FunASR's streaming FSMN-VAD as it arrives; when a
  segment closes, SenseVoice runs on its audio and the server sends {"final": true, "segment_index",
  "start_ms", "end_ms", "endpoint_ms" (audio received when the VAD closed it), "text"}. After
  "Done" it flushes the VAD, sends the remaining finals, then {"complete": true, "duration_ms",
  "segment_count"} and closes.
Bad input (a rate other than 16 kHz, byte counts that do not add up, NaN/inf, too much audio, a
text message other than "Done") gets {"error": "..."} and a close with an error code; other
sessions go on.

"One worker per session": websockets' threaded server gives every connection its own thread,
and that thread does all of the session's model work, serially. Weights are loaded once per
process and shared by every session (see `BaselineModels`).

`PerSessionServer` starts this module as a subprocess for the load tests and tests.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import signal
import struct
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from tritonasr.audio import SAMPLE_RATE, AudioError, validate_samples
from tritonasr.loadtest.processes import ServerProcess

log = logging.getLogger("tritonasr.per_session")

READY_LINE = "per-session baseline ready"
STREAM_PATH = "/stream"
MAX_AUDIO_S = 600  # one offline file
MAX_CHUNK_MS = 2000  # one streaming chunk (as asr_stream)
HEADER = struct.Struct("<ii")  # sample rate, byte count (sherpa-onnx's offline protocol)

# FSMN-VAD as our served pipeline runs it. FunASR 1.4 tapers the end-silence threshold over a
# long segment unless max_end_silence_time is given; ours is the fixed 800 ms of config.yaml.
# Segments are capped at 30 s (SenseVoice's comfortable input length).
VAD_OPTIONS = {"max_end_silence_time": 800, "max_single_segment_time": 30000}
# What every offline request asks AutoModel.generate for. sentence_timestamp=True makes it return
# one sentence per VAD segment (start/end in ms, text without SenseVoice's rich tags).
GENERATE_OPTIONS = {"language": "auto", "use_itn": False, "sentence_timestamp": True}
# FunASR's streaming VAD returns at once on an empty input, so it cannot be told "the stream has
# ended" without audio; the server learns it from "Done", after the last chunk. The final call
# carries one zero sample (1/16 ms, far less than the 10 ms fbank frame shift): it changes nothing
# (checked: the same segments as ending on the last real chunk), and no chunk is held back.
FINAL_PADDING = np.zeros(1, np.float32)
# Stream audio kept before the VAD has opened a segment: the start it reports can lie a few
# hundred ms behind the audio received (start detection + 200 ms look-back); 10 s is ample.
KEEP_BEFORE_OPEN_MS = 10_000

_TAG = re.compile(r"<\|[^|]*\|>")  # SenseVoice's rich tags: <|en|><|NEUTRAL|><|Speech|><|woitn|>


class BadInput(Exception):
    """Input the protocol refuses: the client gets {"error": message} and a close with `code`."""

    def __init__(self, message: str, code: int = 1007):  # 1007: invalid payload data
        super().__init__(message)
        self.code = code


# --- models ----------------------------------------------------------------------------------

def baseline_model_dirs(repository: Path) -> tuple[Path, Path]:
    """(SenseVoice dir, FSMN-VAD dir): the FunASR model directories the served graphs of
    `repository` were exported from, so the baseline runs the same weights."""
    repository = Path(repository)
    found = []
    for model, key in (("sensevoice", "model_dir"), ("vad", "source")):
        meta = repository / model / "1" / "meta.json"
        try:
            value = json.loads(meta.read_text()).get(key)
        except FileNotFoundError:
            raise FileNotFoundError(f"{meta} not found: export the model first "
                                    f"(`tritonasr export {model}`)") from None
        except (OSError, ValueError) as exc:
            raise ValueError(f"{meta} is unreadable: {exc}") from None
        if not value:
            raise ValueError(f"{meta} has no {key!r}: re-export the model with this version of tritonasr")
        path = Path(value)
        if not (path / "model.pt").is_file() or not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"{meta} names {path} as the {model} source, but it holds no "
                                    f"FunASR model (model.pt, config.yaml)")
        found.append(path)
    return found[0], found[1]


def automodel_kwargs(sensevoice_dir: Path, vad_dir: Path, torch_threads: int = 1) -> dict:
    """AutoModel(**these): SenseVoice behind FSMN-VAD, on CPU, as the baseline loads it (the tests
    build the in-process reference from the same kwargs)."""
    return {
        "model": str(sensevoice_dir),
        "vad_model": str(vad_dir),
        "vad_kwargs": dict(VAD_OPTIONS),
        "device": "cpu",
        # AutoModel's ncpu is torch's intra-op thread count: it sets it on every generate(),
        # so it must agree with --torch-threads.
        "ncpu": torch_threads,
        "disable_update": True,
        "disable_pbar": True,
        "disable_log": True,
        # No dither (FunASR's WavFrontend default, 1.0, adds Gaussian noise of that standard
        # deviation on the 16-bit scale before the fbank): the served pipeline has none, and
        # results are then reproducible. It costs one randn per sample either way.
        "frontend_conf": {"dither": 0.0},
    }


class BaselineModels:
    """The weights, loaded once per process, and each session's own view of them.

    Thread safety (funasr 1.4.16, funasr/auto/auto_model.py): one AutoModel must not serve
    several threads at once. generate() starts with _reset_runtime_configs(), which rebinds
    self.kwargs / self.vad_kwargs to fresh copies, and inference() then merges the call's options
    into that shared dict (deep_update), the streaming VAD's `cache` included, before it unpacks
    the dict into model.inference(**kwargs). A second thread in between swaps in its own dict or
    its own cache: checked with 4 threads streaming two files through one AutoModel (switch
    interval 1 µs), 2 of 40 sessions got wrong VAD segments; with a view per thread, 0 of 40.
    SenseVoiceSmall.inference and the frontends keep no per-call state on the module, and
    torch.no_grad() is per thread. FsmnVADStreaming keeps its streaming state in the caller's
    `cache` dict but not all of it: ComputeScores writes the call's block size to
    vad_opts.nn_eval_block_size on the module, which another session's call may change before
    it is read (8 threads mixing streaming VAD and SenseVoice calls: FunASR's "Something wrong
    with the VAD algorithm" 6 times, and an IndexError in one CI run; with a module per session,
    none in two runs).

    So every session gets shallow copies of the two AutoModels: its own kwargs dicts (each
    generate() rebuilds them from the read-only baseline snapshot), its own copy of the two FSMN-VAD
    modules (0.4 M parameters, ~6 ms to copy), the same SenseVoice weights, tokenizer and
    frontends. A full SenseVoice copy per session would not fit 32 sessions in memory.
    """

    name = "per-session-server"

    def __init__(self, sensevoice_dir: Path, vad_dir: Path, torch_threads: int = 1):
        import torch
        from funasr import AutoModel

        torch.set_num_threads(torch_threads)
        kwargs = automodel_kwargs(sensevoice_dir, vad_dir, torch_threads)
        # Offline: AutoModel's own VAD -> SenseVoice pipeline over the whole file. Streaming:
        # SenseVoice of the same AutoModel per closed segment.
        self.pipeline = AutoModel(**kwargs)
        # Streaming VAD: a VAD-only AutoModel, FunASR's streaming API (cache, is_final,
        # chunk_size). FSMN-VAD is 0.4 M parameters: a second copy in the process costs nothing.
        self.vad = AutoModel(model=str(vad_dir), **VAD_OPTIONS,
                             **{k: kwargs[k] for k in ("device", "ncpu", "disable_update", "disable_pbar",
                                                       "disable_log")})

    def session(self) -> SessionModels:
        pipeline, vad = copy.copy(self.pipeline), copy.copy(self.vad)
        pipeline.vad_model, vad.model = copy.deepcopy(self.pipeline.vad_model), copy.deepcopy(self.vad.model)
        return SessionModels(pipeline, vad)

    def warm_up(self) -> None:
        """One short file through both paths: first-run allocations happen before serving."""
        rng = np.random.default_rng(0)
        audio = np.concatenate([np.zeros(8000), 0.1 * rng.standard_normal(16000), np.zeros(16000)])
        models = self.session()
        models.transcribe(audio.astype(np.float32))
        models.transcribe_segment(audio[8000:24000].astype(np.float32))
        models.vad_chunk(audio[:1600].astype(np.float32), {}, is_final=True)


class SessionModels:
    """One session's views of the shared models (use from one thread only)."""

    def __init__(self, pipeline, vad):
        self.pipeline = pipeline
        self.vad = vad

    def transcribe(self, samples: np.ndarray) -> dict:
        """A whole file: AutoModel's VAD + SenseVoice -> {"text", "segments"}."""
        results = self.pipeline.generate(input=samples, **GENERATE_OPTIONS)
        # AutoModel leaves out segments whose text is empty, and returns no result at all when
        # every one is.
        sentences = results[0].get("sentence_info", []) if results else []
        segments = [{"start_ms": int(s["start"]), "end_ms": int(s["end"]), "text": s["text"]} for s in sentences]
        return {"text": " ".join(s["text"] for s in segments), "segments": segments}

    def transcribe_segment(self, samples: np.ndarray) -> str:
        """SenseVoice alone on one segment (AutoModel.inference: what generate() runs when there
        is no VAD model), rich tags removed."""
        if samples.size < 400:  # under one 25 ms fbank frame: nothing to recognise
            return ""
        results = self.pipeline.inference(samples, language="auto", use_itn=False)
        return _TAG.sub("", results[0]["text"]).strip() if results else ""

    def vad_chunk(self, samples: np.ndarray, cache: dict, is_final: bool) -> list[list[int]]:
        """FunASR's streaming FSMN-VAD on the next `samples` of a stream whose state is `cache`
        ({} at the start). Returns [beg_ms, end_ms] pairs, -1 for a boundary not in this call:
        [beg, -1] a segment opened, [-1, end] the open one closed, [beg, end] both."""
        # chunk_size (ms) is the step FunASR cuts the input into: one step of the input's length
        # (n / 16 ms is exact in binary) runs the model once and leaves nothing behind in
        # cache["prev_samples"]; on the final call one sample more, so that the one step is
        # also the final one (FunASR adds a last, empty step when the length divides evenly).
        step_ms = (samples.size + int(is_final)) / (SAMPLE_RATE // 1000)
        try:
            results = self.vad.generate(input=samples, cache=cache, is_final=is_final, chunk_size=step_ms,
                                        is_streaming_input=True)
        except ZeroDivisionError:
            # funasr 1.4.16: AutoModel.inference divides by the audio duration of the features
            # the call produced (to log a real-time factor), so a call that produced no feature
            # frame (a chunk shorter than the frame shift, or the first ~45 ms of a stream)
            # raises after the model has run. Without frames FsmnVADStreaming.forward returns no
            # segments and the samples wait in cache["frontend"]: nothing is lost.
            return []
        return [list(map(int, pair)) for pair in results[0]["value"]] if results else []


# --- sessions --------------------------------------------------------------------------------

def _ms(samples: int) -> int:
    return samples * 1000 // SAMPLE_RATE


def _samples(ms: int) -> int:
    return ms * SAMPLE_RATE // 1000


def _pcm(message: bytes | memoryview) -> np.ndarray:
    if len(message) % 4:
        raise BadInput(f"binary messages must hold whole float32 samples: got {len(message)} bytes")
    try:
        return validate_samples(np.frombuffer(message, dtype="<f4"), allow_empty=True)
    except AudioError as exc:
        raise BadInput(str(exc)) from None


class OfflineSession:
    """sherpa-onnx's offline protocol on one connection: files in, one JSON result per file."""

    def __init__(self, conn, models: SessionModels, max_audio_s: float = MAX_AUDIO_S):
        self.conn = conn
        self.models = models
        self.max_bytes = int(max_audio_s * SAMPLE_RATE) * 4
        self.max_audio_s = max_audio_s
        self.files = 0
        self.segments = 0
        self.audio_samples = 0

    def run(self) -> None:
        while True:
            samples = self.receive_file()
            if samples is None:
                self.conn.close(1000, "Done")
                return
            result = self.models.transcribe(samples)
            self.files += 1
            self.segments += len(result["segments"])
            self.audio_samples += samples.size
            self.conn.send(json.dumps(result, ensure_ascii=False))

    def receive_file(self) -> np.ndarray | None:
        """The next file's samples, or None when the client says "Done"."""
        data, received, expected = None, 0, 0
        while True:
            message = self.conn.recv()
            if isinstance(message, str):
                if message == "Done":
                    return None
                raise BadInput(f"unexpected text message {message[:50]!r}: the only text message is \"Done\"",
                               code=1003)
            if data is None:
                if len(message) < HEADER.size:
                    raise BadInput(f"the first message of a file must start with int32 sample rate and int32 "
                                   f"byte count: got {len(message)} bytes")
                rate, expected = HEADER.unpack_from(message)
                if rate != SAMPLE_RATE:
                    raise BadInput(f"sample rate {rate} Hz is not supported: send {SAMPLE_RATE} Hz mono")
                if expected <= 0 or expected % 4:
                    raise BadInput(f"byte count {expected} is not a positive multiple of 4 (float32 samples)")
                if expected > self.max_bytes:
                    raise BadInput(f"{expected // 4 / SAMPLE_RATE:.1f} s of audio is over the "
                                   f"{self.max_audio_s:g} s limit", code=1009)
                data = bytearray(expected)
                payload = memoryview(message)[HEADER.size:]
            else:
                payload = memoryview(message)
            if received + len(payload) > expected:
                raise BadInput(f"got {received + len(payload)} bytes of samples where the header "
                               f"announced {expected}")
            data[received:received + len(payload)] = payload
            received += len(payload)
            if received == expected:
                return _pcm(data)


class AudioBuffer:
    """A stream's recent audio, kept as received chunks, addressed by absolute sample index."""

    def __init__(self):
        self.chunks: deque[np.ndarray] = deque()
        self.start = 0  # absolute index of chunks[0][0]
        self.end = 0

    def append(self, samples: np.ndarray) -> None:
        if samples.size:
            self.chunks.append(samples)
            self.end += samples.size

    def slice(self, begin: int, end: int) -> np.ndarray:
        parts, pos = [], self.start
        for chunk in self.chunks:
            a, b = max(begin, pos), min(end, pos + chunk.size)
            if a < b:
                parts.append(chunk[a - pos:b - pos])
            pos += chunk.size
            if pos >= end:
                break
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def drop_before(self, index: int) -> None:
        while self.chunks and self.start + self.chunks[0].size <= index:
            self.start += self.chunks.popleft().size


class StreamSession:
    """`/stream` on one connection: chunks through the streaming VAD as they arrive, SenseVoice on
    each segment as it closes."""

    def __init__(self, conn, models: SessionModels):
        self.conn = conn
        self.models = models
        self.cache: dict = {}  # FunASR's streaming VAD state
        self.audio = AudioBuffer()
        self.received = 0  # samples received (and fed to the VAD)
        self.open_start_ms: int | None = None
        self.segments = 0

    @property
    def audio_samples(self) -> int:
        return self.received

    def run(self) -> None:
        while True:
            message = self.conn.recv()
            if isinstance(message, str):
                if message != "Done":
                    raise BadInput(f"unexpected text message {message[:50]!r}: the only text message is \"Done\"",
                                   code=1003)
                break
            chunk = _pcm(message)
            if chunk.size > _samples(MAX_CHUNK_MS):
                raise BadInput(f"a chunk may hold at most {MAX_CHUNK_MS} ms of audio: got {_ms(chunk.size)} ms",
                               code=1009)
            self.received += chunk.size
            self.audio.append(chunk)
            if chunk.size:
                self.feed(chunk, is_final=False)
        if self.received:
            self.feed(FINAL_PADDING, is_final=True)  # "Done": close what is open
        self.conn.send(json.dumps({"complete": True, "duration_ms": _ms(self.received),
                                   "segment_count": self.segments}))
        self.conn.close(1000, "Done")

    def feed(self, samples: np.ndarray, is_final: bool) -> None:
        for beg, end in self.models.vad_chunk(samples, self.cache, is_final):
            if beg >= 0:
                self.open_start_ms = beg
            if end >= 0:
                start = beg if beg >= 0 else self.open_start_ms
                self.open_start_ms = None
                if start is None:  # FunASR closed a segment it never opened: not seen; skip it
                    log.warning("VAD closed a segment ending at %d ms that it never opened", end)
                    continue
                self.final(start, end)
        keep = (_samples(self.open_start_ms) if self.open_start_ms is not None
                else self.received - _samples(KEEP_BEFORE_OPEN_MS))
        self.audio.drop_before(keep)

    def final(self, start_ms: int, end_ms: int) -> None:
        endpoint_ms = _ms(self.received)  # the VAD decided with this much audio in hand
        text = self.models.transcribe_segment(self.audio.slice(_samples(start_ms), _samples(end_ms)))
        self.conn.send(json.dumps({"final": True, "segment_index": self.segments, "start_ms": start_ms,
                                   "end_ms": end_ms, "endpoint_ms": endpoint_ms, "text": text},
                                  ensure_ascii=False))
        self.segments += 1


# --- the server ------------------------------------------------------------------------------

class Handler:
    """websockets' connection handler: runs in the connection's own thread, the session's worker."""

    def __init__(self, models: BaselineModels, max_audio_s: float = MAX_AUDIO_S):
        self.models = models
        self.max_audio_s = max_audio_s
        self.lock = threading.Lock()
        self.active = 0

    def __call__(self, conn) -> None:
        from websockets.exceptions import ConnectionClosed

        path = conn.request.path if conn.request is not None else "?"
        streaming = path.split("?", 1)[0] == STREAM_PATH
        peer = _peer(conn)  # (unreadable once the socket is closed)
        with self.lock:
            self.active += 1
        began = time.monotonic()
        session = None
        try:
            models = self.models.session()
            session = StreamSession(conn, models) if streaming else OfflineSession(conn, models, self.max_audio_s)
            session.run()
            outcome = "done"
        except BadInput as exc:
            outcome = f"refused ({exc.code}): {exc}"
            _send_error(conn, str(exc), exc.code)
        except ConnectionClosed as exc:
            if exc.sent is not None and not exc.rcvd_then_sent:  # we closed first: 1001 at shutdown
                outcome = f"closed by the server ({exc.sent.code})"
            else:
                outcome = f"client went away ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
        except Exception as exc:  # noqa: BLE001 - this session fails, the server goes on
            log.exception("session %s %s failed", peer, path)
            outcome = f"failed: {type(exc).__name__}: {exc}"
            _send_error(conn, f"internal error: {type(exc).__name__}: {exc}", 1011)
        finally:
            with self.lock:
                self.active -= 1
                active = self.active
        audio_s = (session.audio_samples if session else 0) / SAMPLE_RATE
        what = (f"{session.files} file(s), " if isinstance(session, OfflineSession) else "") + \
               f"{session.segments if session else 0} segment(s)"
        log.info("%s %s %s: %s; %s, %.1f s of audio in %.1f s; %d session(s) open", peer,
                 "stream" if streaming else "offline", path, outcome, what, audio_s, time.monotonic() - began, active)


def _send_error(conn, message: str, code: int, timeout_s: float = 10.0) -> None:
    """{"error": message}, then a close with `code`. A client may still be sending: what it sends
    is read and dropped meanwhile. Left unread, its messages would fill the receive queue,
    websockets would stop reading the socket, the client would block in send (holding its
    connection's lock, so it could not answer the close either) and the close would take the
    full close timeout."""
    from websockets.exceptions import ConnectionClosed

    try:
        conn.send(json.dumps({"error": message}, ensure_ascii=False))
    except (ConnectionClosed, OSError):
        return
    reason = message.encode()[:120].decode(errors="ignore")  # a close reason is at most 123 bytes
    closing = threading.Thread(target=conn.close, args=(code, reason), daemon=True)
    closing.start()
    deadline = time.monotonic() + timeout_s
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            conn.recv(timeout=remaining)
    except (ConnectionClosed, TimeoutError, OSError):
        pass
    closing.join(timeout=max(0.0, deadline - time.monotonic()))


def _peer(conn) -> str:
    try:
        host, port = conn.remote_address[:2]
        return f"{host}:{port}"
    except Exception:  # noqa: BLE001
        return "?"


def serve(models: BaselineModels, host: str, port: int, max_audio_s: float = MAX_AUDIO_S):
    """A websockets threaded server (not yet serving: call serve_forever())."""
    from websockets.sync.server import serve as ws_serve

    return ws_serve(Handler(models, max_audio_s), host, port,
                    compression=None,  # float32 audio does not deflate; don't spend CPU on it
                    max_size=HEADER.size + int(max_audio_s * SAMPLE_RATE) * 4,  # a whole file may be one message
                    max_queue=64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonasr.loadtest.per_session", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sensevoice-dir", type=Path, help="FunASR SenseVoiceSmall directory")
    parser.add_argument("--vad-dir", type=Path, help="FunASR FSMN-VAD directory")
    parser.add_argument("--model-repository", type=Path,
                        help="take both directories from this exported repository's meta.json instead")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="PyTorch intra-op threads, shared by all sessions (default 1: sessions run side by "
                             "side, one core each, rather than oversubscribing the cores)")
    parser.add_argument("--max-audio-s", type=float, default=MAX_AUDIO_S, help="longest offline file")
    args = parser.parse_args(argv)
    if args.torch_threads < 1:
        parser.error("--torch-threads must be at least 1")
    if args.model_repository is not None:
        if args.sensevoice_dir or args.vad_dir:
            parser.error("give --model-repository or --sensevoice-dir/--vad-dir, not both")
        try:
            args.sensevoice_dir, args.vad_dir = baseline_model_dirs(args.model_repository)
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    elif not (args.sensevoice_dir and args.vad_dir):
        parser.error("--sensevoice-dir and --vad-dir are required (or --model-repository)")

    # Our own lines at INFO; FunASR logs through the root logger at INFO (per model load, some
    # per request): WARNING and above only. (AutoModel's logging.basicConfig is then a no-op.)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    began = time.monotonic()
    models = BaselineModels(args.sensevoice_dir, args.vad_dir, args.torch_threads)
    models.warm_up()
    log.info("loaded %s and %s in %.1f s (torch threads: %d)", args.sensevoice_dir, args.vad_dir,
             time.monotonic() - began, args.torch_threads)
    try:
        server = serve(models, args.host, args.port, args.max_audio_s)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1

    def stop(signum, _frame):
        log.info("signal %d: closing", signum)
        # shutdown() waits for serve_forever() to return: not from the thread that runs it.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"{READY_LINE}: ws://{args.host}:{args.port} (offline: any path; streaming: {STREAM_PATH})", flush=True)
    with server:
        server.serve_forever()
    return 0


# --- a server process for the load tests and tests --------------------------------------------

class PerSessionServer(ServerProcess):
    """Start, wait for and stop one baseline server process (`python -m tritonasr.loadtest.per_session`).

    >>> with PerSessionServer(*baseline_model_dirs(repository)) as server:
    ...     transcribe(server.url, samples)               # offline protocol
    ...     stream(server.url + "/stream", samples)       # streaming endpoint
    """

    def __init__(self, sensevoice_dir: Path, vad_dir: Path, port: int | None = None, *, host: str = "127.0.0.1",
                 torch_threads: int = 1, max_audio_s: float = MAX_AUDIO_S, log_path: Path | None = None):
        from tritonasr.serving.server import free_port

        self.sensevoice_dir = Path(sensevoice_dir)
        self.vad_dir = Path(vad_dir)
        self.host = host
        self.port = port or free_port()
        self.torch_threads = torch_threads
        self.max_audio_s = max_audio_s
        super().__init__(log_path)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tritonasr.loadtest.per_session", "--sensevoice-dir", str(self.sensevoice_dir),
                "--vad-dir", str(self.vad_dir), "--host", self.host, "--port", str(self.port),
                "--torch-threads", str(self.torch_threads), "--max-audio-s", f"{self.max_audio_s:g}"]

    def ready(self) -> bool:
        return READY_LINE in self.log_text()

if __name__ == "__main__":
    sys.exit(main())
