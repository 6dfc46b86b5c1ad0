"""`python -m vssflow.benchmarks.memory`: where the bytes are, stage by stage and end to end.

    python -m vssflow.benchmarks.memory --size full --seconds 10          # FP32 graphs, ONNX Runtime, CPU
    python -m vssflow.benchmarks.memory --quick                           # tiny model, a 2-second clip
    python -m vssflow.benchmarks.memory --size full --ort ort             # ONNX Runtime's own defaults
    python -m vssflow.benchmarks.memory --size full --precision fp16      # the FP16 graphs

In this process, for each stage in pipeline order (the ort backend on the CPU, with `--ort`'s
memory settings, `--max-memory`'s encoder pieces and `--precision`'s graphs): the graph's bytes,
the resident memory its load adds (weights, and what ONNX Runtime copies of them: little where
they are in a weights file it maps), and for its largest call as one clip's run sends it (a whole
window) the resident growth at its peak less the file pages mapped in meanwhile (activations and
arena: the kernel's high-water mark, restarted before the call), what stays after it (the arena
kept), the weights' file pages the call touched first, and the call's seconds. Beside it, unless `--no-theirs`, the authors'
way (eager torch FP32) on the same window in a process of its own, stage by stage. Then the
caches' and the prefetch queue's bounds, and, unless `--no-end-to-end`, the peak resident memory
(`VmHWM`, as `/usr/bin/time -v` reports it) of a `vssflow-run` subprocess on a generated clip, as
a user runs it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

from vssflow.runtime.memory import format_bytes

from .timing import peak_rss_bytes, reset_peak_rss, status_kib

# The stages in the order one clip's run calls them.
STAGES = ("clip_encoder", "synch_encoder", "speaker_encoder", "condition", "flow_step", "vae_decoder", "vocoder")
SAMPLE_SECONDS = 0.001
DEFAULT_OUT = Path("benchmarks") / "results"


def rss() -> int:
    """This process's resident bytes now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def file_rss() -> int:
    """This process's resident file pages now (`RssFile`: mapped files, as the weights files are)."""
    return (status_kib("RssFile") or 0) * 1024


class PeakRss:
    """`with PeakRss() as p: ...`: `p.before`, `p.peak` and `p.after`, resident bytes. The peak is
    the kernel's own high-water mark where Linux lets it be restarted at `__enter__` (`p.exact`),
    and otherwise what a thread sampled every `SAMPLE_SECONDS` (ONNX Runtime releases the GIL while
    it runs; a short spike between two samples can be missed); `p.sample()` takes a reading now."""

    def __enter__(self):
        self.before = self.peak = rss()
        self.file_before = file_rss()
        self.exact = reset_peak_rss()
        self._stop = threading.Event()
        self._thread = None if self.exact else threading.Thread(target=self._sample, daemon=True)
        if self._thread is not None:             # the kernel's mark needs no sampling
            self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def sample(self) -> int:
        self.peak = max(self.peak, rss())
        return self.peak

    def _sample(self):
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.after = rss()
        self.peak = max(self.sample(), peak_rss_bytes() if self.exact else 0)
        self.mapped = max(0, file_rss() - self.file_before)

    @property
    def anon_peak(self) -> int:
        """The peak's growth less the file pages mapped in meanwhile (weights ONNX Runtime maps from
        their file and touches first in this call): the activations and what the allocator took.
        File pages are only added while a call runs, so those at its end were there at its peak (an
        estimate: where the call also freed memory, or mapped a library's pages, it reads low; never
        below 0)."""
        return max(0, self.peak - self.before - self.mapped)


