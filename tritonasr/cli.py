"""The `tritonasr` command: serve | export | transcribe | stream | speakers | bench | loadtest | repo | demo."""
from __future__ import annotations

import argparse
import functools
import os
import re
import signal
import sys
import threading
from importlib import import_module, metadata
from pathlib import Path

from tritonasr.client.connection import add_arguments as _add_connection_args
from tritonasr.client.connection import Retry
from tritonasr.client.connection import from_arguments as _credentials
from tritonasr.client.endpointing import add_arguments as _add_endpointing_args
from tritonasr.client.endpointing import from_arguments as _endpointing
from tritonasr.client.formats import FORMAT_ALIASES, FORMATS
from tritonasr.client.jobs import add_arguments as _add_jobs_args
from tritonasr.contract import CHANNEL_MODES, DRAIN_SECONDS, ENGINES, EXIT_FAILED, EXIT_USAGE, LANGUAGES
from tritonasr.paths import add_repository_argument, default_model_repository, sample_audio
from tritonasr.serving.server import MODEL_CONTROL_MODES, ServerError

PACKAGE = "tritonasr"


@functools.cache
def _lacking(extra: str) -> tuple[str, ...]:
    """The distributions of `extra` (an optional dependency group in pyproject.toml) that are not
    installed; none when tritonasr itself is not installed, and nothing can be known. Cached: the
    parser asks for the same extras for several commands."""
    try:
        requirements = metadata.requires(PACKAGE) or []
    except metadata.PackageNotFoundError:
        return ()
    marker = re.compile(rf"""extra\s*==\s*["']{extra}["']""")
    lacking = []
    for requirement in filter(marker.search, requirements):
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group()
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            lacking.append(name)
    return tuple(lacking)


def _missing_extra(extras: tuple[str, ...]) -> tuple[str, tuple[str, ...]] | None:
    """The first of `extras` not fully installed, with the distributions it lacks; None when all are."""
    return next(((extra, _lacking(extra)) for extra in extras if _lacking(extra)), None)


def _needs(*extras: str):
    """A command that runs only with these extras installed; without, one line says which."""
    def wrap(command):
        @functools.wraps(command)
        def run(args) -> int:
            missing = _missing_extra(extras)
            if missing:
                extra, lacking = missing
                name = " ".join(filter(None, (args.command, getattr(args, args.command, None))))
                print(f"error: `tritonasr {name}` needs the {extra} extra: pip install "
                      f"'{PACKAGE}[{extra}]' (not installed: {', '.join(lacking)})", file=sys.stderr)
                return EXIT_USAGE
            return command(args)
        run.extras = extras
        return run
    return wrap


def _role_arguments(parser: argparse.ArgumentParser, module: str, *extras: str) -> None:
    """The options `module.add_arguments` defines, when `extras` are installed (the module imports
    them); without, main() lets any arguments through and the command's `_needs` says what to
    install."""
    if _missing_extra(extras) is None:
        import_module(module).add_arguments(parser)


