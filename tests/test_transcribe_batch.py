"""`tritonasr transcribe DIR|GLOB… --output-dir OUT`: the real command (a subprocess) against the
session's real server. Outputs mirror the input tree and equal what the command prints for each
file alone; a rerun resumes; a broken file is listed and the rest written; Ctrl-C leaves only
whole files; inputs that give nothing and outputs that collide are refused before any work."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from tritonasr.client.batch import collect
from tritonasr.contract import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from tritonasr.paths import speech_dir

TRITONASR = str(Path(sys.executable).with_name("tritonasr"))
SPEECH = speech_dir()
UNREACHABLE = "127.0.0.1:1"  # refusals before any work never get as far as the server


def _cli(cwd: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TRITONASR, "transcribe", "--url", url, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def _files(directory: Path) -> set[str]:
    """Every file under `directory`, hidden ones too (a leftover temporary file would be one)."""
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


@pytest.fixture()
def tree(tmp_path) -> Path:
    """in/ with three recordings at three depths (one a FLAC), a text file, hidden audio and a
    hidden folder (both left out, as the shell's * leaves them out)."""
    root = tmp_path / "in"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / ".cache").mkdir()
    (root / "a.wav").write_bytes((SPEECH / "one_phrase.wav").read_bytes())
    samples, rate = sf.read(SPEECH / "pause_0.3s.wav", dtype="float32")
    sf.write(root / "sub" / "b.flac", samples, rate)
    (root / "sub" / "deep" / "c.wav").write_bytes((SPEECH / "pause_1s.wav").read_bytes())
    (root / "notes.txt").write_text("not audio\n")
    (root / "._a.wav").write_bytes(b"\0\5\26\7 macOS resource fork")
    (root / ".cache" / "x.wav").write_bytes((SPEECH / "one_phrase.wav").read_bytes())
    return tmp_path


TREE = {"a": "in/a.wav", "sub/b": "in/sub/b.flac", "sub/deep/c": "in/sub/deep/c.wav"}


@pytest.mark.parametrize("fmt, alone, extension", [("json", "json", ".json"), ("txt", "text", ".txt"),
                                                    ("vtt", "vtt", ".vtt")])
