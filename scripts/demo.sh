#!/usr/bin/env bash
# Sets up .venv, exports the built-in demo model (tiny, random weights: it makes noise), makes a
# 6-second test clip and generates its sound track: the whole product path on any CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh export,cpu
. .venv/bin/activate
mkdir -p demo
vssflow-export --demo --out demo/model --force --backend onnx
python -c "from vssflow.benchmarks.media import make_video; make_video('demo/clip.mp4', seconds=6, fps=25, size=(320, 240))"
vssflow-run demo/clip.mp4 --model demo/model --transcript "a dog barks twice" \
    --speech-start 1 --speech-end 3 -o demo/clip_with_sound.mp4
echo "demo: wrote demo/clip_with_sound.mp4"
