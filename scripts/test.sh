#!/usr/bin/env bash
# Sets up .venv with everything the tests need (CPU only) and runs them. Extra arguments go to pytest.
# VSSFLOW_TEST_BUDGET (seconds, default 4500): past it pytest is interrupted and still prints its
# summary and slowest tests, so a run that would outlast CI's limit says where its time went.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the machine gave this run: cores, load, and the share of CPU time the hypervisor took
# (steal) since the previous line, so a slow CI run can be told from slow tests.
stat_before=""
machine() {
  local now; now=$(grep '^cpu ' /proc/stat)
  awk -v when="$1" -v cores="$(nproc)" -v load="$(cut -d' ' -f1-3 /proc/loadavg)" -v prev="$stat_before" '{
    split(prev, p); total = 0; for (i = 2; i <= NF; i++) total += $i - (prev ? p[i] : 0)
    printf "machine %s: %s cores, load %s, steal %.1f%% of CPU time %s\n", when, cores, load,
           total ? 100 * ($9 - (prev ? p[9] : 0)) / total : 0, prev ? "since the line above" : "since boot" }' <<<"$now"
  stat_before=$now
}
machine "before set-up"
bash scripts/setup.sh export,cpu,dev,ray,kernels,serve-ray   # ray: the --ray batch test (ray[data], ~15-30 s,
                                                            # ~500 MB); serve-ray: vssflow-serve's tests, --ray's
                                                            # through Ray Serve (starlette, uvicorn, ray[serve])
. .venv/bin/activate
machine "before tests"
# How long a fresh process takes to import what most tests' subprocesses import, and what the
# checkout sits on: a slow file system shows here first.
echo "imports: torch, onnxruntime, av in $( { TIMEFORMAT=%R; time python -c 'import torch, onnxruntime, av' >/dev/null 2>&1; } 2>&1 ) s;" \
     "checkout on $(df -PT . | awk 'NR==2{print $2}'), /tmp on $(df -PT /tmp | awk 'NR==2{print $2}')"
# The `pytest` script, not `python -m pytest`: -m would put the repository root on sys.path. With
# --import-mode=importlib (pyproject.toml) the tests import only the installed vssflow.* packages.
# Triton (the kernels extra, pinned by the constraints) runs the kernel tests on the CPU through its
# interpreter (TRITON_INTERPRET=1). Nothing is downloaded at test time: the oracles' hub clients are
# told they are offline, so none waits on a network this machine may not have.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
       RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1
set +e
# Two workers, each taking whole files (a file's fixtures and order stay as they are): many tests
# wait on a child process (an export, a vssflow-run), and the other worker uses that core meanwhile.
timeout --signal=INT --kill-after=120 "${VSSFLOW_TEST_BUDGET:-4500}" \
  pytest -q -p no:cacheprovider -n "${VSSFLOW_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
machine "after tests"
case "$rc" in
  5) echo "pytest collected no tests: treated as a failure, a test run must test something" >&2; exit 1 ;;
  124|137) echo "the tests outlasted VSSFLOW_TEST_BUDGET=${VSSFLOW_TEST_BUDGET:-4500} s (slowest above)" >&2; exit 1 ;;
esac
exit "$rc"
