"""`tritonasr jobs`: batch jobs on the HTTP gateway (docs/jobs.md). `submit` uploads files and
directories (or names files under the gateway's jobs root) as one job, in requests of at most
`--batch-mb` each (one request when all fits; else the job is made open, the rest added, then it is
closed), so a folder larger than the gateway's upload limit is one job all the same; with `--wait` (or
`--output-dir`) it follows the job with a progress bar, then writes each result as
`tritonasr transcribe` does: one file per input under `--output-dir`, or to stdout. The job goes on
on the gateway whatever happens here: `jobs show`, `jobs list` and `jobs cancel` find it again, and
`jobs delete` removes a finished one with its results."""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm

from tritonasr.client.batch import Input, InputError, collect, output_paths, write_atomically
from tritonasr.client.connection import ENVIRONMENT
from tritonasr.client.formats import EXTENSIONS, FORMAT_ALIASES, FORMATS, render
from tritonasr.contract import (CHANNEL_MODES, ENGINES, EXIT_DENIED, EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE,
                                EXIT_USAGE, LANGUAGES, MiB)
from tritonasr.runtime.access import split_keys

# `tritonasr gateway`'s own default address.
DEFAULT_GATEWAY_URL = "http://localhost:8080"
POLL_S = 1.0
# The result format the gateway keeps for us: what `tritonasr transcribe --format json` writes.
RESULT_FORMAT = "tritonasr_json"
ACTIVE = ("queued", "running")
DENIED_CODES = ("invalid_api_key", "permission_denied")
# What a request of uploads may hold by default, in MiB: below the gateway's default --max-upload-mb
# (100), and small enough that a request refused as too large costs little to send again.
BATCH_MB = 32.0
# Bytes a file's part adds to its own in a multipart body (the boundary, its headers, with its name).
PART_OVERHEAD = 256


class GatewayError(Exception):
    """A call the gateway refused or could not be reached for; `exit_code` says which, `code` the
    gateway's error code when it gave one."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, code: str | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.code = code
        self.status = status


class UploadTooLarge(GatewayError):
    """The gateway refused a request's uploads as more than it takes in one request (413, or it
    closed the connection while they were sent)."""


class JobsClient:
    """The gateway's jobs API over HTTP(S), with the caller's key."""

    def __init__(self, url: str = DEFAULT_GATEWAY_URL, api_key: str | None = None, tls_ca: Path | None = None,
                 timeout_s: float = 300.0):
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=10.0),
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
                                 verify=str(tls_ca) if tls_ca else True)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, uploads: list[Input], paths: list[str] = (), *, open_: bool = False, engine: str = "",
               language: str = "auto", itn: bool = False, speaker: bool = True, channels: str = "mix",
               on_read: Callable[[int], None] | None = None) -> dict:
        """A new job of `uploads` (sent under their relative names) and `paths` (under the gateway's
        jobs root), in one request; the job as the gateway answers it. `open_`: it takes more files
        (`append`) until `close`d. `on_read(n)`: n more bytes of the uploads were sent (negative: a
        refused request's, taken back). UploadTooLarge when the request was too large."""
        fields = {"language": language, "itn": str(itn).lower(), "speaker": str(speaker).lower(),
                  "channels": channels, "path": list(paths)}
        if engine:
            fields["model"] = engine
        if open_:
            fields["open"] = "true"
        return self._upload("/v1/jobs", fields, uploads, on_read)

    def append(self, job_id: str, uploads: list[Input], paths: list[str] = (),
               on_read: Callable[[int], None] | None = None) -> dict:
        """More files for an open job, after those it holds; the job. As `submit` for the rest."""
        return self._upload(f"/v1/jobs/{job_id}/files", {"path": list(paths)}, uploads, on_read)

    def close_job(self, job_id: str) -> dict:
        """An open job takes no more files (its workers finish it); the job."""
        return self._call("POST", f"/v1/jobs/{job_id}/close").json()

    def _upload(self, path: str, fields: dict, uploads: list[Input], on_read) -> dict:
        import httpx

        with ExitStack() as files:
            readers = [_Reader(files.enter_context(open(item.path, "rb")), on_read) for item in uploads]
            parts = [("file", (item.relative, reader, "application/octet-stream"))
                     for item, reader in zip(uploads, readers)]
            try:
                return self._call("POST", path, data=fields, files=parts or None).json()
            except GatewayError as error:
                for reader in readers:
                    reader.take_back()
                if error.status == 413:
                    raise UploadTooLarge(str(error), error.exit_code, error.code, 413) from None
                if not isinstance(error.__cause__, (httpx.WriteError, httpx.RemoteProtocolError)):
                    raise
                # A gateway that refuses an upload as too large answers before reading it all, and
                # closes the connection under the sender.
                raise UploadTooLarge(f"the gateway at {self.url} closed the connection while the files were sent: "
                                     "more than it takes in one request (its --max-upload-mb)?") from None

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def jobs(self, limit: int = 20) -> list[dict]:
        return self._call("GET", "/v1/jobs", params={"limit": limit}).json()["data"]

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel").json()

    def delete(self, job_id: str) -> dict:
        """Deletes a finished job with its results (`{"id", "object": "job", "deleted": true}`);
        refused (code `job_active`) while a file of it is queued or running."""
        return self._call("DELETE", f"/v1/jobs/{job_id}").json()

    def result(self, job_id: str, file_id: str) -> dict:
        """A done file's result: `{"file", "duration_ms", "segments"}`."""
        return self._call("GET", f"/v1/jobs/{job_id}/files/{file_id}/result", params={"format": RESULT_FORMAT}).json()

    def _call(self, method: str, path: str, **kwargs):
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.url}: {exc}", EXIT_UNREACHABLE) from exc
        if response.is_success:
            return response
        try:
            error = response.json()["error"]
            message, code = error["message"], error.get("code")
        except (ValueError, KeyError, TypeError):
            message, code = response.text.strip()[:300] or response.reason_phrase, None
        denied = response.status_code == 401 or code in DENIED_CODES
        raise GatewayError(f"the gateway answered {response.status_code}: {message}",
                           EXIT_DENIED if denied else EXIT_FAILED, code, response.status_code)


