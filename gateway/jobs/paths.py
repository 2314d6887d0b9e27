"""Server-side paths of a job: relative to the gateway's `--jobs-root`, and nothing outside it
reachable, neither through `..`, an absolute path, nor a symbolic link that leads out. Checked when
the job is made and again when each file is read (the tree may have changed in between)."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tritonasr.audio import is_audio_name
from tritonasr.errors import shown
from tritonasr.gateway.errors import ApiError


class PathRefused(ApiError):
    pass


def refused(given: str, why: str, status: int = 400) -> PathRefused:
    return PathRefused(status, f"path {shown(given, 200)}: {why}", code="invalid_path", param="path")


class JobsRoot:
    def __init__(self, root: Path):
        self.root = Path(root).resolve(strict=True)
        if not self.root.is_dir():
            raise NotADirectoryError(f"the jobs root {root} is not a directory")

    def expand(self, given: str, limit: int) -> list[str]:
        """The audio files `given` names (a file, or a directory's audio files, subdirectories too,
        hidden ones left out, in name order), each as its path under the root; at most `limit`."""
        relative = self._relative(given)
        target = self._inside(relative, given)
        if target.is_file():
            return [relative.as_posix()]
        if not target.is_dir():
            raise refused(given, "no such file or directory under the jobs root")
        found: list[str] = []
        # Links to directories are not followed (a loop would never end); linked files are checked.
        for parent, directories, names in os.walk(target):
            directories[:] = sorted(d for d in directories if not d.startswith("."))
            for name in sorted(names):
                if name.startswith(".") or not is_audio_name(name):
                    continue
                under = relative / Path(parent).relative_to(target) / name
                if self._inside(under, under.as_posix()).is_file():  # (a link in it that leads out: 403)
                    found.append(under.as_posix())
                    if len(found) > limit:
                        raise refused(given, f"more than {limit} audio files: a job takes at most {limit}")
        if not found:
            raise refused(given, "no audio files in this directory")
        return found

    def open(self, name: str) -> BinaryIO:
        """A job's file, for reading, if it is still under the root."""
        target = self._inside(self._relative(name), name)
        if not target.is_file():
            raise refused(name, "no longer a file under the jobs root")
        return target.open("rb")

    def _relative(self, given: str) -> PurePosixPath:
        if not given or "\0" in given or "\\" in given:
            raise refused(given, "not a path")
        relative = PurePosixPath(given)
        if relative.is_absolute():
            raise refused(given, "must be relative to the jobs root")
        if ".." in relative.parts:
            raise refused(given, "must not contain `..`")
        return relative

    def _inside(self, relative: PurePosixPath, given: str) -> Path:
        """The real path (links followed), if it is under the root; 403 if it leads out."""
        target = (self.root / relative).resolve()
        if not target.is_relative_to(self.root):
            raise refused(given, "leads outside the jobs root", 403)
        return target
