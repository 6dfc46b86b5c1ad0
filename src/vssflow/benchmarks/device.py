"""`python -m vssflow.benchmarks.device`: every stage and a 10-second clip end to end, at every
precision the machine can run, on one GPU; one command, installs nothing.

    python -m vssflow.benchmarks.device                                   # CUDA: full-size random weights
    python -m vssflow.benchmarks.device --device cpu --size tiny --precisions fp32,bf16 \\
        --steps 2 --repeats 1 --warmup 0 --seconds 2                      # CI: that it works

Variants, one Session each (`Session(backend, precision, compile)`), one after another:
* torch at fp32, fp16 and bf16 (the half-precision policy of `export/precision.py`), on CUDA:
  FP32 eager (the reference, kernels off), FP16 with its flow step captured in a CUDA graph
  (`runtime/graphs.py`), FP16 compiled (`--compile`) and captured, then FP32 and BF16 captured,
  FP16 eager and FP32 eager with the Triton kernels (frame preprocessing, RoPE) on;
* ort at fp32 and fp16 (the FP32 and FP16 graphs) where onnxruntime has its CUDA provider;
* trt at fp16 (strongly typed engines from the FP16 graphs) where TensorRT and Polygraphy build here.
The engines are built first, from the model's graphs (`trt_build.engines_for`, as `vssflow-export
--engines-for` does), their build times reported; a failed build is reported and the other variants
run. The trt and ort variants run right after the torch FP32 reference, so the budget never starves
them. What cannot run is listed with the reason. Per variant: each stage once per window at a window's
shapes (median of `--repeats`, device synchronised), the vocoder per streamed chunk, one flow
evaluation, `Session.generate` on a synthetic 10-second clip (euler, `--steps`), the first chunk's
latency, and the final latent, mel and audio against the torch FP32 run (SNR). Writes
`<name>.json` and `<name>.md` into `--out`. A time budget (`--budget`) skips variants that would
start after it, so the whole run fits its slot (8 minutes on an H100-class GPU at full size).

Beside ours, the authors' way on the same device and clip (`benchmarks/theirs.py`: eager FP32, two
unbatched CFG passes, dopri5), end to end; and clips per minute through `generate_many` in a batch
(`--batch-clips` copies of the clip, `--batch` windows per call) with the headline variant. The
top-level `"headline"` holds the figures issue #19 asks for (`HEADLINE_KEYS`), each with the
variant it comes from: ours is the fastest end to end among the variants whose audio is within
`MIN_AUDIO_SNR_DB` of torch FP32 (the reference itself otherwise); "after decode" is that end to
end less the run's video decoding (`frames`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from vssflow.runtime import contracts as C
from vssflow.runtime.precision import PRECISIONS

from . import timing
from .report import _finite, _json_default, snr_db
from .run import DEFAULT_OUT, Progress

# Each stage at one window's shapes (the vocoder: one streamed chunk with its overlap).
STAGE_SIZES = {"N": C.CLIP.frames, "S": C.SYNCH_SEGMENTS, "B": 1, "T": C.WINDOW_LATENTS, "T1": C.WINDOW_LATENTS + 1,
               "M": C.VOCODER_CHUNK + 2 * C.VOCODER_OVERLAP}
STAGES = ("clip_encoder", "synch_encoder", "condition", "flow_step", "vae_decoder", "vocoder")
REFERENCE = ("torch", "fp32", "off")
HEADLINE_KEYS = ("gpu", "clip_seconds", "ours_after_decode_s", "ours_end_to_end_s", "theirs_end_to_end_s",
                 "speedup_end_to_end", "audio_snr_db", "batch_clips_per_min")
MIN_AUDIO_SNR_DB = 30.0     # issue #19's bound for a half-precision variant to count as ours


@dataclasses.dataclass(frozen=True)
class Variant:
    backend: str
    precision: str
    kernels: str            # on | off | n/a (the Triton kernels run on CUDA tensors only)
    graphs: str = "n/a"     # on | off | n/a: the torch flow step captured in a CUDA graph
    compile: bool = False   # the torch flow step through torch.compile

    @property
    def label(self) -> str:
        extra = ("" if self.kernels == "n/a" else f", kernels {self.kernels}") \
            + {"on": ", CUDA graphs", "off": ", eager"}.get(self.graphs, "") + (", compiled" if self.compile else "")
        return f"{self.backend} {self.precision}{extra}"


@contextlib.contextmanager
def kernels_switch(kernels: str):
    """`VSSFLOW_KERNELS` for the variant (read at each call by `vssflow.kernels.dispatch`)."""
    before = os.environ.get("VSSFLOW_KERNELS")
    if kernels != "n/a":
        os.environ["VSSFLOW_KERNELS"] = "1" if kernels == "on" else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("VSSFLOW_KERNELS", None)
        else:
            os.environ["VSSFLOW_KERNELS"] = before


def variants(device: str, precisions: tuple[str, ...]) -> tuple[list[Variant], dict[str, str]]:
    """What runs here, the torch FP32 reference first; and what does not, with the reason."""
    cuda = device.startswith("cuda")
    skipped: dict[str, str] = {}
    if cuda:        # the headline's candidates first, so a cut budget drops the others
        half = [p for p in precisions if p != "fp32"]
        out = [Variant("torch", "fp32", "off", "off")]
        out += [Variant("torch", "fp16", "on", "on"), Variant("torch", "fp16", "on", "on", compile=True)] \
            if "fp16" in half else []
        out += [Variant("torch", "fp32", "on", "on")] + [Variant("torch", p, "on", "on") for p in half if p != "fp16"]
        out += [Variant("torch", p, "on", "off") for p in precisions]
    else:
        out = [Variant("torch", p, "n/a") for p in precisions]
        skipped["compiled"] = "torch.compile variants run on CUDA only here (on this CPU Inductor takes minutes)"
    from vssflow.runtime import extras
    has_cuda = not extras.missing("cpu") and "CUDAExecutionProvider" in extras.onnxruntime().get_available_providers()
    if cuda and has_cuda:
        out += [Variant("ort", p, "n/a") for p in precisions if p in ("fp32", "fp16")]
    else:
        skipped["ort"] = ("onnxruntime has no CUDA provider here (onnxruntime-gpu not installed)" if cuda
                          else "ONNX Runtime variants run on CUDA only here (the CPU is the CI mode)")
    from vssflow.export.trt_build import support
    ok, reason = support() if cuda else (False, "no CUDA device")
    if ok:                          # `prepare_engines` builds FP16 engines
        out += [Variant("trt", "fp16", "n/a")] if "fp16" in precisions else []
    else:
        skipped["trt"] = reason
    # The torch FP32 reference, then TensorRT (whose engines are built first: never starved by the
    # budget), then the rest in the order above.
    trt = [v for v in out if v.backend == "trt"]
    return out[:1] + trt + [v for v in out[1:] if v.backend != "trt"], skipped


def make_model(size: str, root: Path, graphs: bool, say) -> Path:
    """Random weights of `size` in the authors' layout, exported into `root` (the ONNX graphs only
    where ORT on CUDA or TensorRT will run them: the torch variants need weights.pt alone)."""
    from vssflow.export.onnx_export import ExportOptions, export_random
    folder = root / f"{size}-{'graphs' if graphs else 'weights'}"
    if not (folder / "manifest.json").is_file():
        opts = ExportOptions(precision="fp16", backend="onnx", verify=False, graphs=graphs,
                             torch_weights=True)
        export_random(folder, size, options=opts, replace=True, progress=lambda m: say(f"model: {m}"),
                      note="DEVICE BENCHMARK MODEL: random weights")
    return folder


def prepare_engines(folder: Path, todo: list[Variant], skipped: dict[str, str], say) -> tuple[list[Variant], dict]:
    """The trt variants' FP16 engines, built into `folder` before any variant runs; (the variants
    left, the build report: stage -> engine, seconds). A failed build is a finding: reported in
    `skipped`, the trt variants dropped, the rest run."""
    if not any(v.backend == "trt" for v in todo):
        return todo, {}
    from vssflow.export.trt_build import engines_for
    t0 = time.perf_counter()
    try:
        report = engines_for(folder, "fp16", progress=lambda m: say(f"engines: {m}"))
    except Exception as e:
        skipped["trt"] = f"engine build failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        say(f"trt: {skipped['trt']}")
        return [v for v in todo if v.backend != "trt"], {}
    say(f"engines built in {time.perf_counter() - t0:.0f} s")
    return todo, report


def time_stages(session, repeats: int, warmup: int) -> dict:
    """Each stage at a window's shapes on the backend's own arrays; the device synchronised."""
    backend, out = session.backend, {}
    for stage in STAGES:
        contract = backend.folder.contracts[stage]
        feed = {k: backend.arrays.upload(v) for k, v in
                contract.sample("opt", **{a: STAGE_SIZES[a] for a in contract.axes}).items()}
        stat, _ = timing.measure(lambda: backend.run_native(stage, feed), repeats, warmup, sync=timing.cuda_sync)
        out[stage] = stat.to_json()
    return out


def end_to_end(session, video: Path, seed: int, steps: int, repeats: int, warmup: int) -> dict:
    """`Session.stream` on the clip, read to its end: the first chunk's latency and the total, from
    the same runs (after `warmup` untimed ones: lazy loads, autotuning)."""
    def once() -> tuple[float, float, object]:
        t0 = time.perf_counter()
        chunks, _ = session.stream(video, steps=steps, seed=seed, keep_intermediates=True)
        first = next(chunks)
        timing.cuda_sync()
        t_first = time.perf_counter() - t0
        rest = chunks.result()
        timing.cuda_sync()
        return t_first, time.perf_counter() - t0, dataclasses.replace(rest, audio=np.concatenate([first, rest.audio]))
    for _ in range(warmup):
        once()
    runs = [once() for _ in range(max(1, repeats))]
    result = runs[-1][2]
    kept = result.intermediates
    return {"total": timing.Stat.of([r[1] for r in runs]).to_json(),
            "first_chunk": timing.Stat.of([r[0] for r in runs]).to_json(), "nfe": result.nfe,
            "stage_seconds": result.timings, "fallbacks": list(result.fallbacks),
            "outputs": {"latent": kept["final_latent"][0], "mel": kept["mel"][0], "audio": result.audio}}


def theirs_end_to_end(folder: Path, device: str, video: Path, seconds: float, repeats: int, warmup: int,
                      work: Path) -> dict:
    """The authors' way (`benchmarks/theirs.py`) on the same device and clip: eager FP32, two
    unbatched CFG passes, dopri5; video file to waveform, timed as ours (device synchronised)."""
    from .models import make_inputs
    from .settings import BenchSettings
    from .theirs import Theirs
    settings = BenchSettings(model=folder, device=device, repeats=repeats, heavy_repeats=repeats, warmup=warmup,
                             seconds=seconds, transcript=None)
    audio_channels = json.loads((folder / "manifest.json").read_text())["sizes"]["audio_channels"]
    inputs = make_inputs(work, audio_channels, seconds, 0, None, settings.speech, video=video)
    theirs = Theirs(settings, folder, inputs.save(work / "theirs-inputs.npz"))
    for _ in range(warmup):
        theirs.run("end_to_end")
    times = [theirs.run("end_to_end") for _ in range(min(max(1, repeats), 2))]   # dopri5 at full size: seconds each
    return {"how": "the authors' way: eager FP32, two unbatched CFG passes, dopri5 (rtol = atol = 1e-5)",
            "device": theirs.device, "load_s": theirs.load_s, "end_to_end": timing.Stat.of(times).to_json()}


def batch_throughput(folder: Path, device: str, v: Variant, video: Path, clips: int, batch: int | None,
                     steps: int, warmup: int) -> dict:
    """`generate_many` over `clips` copies of the clip (seeds 0..clips-1) with variant `v`: clips per minute."""
    from vssflow.runtime.batch import Item
    from vssflow.runtime.session import Session
    with kernels_switch(v.kernels), Session(folder, backend=v.backend, device=device, precision=v.precision,
                                            verify_hashes=False, compile=v.compile) as session:
        if v.graphs != "n/a":
            session.backend.cuda_graphs = v.graphs == "on"
        items = [Item(video, seed=i) for i in range(clips)]
        for _ in range(warmup):
            list(session.generate_many(items[:1], steps=steps, batch=batch))
        timing.cuda_sync()
        t0 = time.perf_counter()
        results = list(session.generate_many(items, steps=steps, batch=batch))
        timing.cuda_sync()
        wall = time.perf_counter() - t0
        failed = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
        return {"variant": v.label, "clips": clips, "batch": batch or session.default_batch,
                "seconds": wall, "clips_per_min": 60.0 * (clips - len(failed)) / wall, "failed": failed}


def _audio_snr(row: dict) -> float:
    snr = row.get("snr_vs_torch_fp32_db", {}).get("audio", float("nan"))
    return float("inf") if snr is None else snr          # None: identical to the reference


def choose_ours(rows: list[dict]) -> dict:
    """The fastest variant end to end whose audio is within `MIN_AUDIO_SNR_DB` of torch FP32."""
    ok = [r for r in rows if _audio_snr(r) >= MIN_AUDIO_SNR_DB]
    return min(ok or rows[:1], key=lambda r: r["end_to_end"]["total"]["median"])


def headline(rows: list[dict], theirs: dict | None, batch: dict | None, gpu: str, seconds: float) -> dict:
    """Issue #19's figures (`HEADLINE_KEYS`), each with the variant it comes from. None: not measured."""
    if not rows:
        return {k: None for k in HEADLINE_KEYS} | {"gpu": gpu, "clip_seconds": seconds, "variants": {}}
    ours = choose_ours(rows)
    total = ours["end_to_end"]["total"]["median"]
    decode = ours["end_to_end"]["stage_seconds"].get("frames", 0.0)
    theirs_s = None if theirs is None else theirs["end_to_end"]["median"]
    snr = _audio_snr(ours)
    return {"gpu": gpu, "clip_seconds": seconds,
            "ours_after_decode_s": total - decode, "ours_end_to_end_s": total, "theirs_end_to_end_s": theirs_s,
            "speedup_end_to_end": None if theirs_s is None else theirs_s / total,
            "audio_snr_db": None if snr == float("inf") else snr,          # None: the reference itself
            "batch_clips_per_min": None if batch is None else batch["clips_per_min"],
            "variants": {"ours": ours["label"], "theirs": None if theirs is None else theirs["how"],
                         "batch": None if batch is None else batch["variant"]},
            "chosen_by": f"fastest end to end with audio >= {MIN_AUDIO_SNR_DB:g} dB against torch fp32; after "
                         "decode: end to end less the run's video decoding (frames)"}