def measure_stages(folder, ort_memory: str = "", max_memory: str | None = None, whole: bool = False,
                   stages: tuple[str, ...] = STAGES, precision: str = "fp32") -> dict:
    """Per stage: graph bytes, load growth, the largest call's peak growth and what it keeps."""
    from vssflow.runtime.backends import OrtBackend, OrtMemory
    from vssflow.runtime.memory import MemoryPlan, weight_bytes
    from vssflow.runtime.model_folder import ModelFolder
    folder = ModelFolder.open(folder)
    base = rss()
    memory = OrtMemory.parse(ort_memory)
    backend = OrtBackend(folder, "cpu", precision, memory)
    plan = MemoryPlan.make(folder, backend.precision, max_memory)
    backend.pieces = {} if whole else dict(plan.rows)
    graphs = weight_bytes(folder.manifest, backend.precision)
    measured = {}
    for stage in stages:
        contract = folder.contracts[stage]
        feed = contract.sample("opt")                         # one clip's window: N=100, S=30, T=250, B=1
        with PeakRss() as load:
            backend.load(stage)
        with PeakRss() as call:
            backend.run(stage, feed)
        measured[stage] = {
            "graph_bytes": graphs.get(stage, 0),
            "load_bytes": load.after - load.before, "load_peak_bytes": load.peak - load.before,
            "call_peak_bytes": call.anon_peak, "call_kept_bytes": call.after - call.before - call.mapped,
            "call_mapped_bytes": call.mapped,
            "call_seconds": call.seconds, "load_seconds": load.seconds,
            "input_shapes": {k: list(v.shape) for k, v in feed.items()},
            "rows_per_call": backend.pieces.get(stage)}
    end = rss()
    backend.close()
    return {"precision": backend.precision, "ort_memory": memory.describe(),
            "plan": "encoder calls whole" if whole else plan.describe(),
            "base_bytes": base, "resident_after_bytes": end,
            "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "stages": measured}


# The authors' way per stage: no speaker encoder (RawNet3 is ours to run; their code takes the
# embedding as given), and the whole window's waveform in one vocoder call.
THEIR_STAGES = ("clip_encoder", "synch_encoder", "condition", "flow_step", "vae_decoder", "vocoder")


def measure_theirs(folder, work: Path) -> dict:
    """The authors' way (`benchmarks.theirs`: eager torch FP32 on the CPU, the modules of the folder's
    `weights.pt`), each stage once on one clip's window, in a child process of its own so that its
    resident bytes are its own: what loading the modules adds, and per stage the call's peak growth
    and the resident peak while it ran."""
    import concurrent.futures
    import multiprocessing
    if not (Path(folder) / "weights.pt").is_file():
        return {"skipped": "the model folder has no weights.pt (export with --torch-weights)"}
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_theirs_in_child, str(folder), str(work)).result()


def _theirs_in_child(folder: str, work: str) -> dict:
    import torch

    from vssflow.runtime import contracts as C

    from .models import make_inputs
    from .settings import BenchSettings
    from .theirs import Theirs
    torch.set_grad_enabled(False)
    settings = BenchSettings(model=Path(folder), device="cpu", transcript=None)
    sizes = json.loads((Path(folder) / "manifest.json").read_text())["sizes"]
    inputs = make_inputs(Path(work), sizes["audio_channels"], C.WINDOW_SECONDS, 0, None, settings.speech)
    path = inputs.save(Path(work) / "inputs.npz")
    base = rss()
    with PeakRss() as load:
        theirs = Theirs(settings, Path(folder), path)
    stages = {}
    for stage in THEIR_STAGES:
        with PeakRss() as call:
            theirs.run(stage)
        stages[stage] = {"call_peak_bytes": call.anon_peak, "resident_peak_bytes": call.peak,
                         "call_seconds": call.seconds}
        if stage == "condition":            # the VAE decodes the noise: the sampling loop is not run here
            theirs.latent = theirs.x0[:, :theirs.ref.audio_channels]
    return {"base_bytes": base, "load_bytes": load.after - load.before, "load_seconds": load.seconds,
            "resident_after_bytes": rss(), "stages": stages}


def caches_and_queues(folder) -> dict:
    """The byte bounds of what the runtime keeps besides the model: the feature caches (full) and
    the frames of one window (the prefetch queue of `generate_many` holds at most the plan's
    `queue_windows` of them)."""
    from vssflow.runtime.features import CLIP_CACHE, SYNCH_CACHE
    from vssflow.runtime.memory import MemoryPlan, window_frame_bytes
    from vssflow.runtime.model_folder import ModelFolder
    opened = ModelFolder.open(folder)
    window_frames = window_frame_bytes(opened.sizes)
    return {"clip_cache_bytes": CLIP_CACHE, "synch_cache_bytes": SYNCH_CACHE,
            "window_frames_bytes": window_frames,
            "prefetch_queue_bytes_per_window": window_frames,
            "prefetch_queue_windows": MemoryPlan.make(opened).queue_windows}


