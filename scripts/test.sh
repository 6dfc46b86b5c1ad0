#!/usr/bin/env bash
# Sets up .venv with everything the tests need (CPU only) and runs them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh export,cpu,dev,ray,kernels,serve   # ray: the --ray batch test (ray[data], ~15-30 s, ~500 MB);
                                                        # serve: vssflow-serve's tests (starlette, uvicorn)
. .venv/bin/activate
# The `pytest` script, not `python -m pytest`: -m would put the repository root on sys.path. With
# --import-mode=importlib (pyproject.toml) the tests import only the installed vssflow.* packages.
# Triton (the kernels extra, pinned by the constraints) runs the kernel tests on the CPU through its
# interpreter (TRITON_INTERPRET=1).
set +e
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treated as a failure, a test run must test something" >&2
  exit 1
fi
exit "$rc"
