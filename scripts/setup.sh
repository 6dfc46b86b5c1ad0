#!/usr/bin/env bash
# Creates .venv (if missing) and installs vssflow with the extras named in $1 (default: export,cpu).
# torch is pinned to the CPU build 2.13.0 that pip finds on this machine's disk; the project's
# range (torch>=2.3,<2.15) accepts it, so no multi-GB CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-export,cpu}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
