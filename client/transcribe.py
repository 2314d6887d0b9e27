"""`tritonasr transcribe`: many files through `asr_offline` at once, results in input order."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

from tqdm import tqdm

from tritonasr.audio import AudioError
from tritonasr.client.connection import AccessDeniedError, Credentials, Retry, resolve
from tritonasr.client.formats import FORMATS, render
from tritonasr.client.offline import OfflineClient, ServerUnavailableError, TranscriptionError, exit_code
from tritonasr.contract import EXIT_FAILED, EXIT_OK, LANGUAGES, Endpointing


def run_transcribe(files: list[str], url: str, fmt: str, language: str = "auto",
                   concurrency: int = 4, output: TextIO = sys.stdout, return_embedding: bool = False,
                   engine: str = "", with_speaker: bool = True, credentials: Credentials | None = None,
                   use_itn: bool = False, endpointing: Endpointing | None = None,
                   separate_channels: bool = False, retry: Retry = Retry()) -> int:
    """Transcribes `files` with `concurrency` requests in flight; returns the exit code
    (tritonasr.contract): EXIT_OK, EXIT_FAILED when some failed (each reported on stderr),
    EXIT_UNREACHABLE or EXIT_DENIED when the server cannot be used (reported once, remaining files
    skipped).
    """
    credentials = resolve(credentials)
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    try:
        with OfflineClient(url, credentials=credentials) as probe:
            probe.check_ready()
    except ServerUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_code(e)

    local = threading.local()
    clients: list[OfflineClient] = []

    progress = _AudioProgress() if len(files) == 1 else None

    def transcribe(path: str) -> dict:
        if not hasattr(local, "client"):
            local.client = OfflineClient(url, credentials=credentials, retry=retry)
            clients.append(local.client)
        return local.client.transcribe_file(path, language=language, use_itn=use_itn, engine=engine,
                                            return_embedding=return_embedding, with_speaker=with_speaker,
                                            endpointing=endpointing, on_progress=progress,
                                            separate_channels=separate_channels)

    headers = fmt != "json" and len(files) > 1
    code = EXIT_OK
    with tqdm(total=len(files), unit="file", disable=len(files) < 2, file=sys.stderr) as bar, \
            ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(transcribe, path) for path in files]
        for future in futures:
            future.add_done_callback(lambda _: bar.update())
        # Waiting in input order prints each result as soon as it and those before it are done.
        printed = 0
        for path, future in zip(files, futures):
            try:
                result = future.result()
            except (ServerUnavailableError, AccessDeniedError) as e:
                tqdm.write(f"error: {e}", file=sys.stderr)
                pool.shutdown(cancel_futures=True)
                code = exit_code(e)
                break
            except AudioError as e:
                # load_audio's messages already start with the file's name.
                tqdm.write(f"error: {e}", file=sys.stderr)
                code = EXIT_FAILED
                continue
            except TranscriptionError as e:
                tqdm.write(f"error: {path}: {e}", file=sys.stderr)
                code = EXIT_FAILED
                continue
            text = render(result, fmt)
            if headers:
                text = ("\n" if printed else "") + f"==> {path} <==\n" + text
            tqdm.write(text, file=output, end="")
            output.flush()
            printed += 1
    if progress:
        progress.close()
    for client in clients:
        client.close()
    return code


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
