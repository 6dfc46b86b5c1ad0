#!/usr/bin/env bash
# Creates .venv (if missing) and installs vssflow with the extras named in $1 (default: export,cpu),
# every package at the version in scripts/constraints.txt (what CI last passed with), so a new release
# on the registry changes nothing here until that file is raised on purpose.
# torch is the CPU build 2.13.0 that pip finds on this machine's disk; the project's range
# (torch>=2.3,<2.15) accepts it, so no multi-GB CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-export,cpu}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
pip() { python -m pip install -q --disable-pip-version-check -c scripts/constraints.txt "$@"; }
pip --upgrade pip
pip "torch==2.13.0"
pip -e ".[${extras}]"