def _repository(args) -> Path:
    return (args.model_repository or default_model_repository()).resolve()


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    add_repository_argument(parser)
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (inference, streams)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (health, plain-text inference)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    parser.add_argument("--model-config-name", default=None,
                        help="use <model>/configs/NAME.pbtxt where present (your own config variants)")
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton's verbose log level (0: off)")
    parser.add_argument("--asr-engine", choices=ENGINES, default="",
                        help="the default ASR engine of requests that name none (default: the pipelines' "
                             "default_asr_engine, else sensevoice if exported, else parakeet)")
    network = parser.add_argument_group("network and access (README: Security)")
    network.add_argument("--host", default="127.0.0.1",
                         help="address of the gRPC port, the callers' port (default 127.0.0.1: this machine "
                              "only; 0.0.0.0 exposes it, and then needs --api-key)")
    network.add_argument("--http-host", default="127.0.0.1",
                         help="address of the HTTP port (health; plain-text inference)")
    network.add_argument("--metrics-host", default="127.0.0.1", help="address of the Prometheus metrics port")
    network.add_argument("--tls-cert", type=Path, default=None, help="gRPC TLS: the server's certificate chain (PEM)")
    network.add_argument("--tls-key", type=Path, default=None, help="gRPC TLS: its private key (PEM)")
    network.add_argument("--tls-client-ca", type=Path, default=None,
                         help="mutual TLS: callers must present a certificate signed by this CA")
    network.add_argument("--api-key", action="append", default=None,
                         help="a key callers must send on every call; repeat for several "
                              "(default: $TRITONASR_API_KEY, comma-separated)")
    network.add_argument("--admin-key", default=None,
                         help="the key for speaker changes and Triton's admin APIs (default: $TRITONASR_ADMIN_KEY; "
                              "none: those stay closed)")
    network.add_argument("--allow-unauthenticated", action="store_true",
                         help="let a non-loopback --host serve callers without an API key")
    network.add_argument("--model-control", choices=MODEL_CONTROL_MODES, default="none",
                         help="none (default): the exported models, fixed at start; explicit: load/unload "
                              "over Triton's repository API, with the admin key")
    network.add_argument("--open-leaf-models", action="store_true",
                         help="let callers reach the leaf models (vad, sensevoice, …) directly, not only "
                              "through the pipelines")
    from tritonasr.recognition.settings import SpeakerSettings, StreamSettings

    stream = StreamSettings()
    limits = parser.add_argument_group("admission control (README: Admission control; each flag here wins over "
                                       "the config parameter of the same name)")
    limits.add_argument("--max-streams", type=int, default=None, metavar="N",
                        help="open live streams on this server; a START beyond them is refused at once "
                             f"(0: no limit; default: asr_stream's max_streams, else {stream.max_streams})")
    limits.add_argument("--max-streams-per-client", type=int, default=None, metavar="N",
                        help="open live streams per API key (0: no limit; default: asr_stream's "
                             f"max_streams_per_client, else {stream.max_streams_per_client})")
    shipped = SpeakerSettings()
    speakers = parser.add_argument_group(
        "speaker stage, for asr_offline, asr_stream and speaker_registry (each flag wins over the models' "
        "speaker_* config parameter)")
    speakers.add_argument("--speaker-store", default=None, metavar="URL",
                          help="where enrolled voiceprints live: sqlite:///PATH (default: "
                               "<repository>/speaker_registry/speakers.db), or postgresql://USER@HOST:PORT/DB shared "
                               "by a fleet (its password in $PGPASSWORD or $PGPASSFILE, never in the URL)")
    speakers.add_argument("--speaker-threshold", type=float, default=None, metavar="COS",
                          help=f"similarity to a voiceprint that names an enrolled speaker (default {shipped.threshold})")
    speakers.add_argument("--speaker-cluster-threshold", type=float, default=None, metavar="COS",
                          help=f"similarity at which a segment joins an anonymous label "
                               f"(default {shipped.cluster_threshold})")
    speakers.add_argument("--speaker-min-segment-ms", type=int, default=None, metavar="MS",
                          help=f"shorter segments get no embedding (default {shipped.min_segment_ms})")
    speakers.add_argument("--speaker-window-ms", type=int, default=None, metavar="MS",
                          help=f"longer segments average embeddings of windows this long (default {shipped.window_ms})")
    triton = parser.add_argument_group("Triton build (default: the nvidia-pytriton wheel's)")
    triton.add_argument("--tritonserver", type=Path, default=os.environ.get("TRITONASR_TRITONSERVER") or None,
                        help="another tritonserver binary, e.g. NVIDIA's container's ($TRITONASR_TRITONSERVER)")
    triton.add_argument("--backend-directory", type=Path,
                        default=os.environ.get("TRITONASR_BACKEND_DIRECTORY") or None,
                        help="its backends ($TRITONASR_BACKEND_DIRECTORY)")
    triton.add_argument("--triton-arg", action="append", default=[], metavar="ARG",
                        help="one more tritonserver argument, e.g. --triton-arg=--allow-gpu-metrics=true")


# The SpeakerSettings fields `serve` takes as --speaker-* flags.
SPEAKER_FLAGS = ("store", "threshold", "cluster_threshold", "min_segment_ms", "window_ms")