def run_device_benchmark(size: str, device: str, precisions: tuple[str, ...], steps: int, repeats: int,
                         warmup: int, seconds: float, budget: float, work: Path, say,
                         save=lambda summary: None, batch_clips: int = 8, batch: int | None = None) -> dict:
    """Every variant in turn; `save(summary so far)` after each, so a run cut short keeps what it measured."""
    import torch

    from vssflow.runtime.session import Session

    from .media import make_video
    t_start = time.perf_counter()
    todo, skipped = variants(device, precisions)
    graphs = any(v.backend != "torch" for v in todo)
    folder = make_model(size, work, graphs, say)
    todo, engine_report = prepare_engines(folder, todo, skipped, say)
    manifest = json.loads((folder / "manifest.json").read_text())
    video = work / "clip.mp4"
    make_video(video, seconds, 25, (320, 240))
    say(f"model ready in {time.perf_counter() - t_start:.0f} s; {len(todo)} variants")
    rows, reference, extra = [], None, {"theirs": None, "batch": None}
    machine = timing.machine_info()
    gpu = machine.get("gpu") or "cpu"

    def summary() -> dict:
        return {"headline": headline(rows, extra["theirs"], extra["batch"], gpu, seconds),
                "machine": machine, "size": size, "device": device, "steps": steps,
                "repeats": repeats, "warmup": warmup, "clip_seconds": seconds,
                "model": {"folder": str(folder), "sizes": manifest["sizes"], "dims": manifest["dims"]["flow"]},
                "engines": engine_report, "variants": rows, **extra, "skipped": skipped, "wall_s": time.perf_counter() - t_start}

    def beside(what: str, fn) -> None:          # theirs, the batch: a failure is a finding too
        try:
            say(f"{what}: running")
            extra[what] = fn()
        except Exception as e:
            skipped[what] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            say(f"{what}: {skipped[what]}")
        save(summary())
    for v in todo:
        spent = time.perf_counter() - t_start
        if rows and spent > budget:
            skipped[v.label] = f"time budget: {spent:.0f} s spent of {budget:.0f} s"
            continue
        say(f"{v.label}: loading")
        session = None
        try:
            with kernels_switch(v.kernels):
                t0 = time.perf_counter()
                session = Session(folder, backend=v.backend, device=device, precision=v.precision,
                                  verify_hashes=False, compile=v.compile)
                if v.graphs != "n/a":
                    session.backend.cuda_graphs = v.graphs == "on"
                row = {**dataclasses.asdict(v), "label": v.label, "backend_described": session.describe()}
                say(f"{v.label}: stages")
                row["stages"] = time_stages(session, repeats, warmup)
                row["load_and_stages_s"] = time.perf_counter() - t0
                say(f"{v.label}: {seconds:g}-second clip end to end")
                row["end_to_end"] = end_to_end(session, video, 0, steps, repeats, warmup)   # seed 0: the same noise
                row["peak_device_bytes"] = timing.cuda_memory()
        except Exception as e:          # one variant's failure is a finding, not the end of the run
            skipped[v.label] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            say(f"{v.label}: {skipped[v.label]}")
            continue
        finally:
            if session is not None:
                session.close()
            session = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        outputs = row["end_to_end"].pop("outputs")
        if (v.backend, v.precision, v.kernels) in (REFERENCE, ("torch", "fp32", "n/a")):
            reference = outputs
        if reference is not None:
            row["snr_vs_torch_fp32_db"] = {k: snr_db(reference[k], outputs[k]) for k in ("latent", "mel", "audio")}
        rows.append(row)
        say(f"{v.label}: end to end {row['end_to_end']['total']['median']:.3f} s")
        save(summary())
        if len(rows) == 1:       # the authors' way right after our reference, before the budget can cut it
            beside("theirs", lambda: theirs_end_to_end(folder, device, video, seconds, repeats, warmup, work))
    if rows:
        best = next(v for v in todo if v.label == choose_ours(rows)["label"])
        beside("batch", lambda: batch_throughput(folder, device, best, video, batch_clips, batch, steps, warmup))
    return summary()