class _Reader:
    """An upload's file as httpx reads it, telling `on_read` how much was read (its length and file
    number still seen, so the request declares its Content-Length: a gateway refuses a request too
    large for it before it is sent)."""

    def __init__(self, file, on_read: Callable[[int], None] | None):
        self.file, self.on_read, self.read_bytes = file, on_read, 0

    def fileno(self) -> int:
        return self.file.fileno()

    def tell(self) -> int:
        return self.file.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self.file.seek(offset, whence)
        if position == 0:  # (read again from the start: what was counted is counted again)
            self.take_back()
        return position

    def read(self, size: int = -1) -> bytes:
        chunk = self.file.read(size)
        if chunk and self.on_read:
            self.read_bytes += len(chunk)
            self.on_read(len(chunk))
        return chunk

    def take_back(self) -> None:
        if self.read_bytes and self.on_read:
            self.on_read(-self.read_bytes)
        self.read_bytes = 0


class FileTooLarge(GatewayError):
    """One file alone is more than the gateway takes in one request."""


class UploadStopped(Exception):
    """An upload in several requests failed after its job was made: the job is left open."""

    def __init__(self, job: dict, sent: int, total: int):
        super().__init__(job["id"])
        self.job, self.sent, self.total = job, sent, total


def submit_in_batches(client: JobsClient, uploads: list[Input], paths: list[str], batch_bytes: int,
                      on_created: Callable[[dict], None] = lambda job: None,
                      on_read: Callable[[int], None] | None = None, **options) -> dict:
    """One job of `uploads` and `paths`, in requests of at most `batch_bytes` of uploads each: when
    all fit in one, one plain request; else the job is made open with the first batch, the others
    are added in order, then the paths (so the job's files are the uploads in order, then what the
    paths named, as from one request), and it is closed. A request refused as too large is sent
    again in halves; a file too large alone raises FileTooLarge. The job once closed; `on_created`
    is told of an open job when it is made. A failure after that raises UploadStopped (the job left
    open), from the failure."""
    job, sent, limit = None, 0, batch_bytes
    while True:
        batch = _batch(uploads[sent:], limit)
        last = sent + len(batch) == len(uploads)
        try:
            if job is None and last:  # all of it in one request
                return client.submit(batch, paths, on_read=on_read, **options)
            if job is None:
                job = client.submit(batch, (), open_=True, on_read=on_read, **options)
                on_created(job)
            else:
                job = client.append(job["id"], batch, on_read=on_read)
            sent += len(batch)
            if job["counts"]["total"] != sent:  # (the files' order is what the results are matched by)
                raise GatewayError(f"job {job['id']} holds {job['counts']['total']} files, {sent} were sent")
            if last:
                if paths:
                    job = client.append(job["id"], (), paths)
                return client.close_job(job["id"])
        except UploadTooLarge as error:
            if len(batch) == 1:
                failure = FileTooLarge(
                    f"{batch[0].path} ({_cost(batch[0]) / MiB:.1f} MiB) is more than the gateway at {client.url} "
                    "takes in one request: raise the gateway's --max-upload-mb, or put the files under its "
                    f"--jobs-root and submit their paths (--path) ({error})", error.exit_code, error.code, error.status)
                if job is None:
                    raise failure from None
                raise UploadStopped(job, sent, len(uploads)) from failure
            limit = sum(map(_cost, batch)) // 2  # (then the rest goes in batches of this size too)
        except (GatewayError, KeyboardInterrupt) as error:
            if job is None:
                raise
            raise UploadStopped(job, sent, len(uploads)) from error


