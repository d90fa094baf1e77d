#!/usr/bin/env bash
# Install everything the tests need, then run ruff, mypy --strict, the docs build and pytest;
# where pyenv has them, run the unit tests on the oldest and newest supported Pythons too.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh

# The discovery tests run a real etcd and a real DNS server (dnsmasq); they fail without them.
# The status page test drives a real headless Chromium (Debian's, with its chromedriver).
# The Redis example and its tests run real redis-server processes.
# tests/test_doc_configs.py checks the migration page's proxy files with haproxy -c and nginx -t.
apt_install etcd-server dnsmasq-base chromium chromium-driver redis-server haproxy nginx
ensure_venv .venv "${PYTHON:-python3}"
pip_install .venv -e '.[test,lint,docs,all]'

echo "== ruff"; .venv/bin/ruff check tai_lb tests benchmarks scripts examples docs/conf.py
echo "== mypy --strict"; .venv/bin/mypy --strict tai_lb benchmarks scripts examples
echo "== docs"; .venv/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html
echo "== pytest"; .venv/bin/python -m pytest -p no:cacheprovider "$@"

# The newest supported Python runs the unit tests as they are; the oldest runs them in the
# lower-bounds job below (every runtime dependency at its floor), which is its plain run too.
if command -v pyenv >/dev/null && [ -z "${TAI_LB_SKIP_OTHER_PYTHONS:-}" ]; then
    for wanted in 3.13; do
        version=$(pyenv versions --bare 2>/dev/null | grep -E "^${wanted//./\\.}\.[0-9]+$" \
                  | sort -V | tail -n 1 || true)
        [ -n "$version" ] || { echo "== python $wanted: not in pyenv, skipped"; continue; }
        echo "== unit tests on Python $version"
        ensure_venv ".venv-$wanted" "$(pyenv root)/versions/$version/bin/python"
        pip_install ".venv-$wanted" -e '.[test,dns]'
        ".venv-$wanted/bin/python" -m pytest -p no:cacheprovider -q -m "not slow"
    done
fi

# The lower-bounds job: the unit tests with every runtime dependency at setup.cfg's floor, on the
# oldest Python, so the floors we declare are ones the code works with.
if command -v pyenv >/dev/null && [ -z "${TAI_LB_SKIP_OTHER_PYTHONS:-}" ]; then
    version=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.9\.[0-9]+$' | sort -V | tail -n 1 || true)
    if [ -n "$version" ]; then
        echo "== unit tests on Python $version with every dependency at its declared minimum"
        ensure_venv .venv-min "$(pyenv root)/versions/$version/bin/python"
        .venv-min/bin/python scripts/min_constraints.py dns yaml prometheus otel flask django grpc \
            > .venv-min/constraints.txt
        cat .venv-min/constraints.txt
        pip_install .venv-min -c .venv-min/constraints.txt -e '.[test,dns,yaml]'
        .venv-min/bin/python -m pytest -p no:cacheprovider -q -m "not slow"
    else
        echo "== lower bounds: Python 3.9 not in pyenv, skipped"
    fi
fi
