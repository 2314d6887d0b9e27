"""Errors as the caller sees them: an HTTP status that says whose fault it is, and OpenAI's error
body (`{"error": {"message", "type", "param", "code"}}`), which OpenAI's client libraries parse."""
from __future__ import annotations

from tritonasr.client.connection import AccessDeniedError
from tritonasr.client.offline import ServerBusyError, ServerUnavailableError, TranscriptionError
from tritonasr.errors import AudioError, AudioTooLongError, UnsupportedFormatError

# gRPC statuses of a failed call -> the HTTP status that tells the caller whose fault it was.
_GRPC_STATUS = {"INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "FAILED_PRECONDITION": 400, "NOT_FOUND": 400,
                "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 413,
                "DEADLINE_EXCEEDED": 504, "UNAVAILABLE": 503}


class ApiError(Exception):
    """An error answer: `status`, OpenAI's `type` and `code`, the parameter at fault."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def busy(message: str, retry_after_s: int) -> ApiError:
    return ApiError(503, message, code="server_busy", headers={"Retry-After": str(retry_after_s)})


def from_failure(error: Exception, retry_after_s: int) -> ApiError:
    """The answer for what the client library or the audio decoder raised."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, UnsupportedFormatError):
        return ApiError(415, str(error), code="unsupported_format", param="file")
    if isinstance(error, AudioTooLongError):
        return ApiError(413, str(error), code="audio_too_long", param="file")
    if isinstance(error, AudioError):
        return ApiError(400, str(error), code="invalid_audio", param="file")
    if isinstance(error, AccessDeniedError):
        unauthenticated = str(error).startswith("unauthenticated:")
        return ApiError(401 if unauthenticated else 403, str(error),
                        code="invalid_api_key" if unauthenticated else "permission_denied")
    if isinstance(error, ServerBusyError):
        return busy(str(error), retry_after_s)
    if isinstance(error, ServerUnavailableError):
        return ApiError(503, str(error), code="triton_unavailable", headers={"Retry-After": str(retry_after_s)})
    if isinstance(error, TranscriptionError):
        status = _GRPC_STATUS.get(error.status or "", 502)
        return ApiError(status, str(error), code=(error.status or "upstream_error").lower(),
                        headers={"Retry-After": str(retry_after_s)} if status == 503 else None)
    raise error
