"""`tritonasr stream`: one file through `asr_stream` as a live stream, results printed as they arrive."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from dataclasses import asdict
from typing import TextIO

from tritonasr.audio import AudioError
from tritonasr.client.formats import clock, line_prefix, speaker_name
from tritonasr.client.connection import AccessDeniedError, Credentials
from tritonasr.client.offline import ServerUnavailableError, exit_code
from tritonasr.client.stream import (SpeakerUpdate, StreamError, StreamingClient, StreamSegment, StreamSummary,
                                    load_stream_audio)
from tritonasr.contract import EXIT_FAILED, EXIT_OK, LANGUAGES, Endpointing

STREAM_FORMATS = ("text", "json")


def run_stream(path: str, url: str = "localhost:8001", *, chunk_ms: int = 100, realtime: bool = False,
               partial_interval_ms: int = 0, language: str = "auto", use_itn: bool = False,
               fmt: str = "text", output: TextIO = sys.stdout, engine: str = "", with_speaker: bool = True,
               credentials: Credentials | None = None, endpointing: Endpointing | None = None,
               text_first: bool = False, separate_channels: bool = False) -> int:
    """Streams one audio file (an 8 kHz one as it is: load_stream_audio; its channels mixed, or
    each recognised on its own) and prints each result as it arrives; returns the exit code (tritonasr.contract): EXIT_OK once the stream completed,
    EXIT_FAILED when the file or the stream failed, EXIT_UNREACHABLE or EXIT_DENIED when the server
    cannot be used (on stderr).
    """
    if fmt not in STREAM_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(STREAM_FORMATS)}")
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    try:
        audio = load_stream_audio(path, keep_channels=separate_channels)
    except AudioError as exc:
        print(f"error: {exc}", file=sys.stderr)  # load_audio's messages start with the path
        return EXIT_FAILED
    printer = Printer(fmt, output)
    return asyncio.run(_stream(path, url, credentials, audio.chunks(chunk_ms), printer, sample_rate=audio.sample_rate,
                               encoding=audio.encoding, realtime=realtime,
                               partial_interval_ms=partial_interval_ms, language=language, use_itn=use_itn,
                               engine=engine, with_speaker=with_speaker, endpointing=endpointing,
                               text_first=text_first, channels=audio.channels,
                               separate_channels=separate_channels))


async def _stream(path: str, url: str, credentials: Credentials | None, chunks: list, printer: Printer,
                  **options) -> int:
    async with StreamingClient(url, credentials=credentials) as client:
        try:
            await client.check_ready()
            async with client.stream(chunks, **options) as stream:
                async for segment in stream:
                    printer.segment(segment)
        except (ServerUnavailableError, AccessDeniedError, StreamError, AudioError) as exc:
            printer.clear()
            about = "" if isinstance(exc, (ServerUnavailableError, AccessDeniedError)) else f"{path}: "
            print(f"error: {about}{exc}", file=sys.stderr)
            return exit_code(exc)
    printer.summary(stream.summary)
    return EXIT_OK


class Printer:
    """Text: one line per final segment; partials on their own marked lines, or on a TTY one line
    rewritten in place until its final arrives. JSON: one object per line, the summary last."""

    def __init__(self, fmt: str, output: TextIO):
        self.fmt = fmt
        self.output = output
        self.rewrite = fmt == "text" and output.isatty()
        self._pending = False  # a partial line is on screen without its newline
        self._latencies: list[float] = []

    def segment(self, segment: StreamSegment | SpeakerUpdate) -> None:
        if isinstance(segment, SpeakerUpdate):
            self.clear()
            self._write(json.dumps({"segment_index": segment.segment_index, "speaker": segment.speaker,
                                    "speaker_update": True}, ensure_ascii=False) + "\n" if self.fmt == "json"
                        else f"[segment {segment.segment_index}] {speaker_name(segment.speaker)}\n")
            return
        if segment.final and segment.latency_ms is not None:
            self._latencies.append(segment.latency_ms)
        if self.fmt == "json":
            self._write(json.dumps(segment_json(segment), ensure_ascii=False) + "\n")
        elif self.rewrite and not segment.final:
            width = shutil.get_terminal_size().columns - 1
            self._write("\r\x1b[K" + text_line(segment)[:width])
            self._pending = True
        else:
            self.clear()
            self._write(text_line(segment) + "\n")

    def summary(self, summary: StreamSummary) -> None:
        if self.fmt == "json":
            self._write(json.dumps({"complete": True, "duration_ms": summary.duration_ms,
                                    "segment_count": summary.segment_count}) + "\n")
            return
        self.clear()
        line = f"tritonasr: {summary.segment_count} segments in {summary.duration_ms / 1000:.2f} s of audio"
        if self._latencies:
            ordered = sorted(self._latencies)
            line += (f"; latency median {ordered[len(ordered) // 2]:.0f} ms, "
                     f"max {ordered[-1]:.0f} ms (end of speech -> final result)")
        print(line, file=sys.stderr)

    def clear(self) -> None:
        if self._pending:
            self._write("\r\x1b[K")
            self._pending = False

    def _write(self, text: str) -> None:
        self.output.write(text)
        self.output.flush()


def text_line(segment: StreamSegment) -> str:
    """`[00:01.230 --> 00:03.400] <en|NEUTRAL|Speech> text  (latency 812 ms)`, as `transcribe`
    prints segments, with the latency; partials say so."""
    prefix = line_prefix(asdict(segment))
    notes = [] if segment.final else ["partial"]
    if segment.latency_ms is not None:
        notes.append(f"latency {segment.latency_ms:.0f} ms")
    suffix = f"  ({', '.join(notes)})" if notes else ""
    return f"[{clock(segment.start_ms, '.')} --> {clock(segment.end_ms, '.')}] {prefix}{segment.text}{suffix}"


def segment_json(segment: StreamSegment) -> dict:
    """The server's segment JSON plus the client's timings (ms, rounded to 0.1); `channel` only
    where the stream recognises channels separately, as the server sends it."""
    fields = asdict(segment)
    if fields["channel"] is None:
        del fields["channel"]
    for key in ("latency_ms", "after_endpoint_ms", "received_ms"):
        if fields[key] is not None:
            fields[key] = round(fields[key], 1)
    return fields