def high_water(pid: int) -> int:
    """The peak resident bytes of process `pid` so far (`VmHWM`), 0 once it is gone."""
    return (status_kib("VmHWM", pid) or 0) * 1024


def end_to_end(folder: Path, seconds: float, work: Path, max_memory: str | None = None,
               precision: str = "fp32", steps: int | None = None, low_memory: bool = False) -> dict:
    """Peak resident memory of `vssflow-run` on a generated clip (ONNX Runtime, CPU): the child's
    `VmHWM` (what `/usr/bin/time -v` reports as its maximum resident set), read until it ends, and
    the most of it that was anonymous (`RssAnon`, sampled every 20 ms: the rest is file pages, the
    weights ONNX Runtime maps, which the kernel can drop and processes share)."""
    from .media import make_video
    video = work / "clip.mp4"
    make_video(video, seconds, 25, (320, 240))
    cmd = [sys.executable, "-m", "vssflow.runtime.cli", str(video), "--model", str(folder), "--backend", "ort",
           "--device", "cpu", "--precision", precision, "-o", str(work / "out.wav"), "-q"]
    if max_memory is not None:
        cmd += ["--max-memory", str(max_memory)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    if low_memory:
        cmd += ["--low-memory"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    peak = anon = 0
    while proc.poll() is None:          # the child's own high-water mark (a fork's ru_maxrss starts at ours)
        peak = max(peak, high_water(proc.pid))
        anon = max(anon, (status_kib("RssAnon", proc.pid) or 0) * 1024)
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace").strip()
    proc.stderr.close()
    if proc.returncode != 0:
        raise click.ClickException(f"vssflow-run exited {proc.returncode}: {err.splitlines()[-1] if err else ''}")
    shown = ["vssflow-run" if c == "vssflow.runtime.cli" else c for c in cmd[2:]]
    return {"command": " ".join(shown), "seconds": seconds, "peak_bytes": peak, "peak_anon_bytes": anon,
            "wall_seconds": wall}


def table(report: dict) -> str:
    s = report["stages"]
    theirs = report.get("theirs") or {}
    their = theirs.get("stages", {})
    lines = [f"# Memory: {report['model']}, {report.get('precision', 'fp32').upper()} graphs "
             f"({report['ort_memory']}; {report['plan']})", "",
             "| stage | graph | load adds | largest call: peak adds | kept after | weights mapped in | call s "
             "| rows/call | authors': call peak adds | call s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in s.items():
        t = their.get(name)
        lines.append(f"| {name} | {format_bytes(r['graph_bytes'])} | {format_bytes(r['load_bytes'])} | "
                     f"{format_bytes(r['call_peak_bytes'])} | {format_bytes(r['call_kept_bytes'])} | "
                     f"{format_bytes(r.get('call_mapped_bytes', 0))} | {r['call_seconds']:.2f} | {r['rows_per_call'] or ''} | "
                     + (f"{format_bytes(t['call_peak_bytes'])} | {t['call_seconds']:.2f} |" if t else "- | - |"))
    lines += ["", f"- before any stage: {format_bytes(report['base_bytes'])} resident; after every stage: "
              f"{format_bytes(report['resident_after_bytes'])}; this process's peak: "
              f"{format_bytes(report['process_peak_bytes'])}"]
    c = report["caches"]
    lines.append(f"- caches at most: CLIP features {format_bytes(c['clip_cache_bytes'])}, Synchformer features "
                 f"{format_bytes(c['synch_cache_bytes'])}; frames of one window "
                 f"{format_bytes(c['window_frames_bytes'])} (the batch prefetch queue holds at most "
                 f"{c['prefetch_queue_windows']} of them without a budget)")
    if "skipped" in theirs:
        lines.append(f"- the authors' way: not measured: {theirs['skipped']}")
    elif theirs:
        lines.append(f"- the authors' way (eager torch FP32, a process of its own, each stage once on the same window; "
                     f"no speaker encoder, the vocoder on the whole window): loading the modules adds "
                     f"{format_bytes(theirs['load_bytes'])} to the {format_bytes(theirs['base_bytes'])} before; resident after "
                     f"every stage {format_bytes(theirs['resident_after_bytes'])}; its peak "
                     f"{format_bytes(max(t['resident_peak_bytes'] for t in their.values()))}")
    e = report.get("end_to_end")
    if e:
        lines.append(f"- end to end, `{e['command']}` on a {e['seconds']:g}-second clip: peak "
                     f"**{format_bytes(e['peak_bytes'])}** resident ({e['peak_bytes'] // 1024} kB), at most "
                     f"{format_bytes(e.get('peak_anon_bytes', 0))} of it anonymous (the rest: mapped weights), "
                     f"{e['wall_seconds']:.1f} s")
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Exported model folder. Default: random weights of --size.")
@click.option("--size", type=click.Choice(["tiny", "small", "full"]), default="small", show_default=True,
              help="Random-weight model in the authors' layout, exported once into $VSSFLOW_HOME/bench-models.")
@click.option("--seconds", type=float, default=10.0, show_default=True, help="Length of the end-to-end clip.")
@click.option("--ort", "ort_memory", default="", help="ONNX Runtime memory settings over ours, e.g. "
              "arena=shared,mem_pattern=on,prepack=off; 'ort': ONNX Runtime's own defaults.")
@click.option("--max-memory", default=None, help="Budget the encoder pieces are planned for (as vssflow-run's).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Which graphs ours runs: fp16 needs a folder exported with FP16 graphs.")
@click.option("--theirs/--no-theirs", default=True, show_default=True,
              help="Also measure the authors' way per stage (needs the folder's weights.pt).")
@click.option("--low-memory", is_flag=True, help="The end-to-end run with --low-memory (one stage loaded at a time).")
@click.option("--whole", is_flag=True, help="Encoder calls whole (no pieces), as before #22 (in this process).")
@click.option("--no-end-to-end", is_flag=True, help="Skip the vssflow-run subprocess.")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="The end-to-end run's solver steps (default: vssflow-run's). Every step's call is the same "
                   "size, so fewer steps give the same peak sooner.")
@click.option("--quick", is_flag=True, help="Tiny model and a 2-second clip (for tests).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Write <name>.json and .md there (e.g. {DEFAULT_OUT}).")
@click.option("--name", default=None, help="File name stem [memory-cpu-<size or folder>].")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON on stdout instead of the table.")
def main(model, size, seconds, ort_memory, max_memory, precision, theirs, low_memory, whole, no_end_to_end, steps,
         quick, out, name, as_json):
    """Where vssflow's memory goes: weights, activations and arena per stage, caches, end to end."""
    from vssflow.runtime.errors import VssflowError

    from .models import model_folder
    if quick:
        size, seconds = "tiny", 2.0
    folder = model or model_folder(size, progress=lambda m: click.echo(m, err=True), precision=precision)
    try:
        report = {"model": str(model) if model else f"{size} (random weights)",
                  **measure_stages(folder, ort_memory, max_memory, whole, precision=precision),
                  "caches": caches_and_queues(folder)}
        with tempfile.TemporaryDirectory(prefix="vssflow-memory-") as tmp:
            if theirs:
                report["theirs"] = measure_theirs(folder, Path(tmp))
            if not no_end_to_end:
                report["end_to_end"] = end_to_end(Path(folder), seconds, Path(tmp), max_memory, precision, steps,
                                                  low_memory)
    except VssflowError as e:
        raise click.ClickException(str(e)) from None
    text = table(report)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stem = name or f"memory-cpu-{model.name if model else size}" + ("-fp16" if precision == "fp16" else "")
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / f"{stem}.md").write_text(text)
    click.echo(json.dumps(report, indent=1) if as_json else text)


if __name__ == "__main__":
    main()
