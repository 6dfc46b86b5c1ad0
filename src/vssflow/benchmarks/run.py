"""One benchmark run: model, inputs, then every stage on both ways, alternating, and the figures.

Each way lives in its own child process by default (its peak memory is its own; neither's
threads or caches disturb the other) and is driven stage by stage from here. The timed runs of
a stage alternate between the two ways (theirs, ours, ours, theirs, ...), so both sides of every
ratio are measured under the same machine load even when other work shares the CPU.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

from vssflow.runtime import contracts as C

from . import report, timing
from .models import make_inputs, model_folder
from .ours import Ours
from .settings import BenchSettings
from .theirs import Theirs

DEFAULT_OUT = Path("benchmarks") / "results"          # relative to where it runs: the repository root


class Progress:
    """Timestamped progress lines on stderr."""

    def __init__(self, start: float | None = None, quiet: bool = False):
        self.start, self.quiet = start or time.time(), quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[bench {time.time() - self.start:6.1f} s] {msg}", file=sys.stderr, flush=True)


# --- the two ways, in this process or each in a child ---------------------------------------------

_OBJECT = None


def _create(module: str, name: str, args: tuple) -> None:
    global _OBJECT
    _OBJECT = getattr(importlib.import_module(module), name)(*args)


def _invoke(method: str, args: tuple):
    return getattr(_OBJECT, method)(*args)


class Way:
    """`way(method, *args)` calls a method of an `Ours`/`Theirs` living here or in a spawned child."""

    def __init__(self, cls: type, args: tuple, isolate: bool):
        self.name = cls.name
        if isolate:
            self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            self.pool.submit(_create, cls.__module__, cls.__name__, args).result()
        else:
            self.pool, self.obj = None, cls(*args)

    def __call__(self, method: str, *args):
        if self.pool is None:
            return getattr(self.obj, method)(*args)
        return self.pool.submit(_invoke, method, args).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def alternate(ways: list[Way], stage: str, repeats: int, warmup: int) -> dict[str, timing.Stat]:
    """Warm each way up, then time `stage` `repeats` times per way, the order flipped every round."""
    for way in ways:
        for _ in range(warmup):
            way("run", stage, True)
    samples: dict[str, list[float]] = {w.name: [] for w in ways}
    for r in range(repeats):
        for way in (ways if r % 2 == 0 else ways[::-1]):
            samples[way.name].append(way("run", stage))
    return {name: timing.Stat.of(s) for name, s in samples.items()}


def describe_model(folder: Path, settings: BenchSettings) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    sizes = manifest["sizes"]
    random = bool(manifest.get("demo")) or settings.model is None
    name = settings.size if settings.model is None else folder.name
    flow = manifest["dims"]["flow"]
    return {"name": name, "folder": str(folder), "random_weights": random,
            "describe": (f"flow transformer {flow['num_layers']} layers x {flow['width']} wide, "
                         f"{sizes['condition_channels']} condition channels; CLIP width {sizes['clip_dim']}, "
                         f"Synchformer width {sizes['synch_dim']}"
                         + ("; random weights" if random else "")),
            "sizes": sizes, "weights_bytes": manifest["files"].get("weights.pt", {}).get("bytes")}


def measure(settings: BenchSettings, folder: Path, inputs_path: Path, say: Progress) -> tuple[dict, dict]:
    """Every stage on both ways; returns (ours, theirs) as `report.summarize` takes them."""
    s, heavy, light = settings, settings.heavy_repeats, settings.repeats
    say("loading the authors' way (eager torch modules)")
    theirs = Way(Theirs, (s, folder, inputs_path), s.isolate)
    say(f"loading ours (Session, {s.backend} backend)")
    ours = Way(Ours, (s, folder, inputs_path), s.isolate)
    both = [theirs, ours]
    st: dict[str, dict[str, timing.Stat]] = {"ours": {}, "theirs": {}}

    def put(stats: dict[str, timing.Stat], stage: str, scale: float = 1.0) -> None:
        for name, stat in stats.items():
            st[name][stage] = stat.scaled(scale)

    try:
        say("video decode and frame preparation (the runtime's, for both)")
        put(alternate([ours], "decode", light, s.warmup), "decode")
        say(f"CLIP encoder on {s.clip_frames} of {C.CLIP.frames} frames")
        put(alternate(both, "clip_encoder", heavy, s.warmup), "clip_encoder", C.CLIP.frames / s.clip_frames)
        say(f"Synchformer on {s.synch_segments} of {C.SYNCH_SEGMENTS} segments")
        put(alternate(both, "synch_encoder", heavy, s.warmup), "synch_encoder", C.SYNCH_SEGMENTS / s.synch_segments)
        ours("set_features", theirs("features"))
        say("condition")
        put(alternate(both, "condition", light, s.warmup), "condition")
        say("one function evaluation (flow_step / two unbatched passes)")
        put(alternate(both, "flow_step", light, s.warmup), "flow_step")
        say(f"ODE loop: ours {s.solver} {s.steps} steps, theirs dopri5 at 1e-5")
        put(alternate(both, "sampling", heavy, 0), "sampling")
        if s.parity:
            say("ODE loop: ours with dopri5 at 1e-5 (same solver as theirs)")
            ours("run", "parity")
        say("VAE decoder")
        put(alternate(both, "vae_decoder", heavy, s.warmup), "vae_decoder")
        say("vocoder: ours in chunks as streamed, theirs the whole window at once")
        put(alternate(both, "vocoder", heavy, s.warmup), "vocoder")
        e2e: dict[str, dict] = {}
        if s.end_to_end == "measured":
            say("end to end on the video file")
            totals = alternate(both, "end_to_end", heavy, 0)
            firsts = alternate([ours], "first_chunk", heavy, 0)
            firsts["theirs"] = totals["theirs"]          # the authors' audio exists only at the very end
            e2e = {k: {"total": totals[k].to_json(), "first_chunk": firsts[k].to_json(), "how": "measured"}
                   for k in ("ours", "theirs")}
        say(f"quality sweep: {len(s.sweep())} solver/steps configurations")
        sweep = ours("sweep")
        fp16 = ours("fp16")
        if "skipped" in fp16:
            say(f"FP16: {fp16['skipped']}")
        o, t = ours("result"), theirs("result")
    finally:
        for way in both:
            way.close()

    for name, r in (("ours", o), ("theirs", t)):
        st[name]["flow_step_in_loop"] = timing.Stat.of(r["flow_step_in_loop"])
    st["ours"]["vocoder_chunk"] = timing.Stat.of(o["vocoder_chunk"])
    st["ours"]["vocoder_first_chunk"] = timing.Stat.of(o["vocoder_first_chunk"])
    for row in sweep:
        row["loop"] = timing.Stat.of([row["seconds"]]).to_json()
    ours_out = {**o, "stages": {k: v.to_json() for k, v in st["ours"].items()}, "sweep": sweep, "fp16": fp16}
    theirs_out = {**t, "stages": {k: v.to_json() for k, v in st["theirs"].items()}}
    if e2e:
        ours_out["end_to_end"] = {**e2e["ours"], **o["end_to_end"]}          # + its NFE and per-stage seconds
        theirs_out["end_to_end"] = e2e["theirs"]
    return ours_out, theirs_out


def run_benchmark(settings: BenchSettings, out: Path | None = DEFAULT_OUT, name: str | None = None,
                  say: Progress | None = None) -> tuple[dict, dict[str, Path]]:
    """Measure everything `settings` asks for; write `<name>.json|.md|.png/.svg` into `out` (if given)."""
    settings.check()
    say = say or Progress()
    t0 = time.perf_counter()
    machine = timing.machine_info()
    folder = Path(settings.model) if settings.model else model_folder(settings.size, settings.seed, progress=say)
    model = describe_model(folder, settings)
    with tempfile.TemporaryDirectory(prefix="vssflow-bench-") as work:
        work = Path(work)
        inputs = make_inputs(work, model["sizes"]["audio_channels"], settings.seconds, settings.seed,
                             settings.transcript, settings.speech, settings.video)
        inputs_path = inputs.save(work / "inputs.npz")
        ours, theirs = measure(settings, folder, inputs_path, say)
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    machine["torch_threads"] = theirs["torch_threads"]
    summary = report.summarize(settings, machine, model, ours, theirs, time.perf_counter() - t0, inputs.seconds)
    paths = {}
    if out is not None:
        kind = "cuda" if theirs["device"].startswith("cuda") else "cpu"
        paths = report.write(summary, Path(out), name or f"{kind}-{model['name']}")
    return summary, paths