def _server_config(args):
    from tritonasr.repository.check import stale_configs
    from tritonasr.repository.layout import exported_models, install_model_files
    from tritonasr.runtime.access import is_loopback, split_keys
    from tritonasr.serving.server import ServerConfig, ServerError, TlsFiles

    repository = _repository(args)
    models = exported_models(repository)
    # The shipped config and model.py of each exported model, where the repository lacks them.
    install_model_files(repository, models)
    for line in stale_configs(repository, models):
        print(f"warning: {line}", file=sys.stderr)
    api_keys = [key for value in (args.api_key or [os.environ.get("TRITONASR_API_KEY", "")])
                for key in split_keys(value)]
    if not is_loopback(args.host) and not api_keys and not args.allow_unauthenticated:
        raise ServerError(f"--host {args.host} lets other machines call this server: give it --api-key "
                          "(or $TRITONASR_API_KEY), or --allow-unauthenticated on a network you trust")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ServerError("TLS needs both --tls-cert and --tls-key")
    if args.tls_client_ca and not args.tls_cert:
        raise ServerError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    if tls is None and not is_loopback(args.host):
        print(f"WARNING: gRPC on {args.host} without TLS: keys and audio cross the network in plain text "
              "(--tls-cert/--tls-key)", file=sys.stderr)
    return ServerConfig(repository, args.grpc_port, args.http_port, args.metrics_port,
                        args.log_verbose, args.model_config_name, models=models,
                        asr_engine=args.asr_engine, grpc_host=args.host, http_host=args.http_host,
                        metrics_host=args.metrics_host, tls=tls, api_keys=api_keys,
                        admin_key=args.admin_key or os.environ.get("TRITONASR_ADMIN_KEY") or None,
                        model_control=args.model_control, open_leaf_models=args.open_leaf_models,
                        max_streams=args.max_streams, max_streams_per_client=args.max_streams_per_client,
                        speaker_settings={name: getattr(args, f"speaker_{name}") for name in SPEAKER_FLAGS
                                          if getattr(args, f"speaker_{name}") is not None},
                        tritonserver=args.tritonserver, backend_directory=args.backend_directory,
                        extra_args=args.triton_arg)


def cmd_serve(args) -> int:
    """The server under its supervisor: restarted when a model process dies, its health on
    --health-port; exits 1 when it cannot start or the supervisor gives up."""
    from tritonasr.serving.server import ServerError, TritonServer
    from tritonasr.serving.supervisor import Supervisor

    stop, hurry = threading.Event(), threading.Event()

    def on_signal(*_) -> None:
        if stop.is_set():  # a second signal: stop without waiting for the drain
            hurry.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        config = _server_config(args)
        server = TritonServer(config, echo_log=not args.quiet)
        supervisor = Supervisor(server, args.health_host or config.http_host, args.health_port,
                                max_restarts=args.max_restarts)
    except OSError as exc:
        print(f"error: health port {args.health_port}: {exc.strerror}; pick another with --health-port", file=sys.stderr)
        return 1
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        supervisor.start()
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"tritonasr: ready; gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url}, "
          f"health {supervisor.health_url}/health/ready (Ctrl-C stops)", file=sys.stderr, flush=True)
    failure = supervisor.run(stop)
    if failure:
        print(f"error: {failure}\n{server.log_tail(20)}", file=sys.stderr)
        supervisor.stop()
        return 1
    if args.drain_seconds > 0:
        print(f"tritonasr: draining: not ready, taking no new streams or requests; up to {args.drain_seconds:.0f} s "
              "for those open (signal again to stop now)", file=sys.stderr, flush=True)
        left = supervisor.drain(args.drain_seconds, hurry)
        print("tritonasr: drained" if left is None else f"tritonasr: drain ended with {left}",
              file=sys.stderr, flush=True)
    print("tritonasr: stopping…", file=sys.stderr, flush=True)
    code = supervisor.stop()
    print(f"tritonasr: stopped ({code})", file=sys.stderr)
    return 0


def _export_problem(args) -> str | None:
    """What is wrong with an export's arguments, if anything."""
    for option, path in (("--model-dir", args.model_dir), ("--check-audio", args.check_audio)):
        if path is not None and not path.exists():
            return f"{option} {path}: no such file or directory"
    if args.model_dir and args.hub_id:
        return "give --model-dir or --model, not both"
    if args.model != "vad" and not (args.model_dir or args.hub_id or args.random_init):
        return "give --model-dir DIR, --model HUB_ID or --random-init {full,tiny}"
    if args.model == "vad" and (args.hub_id or args.random_init):
        return "the VAD exports the real FSMN-VAD weights: --model and --random-init do not apply"
    return None


