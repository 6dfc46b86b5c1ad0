"""Many clips, three ways: N separate `vssflow-run` processes, one batch run, one `--ray` run.

    python -m vssflow.benchmarks.many_clips MODEL WORK --clips 6 --seconds 4 --steps 25 [--ray]

Writes N synthetic clips (`media.make_video`) into WORK and runs each way as a user would (a
subprocess), printing one JSON line per way: wall seconds, clips per minute, and the peak memory
of the whole process tree (RSS summed, sampled every 0.1 s from /proc: Ray's processes are not
the command's waited-for children, so `/usr/bin/time` would miss them). Then the encoders of one
short clip's window with and without the padding encoded once (`features.Encoders`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

from .media import make_video
from .timing import status_kib


def _tree_rss_mb(root: int) -> float:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                kids.setdefault(int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        total += status_kib("VmRSS", pid) or 0
    return total / 1024


def measure(commands: list[list[str]]) -> dict:
    """Run `commands` one after another; wall time and the peak RSS of each one's process tree."""
    peak, t0 = 0.0, time.perf_counter()
    for cmd in commands:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stop = threading.Event()

        def sample():
            nonlocal peak
            while not stop.wait(0.1):
                peak = max(peak, _tree_rss_mb(proc.pid))
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        err = proc.communicate()[1]
        stop.set()
        thread.join()
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_tree_rss_mb": round(peak)}


def padding_saving(model: Path, clip: Path) -> dict:
    """Encoder seconds for one short clip's window: every frame and segment (the authors' way)
    against each distinct input once (a Session's encoders, the padding already known)."""
    from vssflow.runtime import video
    from vssflow.runtime.features import Encoders
    from vssflow.runtime.session import Session
    from vssflow.runtime.window import Run, encode
    session = Session(model, backend="ort")
    w = next(video.windows(clip, hop=9.0))
    encoders = Encoders()
    encoders.encode(session.backend, Run(), [w])                   # the padding's features, once per Session
    other = next(video.windows(clip, hop=9.0))
    times = {}
    for name, fn in (("every_input_s", lambda: encode(session.backend, Run(), w)),
                     ("distinct_inputs_s", lambda: Encoders(clip_bytes=1 << 40, synch_bytes=1 << 40).encode(
                         session.backend, Run(), [other]))):
        t0 = time.perf_counter()
        fn()
        times[name] = round(time.perf_counter() - t0, 2)
    # the second of those is a fresh cache: only the padding saved, as a clip seen once would be
    return {"clip_frames_real": w.clip_count, "synch_frames_real": w.synch_count, **times}


@click.command()
@click.argument("model", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("work", type=click.Path(file_okay=False, path_type=Path))
@click.option("--clips", "n", type=int, default=6, show_default=True)
@click.option("--seconds", type=float, default=4.0, show_default=True)
@click.option("--steps", type=int, default=25, show_default=True)
@click.option("--ray", "with_ray", is_flag=True, help="Also the --ray run (a local instance).")
@click.option("--padding", is_flag=True, help="Also the encoders' time with and without the padding encoded.")
def main(model, work, n, seconds, steps, with_ray, padding):
    clips = work / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    paths = [clips / f"clip{k}.mp4" for k in range(n)]
    for path in paths:
        make_video(path, seconds, 25, (320, 240))
    run = [sys.executable, "-m", "vssflow.runtime.cli", "--model", str(model), "--steps", str(steps), "-q"]
    ways = {"processes": [run + [str(p), "-o", str(work / f"single{k}.wav")] for k, p in enumerate(paths)],
            "batch": [run + [str(clips), "--output-dir", str(work / "batch"), "--format", "wav"]]}
    if with_ray:
        ways["ray"] = [run + [str(clips), "--output-dir", str(work / "ray"), "--format", "wav", "--ray"]]
    for way, commands in ways.items():
        m = measure(commands)
        print(json.dumps({"way": way, "clips": n, "seconds": seconds, "steps": steps, **m,
                          "clips_per_min": round(60 * n / m["wall_s"], 1), "load_1min": round(os.getloadavg()[0], 1)}),
              flush=True)
    if padding:
        print(json.dumps({"padding": padding_saving(model, paths[0])}), flush=True)


if __name__ == "__main__":
    main()
