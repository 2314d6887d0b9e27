"""Client of sherpa-onnx's offline websocket protocol (offline-websocket-server-impl.cc), for the
peer servers the load tests compare Triton with.

One file per request: binary messages carry int32 LE sample rate, int32 LE byte count of the
samples, then the float32 LE samples, split over as many messages as needed; the server answers
with one text message, a JSON result (sherpa: text, tokens, timestamps, lang, emotion, event…;
other servers of the same protocol may add keys such as "segments"). The text message "Done"
ends the connection.

Synchronous on purpose (websockets' sync client): it runs unchanged in threads and in Locust's
gevent workers, once gevent has monkey-patched sockets and threads.
"""
from __future__ import annotations

import json
import logging
import struct
import time

import numpy as np

# Bytes per binary message: 16 MiB, so a file of up to 262 s at 16 kHz goes as one message.
# sherpa's own example client sends 10 KiB messages, but sherpa refuses an over-long file after
# its first message and closes the socket while later ones are still arriving: the client then
# often sees a reset instead of the close frame that says why. One message per file avoids that
# race, and stays below websocketpp's 32 MB message cap. A server built on the `websockets`
# package must accept such messages (its default max_size is 1 MiB): serve with max_size=None or
# pass a smaller message_bytes here.
DEFAULT_MESSAGE_BYTES = 16 << 20
HEADER = struct.Struct("<ii")  # sample rate, byte count
MAX_BYTES = 2**31 - 1  # the byte count is an int32
# How long to wait for the server's close after "Done" (localhost: well under a millisecond).
CLOSE_WAIT_S = 2.0
log = logging.getLogger(__name__)


class OfflineWebsocketError(RuntimeError):
    """The server refused or dropped the request, or did not answer in time; the message says which."""


def transcribe(url: str, samples: np.ndarray, sample_rate: int = 16000, timeout_s: float = 300,
               message_bytes: int = DEFAULT_MESSAGE_BYTES) -> dict:
    """Send one file over one connection and return the server's JSON result, parsed.

    samples: mono audio, float in [-1, 1] (sent as float32). `timeout_s` bounds the whole
    request: connecting, sending and waiting for the result.
    """
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
    from websockets.sync.client import connect

    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f"samples must be one-dimensional (mono), not of shape {samples.shape}")
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, not {sample_rate!r}")
    if message_bytes <= HEADER.size:
        raise ValueError(f"message_bytes must exceed the {HEADER.size}-byte header")
    payload = np.ascontiguousarray(samples, dtype="<f4").tobytes()
    if len(payload) > MAX_BYTES:
        raise ValueError(f"{len(samples)} samples do not fit the protocol's int32 byte count")
    data = HEADER.pack(int(sample_rate), len(payload)) + payload

    deadline = time.monotonic() + timeout_s
    try:
        # max_size=None: the result of a long file can be large (one timestamp per token).
        with connect(url, open_timeout=timeout_s, close_timeout=5, max_size=None) as ws:
            try:
                for start in range(0, len(data), message_bytes):
                    ws.send(data[start:start + message_bytes])
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                message = ws.recv(timeout=remaining)
            except ConnectionClosed as exc:
                raise OfflineWebsocketError(f"{url} closed the connection: {_close_reason(exc)}") from None
            except TimeoutError:
                raise OfflineWebsocketError(
                    f"{url} sent no result within {timeout_s:g} s "
                    f"({len(samples) / sample_rate:.1f} s of audio)") from None
            if not isinstance(message, str):
                raise OfflineWebsocketError(f"{url} answered with a binary message of {len(message)} "
                                            f"bytes where a JSON text message was expected")
            try:
                result = json.loads(message)
            except json.JSONDecodeError as exc:
                raise OfflineWebsocketError(f"{url} answered with invalid JSON ({exc}): "
                                            f"{message[:200]!r}") from None
            # "Done": the server closes. Wait for its close frame rather than closing at the same
            # time (both sides closing at once leaves sherpa writing to a dropped socket).
            try:
                ws.send("Done")
                ws.recv(timeout=CLOSE_WAIT_S)
                log.warning("%s sent a message after \"Done\" instead of closing", url)
            except ConnectionClosed:
                pass
            except TimeoutError:  # the result is in hand, but every request pays this wait
                log.warning("%s did not close within %g s of \"Done\"", url, CLOSE_WAIT_S)
    except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
        # Connection refused / reset, handshake failures and open timeouts.
        raise OfflineWebsocketError(f"cannot talk to {url}: {type(exc).__name__}: {exc}") from None
    if not isinstance(result, dict):
        raise OfflineWebsocketError(f"{url} answered with JSON that is not an object: {message[:200]!r}")
    return result


def _close_reason(exc) -> str:
    close = exc.rcvd or exc.sent
    if close is None:
        return ("the connection dropped without a close frame (a file sent in several messages "
                "that the server refuses, e.g. longer than sherpa-onnx's --max-utterance-length, "
                "ends this way)")
    return f"code {close.code}" + (f": {close.reason}" if close.reason else "")
