#!/usr/bin/env bash
# Install tritonasr into .venv and run the whole test suite (the real Triton server included).
set -euo pipefail
cd "$(dirname "$0")/.."
# tests/test_deploy.py validates docker-compose.yml with Debian's docker-compose: install it when
# it is missing and we can (root, apt-get), without the Docker engine it recommends. Nothing to
# do, and no time spent, when it is there.
if ! command -v docker-compose >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    install_compose() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1; }
    install_compose || { apt-get update -q >/dev/null 2>&1 && install_compose; } \
        || echo "warning: could not install docker-compose (apt-get); tests/test_deploy.py will fail" >&2
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --disable-pip-version-check -e ".[all,test]"
exec python -m pytest "$@"