def test_a_tree_is_mirrored_with_what_transcribe_prints_for_each_file(server, tree, fmt, alone, extension):
    run = _cli(tree, server.grpc_url, "in", "--output-dir", "out", "--format", fmt, "-j", "3")
    assert run.returncode == EXIT_OK, run.stderr
    assert "in: 3 audio files (1 other file skipped)" in run.stderr
    assert "3 done, 0 skipped (output exists), 0 failed" in run.stderr
    assert _files(tree / "out") == {name + extension for name in TREE}
    # Each as `tritonasr transcribe FILE --format F` prints it (run side by side: 2 cores, 3 files).
    alone_runs = {name: subprocess.Popen([TRITONASR, "transcribe", "--url", server.grpc_url, path, "--format", alone],
                                         cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for name, path in TREE.items()}
    for name, process in alone_runs.items():
        printed, errors = process.communicate(timeout=120)
        assert process.returncode == 0, errors
        assert printed.strip(), f"{name}: nothing transcribed, the comparison would prove nothing"
        assert (tree / "out" / (name + extension)).read_text() == printed


def test_a_rerun_skips_what_is_written_and_redoes_what_is_missing(server, tree):
    assert _cli(tree, server.grpc_url, "in", "--output-dir", "out", "--format", "json").returncode == EXIT_OK
    out = tree / "out"
    kept, redone = out / "a.json", out / "sub" / "b.json"
    before, contents, written = kept.stat(), kept.read_text(), redone.read_text()
    redone.unlink()

    rerun = _cli(tree, server.grpc_url, "in", "--output-dir", "out", "--format", "json")
    assert rerun.returncode == EXIT_OK, rerun.stderr
    assert "1 done, 2 skipped (output exists; --overwrite redoes them), 0 failed" in rerun.stderr
    after = kept.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not touched
    assert redone.read_text() == written
    finished = _cli(tree, UNREACHABLE, "in", "--output-dir", "out", "--format", "json")  # nothing to ask a server
    assert finished.returncode == EXIT_OK and "0 done, 3 skipped" in finished.stderr, finished.stderr

    overwrite = _cli(tree, server.grpc_url, "in", "--output-dir", "out", "--format", "json", "--overwrite")
    assert overwrite.returncode == EXIT_OK, overwrite.stderr
    assert "3 done, 0 skipped" in overwrite.stderr
    assert kept.stat().st_ino != before.st_ino  # written anew (through a rename)
    assert kept.read_text() == contents


def test_a_broken_file_is_listed_and_the_others_are_written(server, tree):
    broken = tree / "in" / "sub" / "broken.wav"
    broken.write_bytes((SPEECH / "one_phrase.wav").read_bytes()[:30])  # a RIFF header cut short
    run = _cli(tree, server.grpc_url, "in", "--output-dir", "out", "--format", "srt")
    assert run.returncode == EXIT_FAILED, run.stderr
    assert "3 done, 0 skipped (output exists), 1 failed" in run.stderr
    failed = run.stderr[run.stderr.index("\nfailed:\n") + len("\nfailed:\n"):].splitlines()
    assert len(failed) == 1 and failed[0].startswith("  in/sub/broken.wav is not a readable audio file"), run.stderr
    assert f"error: {failed[0].strip()}" in run.stderr  # said as it happened, too
    assert _files(tree / "out") == {"a.srt", "sub/b.srt", "sub/deep/c.srt"}  # and no half or temporary file
    assert "Traceback" not in run.stderr


def test_a_glob_pattern_takes_its_matches_under_its_root(server, tree):
    run = _cli(tree, server.grpc_url, "in/**/*.wav", "--output-dir", "out", "--format", "json")
    assert run.returncode == EXIT_OK, run.stderr
    assert "in/**/*.wav: 2 audio files" in run.stderr
    assert _files(tree / "out") == {"a.json", "sub/deep/c.json"}
    assert json.loads((tree / "out" / "sub" / "deep" / "c.json").read_text())["file"] == "in/sub/deep/c.wav"


def test_ctrl_c_leaves_whole_files_and_a_rerun_finishes(server, tmp_path):
    recordings = tmp_path / "in"
    recordings.mkdir()
    for i in range(40):
        (recordings / f"{i:02d}.wav").write_bytes((SPEECH / "one_phrase.wav").read_bytes())
    command = [TRITONASR, "transcribe", "--url", server.grpc_url, "in", "--output-dir", "out", "--format", "json",
               "-j", "1"]
    # Ctrl-C as in a terminal: a suite started in the background (`cmd &` in a script) runs with
    # SIGINT ignored, which its children inherit, and Python then leaves SIGINT ignored.
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not any((tmp_path / "out").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 130, errors
    written = _files(tmp_path / "out")
    assert 0 < len(written) < 40, errors
    assert all(name.endswith(".json") and json.loads((tmp_path / "out" / name).read_text())["segments"]
               for name in written)  # whole files only, no temporary ones
    assert f"interrupted: {len(written)} done, 0 skipped (output exists), 0 failed, {40 - len(written)} not done" \
        in errors
    assert "Traceback" not in errors

    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == EXIT_OK, rerun.stderr
    assert f"{40 - len(written)} done, {len(written)} skipped" in rerun.stderr
    assert len(_files(tmp_path / "out")) == 40


# -- refused before any work (the server is never asked: it is unreachable) ----------------------

def test_two_inputs_for_one_output_are_refused_naming_both(tree):
    (tree / "in" / "a.mp3").write_bytes(b"")
    run = _cli(tree, UNREACHABLE, "in", "--output-dir", "out")
    assert run.returncode == EXIT_USAGE, run.stderr
    assert "error: in/a.mp3 and in/a.wav would both be written to out/a.txt" in run.stderr
    assert not (tree / "out").exists()


def test_inputs_that_match_nothing_are_errors_naming_each(tree):
    (tree / "empty").mkdir()
    run = _cli(tree, UNREACHABLE, "in/*.ogg", "missing.wav", "empty", "in/a.wav", "--output-dir", "out")
    assert run.returncode == EXIT_USAGE, run.stderr
    assert run.stderr.splitlines() == ["error: in/*.ogg: no audio files match this pattern",
                                       "error: missing.wav: no such file or directory",
                                       "error: empty: no audio files in this directory"]
    assert not (tree / "out").exists()


def test_the_same_file_named_twice_is_done_once(tree, monkeypatch):
    monkeypatch.chdir(tree)
    inputs = collect(["in/a.wav", "in", "./in/a.wav", "in/**/*.wav", "in/sub/b.flac"])
    assert [(i.path, i.relative) for i in inputs.files] == [
        ("in/a.wav", "a.wav"), ("in/sub/b.flac", "sub/b.flac"), ("in/sub/deep/c.wav", "sub/deep/c.wav")]


def test_an_existing_name_with_wildcard_characters_is_a_file(tree, monkeypatch):
    monkeypatch.chdir(tree)
    (tree / "in" / "take[1].wav").write_bytes(b"")
    assert [i.path for i in collect(["in/take[1].wav"]).files] == ["in/take[1].wav"]
