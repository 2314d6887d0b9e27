"""The command line's own behaviour: help, usage errors, argument checks before any work."""
from __future__ import annotations

import argparse

import pytest

from tritonasr.cli import build_parser, main
from tritonasr.contract import EXIT_USAGE


def _options(parser: argparse.ArgumentParser, name: str = "tritonasr"):
    """(command, action) of every option of every (sub)command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _options(sub, f"{name} {sub_name}")
        elif action.option_strings and action.dest not in ("help", "version"):
            yield name, action, parser


def test_every_option_has_help_that_gives_its_default():
    for command, action, parser in _options(build_parser()):
        assert action.help, f"{command} {action.option_strings[0]} has no help text"
        if action.default not in (None, False, "", argparse.SUPPRESS):
            text = parser.formatter_class(command)._get_help_string(action)
            assert "default" in text, f"{command} {action.option_strings[0]}: {text!r} does not give its default"


@pytest.mark.parametrize("arguments, message", [
    (["export", "sensevoice"], "give --model-dir DIR, --model HUB_ID or --random-init"),
    (["export", "sensevoice", "--model-dir", "/nonexistent/SenseVoiceSmall"], "--model-dir /nonexistent"),
    (["export", "speaker", "--random-init", "tiny", "--check-audio", "/nonexistent.wav"], "--check-audio"),
    (["export", "parakeet", "--model-dir", ".", "--model", "nvidia/parakeet-tdt-0.6b-v2"], "not both"),
    (["export", "vad", "--random-init", "tiny"], "do not apply"),
])
def test_an_export_with_bad_arguments_writes_nothing(tmp_path, capsys, arguments, message):
    repository = tmp_path / "repository"
    assert main([*arguments, "--model-repository", str(repository)]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not repository.exists()


def test_an_unknown_language_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["transcribe", "--language", "fr", "any.wav"])
    assert exited.value.code == EXIT_USAGE
    assert "invalid choice: 'fr'" in capsys.readouterr().err


def test_a_benchmark_whose_server_cannot_start_says_why_without_a_traceback(tmp_path, capsys):
    assert main(["bench", "memory", "--model-repository", str(tmp_path / "none"), "--scenarios", "abandoned"]) == 1
    err = capsys.readouterr().err
    assert "error: model repository" in err and "does not exist" in err and "Traceback" not in err
