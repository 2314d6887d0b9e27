"""Every failure the pipelines report, classified once: whose fault it is (the Triton error code it
travels with, which the gRPC frontend turns into a status) and how it is counted (the `kind`
label of tritonasr_errors_total).

Pure Python, so the client library can raise and catch the same classes (e.g. AudioError).
"""
from __future__ import annotations

# Longest message sent to a caller: a request may carry megabytes of text in an option, and an
# error must not echo it back.
MAX_MESSAGE_CHARS = 400


# The Python backend's error codes (pb_utils.TritonError.*) and the gRPC status Triton 2.51 answers
# a failed request with (checked against the server). There is no code for RESOURCE_EXHAUSTED,
# UNAUTHENTICATED or PERMISSION_DENIED: overload answers UNAVAILABLE.
GRPC_STATUS = {
    "INVALID_ARG": "INVALID_ARGUMENT",
    "NOT_FOUND": "NOT_FOUND",
    "ALREADY_EXISTS": "ALREADY_EXISTS",
    "UNAVAILABLE": "UNAVAILABLE",
    "CANCELLED": "CANCELLED",
    "UNSUPPORTED": "UNIMPLEMENTED",
    "INTERNAL": "INTERNAL",
    "UNKNOWN": "UNKNOWN",
}


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return message if len(message) <= limit else message[:limit - 1] + "…"


def shown(value: object, limit: int = 40) -> str:
    """A caller's value inside a message: its repr, cut short."""
    return bounded(repr(value), limit)


class ServiceError(Exception):
    """A failure reported to the caller. `code` names a `pb_utils.TritonError` code; `kind` is
    the errors_total label, None where the failure was already counted."""

    code = "INTERNAL"
    kind: str | None = "internal"

    def __init__(self, message: str, *, code: str | None = None, kind: str | None = "",
                 notify: bool = True):
        super().__init__(message)
        if code is not None:
            self.code = code
        if kind != "":
            self.kind = kind
        self.notify = notify  # False: a hang-up, nobody to tell and nothing to count

    @property
    def grpc_status(self) -> str:
        return GRPC_STATUS[self.code]


class InputError(ServiceError, ValueError):
    """The request is wrong; the same request will fail again."""

    code = "INVALID_ARG"
    kind = "bad_request"


class AudioError(InputError):
    """Audio that cannot be transcribed: unreadable, empty, not finite, out of range."""

    kind = "bad_audio"


class UnsupportedFormatError(AudioError):
    """Data that no decoder here recognises as audio (or a container without an audio stream):
    a format this package does not read, as opposed to a damaged file of one it does."""


class AudioTooLongError(AudioError):
    """Audio longer than the caller accepts (`load_audio`'s max_seconds): refused before it is all
    decoded."""


class SpeakerError(InputError):
    """A registry request that cannot be done (unknown name, duplicate, bad embedding)."""


class StreamError(InputError):
    """A chunk that does not fit the state of its stream (never started, closed, someone else's)."""

    kind = "bad_stream"


class AccessDenied(InputError):
    """No key, a wrong key, or a key without the right (Triton has no UNAUTHENTICATED code for
    a model to answer with)."""

    kind = "access_denied"


class OverloadError(ServiceError):
    """This server has no room now; retry later or elsewhere. `reason` names the limit that
    refused it: refusals are counted in tritonasr_rejected_total{reason}, not as errors."""

    code = "UNAVAILABLE"
    kind = None

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason


class RecognitionError(ServiceError):
    """A model call failed while recognising (a leaf model's own error, with its code)."""

    kind = "recognition"


class CallerGone(ServiceError):
    """The caller cancelled its request (a deadline, a hang-up): its work stops, and nobody is at
    fault (not counted as an error)."""

    code = "CANCELLED"
    kind = None


class IdleTimeout(ServiceError):
    """A stream that sent nothing for the idle timeout (the caller stalled or vanished)."""

    code = "CANCELLED"
    kind = "idle_timeout"


def with_status(error: ServiceError) -> str:
    """The message of an error inside a gRPC stream, which carries no status: the status first."""
    return f"{error.grpc_status}: {bounded(str(error))}"


def split_status(message: str) -> tuple[str, str | None]:
    """(message, gRPC status name or None) of a stream error's message (see `with_status`)."""
    status, sep, rest = message.partition(": ")
    return (rest, status) if sep and status in GRPC_STATUS.values() else (message, None)


def classify(exc: BaseException) -> ServiceError:
    """The ServiceError to report for any exception; anything unforeseen is an internal fault."""
    if isinstance(exc, ServiceError):
        return exc
    return ServiceError(f"internal error: {type(exc).__name__}: {exc}")
