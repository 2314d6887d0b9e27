"""`tritonasr jobs`: batch jobs on the HTTP gateway (docs/jobs.md). `submit` uploads files and
directories (or names files under the gateway's jobs root) as one job; with `--wait` (or
`--output-dir`) it follows the job with a progress bar, then writes each result as
`tritonasr transcribe` does: one file per input under `--output-dir`, or to stdout. The job goes on
on the gateway whatever happens here: `jobs show`, `jobs list` and `jobs cancel` find it again, and
`jobs delete` removes a finished one with its results."""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm

from tritonasr.client.batch import Input, InputError, collect, output_paths, write_atomically
from tritonasr.client.connection import ENVIRONMENT
from tritonasr.client.formats import EXTENSIONS, FORMAT_ALIASES, FORMATS, render
from tritonasr.contract import (CHANNEL_MODES, ENGINES, EXIT_DENIED, EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE,
                                EXIT_USAGE, LANGUAGES)
from tritonasr.runtime.access import split_keys

# `tritonasr gateway`'s own default address.
DEFAULT_GATEWAY_URL = "http://localhost:8080"
POLL_S = 1.0
# The result format the gateway keeps for us: what `tritonasr transcribe --format json` writes.
RESULT_FORMAT = "tritonasr_json"
ACTIVE = ("queued", "running")
DENIED_CODES = ("invalid_api_key", "permission_denied")


class GatewayError(Exception):
    """A call the gateway refused or could not be reached for; `exit_code` says which, `code` the
    gateway's error code when it gave one."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, code: str | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.code = code


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

    def submit(self, uploads: list[Input], paths: list[str] = (), *, engine: str = "", language: str = "auto",
               itn: bool = False, speaker: bool = True, channels: str = "mix") -> dict:
        """A new job of `uploads` (sent under their relative names) and `paths` (under the gateway's
        jobs root); the job as the gateway answers it."""
        import httpx

        fields = {"language": language, "itn": str(itn).lower(), "speaker": str(speaker).lower(),
                  "channels": channels, "path": list(paths)}
        if engine:
            fields["model"] = engine
        with ExitStack() as files:
            parts = [("file", (item.relative, files.enter_context(open(item.path, "rb")), "application/octet-stream"))
                     for item in uploads]
            try:
                return self._call("POST", "/v1/jobs", data=fields, files=parts or None).json()
            except GatewayError as error:
                if not isinstance(error.__cause__, (httpx.WriteError, httpx.RemoteProtocolError)):
                    raise
                # A gateway that refuses an upload as too large answers before reading it all, and
                # closes the connection under the sender.
                raise GatewayError(f"the gateway at {self.url} closed the connection while the files were sent: "
                                   "more than it takes in one request (its --max-upload-mb)? Submit fewer files "
                                   "at a time") from None

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
                           EXIT_DENIED if denied else EXIT_FAILED, code)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`jobs submit | list | show | cancel | delete`, each with the gateway's address and the caller's key."""
    actions = parser.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="transcribe files and directories as one job on the gateway")
    submit.add_argument("files", nargs="*", metavar="FILE|DIR|GLOB",
                        help="audio files; directories (their audio files, subdirectories too); quoted glob "
                             "patterns, uploaded in one request")
    submit.add_argument("--path", action="append", metavar="REL",
                        help="a file or directory on the gateway's machine, under its --jobs-root (repeat)")
    submit.add_argument("--wait", action="store_true", help="follow the job with a progress bar, then write the "
                                                            "results (to stdout without --output-dir)")
    submit.add_argument("--output-dir", type=Path, metavar="OUT",
                        help="write one file per input there, as `tritonasr transcribe --output-dir` does (implies "
                             "--wait); inputs whose file exists are not submitted")
    submit.add_argument("--overwrite", action="store_true", help="with --output-dir: redo those that exist")
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
        raise GatewayError(f"job {job_id} still has files queued or running: cancel it first (tritonasr jobs "
                           f"cancel {job_id}), then delete it") from None


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
    job = client.submit(inputs, args.path, engine=args.engine, language=args.language, itn=args.itn,
                        speaker=not args.no_speaker, channels=args.channels)
    print(job["id"], flush=True)
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
