"""The pipeline models' settings: one default each, and one precedence (serve's environment, then
the model's config parameter, then the default) for every setting."""
from __future__ import annotations

import pytest

from tritonasr.recognition.settings import (OfflineSettings, PipelineSettings, RegistrySettings, SpeakerSettings,
                                            StreamSettings)
from tritonasr.serving.server import ServerConfig, ServerError


@pytest.mark.parametrize("settings", [PipelineSettings, OfflineSettings, RegistrySettings, StreamSettings,
                                      SpeakerSettings])
def test_without_parameters_every_setting_is_its_default(settings):
    assert settings.from_parameters({}, {}) == settings()


def test_serve_wins_over_the_config_which_wins_over_the_default():
    serve = SpeakerSettings.environment({"threshold": 0.7, "window_ms": 2000, "store": "sqlite:///x.db"})
    assert serve == {"TRITONASR_SPEAKER_THRESHOLD": "0.7", "TRITONASR_SPEAKER_WINDOW_MS": "2000",
                     "TRITONASR_SPEAKER_STORE": "sqlite:///x.db"}
    config = {"speaker_threshold": "0.9", "speaker_model": "", "speaker_min_segment_ms": "500"}
    assert SpeakerSettings.from_parameters(config, serve) == SpeakerSettings(
        model="", store="sqlite:///x.db", window_ms=2000, threshold=0.7, min_segment_ms=500)


def test_each_model_reads_its_own_parameters():
    config = {"max_audio_seconds": "60", "enroll_max_audio_seconds": "30", "max_chunk_ms": "500",
              "require_stream_token": "true", "pad_segments_ms": "1000", "vad_model": "vad2"}
    assert OfflineSettings.from_parameters(config, {}).max_audio_seconds == 60
    assert RegistrySettings.from_parameters(config, {}).max_audio_seconds == 30
    assert StreamSettings.from_parameters(config, {}) == StreamSettings(max_chunk_ms=500, require_stream_token=True)
    assert PipelineSettings.from_parameters(config, {}) == PipelineSettings(vad_model="vad2", pad_segments_ms=1000)
    assert StreamSettings.from_parameters({"require_stream_token": "False"}, {}).require_stream_token is False


@pytest.mark.parametrize("settings, config, message", [
    (StreamSettings, {"max_chunk_ms": "5000"}, "max_chunk_ms must be between 1 and 2000"),
    (StreamSettings, {"max_streams": "lots"}, "max_streams: invalid literal"),
    (StreamSettings, {"require_stream_token": "yes please"}, "require_stream_token: expected true or false"),
    (StreamSettings, {"max_streams": "-1"}, "max_streams must be 0 \\(no limit\\) or more"),
    (OfflineSettings, {"max_inflight_audio_mb": "0"}, "max_inflight_audio_mb must be positive"),
    (PipelineSettings, {"pad_segments_ms": "-5"}, "pad_segments_ms must be 0"),
    (SpeakerSettings, {"speaker_threshold": "1.5"}, "speaker_threshold must be a cosine similarity"),
    (SpeakerSettings, {"speaker_window_ms": "0"}, "speaker_window_ms must be positive"),
])
def test_bad_values_are_refused_naming_the_parameter(settings, config, message):
    with pytest.raises(ValueError, match=message):
        settings.from_parameters(config, {})


def test_serve_refuses_bad_settings_before_starting_anything(tmp_path):
    with pytest.raises((ServerError, TypeError), match="unexpected keyword|thresold"):
        ServerConfig(tmp_path, speaker_settings={"thresold": 0.5})
    with pytest.raises(ServerError, match="max_streams must be 0"):
        ServerConfig(tmp_path, max_streams=-1)


def test_serve_sets_the_default_engine_for_every_pipeline(tmp_path):
    env = ServerConfig(tmp_path, asr_engine="parakeet").environment()
    assert PipelineSettings.from_parameters({"default_asr_engine": "sensevoice"}, env).default_asr_engine == "parakeet"
    assert "TRITONASR_DEFAULT_ASR_ENGINE" not in ServerConfig(tmp_path).environment()


def test_an_empty_environment_variable_is_unset():
    assert StreamSettings.from_parameters({"max_streams": "4"}, {"TRITONASR_MAX_STREAMS": ""}).max_streams == 4
