"""The error classification, in one table: which code and which counter each failure gets."""
from __future__ import annotations

import grpc

from tritonasr.errors import (GRPC_STATUS, AudioError, IdleTimeout, OverloadError, RecognitionError, SpeakerError,
                              StreamError, bounded, classify, split_status, with_status)


def test_each_failure_has_its_code_and_counter():
    table = {AudioError: ("INVALID_ARG", "bad_audio"), SpeakerError: ("INVALID_ARG", "bad_request"),
             StreamError: ("INVALID_ARG", "bad_stream"), RecognitionError: ("INTERNAL", "recognition"),
             IdleTimeout: ("CANCELLED", "idle_timeout")}
    for cls, (code, kind) in table.items():
        error = cls("x")
        assert (error.code, error.kind) == (code, kind)
        assert getattr(grpc.StatusCode, error.grpc_status)  # a real gRPC status
    # A refusal is counted in tritonasr_rejected_total{reason}, not as an error.
    refused = OverloadError("full", reason="max_streams")
    assert (refused.code, refused.grpc_status, refused.kind, refused.reason) == (
        "UNAVAILABLE", "UNAVAILABLE", None, "max_streams")
    assert isinstance(AudioError("x"), ValueError)  # callers that catch ValueError still do
    assert StreamError("x", kind=None).kind is None and RecognitionError("x", code="UNAVAILABLE").code == "UNAVAILABLE"


def test_anything_unforeseen_is_internal():
    internal = classify(KeyError("boom"))
    assert (internal.code, internal.kind) == ("INTERNAL", "internal") and "KeyError" in str(internal)
    known = AudioError("bad")
    assert classify(known) is known


def test_messages_are_bounded_and_stream_errors_carry_their_status():
    assert len(bounded("x" * 10**6)) == 400 and bounded("short") == "short"
    assert split_status(with_status(OverloadError("full", reason="max_streams"))) == ("full", "UNAVAILABLE")
    assert split_status("plain: message") == ("plain: message", None)
    assert len(with_status(AudioError("y" * 10**6))) < 450
