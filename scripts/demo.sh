#!/usr/bin/env bash
# The main job on a fresh machine: install, export the models (real FSMN-VAD; SenseVoice from
# --model-dir/--model if given, else full-size random weights), start the embedded Triton
# server and transcribe the bundled sample. Extra arguments go to `tritonasr demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --disable-pip-version-check -e ".[all]"
exec tritonasr demo "$@"
