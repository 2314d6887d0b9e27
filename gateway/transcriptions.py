"""OpenAI's `POST /v1/audio/transcriptions`, answered by asr_offline: clients written for OpenAI's
API (its official libraries included) work unchanged against the gateway's URL.

Form fields: `file` (any format tritonasr.audio decodes), `model` (an engine, or one of OpenAI's
model names for the server's default engine), `language` (`auto` or a code the engines know),
`response_format` (json, text, srt, vtt, verbose_json, diarized_json),
`timestamp_granularities[]` (segment, word: Parakeet's words). Accepted and ignored: `prompt`,
`temperature`, `include[]`, `chunking_strategy` (our VAD always cuts the audio). Ours:
`speaker` (false skips the speaker stage), `channels` (mix, or separate: each channel recognised
on its own), `itn` (SenseVoice's punctuation and numbers)."""
from __future__ import annotations

import re
from collections import Counter

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from tritonasr.client.formats import render
from tritonasr.contract import ENGINES, LANGUAGES
from tritonasr.gateway.errors import ApiError
from tritonasr.gateway.offline import OfflineRunner

# OpenAI's model names, for clients that cannot be told another: the server's default engine.
OPENAI_MODELS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-transcribe")
MODELS = {**{engine: engine for engine in ENGINES}, **{name: "" for name in OPENAI_MODELS}}
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")
GRANULARITIES = ("segment", "word")
LANGUAGE_NAMES = {"zh": "chinese", "en": "english", "yue": "cantonese", "ja": "japanese", "ko": "korean"}
IGNORED = ("prompt", "temperature", "include[]", "chunking_strategy")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


async def create_transcription(request: Request, runner: OfflineRunner, api_key: str | None,
                               max_fields: int = 32) -> Response:
    form = await request.form(max_files=1, max_fields=max_fields)
    try:
        options, response_format, words = form_options(form)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "`file` is required: the audio, as a file part of a multipart/form-data body",
                           param="file", code="missing_file")
        timings: dict[str, float] = {}
        audio, result = await runner.transcribe(upload.file, upload.filename or "file", api_key, timings=timings,
                                                **options)
    finally:
        await form.close()
    segments = result["segments"]
    if words and any(segment.get("words") is None for segment in segments):
        raise ApiError(400, "word timestamps need an engine that gives them: model=parakeet",
                       param="timestamp_granularities[]", code="unsupported_granularity")
    response = render_response(response_format, {"duration_ms": audio.duration_ms, "segments": segments},
                               options["language"], words)
    # Where the time went (the caller's own measure minus "triton" is the network's and ours).
    response.headers["Server-Timing"] = ", ".join(f"{name};dur={ms:.1f}" for name, ms in timings.items())
    return response


def form_options(form: FormData, model_required: bool = True) -> tuple[dict, str, bool]:
    """asr_offline's options from the form, the response format, and whether words were asked for;
    without `model` (where not required), the server's default engine."""
    model = _field(form, "model")
    if model is None and model_required:
        raise ApiError(400, "`model` is required: " + ", ".join(MODELS), param="model", code="missing_model")
    if model is not None and model not in MODELS:
        raise ApiError(400, f"unknown model {model!r}: use one of {', '.join(MODELS)} (OpenAI's names take the "
                            "server's default engine)", param="model", code="model_not_found")
    language = _field(form, "language") or "auto"
    if language not in LANGUAGES:
        raise ApiError(400, f"unknown language {language!r}: use one of {', '.join(LANGUAGES)}",
                       param="language", code="unsupported_language")
    response_format = _field(form, "response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"unknown response_format {response_format!r}: use one of {', '.join(RESPONSE_FORMATS)}",
                       param="response_format", code="unsupported_response_format")
    granularities = [g for key in ("timestamp_granularities[]", "timestamp_granularities")
                     for g in form.getlist(key)]
    for granularity in granularities:
        if granularity not in GRANULARITIES:
            raise ApiError(400, f"unknown timestamp granularity {granularity!r}: segment or word",
                           param="timestamp_granularities[]", code="unsupported_granularity")
    if granularities and response_format != "verbose_json":
        raise ApiError(400, "timestamp_granularities[] needs response_format=verbose_json",
                       param="timestamp_granularities[]", code="unsupported_granularity")
    if form_boolean(form, "stream", False):
        raise ApiError(400, "streamed answers (stream=true) are not offered here: use the WebSocket "
                            "/v1/stream for live results", param="stream", code="unsupported_stream")
    channels = _field(form, "channels") or "mix"
    if channels not in ("mix", "separate"):
        raise ApiError(400, f"channels must be mix or separate, got {channels!r}", param="channels")
    options = dict(engine=MODELS.get(model, ""), language=language, use_itn=form_boolean(form, "itn", False),
                   with_speaker=form_boolean(form, "speaker", True), separate_channels=channels == "separate")
    return options, response_format, "word" in granularities


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise ApiError(400, f"`{name}` must be a text field, not a file", param=name)
    return value.strip() if value is not None else None


