"""What `tritonasr transcribe` works through: files, directories and glob patterns made into a list
of audio files (each with its path under the directory or pattern root it came from), the output
file of each under `--output-dir`, and writing those so that a run cut short leaves no half file."""

from __future__ import annotations

import glob
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from tritonasr.audio import is_audio_name

class InputError(ValueError):
    """An input that gives no file, or outputs that cannot be written as asked; found before any work."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Input:
    path: str  # as the user wrote it, or found under what they wrote (relative stays relative)
    relative: str  # under the directory or pattern root it came from; a named file: its name


@dataclass
class Inputs:
    files: list[Input] = field(default_factory=list)
    found: list[str] = field(default_factory=list)  # what each directory and pattern gave, in words


def collect(arguments: list[str]) -> Inputs:
    """The audio files `arguments` name, in order, each once: a file as it is; a directory's audio
    files (by tritonasr.audio.AUDIO_EXTENSIONS, in its subdirectories too, hidden ones left out); a
    glob pattern the shell did not expand (`calls/**/*.wav`, ** for any depth), its audio files and those of the
    directories it matches. Raises InputError naming every argument that gives no file."""
    inputs, problems, seen = Inputs(), [], set()

    def add(path: str, relative: str) -> None:
        key = os.path.normcase(os.path.realpath(path))
        if key not in seen:  # the same file named twice, or found twice, is done once
            seen.add(key)
            inputs.files.append(Input(path, os.path.normpath(relative)))

    for argument in arguments:
        # An existing path is taken as it is, even with [ ] or * in its name.
        if os.path.isdir(argument):
            files, others = _walk(argument, problems)
            if not files:
                problems.append(f"{argument}: no audio files in this directory{_others(others)}")
            for path in files:
                add(path, os.path.relpath(path, argument))
            inputs.found.append(f"{argument}: {_count(len(files), 'audio file')}{_others(others, ' skipped')}")
        elif os.path.lexists(argument):
            add(argument, os.path.basename(argument))  # (a broken link fails when read, naming it)
        elif glob.has_magic(argument):
            root = _pattern_root(argument)
            files, others = [], 0
            for match in sorted(glob.glob(argument, recursive=True)):
                if os.path.isdir(match):
                    found, skipped = _walk(match, problems)
                    files += found
                    others += skipped
                elif is_audio_name(match):
                    files.append(match)
                else:
                    others += 1
            if not files:
                problems.append(f"{argument}: no audio files match this pattern{_others(others)}")
            for path in files:
                add(path, os.path.relpath(path, root))
            inputs.found.append(f"{argument}: {_count(len(files), 'audio file')}{_others(others, ' skipped')}")
        else:
            problems.append(f"{argument}: no such file or directory")
    if problems:
        raise InputError(problems)
    return inputs


def _walk(directory: str, problems: list[str]) -> tuple[list[str], int]:
    """(the audio files under `directory`, sorted, and how many other files there are). Hidden
    files and directories are left out, as the shell's * and glob leave them out (macOS's `._a.wav`
    are not audio); links to directories are not followed (a loop would never end)."""
    files, others = [], 0

    def unreadable(error: OSError) -> None:
        problems.append(f"{error.filename}: {error.strerror}")

    for parent, directories, names in os.walk(directory, onerror=unreadable):
        directories[:] = sorted(d for d in directories if not d.startswith("."))
        for name in sorted(names):
            path = os.path.join(parent, name)
            if name.startswith(".") or not os.path.isfile(path):
                continue
            if is_audio_name(name):
                files.append(path)
            else:
                others += 1
    return files, others


def _pattern_root(pattern: str) -> str:
    """The directory a pattern's matches are under: its leading parts without wildcards."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return str(Path(*parts[:fixed])) if fixed else "."


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def _others(n: int, skipped: str = "") -> str:
    return f" ({_count(n, 'other file')}{skipped})" if n else ""


def output_paths(inputs: list[Input], output_dir: str | os.PathLike, extension: str) -> list[Path]:
    """Each input's output: its relative path under `output_dir`, with `extension` for its own.
    Raises InputError, naming them, where two inputs would be written to one file, or an output
    would replace an input."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError([f"{output_dir}: not a directory (--output-dir)"])
    problems, taken = [], {}
    sources = {os.path.realpath(i.path): i.path for i in inputs}
    outputs = []
    for item in inputs:
        relative = Path(item.relative)
        if relative.is_absolute() or ".." in relative.parts or not relative.name:
            problems.append(f"{item.path}: its path under the directory it came from ({item.relative}) leads "
                            "outside the output directory")
            continue
        output = output_dir / relative.with_name(relative.stem + extension)
        key = os.path.normcase(os.path.abspath(output))
        if key in taken:
            problems.append(f"{taken[key]} and {item.path} would both be written to {output}")
        elif os.path.realpath(output) in sources:
            problems.append(f"{item.path}: its output {output} would replace the input "
                            f"{sources[os.path.realpath(output)]}")
        else:
            taken[key] = item.path
        outputs.append(output)
    if problems:
        raise InputError(problems)
    return outputs


def write_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` through a hidden temporary file in the same directory, renamed over
    it once complete: `path` is either absent, as before, or whole, even if the process is killed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        # "x": never through a link an attacker placed; permissions as the umask says.
        with open(temporary, "x", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
