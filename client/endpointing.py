"""Per-request endpointing on the command line: a preset (tritonasr.contract's ENDPOINTING_PRESETS)
and a flag per Endpointing field that overrides the preset's value."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace

from tritonasr.contract import ENDPOINTING_LIMITS, ENDPOINTING_PRESETS, Endpointing

_FIELD_HELP = {"end_silence_ms": "the silence that ends a segment (a stream's final waits for it)",
               "max_segment_ms": "longer speech is cut into segments of at most this",
               "speech_start_ms": "speech in the VAD's 200 ms window that opens a segment"}


def endpointing(preset: str = "default", **overrides: int | None) -> Endpointing:
    """The preset, with each field given in `overrides` (not None) in place of its own."""
    return replace(ENDPOINTING_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def describe(settings: Endpointing) -> str:
    """`end silence 300 ms, max segment 15000 ms`: the fields set; unset ones are the server's."""
    values = [f"{f.name.removesuffix('_ms').replace('_', ' ')} {getattr(settings, f.name)} ms"
              for f in fields(settings) if getattr(settings, f.name) is not None]
    return ", ".join(values) or "the server's VAD values"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--endpointing PRESET and a --FIELD-ms flag per Endpointing field."""
    group = parser.add_argument_group("endpointing (how speech is cut into segments)")
    presets = ", ".join(f"{name} ({describe(settings)})" for name, settings in ENDPOINTING_PRESETS.items())
    group.add_argument("--endpointing", choices=ENDPOINTING_PRESETS, default="default", metavar="PRESET",
                       help=f"a preset: {presets}; the flags below override its values (default: default)")
    for f in fields(Endpointing):
        low, high = ENDPOINTING_LIMITS[f.name]
        group.add_argument(f"--{f.name.replace('_', '-')}", type=_milliseconds(f.name), default=None, metavar="MS",
                           help=f"{_FIELD_HELP[f.name]}, {low}..{high} ms (default: the preset's)")


def from_arguments(args: argparse.Namespace) -> Endpointing:
    return endpointing(args.endpointing, **{f.name: getattr(args, f.name) for f in fields(Endpointing)})


def _milliseconds(name: str):
    """An argparse type for field `name`: a value out of its range is a usage error."""
    low, high = ENDPOINTING_LIMITS[name]

    def parse(text: str) -> int:
        try:
            value = int(text)
            Endpointing(**{name: value})  # the contract's own check
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number of ms from {low} to {high}, "
                                             f"got {text!r}") from None
        return value
    return parse
