#!/usr/bin/env bash
# Install tai-lb into ./.venv and run its demonstration.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
ensure_venv .venv "${PYTHON:-python3}"
pip_install .venv .
exec .venv/bin/python -m tai_lb demo "$@"