def _ms(stat: dict | None) -> str:
    return "-" if stat is None else f"{stat['median'] * 1e3:.1f}"


def markdown(s: dict) -> str:
    gpu = s["machine"].get("gpu") or "CPU"
    flow = s["model"]["dims"]
    h = s["headline"]

    def sec(x):
        return "not measured" if x is None else f"{x:.3f} s"
    lines = [f"# Device benchmark: {gpu}, {s['size']} model (random weights)", "",
             "| headline | value | from |", "|---|---|---|",
             f"| {h['clip_seconds']:g}-second clip, after decode | {sec(h['ours_after_decode_s'])} | "
             f"{h['variants'].get('ours')} |",
             f"| end to end | {sec(h['ours_end_to_end_s'])} | {h['variants'].get('ours')} |",
             f"| the authors' way, end to end | {sec(h['theirs_end_to_end_s'])} | {h['variants'].get('theirs')} |",
             "| speedup end to end | " + ("-" if h["speedup_end_to_end"] is None else f"{h['speedup_end_to_end']:.1f}x")
             + " | theirs / ours |",
             "| audio SNR vs torch fp32 | "
             + ("reference" if h["audio_snr_db"] is None else f"{h['audio_snr_db']:.1f} dB")
             + f" | {h['variants'].get('ours')} |",
             "| clips per minute in a batch | "
             + ("-" if h["batch_clips_per_min"] is None else f"{h['batch_clips_per_min']:.1f}")
             + f" | {h['variants'].get('batch')} |",
             "", f"Ours: {h.get('chosen_by', '')}.", "",
             f"Flow transformer {flow['num_layers']} x {flow['width']}; a {s['clip_seconds']:g}-second clip, euler "
             f"{s['steps']} steps; milliseconds, median of {s['repeats']}; stages at one window's shapes (vocoder: "
             f"one streamed chunk of {C.VOCODER_CHUNK} mel frames + overlap). torch "
             f"{s['machine']['versions'].get('torch')}. Wall time {s['wall_s']:.0f} s.", "",
             "| variant | " + " | ".join(STAGES) + " | end to end | first chunk | audio SNR vs torch fp32 |",
             "|---" * (len(STAGES) + 4) + "|"]
    for r in s["variants"]:
        e2e = r["end_to_end"]
        snr = r.get("snr_vs_torch_fp32_db", {}).get("audio")
        is_ref = (r["backend"], r["precision"], r["kernels"]) in (REFERENCE, ("torch", "fp32", "n/a"))
        snr_s = ("reference" if is_ref else "-" if snr is None else "identical" if not np.isfinite(snr)
                 else f"{snr:.1f} dB")
        fb = f" ({len(e2e['fallbacks'])} FP32 fallbacks)" if e2e["fallbacks"] else ""
        lines.append(f"| {r['label']} | " + " | ".join(_ms(r["stages"].get(st)) for st in STAGES)
                     + f" | {_ms(e2e['total'])}{fb} | {_ms(e2e['first_chunk'])} | {snr_s} |")
    if s.get("engines"):
        lines.append("\nTensorRT engine builds (s): " + ", ".join(f"{k} {v['seconds']}" for k, v in s["engines"].items()))
    for what, why in s["skipped"].items():
        lines.append(f"\n{what}: not run: {why}")
    return "\n".join(lines)


