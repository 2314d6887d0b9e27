import json

import pytest

from tritonasr.client.formats import render

RESULT = {
    "file": "talk.wav",
    "duration_ms": 3_725_000,
    "segments": [
        {"start_ms": 1230, "end_ms": 3450, "text": "Hello there.",
         "language": "en", "emotion": "HAPPY", "event": "Speech",
         "speaker": {"id": "alice", "score": 0.81, "label": "A"}},
        {"start_ms": 61_005, "end_ms": 65_000, "text": "今天天气很好。",
         "language": "zh", "emotion": None, "event": None,
         "speaker": {"id": None, "score": 0.12, "label": "B"}},
        {"start_ms": 3_600_000, "end_ms": 3_723_004, "text": "The end.",
         "language": None, "emotion": None, "event": None},
    ],
}
EMPTY = {"file": "silence.wav", "duration_ms": 5000, "segments": []}


def test_text_has_one_line_per_segment_with_compact_tags():
    assert render(RESULT, "text") == (
        "[00:01.230 --> 00:03.450] <en|HAPPY|Speech> alice: Hello there.\n"
        "[01:01.005 --> 01:05.000] <zh> speaker B: 今天天气很好。\n"
        "[01:00:00.000 --> 01:02:03.004] The end.\n"
    )


def test_srt_numbers_blocks_and_uses_comma_timestamps():
    assert render(RESULT, "srt") == (
        "1\n00:00:01,230 --> 00:00:03,450\nalice: Hello there.\n"
        "\n"
        "2\n00:01:01,005 --> 00:01:05,000\nspeaker B: 今天天气很好。\n"
        "\n"
        "3\n01:00:00,000 --> 01:02:03,004\nThe end.\n"
    )


def test_json_is_the_contract_on_one_line():
    out = render(RESULT, "json")
    assert out.endswith("\n") and out.count("\n") == 1
    assert "今天天气很好" in out  # UTF-8, not \u escapes
    assert json.loads(out) == RESULT


def test_empty_segments():
    assert render(EMPTY, "text") == ""
    assert render(EMPTY, "srt") == ""
    assert json.loads(render(EMPTY, "json")) == EMPTY


def test_vtt_names_speakers_as_voices_and_escapes_markup():
    result = {"segments": [*RESULT["segments"][:2],
                           {"start_ms": 70_000, "end_ms": 71_000, "text": "a <b> & c", "speaker": None}]}
    assert render(result, "vtt") == (
        "WEBVTT\n"
        "\n00:00:01.230 --> 00:00:03.450\n<v alice>Hello there.\n"
        "\n00:01:01.005 --> 00:01:05.000\n<v speaker B>今天天气很好。\n"
        "\n00:01:10.000 --> 00:01:11.000\na &lt;b&gt; &amp; c\n"
    )
    assert render(EMPTY, "vtt") == "WEBVTT\n"  # a valid file, without cues


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="format 'xml'; choose one of text, json, srt, vtt"):
        render(RESULT, "xml")
