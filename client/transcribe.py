"""`tritonasr transcribe`: many files through `asr_offline` at once; results to stdout in input
order, or one file each under an output directory (client/batch.py), skipping those already written."""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from tritonasr.audio import AudioError
from tritonasr.client.batch import Input, InputError, collect, output_paths, write_atomically
from tritonasr.client.connection import AccessDeniedError, Credentials, Retry, resolve
from tritonasr.client.formats import EXTENSIONS, FORMAT_ALIASES, FORMATS, render
from tritonasr.client.offline import OfflineClient, ServerUnavailableError, TranscriptionError, exit_code
from tritonasr.contract import EXIT_FAILED, EXIT_OK, EXIT_USAGE, LANGUAGES, Endpointing

# What stops the whole run rather than one file: the next file would meet it too.
_FATAL = (ServerUnavailableError, AccessDeniedError)


def run_transcribe(files: list[str], url: str, fmt: str, language: str = "auto",
                   concurrency: int = 4, output: TextIO = sys.stdout, return_embedding: bool = False,
                   engine: str = "", with_speaker: bool = True, credentials: Credentials | None = None,
                   use_itn: bool = False, endpointing: Endpointing | None = None,
                   separate_channels: bool = False, retry: Retry = Retry(),
                   output_dir: str | os.PathLike | None = None, overwrite: bool = False) -> int:
    """Transcribes `files` (files, directories, glob patterns: batch.collect) with `concurrency`
    requests in flight; returns the exit code (tritonasr.contract): EXIT_OK, EXIT_FAILED when some
    failed (each reported on stderr), EXIT_USAGE for inputs that give no file or outputs that
    collide (before any work), EXIT_UNREACHABLE or EXIT_DENIED when the server cannot be used
    (reported once, remaining files skipped).

    Without `output_dir` the results go to `output` in input order. With it, each file's result is
    written to its own file there (batch.output_paths), one that exists already is skipped unless
    `overwrite`, and a summary ends the run. Ctrl-C (KeyboardInterrupt, raised again once the
    summary is out) stops the requests in flight; what was finished is written.
    """
    credentials = resolve(credentials)
    if fmt not in FORMATS and fmt not in FORMAT_ALIASES:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join((*FORMATS, *FORMAT_ALIASES))}")
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    try:
        inputs = collect(files)
        outputs = output_paths(inputs.files, output_dir, EXTENSIONS[fmt]) if output_dir is not None else None
    except InputError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    for line in inputs.found:
        print(line, file=sys.stderr)
    todo = inputs.files
    if outputs is not None:  # those written already are skipped
        todo = [(item, out) for item, out in zip(inputs.files, outputs) if overwrite or not os.path.lexists(out)]
    if todo:  # (a finished run, rerun, needs no server)
        try:
            with OfflineClient(url, credentials=credentials) as probe:
                probe.check_ready()
        except ServerUnavailableError as e:
            print(f"error: {e}", file=sys.stderr)
            return exit_code(e)

    work = _Work(url, credentials, retry, dict(language=language, use_itn=use_itn, engine=engine,
                                               return_embedding=return_embedding, with_speaker=with_speaker,
                                               endpointing=endpointing, separate_channels=separate_channels),
                 single=len(inputs.files) == 1)
    try:
        if outputs is None:
            return _to_stream(inputs.files, work, fmt, concurrency, output)
        return _to_files(todo, len(inputs.files), work, fmt, concurrency)
    finally:
        work.close()


class _Work:
    """Transcribes one file per call, from any thread (a client each); `stop` aborts the requests
    in flight and refuses new ones."""

    def __init__(self, url: str, credentials: Credentials, retry: Retry, options: dict, single: bool):
        self.url, self.credentials, self.retry, self.options = url, credentials, retry, options
        self.local = threading.local()
        self.lock = threading.Lock()
        self.clients: list[OfflineClient] = []
        self.stopped = False
        self.progress = _AudioProgress() if single else None

    def transcribe(self, path: str) -> dict:
        if not hasattr(self.local, "client"):
            with self.lock:
                if self.stopped:
                    raise _Stopped()
                self.local.client = OfflineClient(self.url, credentials=self.credentials, retry=self.retry)
                self.clients.append(self.local.client)
        return self.local.client.transcribe_file(path, on_progress=self.progress, **self.options)

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            for client in self.clients:
                client.close()  # (grpc ends the calls in flight on a closed channel)
            self.clients.clear()

    def close(self) -> None:
        self.stop()
        if self.progress:
            self.progress.close()


class _Stopped(Exception):
    """A file not started because the run was stopped."""


class _WriteError(Exception):
    """A file's output could not be written."""


def _failure(path: str, error: Exception) -> str | None:
    """The line that reports a file's failure; None for an error that is not the file's own."""
    if isinstance(error, AudioError):
        return str(error)  # load_audio's messages already start with the file's name
    if isinstance(error, (TranscriptionError, _WriteError)):
        return f"{path}: {error}"
    return None