def cmd_export(args) -> int:
    from tritonasr.repository.layout import install_model_files, models_of_export

    repository = _repository(args)
    if args.model == "sherpa-onnx":  # the load tests' peer server's copy of the served SenseVoice
        from tritonasr.export.sherpa_onnx import sherpa_model_for

        print(sherpa_model_for(repository))
        return 0
    problem = _export_problem(args)  # before anything is written
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    install_model_files(repository, models_of_export(args.model))
    if args.model == "vad":
        from tritonasr.export.vad import export_vad

        export_vad(args.model_dir, repository, args.check_audio)
        return 0
    source = str(args.model_dir) if args.model_dir else args.hub_id
    if args.model == "speaker":
        from tritonasr.export.speaker import export_speaker as export
    elif args.model == "parakeet":
        from tritonasr.export.parakeet import export_parakeet as export
    else:
        from tritonasr.export.sensevoice import export_sensevoice as export
    export(source, args.random_init, repository, args.check_audio, seed=args.seed)
    return 0


def cmd_transcribe(args) -> int:
    from tritonasr.client.transcribe import run_transcribe

    if args.retries < 0:
        print(f"error: --retries must be 0 or more, got {args.retries}", file=sys.stderr)
        return EXIT_USAGE
    if args.concurrency < 1:
        print(f"error: --concurrency must be 1 or more, got {args.concurrency}", file=sys.stderr)
        return EXIT_USAGE
    return run_transcribe(args.files, args.url, args.format, language=args.language, retry=Retry(args.retries + 1),
                          concurrency=args.concurrency, return_embedding=args.embeddings, engine=args.engine,
                          with_speaker=not args.no_speaker, credentials=_credentials(args), use_itn=args.itn,
                          endpointing=_endpointing(args), separate_channels=args.channels == "separate",
                          output_dir=args.output_dir, overwrite=args.overwrite)


def _add_channels_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--channels", choices=CHANNEL_MODES, default="mix",
                        help="mix (default): a multi-channel file's channels recognised as one; separate: each "
                             "on its own (a call's agent and customer), segments marked with their channel")


def cmd_stream(args) -> int:
    from tritonasr.client.stream_cli import run_stream

    return run_stream(args.file, args.url, chunk_ms=args.chunk_ms, realtime=args.realtime,
                      partial_interval_ms=args.partials, language=args.language, use_itn=args.itn,
                      fmt=args.format, engine=args.engine, with_speaker=not args.no_speaker,
                      credentials=_credentials(args), endpointing=_endpointing(args), text_first=args.text_first,
                      separate_channels=args.channels == "separate")


def cmd_speakers(args) -> int:
    from tritonasr.client.speakers import run_speakers

    return run_speakers(args.action, args.url, getattr(args, "name", None), getattr(args, "files", []),
                        getattr(args, "replace", False), getattr(args, "format", "text"), _credentials(args))


def cmd_bench(args) -> int:
    from tritonasr.loadtest.bench_offline import main as bench_main

    return bench_main(args)


def cmd_bench_stream(args) -> int:
    from tritonasr.loadtest.bench_stream import main as bench_main

    return bench_main(args)


def cmd_bench_gateway(args) -> int:
    from tritonasr.loadtest.bench_gateway import main as bench_main

    return bench_main(args)


def cmd_bench_memory(args) -> int:
    from tritonasr.loadtest.bench_memory import main as bench_main

    return bench_main(args)


def cmd_loadtest_soak(args) -> int:
    from tritonasr.loadtest.soak import main as soak_main

    return soak_main(args)


def cmd_loadtest_sweep(args) -> int:
    from tritonasr.loadtest.sweep import main as sweep_main

    return sweep_main(args)


def cmd_jobs(args) -> int:
    from tritonasr.client.jobs import main as jobs_main

    return jobs_main(args)


def cmd_gateway(args) -> int:
    from tritonasr.gateway.cli import main as gateway_main

    return gateway_main(args)


def cmd_loadtest_report(args) -> int:
    from tritonasr.loadtest.sweep import report_main

    return report_main(args)


