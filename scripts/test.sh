#!/usr/bin/env bash
# Sets up .venv with everything the tests need (CPU only) and runs them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh export,cpu,dev
. .venv/bin/activate
set +e
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treated as a failure, a test run must test something" >&2
  exit 1
fi
exit "$rc"