def write(s: dict, out: Path, name: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(_finite(s), indent=1, default=_json_default, allow_nan=False) + "\n")
    paths["md"].write_text(markdown(s) + "\n")
    return paths


def _precisions(ctx, param, value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in PRECISIONS]
    if bad or not names:
        raise click.BadParameter(f"expected a comma-separated list of {', '.join(PRECISIONS)}, got {value!r}")
    return ("fp32",) + tuple(n for n in names if n != "fp32")          # the reference always runs first


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--size", type=click.Choice(["tiny", "small", "full"]), default="full", show_default=True,
              help="Random weights in the authors' layout.")
@click.option("--device", default=None, help="cuda | cuda:N | cpu (default: cuda where present, else cpu).")
@click.option("--precisions", default=",".join(PRECISIONS), show_default=True, callback=_precisions,
              help="Comma-separated; fp32 always runs (the reference of the SNR column).")
@click.option("--steps", type=int, default=25, show_default=True, help="Euler steps of the end-to-end run.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs of each stage and of the clip.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs before them (0: CI's mode).")
@click.option("--seconds", type=float, default=10.0, show_default=True, help="Length of the synthetic clip.")
@click.option("--budget", type=float, default=330.0, show_default=True,
              help="Seconds after which no further variant starts (the model's making counts).")