def cmd_repo_build(args) -> int:
    from tritonasr.repository.build import BuildOptions, build_repository

    try:
        options = BuildOptions(args.target, args.gpus, args.instances, args.max_batch, args.trt_cache,
                               served_frontends=args.served_frontends, int8=args.int8)
        export_frontend = None
        if options.frontends:  # graphs exported from torch modules
            missing = _missing_extra(("export",))
            if missing:
                print(f"error: served front ends (--target {args.target}) are exported by the export extra: "
                      f"pip install '{PACKAGE}[export]', or build with --no-served-frontends", file=sys.stderr)
                return EXIT_USAGE
            from tritonasr.export.frontend import export_served_frontend as export_frontend
        models = build_repository(args.source or _repository(args), args.output, options, export_frontend)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({args.target}): {', '.join(models)}")
    if args.int8:
        _print_quantization(args.output)
    if args.target == "gpu-tensorrt":
        print(f"next, on the serving GPU: tritonasr repo plans {args.output}")
    return 0


def _print_quantization(repository: Path) -> None:
    import json

    from tritonasr.repository.quantize import QUANTIZATION_FILE

    report = json.loads((repository / QUANTIZATION_FILE).read_text())
    print(f"int8 weights: {', '.join(report['models']) or 'none (no ASR encoder exported)'}; "
          f"the sample's text with float32 and int8 weights (also in {repository / QUANTIZATION_FILE}):")
    for model, texts in report["sample_text"].items():
        same = "identical" if texts["identical"] else f"different; similarity {texts['similarity']:.3f}"
        print(f"  {model} ({same}):\n    float32: {texts['float32']}\n    int8:    {texts['int8']}")


def cmd_repo_check(args) -> int:
    from tritonasr.repository.check import main as check_main

    return check_main(args)


def cmd_repo_plans(args) -> int:
    from tritonasr.repository.plans import main as plans_main

    return plans_main(args)


def cmd_demo(args) -> int:
    """The main job: make sure the models are exported, start the embedded server, transcribe."""
    from tritonasr.client.connection import Credentials
    from tritonasr.client.transcribe import run_transcribe
    from tritonasr.serving.server import ServerError, TritonServer

    from tritonasr.models.meta import read_meta
    from tritonasr.repository.layout import ALL_MODELS, install_model_files

    repository = _repository(args)
    install_model_files(repository, ALL_MODELS)
    if not (repository / "vad" / "1" / "model.onnx").exists():
        from tritonasr.export.vad import export_vad

        export_vad(None, repository, None)
    if args.model_dir or args.hub_id or not (repository / "sensevoice" / "1" / "model.onnx").exists():
        from tritonasr.export.sensevoice import export_sensevoice

        source = str(args.model_dir) if args.model_dir else args.hub_id
        export_sensevoice(source, None if source else "full", repository, None)
    if not (repository / "speaker" / "1" / "model.onnx").exists():
        from tritonasr.export.speaker import export_speaker

        export_speaker(None, "full", repository, None)
    files = args.files or [str(sample_audio())]
    for model, what in (("sensevoice", "the text below is meaningless"), ("speaker", "so are the speaker labels")):
        meta = read_meta(repository / model / "1")
        if meta.get("random_init"):
            print(f"WARNING: {model} has RANDOM weights ({meta['random_init']}): {what}. "
                  f"Export a real checkpoint with `tritonasr export {model} --model-dir DIR`.",
                  file=sys.stderr, flush=True)
    print("tritonasr: starting the embedded Triton server…", file=sys.stderr, flush=True)
    try:
        config = _server_config(args)
        credentials = Credentials.from_environment(api_key=next(iter(config.api_keys), None))
        with TritonServer(config) as server:
            print(f"tritonasr: server ready on {server.grpc_url}", file=sys.stderr, flush=True)
            return run_transcribe(files, server.grpc_url, args.format, credentials=credentials)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _chunk_ms(text: str) -> int:
    value = int(text)
    if not 10 <= value <= 2000:
        raise argparse.ArgumentTypeError(f"chunk size must be 10..2000 ms, got {value}")
    return value


def _partials_ms(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"partial interval must be 0 (none) or more ms, got {value}")
    return value