def _cost(item: Input) -> int:
    """What an upload adds to a request: its bytes and its part's."""
    return os.path.getsize(item.path) + PART_OVERHEAD + len(item.relative.encode())


def _batch(uploads: list[Input], limit: int) -> list[Input]:
    """The first uploads that fit in `limit` together; the first alone when it does not fit."""
    batch, size = [], 0
    for item in uploads:
        cost = _cost(item)
        if batch and size + cost > limit:
            break
        batch.append(item)
        size += cost
    return batch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`jobs submit | list | show | cancel | delete`, each with the gateway's address and the caller's key."""
    actions = parser.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="transcribe files and directories as one job on the gateway")
    submit.add_argument("files", nargs="*", metavar="FILE|DIR|GLOB",
                        help="audio files; directories (their audio files, subdirectories too); quoted glob "
                             "patterns: uploaded, in requests of at most --batch-mb")
    submit.add_argument("--path", action="append", metavar="REL",
                        help="a file or directory on the gateway's machine, under its --jobs-root (repeat)")
    submit.add_argument("--wait", action="store_true", help="follow the job with a progress bar, then write the "
                                                            "results (to stdout without --output-dir)")
    submit.add_argument("--output-dir", type=Path, metavar="OUT",
                        help="write one file per input there, as `tritonasr transcribe --output-dir` does (implies "
                             "--wait); inputs whose file exists are not submitted")
    submit.add_argument("--overwrite", action="store_true", help="with --output-dir: redo those that exist")
    submit.add_argument("--batch-mb", type=float, default=BATCH_MB, metavar="MB",
                        help="the most one request uploads, in MiB (default %(default)g; the gateway's --max-upload-mb "
                             "is 100 unless set otherwise): more goes into one job in several requests; a request "
                             "the gateway refuses as too large is sent again in halves")
    submit.add_argument("--format", choices=(*FORMATS, *FORMAT_ALIASES), default="text",
                        help="output format (txt: the same as text)")
    submit.add_argument("--engine", choices=ENGINES, default="", help="ASR engine (default: the server's)")
    submit.add_argument("--language", default="auto", choices=LANGUAGES, help="spoken language (auto: detect)")
    submit.add_argument("--itn", action="store_true", help="inverse text normalisation (punctuation, numbers)")
    submit.add_argument("--no-speaker", action="store_true", help="skip the server's speaker stage")
    submit.add_argument("--channels", choices=CHANNEL_MODES, default="mix",
                        help="separate: each channel of a multichannel file recognised on its own")
    listing = actions.add_parser("list", help="your newest jobs")
    listing.add_argument("--limit", type=int, default=20, help="how many")
    listing.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    show = actions.add_parser("show", help="a job and its files")
    show.add_argument("job_id", metavar="ID")
    show.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    cancel = actions.add_parser("cancel", help="cancel a job's unfinished files")
    cancel.add_argument("job_id", metavar="ID")
    delete = actions.add_parser("delete", help="delete a finished job and its results from the gateway")
    delete.add_argument("job_id", metavar="ID")
    for action in (submit, listing, show, cancel, delete):
        action.add_argument("--gateway-url", default=DEFAULT_GATEWAY_URL, help="the HTTP gateway (tritonasr gateway)")
        action.add_argument("--api-key", default=None, help="your API key ($TRITONASR_API_KEY)")
        action.add_argument("--tls-ca", type=Path, default=None,
                            help="an https gateway's certificate is signed by this CA (default: the system's)")


def main(args: argparse.Namespace) -> int:
    api_key = args.api_key or next(iter(split_keys(os.environ.get(ENVIRONMENT["api_key"], ""))), None)
    try:
        with JobsClient(args.gateway_url, api_key, args.tls_ca) as client:
            if args.action == "submit":
                return _submit(client, args)
            if args.action == "list":
                jobs = client.jobs(args.limit)
                print(_json(jobs) if args.format == "json" else "\n".join(map(_job_line, jobs)) or "no jobs")
            elif args.action == "show":
                job = client.job(args.job_id)
                print(_json(job) if args.format == "json" else _job_text(job))
            elif args.action == "cancel":
                print(_job_line(client.cancel(args.job_id)))
            else:
                print(f"deleted {_delete(client, args.job_id)['id']}")
    except GatewayError as error:
        tqdm.write(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return EXIT_OK


def _delete(client: JobsClient, job_id: str) -> dict:
    try:
        return client.delete(job_id)
    except GatewayError as error:
        if error.code != "job_active":
            raise
        raise GatewayError(f"job {job_id} still has files queued or running, or takes more files (open): cancel it "
                           f"first (tritonasr jobs cancel {job_id}), then delete it") from None


def _submit(client: JobsClient, args: argparse.Namespace) -> int:
    fmt = FORMAT_ALIASES.get(args.format, args.format)
    try:
        inputs = collect(args.files).files if args.files else []
        outputs = output_paths(inputs, args.output_dir, EXTENSIONS[fmt]) if args.output_dir else [None] * len(inputs)
    except InputError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    args.path = args.path or []
    if not args.batch_mb > 0:
        print(f"error: --batch-mb must be more than 0, got {args.batch_mb:g}", file=sys.stderr)
        return EXIT_USAGE
    if not inputs and not args.path:
        print("error: nothing to submit: give files or directories, or --path", file=sys.stderr)
        return EXIT_USAGE
    if args.output_dir and not args.overwrite:
        todo = [(item, out) for item, out in zip(inputs, outputs) if not out.exists()]
        if len(todo) < len(inputs):
            print(f"{len(inputs) - len(todo)} of {len(inputs)} already written in {args.output_dir}, not submitted "
                  "(--overwrite redoes them)", file=sys.stderr)
        if not todo and not args.path:
            return EXIT_OK
        inputs, outputs = [item for item, _ in todo], [out for _, out in todo]
    try:
        job = _upload(client, inputs, args)
    except UploadStopped as stopped:
        why = stopped.__cause__
        if not isinstance(why, KeyboardInterrupt):
            tqdm.write(f"error: {why}", file=sys.stderr)
        job_id = stopped.job["id"]
        tqdm.write(f"{'stopped: ' if isinstance(why, KeyboardInterrupt) else ''}job {job_id} was left open with "
                   f"{stopped.sent} of {stopped.total} uploads: `tritonasr jobs cancel {job_id}` ends it (the gateway "
                   "also deletes it once nothing was added to it for its --job-retention days)", file=sys.stderr)
        return 130 if isinstance(why, KeyboardInterrupt) else getattr(why, "exit_code", EXIT_FAILED)
    except KeyboardInterrupt:
        print("\nstopped: nothing was submitted", file=sys.stderr)
        return 130
    print(f"job {job['id']}: {job['counts']['total']} files (tritonasr jobs show {job['id']})", file=sys.stderr)
    if not (args.wait or args.output_dir):
        return EXIT_OK
    try:
        job = wait(client, job)
    except KeyboardInterrupt:
        print(f"\nstopped waiting: the job goes on (tritonasr jobs show {job['id']}; tritonasr jobs cancel "
              f"{job['id']})", file=sys.stderr)
        return 130
    # The gateway's files are the uploads in order, then what the paths named.
    named = [Input(file["name"], file["name"]) for file in job["files"][len(inputs):]]
    if args.output_dir and named:
        try:
            outputs += output_paths(named, args.output_dir, EXTENSIONS[fmt])
        except InputError as error:
            for problem in error.problems:
                print(f"error: {problem}", file=sys.stderr)
            return EXIT_FAILED
    return _write_results(client, job, [*inputs, *named], outputs + [None] * len(named), fmt)


def _upload(client: JobsClient, inputs: list[Input], args: argparse.Namespace) -> dict:
    """The job of `inputs` and `args.path`, closed, in batches of `--batch-mb`, with a bar of the bytes
    uploaded; its id printed on stdout as soon as it exists."""
    printed = []

    def created(job: dict) -> None:
        print(job["id"], flush=True)
        printed.append(job["id"])

    total = sum(os.path.getsize(item.path) for item in inputs)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, desc="upload",
              disable=not inputs) as bar:
        job = submit_in_batches(client, inputs, args.path, max(int(args.batch_mb * MiB), 1), created, bar.update,
                                engine=args.engine, language=args.language, itn=args.itn, speaker=not args.no_speaker,
                                channels=args.channels)
    if not printed:
        print(job["id"], flush=True)
    return job


def wait(client: JobsClient, job: dict) -> dict:
    """The job once no file of it is queued or running; a bar of files finished and audio done meanwhile."""
    with tqdm(total=job["counts"]["total"], unit="file", file=sys.stderr, desc=job["id"]) as bar:
        while True:
            counts = job["counts"]
            bar.update(counts["total"] - counts["queued"] - counts["running"] - bar.n)
            files = job.get("files", [])
            done_ms, total_ms = sum(f["done_ms"] for f in files), sum(f["total_ms"] or 0 for f in files)
            bar.set_postfix_str(f"audio {done_ms / 1000:.0f}/{total_ms / 1000:.0f} s"
                                + (f", {counts['failed']} failed" if counts["failed"] else ""))
            if job["status"] not in ACTIVE:
                return job
            time.sleep(POLL_S)
            job = client.job(job["id"])


def _write_results(client: JobsClient, job: dict, inputs: list[Input], outputs: list, fmt: str) -> int:
    code, printed = EXIT_OK, 0
    headers = fmt != "json" and len(inputs) > 1
    for item, output, file in zip(inputs, outputs, job["files"]):
        if file["status"] != "done":
            tqdm.write(f"error: {item.path}: {file['status']}" + (f": {file['error']}" if file["error"] else ""),
                       file=sys.stderr)
            code = EXIT_FAILED
            continue
        result = client.result(job["id"], file["id"])
        text = render({**result, "file": item.path}, fmt)
        if output is not None:
            write_atomically(output, text)
            continue
        if headers:
            text = ("\n" if printed else "") + f"==> {item.path} <==\n" + text
        sys.stdout.write(text)
        sys.stdout.flush()
        printed += 1
    return code


def _json(value) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, indent=2)


def _when(seconds: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _job_line(job: dict) -> str:
    counts = job["counts"]
    failed = f", {counts['failed']} failed" if counts["failed"] else ""
    cancelled = f", {counts['cancelled']} cancelled" if counts["cancelled"] else ""
    return (f"{job['id']}  {job['status']:<9}  {_when(job['created_at'])}  "
            f"{counts['done']}/{counts['total']} done{failed}{cancelled}")


def _job_text(job: dict) -> str:
    lines = [_job_line(job)]
    for file in job["files"]:
        progress = f"{100 * file['done_ms'] // file['total_ms']}%" if file["status"] == "running" and file["total_ms"] \
            else ""
        if file["status"] == "done":
            progress = f"{file['duration_ms'] / 1000:.1f} s"
        error = f": {file['error']}" if file["error"] else ""
        lines.append(f"  {file['status']:<9} {progress:>8}  {file['name']}{error}")
    return "\n".join(lines)
