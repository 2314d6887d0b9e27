"""Renders a transcription result (`{"duration_ms", "segments": [...]}`) as text, JSON, SRT or
WebVTT."""

from __future__ import annotations

import json

FORMATS = ("text", "json", "srt", "vtt")
# Other names a format answers to: `txt`, as its files are named.
FORMAT_ALIASES = {"txt": "text"}
# The name of each format's files ends with this (`tritonasr transcribe --output-dir`).
EXTENSIONS = {"text": ".txt", "json": ".json", "srt": ".srt", "vtt": ".vtt"}


def render(result: dict, fmt: str) -> str:
    """The whole result in `fmt`; text and srt end with a newline unless there are no segments, vtt
    is a WEBVTT file (its header alone without segments)."""
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt == "json":
        return json.dumps(result, ensure_ascii=False) + "\n"
    if fmt == "text":
        return "".join(_text_line(s) for s in result["segments"])
    if fmt == "srt":
        return "\n".join(_srt_block(i, s) for i, s in enumerate(result["segments"], 1))
    if fmt == "vtt":
        return "WEBVTT\n" + "".join("\n" + _vtt_cue(s) for s in result["segments"])
    raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")


def line_prefix(seg: dict) -> str:
    """The channel (recognised separately), SenseVoice's rich tags, compact and only those the server
    filled in, then the speaker: `ch1 <en|NEUTRAL|Speech> alice: ` (an enrolled name) or
    `speaker B: ` (an anonymous label)."""
    tags = "|".join(t for t in (seg.get(k) for k in ("language", "emotion", "event")) if t)
    channel = f"ch{seg['channel']} " if seg.get("channel") is not None else ""
    return channel + (f"<{tags}> " if tags else "") + _speaker(seg)


def _speaker(seg: dict) -> str:
    speaker = seg.get("speaker")
    return f"{speaker_name(speaker)}: " if speaker else ""


def speaker_name(speaker: dict | None) -> str:
    """`alice` (an enrolled name), `speaker B` (an anonymous label), or `no speaker` (too short)."""
    if not speaker:
        return "no speaker"
    return speaker["id"] if speaker.get("id") else f"speaker {speaker['label']}"


def _text_line(seg: dict) -> str:
    start, end = clock(seg["start_ms"], "."), clock(seg["end_ms"], ".")
    return f"[{start} --> {end}] {line_prefix(seg)}{seg['text']}\n"


def _srt_block(index: int, seg: dict) -> str:
    start, end = clock(seg["start_ms"], ",", hours=True), clock(seg["end_ms"], ",", hours=True)
    return f"{index}\n{start} --> {end}\n{_speaker(seg)}{seg['text']}\n"


def _vtt_cue(seg: dict) -> str:
    """A cue; its speaker as WebVTT's voice span, which players show as the speaker's name."""
    start, end = clock(seg["start_ms"], ".", hours=True), clock(seg["end_ms"], ".", hours=True)
    speaker = seg.get("speaker")
    voice = f"<v {speaker_name(speaker)}>" if speaker else ""
    return f"{start} --> {end}\n{voice}{_escape_vtt(seg['text'])}\n"


def _escape_vtt(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def clock(ms: int, sep: str, hours: bool = False) -> str:
    """`MM:SS.mmm`, with hours in front past the first hour or when `hours` (SRT needs them)."""
    h, rest = divmod(int(ms), 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    clock = f"{m:02d}:{s:02d}{sep}{ms:03d}"
    return f"{h:02d}:{clock}" if hours or h else clock
