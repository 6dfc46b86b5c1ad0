#!/usr/bin/env bash
# Sets up .venv with everything the tests need (CPU only) and runs them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh export,cpu,dev,ray   # ray: the --ray batch test (ray[data], ~15-30 s, ~500 MB)
. .venv/bin/activate
# Triton for the kernel tests, run on the CPU through its interpreter (TRITON_INTERPRET=1); pinned
# because the ahead-of-time compile test uses triton 3.9's ASTSource API.
python -m pip install -q --disable-pip-version-check "triton==3.9.0"
set +e
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treated as a failure, a test run must test something" >&2
  exit 1
fi
exit "$rc"