def _to_stream(files: list[Input], work: _Work, fmt: str, concurrency: int, output: TextIO) -> int:
    headers = fmt != "json" and len(files) > 1
    code = EXIT_OK
    with tqdm(total=len(files), unit="file", disable=len(files) < 2, file=sys.stderr) as bar, \
            _Pool(concurrency, work) as pool:
        futures = [pool.submit(work.transcribe, item.path) for item in files]
        advance = _Advance(bar)
        for future in futures:
            future.add_done_callback(advance)
        # Waiting in input order prints each result as soon as it and those before it are done.
        printed = 0
        for item, future in zip(files, futures):
            try:
                result = future.result()
            except _FATAL as e:
                pool.stop()
                tqdm.write(f"error: {e}", file=sys.stderr)
                code = exit_code(e)
                break
            except (AudioError, TranscriptionError) as e:
                tqdm.write(f"error: {_failure(item.path, e)}", file=sys.stderr)
                code = EXIT_FAILED
                continue
            text = render(result, fmt)
            if headers:
                text = ("\n" if printed else "") + f"==> {item.path} <==\n" + text
            tqdm.write(text, file=output, end="")
            output.flush()
            printed += 1
    return code


def _to_files(todo: list[tuple[Input, Path]], total: int, work: _Work, fmt: str, concurrency: int) -> int:
    """Writes the result of each of `todo` (inputs and their outputs) of `total` files, those not
    in `todo` having been skipped."""
    skipped = total - len(todo)
    failed: list[str] = []
    done, fatal = 0, None

    def transcribe_and_write(item: Input, out: Path) -> dict:
        result = work.transcribe(item.path)
        try:  # (here, in the worker: what was finished is written, even on Ctrl-C)
            write_atomically(out, render(result, fmt))
        except OSError as e:
            raise _WriteError(f"cannot write {out}: {e.strerror or e}") from None
        return result

    with tqdm(total=total, initial=skipped, unit="file", disable=total < 2, file=sys.stderr) as bar, \
            _Pool(concurrency, work) as pool:
        pending = {pool.submit(transcribe_and_write, item, out): item for item, out in todo}
        advance = _Advance(bar)
        for future in pending:
            future.add_done_callback(advance)
        try:
            while pending and fatal is None:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    item = pending.pop(future)
                    error = future.exception()
                    if error is None:
                        done += 1
                    elif isinstance(error, _FATAL):
                        fatal = fatal or error
                    elif (line := _failure(item.path, error)) is not None:
                        failed.append(line)
                        tqdm.write(f"error: {line}", file=sys.stderr)
                    else:
                        raise error
        except KeyboardInterrupt:
            pool.stop()
            pool.shutdown(wait=True)  # (quick: the requests in flight were ended)
            # Results that were complete got written; the rest is not done.
            done += sum(1 for f in pending if not f.cancelled() and f.exception() is None)
            bar.close()
            _summary(done, skipped, failed, not_done=total - skipped - done - len(failed), why="interrupted")
            raise
        if fatal is not None:
            pool.stop()
            tqdm.write(f"error: {fatal}", file=sys.stderr)
    if fatal is not None:
        _summary(done, skipped, failed, not_done=total - skipped - done - len(failed), why="stopped")
        return exit_code(fatal)
    _summary(done, skipped, failed)
    return EXIT_FAILED if failed else EXIT_OK


def _summary(done: int, skipped: int, failed: list[str], not_done: int = 0, why: str = "") -> None:
    parts = [f"{done} done", f"{skipped} skipped (output exists{'; --overwrite redoes them' if skipped else ''})",
             f"{len(failed)} failed"]
    if not_done:
        parts.append(f"{not_done} not done")
    print(f"{why + ': ' if why else ''}{', '.join(parts)}", file=sys.stderr)
    if failed:
        print("failed:", *(f"  {line}" for line in failed), sep="\n", file=sys.stderr)


class _Advance:
    """A future's done callback (any thread): one more file on the bar, and the audio seconds done
    so far next to it."""

    def __init__(self, bar: tqdm):
        self.bar, self.lock, self.audio_s = bar, threading.Lock(), 0.0

    def __call__(self, future: Future) -> None:
        if future.cancelled():
            return
        with self.lock:
            if future.exception() is None:
                self.audio_s += future.result()["duration_ms"] / 1000
                self.bar.set_postfix_str(f"{self.audio_s:,.0f} s of audio", refresh=False)
            self.bar.update()


class _Pool(ThreadPoolExecutor):
    """A thread pool whose exit on an error (Ctrl-C among them) or `stop` does not run the files
    still queued, and aborts those in flight, instead of waiting for all of them."""

    def __init__(self, workers: int, work: _Work):
        super().__init__(max_workers=workers)
        self.work = work

    def stop(self) -> None:
        self.shutdown(wait=False, cancel_futures=True)
        self.work.stop()

    def __exit__(self, kind, *rest):
        if kind is not None:
            self.stop()
        return super().__exit__(kind, *rest)


class _AudioProgress:
    """A bar of the audio done so far, for one long recording (sent in pieces)."""

    def __init__(self):
        self.bar: tqdm | None = None

    def __call__(self, done_ms: int, total_ms: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=round(total_ms / 1000), unit="s", desc="audio done", file=sys.stderr)
        self.bar.update(round(done_ms / 1000) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