def _version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "(not installed)"


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless the help gives it already or there is
    none to give."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False, "")
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _Parser(argparse.ArgumentParser):
    """The command's parsers (subcommands' too: argparse makes them of the parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tritonasr", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the embedded Triton server on the model repository")
    _add_server_args(serve)
    serve.add_argument("--quiet", action="store_true", help="do not echo the server log")
    serve.add_argument("--health-port", type=int, default=8003,
                       help="GET /health/ready and /health/live: 503 the moment a model process dies, "
                            "200 again once the server is restarted")
    serve.add_argument("--health-host", default=None, help="address of the health port (default: --http-host)")
    serve.add_argument("--max-restarts", type=int, default=3,
                       help="automatic restarts within 10 minutes before serve gives up and exits 1")
    serve.add_argument("--drain-seconds", type=float, default=DRAIN_SECONDS,
                       help="on SIGTERM or Ctrl-C: not ready, new streams and requests refused (UNAVAILABLE, "
                            "draining), and up to this long for the open streams to end and the offline requests "
                            "taken in to finish, before the server stops (a second signal stops it at once)"),
    serve.set_defaults(func=_needs("server")(cmd_serve))

    export = sub.add_parser("export", help="export a model to ONNX into the model repository")
    export.add_argument("model", choices=["vad", "sensevoice", "parakeet", "speaker", "sherpa-onnx"],
                        help="sherpa-onnx: the repository's SenseVoice checkpoint in sherpa-onnx's format "
                             "(cached; prints its directory)")
    export.add_argument("--model-dir", type=Path,
                        help="checkpoint (FunASR directory: model.pt, config.yaml, am.mvn…; Parakeet: a .nemo "
                             "file; ERes2NetV2: a directory with configuration.json and its .ckpt)")
    export.add_argument("--model", dest="hub_id",
                        help="ModelScope/Hugging Face id, e.g. nvidia/parakeet-tdt-0.6b-v2 (needs the hub)")
    export.add_argument("--random-init", choices=["full", "tiny"],
                        help="random weights (real compute, meaningless results)")
    export.add_argument("--seed", type=int, default=0, help="seed of --random-init weights")
    export.add_argument("--check-audio", type=Path, help="speech for the parity check (default: the sample)")
    add_repository_argument(export)
    export.set_defaults(func=_needs("server", "export")(cmd_export))

    transcribe = sub.add_parser("transcribe", help="transcribe audio files through asr_offline")
    transcribe.add_argument("files", nargs="+", metavar="FILE|DIR|GLOB",
                            help="audio files; directories (their audio files, subdirectories too); quoted glob "
                                 "patterns ('calls/**/*.wav')")
    transcribe.add_argument("--url", default="localhost:8001", help="Triton gRPC HOST:PORT")
    transcribe.add_argument("--format", choices=(*FORMATS, *FORMAT_ALIASES), default="text",
                            help="output format (txt: the same as text)")
    transcribe.add_argument("--output-dir", type=Path, metavar="OUT",
                            help="write one file per input there (its path under the directory or pattern it "
                                 "came from, extension of the format) instead of to stdout; those that exist "
                                 "are skipped (a rerun resumes)")
    transcribe.add_argument("--overwrite", action="store_true", help="with --output-dir: redo those that exist")
    transcribe.add_argument("--language", default="auto", choices=LANGUAGES, help="spoken language (auto: detect)")
    transcribe.add_argument("--itn", action="store_true", help="inverse text normalisation (punctuation, numbers)")
    transcribe.add_argument("-j", "--concurrency", type=int, default=4, metavar="N", help="files in flight at once")
    transcribe.add_argument("--retries", type=int, default=Retry.attempts - 1, metavar="N",
                            help="times a request no server took (unreachable, at capacity, draining) is tried again, "
                                 f"after ~{Retry.first_s} s, then twice as long each time up to {Retry.max_s:.0f} s "
                                 "(default %(default)s; 0: never)")
    transcribe.add_argument("--engine", choices=ENGINES, default="", help="ASR engine (default: the server's)")
    transcribe.add_argument("--no-speaker", action="store_true", help="skip the server's speaker stage")
    transcribe.add_argument("--embeddings", action="store_true",
                            help="each segment's speaker embedding in the JSON output")
    _add_channels_arg(transcribe)
    _add_endpointing_args(transcribe)
    _add_connection_args(transcribe)
    transcribe.set_defaults(func=cmd_transcribe)

    stream = sub.add_parser("stream", help="stream an audio file through asr_stream, results as they arrive")
    stream.add_argument("file", help="any audio file; an 8 kHz one goes as it is, for the server to resample (mono "
                                      "16-bit PCM, mu-law and A-law WAVs in their own encoding); other rates are "
                                      "resampled to 16 kHz here")
    stream.add_argument("--url", default="localhost:8001", help="Triton gRPC HOST:PORT")
    stream.add_argument("--chunk-ms", type=_chunk_ms, default=100, help="chunk size, 10..2000 ms")
    stream.add_argument("--realtime", action="store_true", help="send the audio at the pace it plays")
    stream.add_argument("--partials", type=_partials_ms, default=0, metavar="MS",
                        help="partial results of the open segment every MS ms (default 0: none)")
    stream.add_argument("--language", default="auto", choices=LANGUAGES, help="spoken language (auto: detect)")
    stream.add_argument("--itn", action="store_true", help="inverse text normalisation (punctuation, numbers)")
    stream.add_argument("--engine", choices=ENGINES, default="", help="ASR engine (default: the server's)")
    stream.add_argument("--no-speaker", action="store_true",
                        help="skip the server's speaker stage (finals arrive sooner on a CPU server)")
    stream.add_argument("--text-first", action="store_true",
                        help="print each final as soon as its text is ready and its speaker on a line of "
                             "its own after it (default: each final waits for its speaker)")
    stream.add_argument("--format", choices=["text", "json"], default="text", help="output format")
    _add_channels_arg(stream)
    _add_endpointing_args(stream)
    _add_connection_args(stream)
    stream.set_defaults(func=cmd_stream)

    speakers = sub.add_parser("speakers", help="enrolled speakers: enroll, list, remove")
    speakers_sub = speakers.add_subparsers(dest="action", required=True)
    enroll = speakers_sub.add_parser("enroll", help="enroll NAME from recordings of that speaker alone")
    enroll.add_argument("name")
    enroll.add_argument("files", nargs="+")
    enroll.add_argument("--replace", action="store_true", help="replace NAME's voiceprint if enrolled")
    listing = speakers_sub.add_parser("list", help="the enrolled speakers")
    listing.add_argument("--format", choices=["text", "json"], default="text", help="output format")
    remove = speakers_sub.add_parser("remove", help="forget an enrolled speaker")
    remove.add_argument("name")
    for action in (enroll, listing, remove):
        action.add_argument("--url", default="localhost:8001", help="Triton gRPC HOST:PORT")
        _add_connection_args(action)
        action.set_defaults(func=cmd_speakers)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    offline = bench_sub.add_parser("offline", help="served throughput vs raw ONNX Runtime, same run")
    _role_arguments(offline, "tritonasr.loadtest.bench_offline", "server", "loadtest")
    offline.set_defaults(func=_needs("server", "loadtest")(cmd_bench))
    bench_stream = bench_sub.add_parser("stream", help="N concurrent real-time streams: latency after end of speech")
    _role_arguments(bench_stream, "tritonasr.loadtest.bench_stream", "server", "loadtest")
    bench_stream.set_defaults(func=_needs("server", "loadtest")(cmd_bench_stream))
    bench_gateway = bench_sub.add_parser("gateway", help="the gateway against direct gRPC on one server, rounds "
                                                         "alternated: latency and the gateway's CPU")
    _role_arguments(bench_gateway, "tritonasr.loadtest.bench_gateway", "server", "loadtest", "gateway")
    bench_gateway.set_defaults(func=_needs("server", "loadtest", "gateway")(cmd_bench_gateway))
    bench_memory = bench_sub.add_parser("memory", help="RSS after 2-hour requests, an oversized one, abandoned streams")
    _role_arguments(bench_memory, "tritonasr.loadtest.bench_memory", "server", "loadtest")
    bench_memory.set_defaults(func=_needs("server", "loadtest")(cmd_bench_memory))

    gateway = sub.add_parser("gateway", help="HTTP and WebSocket gateway: OpenAI-compatible transcription, "
                                             "live streams over WebSocket")
    _role_arguments(gateway, "tritonasr.gateway.cli", "gateway")
    gateway.set_defaults(func=_needs("gateway")(cmd_gateway))

    jobs = sub.add_parser("jobs", help="batch jobs on the HTTP gateway: submit, list, show, cancel, delete (docs/jobs.md)")
    _add_jobs_args(jobs)
    jobs.set_defaults(func=cmd_jobs)

    loadtest = sub.add_parser("loadtest", help="Locust concurrency sweeps against tritonasr and baselines")
    loadtest_sub = loadtest.add_subparsers(dest="loadtest", required=True)
    sweep = loadtest_sub.add_parser("sweep", help="start each system, sweep it with Locust, stop it, write the report")
    # The sweep starts the embedded server and the per-session FunASR baseline (export's FunASR).
    _role_arguments(sweep, "tritonasr.loadtest.sweep", "server", "export", "loadtest")
    sweep.set_defaults(func=_needs("server", "export", "loadtest")(cmd_loadtest_sweep))
    soak = loadtest_sub.add_parser("soak", help="N minutes of mixed offline requests and live streams: RSS of "
                                   "every process, errors, open streams (CSV + Markdown)")
    _role_arguments(soak, "tritonasr.loadtest.soak", "server", "loadtest")
    soak.set_defaults(func=_needs("server", "loadtest")(cmd_loadtest_soak))
    report = loadtest_sub.add_parser("report", help="(re)write a sweep's report: Markdown table and PNG plots")
    report.add_argument("run_dir", type=Path, help="the sweep's run directory (holds run.json)")
    report.set_defaults(func=_needs("loadtest")(cmd_loadtest_report))

    repo = sub.add_parser("repo", help="model repositories for a deployment target: build, check, TensorRT plans")
    repo_sub = repo.add_subparsers(dest="repo", required=True)
    build = repo_sub.add_parser("build", help="write a complete repository for a target from the exported graphs")
    build.add_argument("--target", choices=["cpu", "gpu-onnxruntime", "gpu-tensorrt"], required=True,
                       help="where the repository will be served")
    build.add_argument("--output", type=Path, required=True, help="the repository to write")
    build.add_argument("--source", type=Path, default=None,
                       help="the exported repository (default: --model-repository, else the checkout's)")
    build.add_argument("--gpus", type=int, default=1, help="GPU targets: put instances on GPUs 0..N-1")
    build.add_argument("--instances", type=int, default=None, help="leaf-model instances per device")
    build.add_argument("--max-batch", type=int, default=None, help="leaf models' max_batch_size")
    build.add_argument("--served-frontends", action=argparse.BooleanOptionalAction, default=None,
                       help="front ends (fbank, mel) as served models batched on the device "
                            "(default: on for the GPU targets, off for cpu)")
    build.add_argument("--int8", action="store_true",
                       help="cpu target: the ASR encoders' weights in int8 (ONNX Runtime dynamic quantization): "
                            "measured at about twice the audio per core on a CPU with VNNI; the text can differ from "
                            "float32, so compare on your own audio (README)")
    build.add_argument("--trt-cache", default="/cache/trt",
                       help="gpu-onnxruntime: directory of the TensorRT engine and timing caches (a volume)")
    add_repository_argument(build)
    build.set_defaults(func=_needs("server")(cmd_repo_build))
    check = repo_sub.add_parser("check", help="validate a repository: configs, tensors against graphs, BLS targets")
    check.add_argument("repository", type=Path)
    check.add_argument("--allow-missing-plans", action="store_true",
                       help="accept gpu-tensorrt plans not built yet")
    check.set_defaults(func=_needs("server")(cmd_repo_check))
    plans = repo_sub.add_parser("plans", help="build a gpu-tensorrt repository's TensorRT plans on this GPU (trtexec)")
    plans.add_argument("repository", type=Path)
    plans.add_argument("--trtexec", default=None, help="trtexec binary (default: PATH, then the NGC image's)")
    plans.add_argument("--timing-cache", type=Path, default=None, help="TensorRT timing cache file to reuse")
    plans.add_argument("--force", action="store_true", help="rebuild plans that are current")
    plans.set_defaults(func=_needs("server")(cmd_repo_plans))

    demo = sub.add_parser("demo", help="export what is missing, start the server, transcribe the sample")
    demo.add_argument("files", nargs="*", help="audio files (default: the bundled sample)")
    demo.add_argument("--model-dir", type=Path, help="SenseVoice FunASR model directory")
    demo.add_argument("--model", dest="hub_id", help="SenseVoice hub id")
    demo.add_argument("--format", choices=FORMATS, default="text", help="output format")
    _add_server_args(demo)
    demo.set_defaults(func=_needs("server", "export")(cmd_demo))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # A command whose extra is missing has not got its options: it only says what to install.
    if unknown and not _missing_extra(getattr(args.func, "extras", ())):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except ServerError as exc:  # an embedded server (bench, loadtest) that could not start
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
