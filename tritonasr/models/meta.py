"""The file beside an exported graph that describes it. What it holds is each model spec's own
schema: the spec's `meta(...)` writes the keys its `load` / `from_meta` reads; exporters add
provenance and parity, which serving does not read."""
from __future__ import annotations

import json
from pathlib import Path

META_FILE = "meta.json"


def read_meta(version_dir: Path) -> dict:
    return json.loads((Path(version_dir) / META_FILE).read_text())