def form_boolean(form: FormData, name: str, default: bool) -> bool:
    value = _field(form, name)
    if value is None or value == "":
        return default
    if value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ApiError(400, f"`{name}` must be true or false, got {value!r}", param=name)


def joined_text(segments: list[dict]) -> str:
    """The segments' text as one transcript: a space between words, none between CJK characters."""
    text = ""
    for segment in segments:
        piece = segment["text"].strip()
        if text and piece and not (_CJK.match(text[-1]) and _CJK.match(piece[0])):
            text += " "
        text += piece
    return text


def _language(segments: list[dict], asked: str) -> str:
    if asked != "auto":
        return LANGUAGE_NAMES.get(asked, asked)
    spoken = Counter()
    for segment in segments:
        if segment.get("language"):
            spoken[segment["language"]] += segment["end_ms"] - segment["start_ms"]
    code = spoken.most_common(1)[0][0] if spoken else "unknown"
    return LANGUAGE_NAMES.get(code, code)


def _speaker_label(segment: dict) -> str:
    speaker = segment.get("speaker") or {}
    return speaker.get("id") or speaker.get("label") or "unknown"


def render_response(response_format: str, result: dict, language: str, words: bool) -> Response:
    segments = result["segments"]
    seconds = result["duration_ms"] / 1000
    text = joined_text(segments)
    usage = {"type": "duration", "seconds": seconds}
    if response_format == "json":
        return JSONResponse({"text": text, "usage": usage})
    if response_format == "text":
        return PlainTextResponse(text + "\n")
    if response_format in ("srt", "vtt"):
        return PlainTextResponse(render(result, response_format), media_type=f"text/{response_format}"
                                 if response_format == "vtt" else "application/x-subrip")
    if response_format == "diarized_json":
        return JSONResponse({"task": "transcribe", "duration": seconds, "text": text, "usage": usage, "segments": [
            {"type": "transcript.text.segment", "id": f"seg_{index}", "start": s["start_ms"] / 1000,
             "end": s["end_ms"] / 1000, "text": s["text"], "speaker": _speaker_label(s)}
            for index, s in enumerate(segments)]})
    verbose = {"task": "transcribe", "language": _language(segments, language), "duration": seconds, "text": text,
               "segments": [_verbose_segment(index, s) for index, s in enumerate(segments)], "usage": usage}
    if words:
        verbose["words"] = [{"word": w["text"], "start": w["start_ms"] / 1000, "end": w["end_ms"] / 1000}
                            for s in segments for w in s["words"]]
    return JSONResponse(verbose)


def _verbose_segment(index: int, segment: dict) -> dict:
    """OpenAI's segment fields (those Whisper's decoder computes, which ours does not, at neutral
    values: seek 0, temperature 0, logprob 0, compression 1, no-speech 0, no tokens), then ours:
    speaker, language, emotion, event, channel."""
    out = {"id": index, "seek": 0, "start": segment["start_ms"] / 1000, "end": segment["end_ms"] / 1000,
           "text": segment["text"], "tokens": [], "temperature": 0.0, "avg_logprob": 0.0,
           "compression_ratio": 1.0, "no_speech_prob": 0.0}
    for key in ("speaker", "language", "emotion", "event", "channel"):
        if segment.get(key) is not None:
            out[key] = segment[key]
    return out
