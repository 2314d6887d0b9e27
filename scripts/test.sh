#!/usr/bin/env bash
# Install tritonasr into .venv and run the whole test suite (the real Triton server included).
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages the tests need: docker-compose (tests/test_deploy.py validates docker-compose.yml
# with it, without the Docker engine it recommends), prometheus (its promtool checks and unit-tests
# the alert rules), nginx (the gRPC balancer of tests/test_e2e_balancer.py) and postgresql (the
# shared speaker store); the tests start the services themselves. Installed when missing and we can (root, apt-get); nothing to do, and no
# time spent, when they are there.
missing=()
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v promtool >/dev/null || missing+=(prometheus)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
# chromium and its driver: tests/test_e2e_console.py drives the web console in a real browser.
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    install_packages() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1; }
    install_packages || { apt-get update -q >/dev/null 2>&1 && install_packages; } \
        || echo "warning: could not install ${missing[*]} (apt-get); the tests that use them will fail" >&2
fi
# Prometheus Operator's schemas for tests/test_kubernetes.py (npm; Node.js is on the machine).
if [ ! -d tests/kubernetes/node_modules ] && command -v npm >/dev/null; then
    npm ci --prefix tests/kubernetes --no-audit --no-fund --silent \
        || echo "warning: npm ci failed in tests/kubernetes; the ServiceMonitor checks will fail" >&2
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install --quiet --disable-pip-version-check -e ".[all,test]"
exec python -m pytest "$@"
