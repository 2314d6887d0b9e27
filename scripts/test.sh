#!/usr/bin/env bash
# Install tritonasr into .venv and run the whole test suite (the real Triton server included).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --disable-pip-version-check -e ".[test]"
exec python -m pytest "$@"