@click.option("--batch-clips", type=int, default=8, show_default=True,
              help="Copies of the clip through generate_many for the clips-per-minute figure.")
@click.option("--batch", type=int, default=None, help="Windows per flow-step call there (default: the Session's).")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the model and the clip (kept, so a rerun skips making them). Default: a temporary one.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True)
@click.option("--name", default=None, help="File name stem [device-<gpu or cpu>-<size>].")
@click.option("-q", "--quiet", is_flag=True)
def main(size, device, precisions, steps, repeats, warmup, seconds, budget, batch_clips, batch, work, out, name,
         quiet):
    """Time every stage and a clip end to end at each precision and backend this machine runs."""
    import torch
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    say = Progress(quiet=quiet)
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vssflow-device-")))
        work.mkdir(parents=True, exist_ok=True)
        gpu = (torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu").lower()
        stem = name or f"device-{''.join(c if c.isalnum() else '-' for c in gpu).strip('-')}-{size}"
        summary = run_device_benchmark(size, device, precisions, steps, repeats, warmup, seconds, budget, work, say,
                                       save=lambda s: write(s, Path(out), stem), batch_clips=batch_clips,
                                       batch=batch)
    paths = write(summary, Path(out), stem)
    click.echo(markdown(summary))
    for kind, p in paths.items():
        click.echo(f"{kind}: {p}", err=True)


if __name__ == "__main__":
    sys.exit(main())
