"""Where one clip's time goes: Session stages, frame preprocessing, and the flow step's operators.

    python -m vssflow.benchmarks.profile MODEL_DIR --make-model small    # random weights, once
    python -m vssflow.benchmarks.profile MODEL_DIR --backend torch [--video clip.mp4 | --size 1280x720]
    python -m vssflow.benchmarks.profile --launches all                  # no model folder needed

Prints one JSON report (the figures of ``kernels/PROFILE.md``). Everything is read through public
hooks: the Session's own per-stage timings (``Result.timings``; ``frames`` is decoding plus host
resizing, ``preprocess`` the device kernels), its progress events, and the stage modules.

* ``session``: ``Session.generate`` on a 10-second clip (a warm-up run first, so stage loading is
  not counted): seconds per stage, seconds of frame preparation, and the rest.
* ``frames``: the preprocessing split into decode (to RGB), resize (CLIP's 100 frames, the
  Synchformer's 250) and normalisation, each timed alone on the same clip.
* ``flow_step``: one flow step under ``torch.profiler`` (torch backend) or ONNX Runtime's node
  profiler (ort backend): self time in matrix products, in attention, and outside both, and the
  compute operators per call (on a GPU, each is a kernel launch).
* ``launches`` (``--launches``, alone): the ATen kernels one flow step launches (as eager torch
  would on a GPU), counted on the meta device (no compute), by kind, for each model size; and the
  solvers' own launches per step. Triton kernels are not ATen ops: on a GPU the flow-step
  profile counts every launch, kernels included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from vssflow.runtime import video
from vssflow.runtime.backends import PREPROCESS
from vssflow.runtime.contracts import CLIP, SYNCH
from vssflow.runtime.resize import planar

from .media import make_video

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
            "MatMul", "Gemm", "FusedMatMul", "MatMulNBits"}
ATTENTION_KERNEL_MARKS = ("flash", "fmha", "attention", "softmax")                      # CUDA kernel names
GEMM_KERNEL_MARKS = ("gemm", "cutlass", "sm90_xmma", "ampere_", "cublas", "nvjet")   # CUDA kernel names
ATTENTION_MARKS = ("scaled_dot_product", "flash_attention", "efficient_attention", "Attention", "Softmax")
# Dispatched ops that launch nothing on a GPU: views, allocations (and .item(), counted as a sync).
NO_KERNEL_OPS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::transpose", "aten::t",
                 "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze",
                 "aten::as_strided", "aten::permute", "aten::chunk", "aten::split", "aten::_unsafe_view",
                 "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::detach", "aten::alias",
                 "aten::narrow", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh",
                 "aten::unflatten", "aten::flatten", "aten::result_type", "aten::unbind",
                 "aten::split_with_sizes", "aten::view_as", "aten::new_empty", "aten::new_empty_strided",
                 "aten::_local_scalar_dense"}


def make_model(size: str, out: Path) -> None:
    """A random-weight model folder of ``size`` (``tiny``, ``small``, ``full``), ONNX + weights.pt."""
    from vssflow.export.onnx_export import ExportOptions, export_random
    export_random(out, size, options=ExportOptions(precision="fp32", backend="onnx", torch_weights=True),
                  progress=lambda m: print(m, flush=True))


def frame_breakdown(path: Path) -> dict:
    """Decode, resize and normalise of one window, timed apart, frame by frame as
    ``video.windows`` runs them (a 25 fps source: every frame feeds the Synchformer, every
    2.5th the CLIP encoder)."""
    import av
    t = defaultdict(float)
    clip, synch = [], []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        fps = float(s.average_rate)
        picks = {video.clip_frame_index(j, fps) for j in range(CLIP.frames)}
        frames = iter(c.decode(s))
        for n in range(SYNCH.frames):
            t0 = time.perf_counter()
            frame = next(frames, None)
            if frame is None:
                break
            rgb = frame.to_ndarray(format="rgb24")                     # [H, W, 3] uint8
            t1 = time.perf_counter()
            x = planar(rgb)                                            # [3, H, W] float32
            t2 = time.perf_counter()
            synch.append(SYNCH.resizer(*x.shape[1:])(x))
            t3 = time.perf_counter()
            if n in picks:
                clip.append(CLIP.resizer(*x.shape[1:])(x))
            t4 = time.perf_counter()
            for k, dt in (("decode_rgb_s", t1 - t0), ("to_planar_s", t2 - t1), ("synch_resize_s", t3 - t2),
                          ("clip_resize_s", t4 - t3)):
                t[k] += dt
    t0 = time.perf_counter()
    CLIP.normalise(np.stack(clip))
    SYNCH.normalise(np.stack(synch))
    t["normalise_s"] = time.perf_counter() - t0
    return {"size": f"{rgb.shape[1]}x{rgb.shape[0]}", "synch_frames": len(synch), "clip_frames": len(clip),
            **t, "total_s": sum(t.values())}


def session_profile(model: Path, backend: str, clip: Path, steps: int, solver: str, repeat: int = 1,
                    preprocess: str = "auto") -> dict:
    """The fastest of ``repeat`` runs (a shared machine's noise only ever adds time), from the
    Session's own record: seconds per stage (``Result.timings``) and, per window, from its
    progress events.

    ``frames_s`` is the time inside ``video.windows``: decode + resize + normalise on the host,
    decode + upload with ``preprocess="device"`` (the kernels are then ``timings_s["preprocess"]``).
    """
    from vssflow.runtime.session import Session
    session = Session(model, backend=backend, preprocess=preprocess)
    session.generate(clip, steps=1, solver="euler")                     # loads every stage
    best: dict | None = None
    for _ in range(repeat):
        per_window: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))

        def progress(event: dict) -> None:
            if event["kind"] == "stage":
                per_window[event["window"]][event["stage"]] += event["seconds"]
        t0 = time.perf_counter()
        result = session.generate(clip, steps=steps, solver=solver, progress=progress)
        total = time.perf_counter() - t0
        if best is None or total < best["total_s"]:
            stages = {k: v for k, v in result.timings.items() if k != "frames"}
            best = {"backend": session.describe(), "solver": solver, "steps": steps, "nfe": result.nfe,
                    "total_s": total, "timings_s": stages, "frames_s": result.timings["frames"],
                    "other_s": total - sum(result.timings.values()),
                    "flow_step_per_nfe_s": result.timings.get("flow_step", 0.0) / max(result.nfe, 1),
                    "per_window_s": {k: dict(v) for k, v in sorted(per_window.items())}}
    return {**best, "runs": repeat}


def _classify(by_op: dict[str, float]) -> dict:
    """Time in attention (first: fused attention kernels may be CUTLASS ones), in matrix
    products, and outside both."""
    def is_attention(k: str) -> bool:
        return k not in GEMM_OPS and (any(m in k for m in ATTENTION_MARKS)
                                      or any(m in k.lower() for m in ATTENTION_KERNEL_MARKS))
    attn = sum(v for k, v in by_op.items() if is_attention(k))
    gemm = sum(v for k, v in by_op.items() if not is_attention(k)
               and (k in GEMM_OPS or any(m in k.lower() for m in GEMM_KERNEL_MARKS)))
    total = sum(by_op.values())
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    return {"total_s": total, "gemm_s": gemm, "attention_s": attn, "other_s": total - gemm - attn,
            "other_share": (total - gemm - attn) / total if total else 0.0,
            "top_ops_s": {k: round(v, 5) for k, v in top}}


def flow_step_torch(model: Path, calls: int = 3, device: str = "cpu", autocast: str | None = None) -> dict:
    """Self time per operator over ``calls`` flow steps of the torch modules.

    On ``cuda``: GPU kernel time per kernel (``torch.profiler`` CUDA activity), and the kernels
    launched per call; elsewhere the ops that would launch one (``count_launches``). ``autocast``: ``bf16`` / ``fp16`` run the step under ``torch.autocast``
    (the precision a GPU would use; the runtime's torch backend itself runs float32).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vssflow.export.torch_stages import load_stage_modules
    from vssflow.runtime.model_folder import ModelFolder
    folder = ModelFolder.open(model, verify_hashes=False)
    module = load_stage_modules(folder.file("weights.pt"), device)["flow_step"]
    feed = folder.contracts["flow_step"].sample(B=1, T=250, T1=251)
    args = [torch.from_numpy(v).to(device) for v in feed.values()]
    cuda = torch.device(device).type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[autocast]
    cast = (torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None
            else contextlib.nullcontext())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode(), cast:
        for _ in range(2):
            module(*args)                                               # warm-up (and cuDNN/cuBLAS picks)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()                                        # wall time, without the profiler
        for _ in range(calls):
            module(*args)
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / calls
        with profile(activities=activities) as prof:
            for _ in range(calls):
                module(*args)
            if cuda:
                torch.cuda.synchronize()
    by_op: dict[str, float] = defaultdict(float)
    launches = 0
    for e in prof.events():
        if cuda:                                                         # GPU kernels: their device time
            if e.device_type == torch.autograd.DeviceType.CUDA:
                by_op[e.name] += e.device_time_total / 1e6 / calls
                launches += 1
        else:
            by_op[e.name] += e.self_cpu_time_total / 1e6 / calls
    if not cuda:
        with cast:
            launches = calls * sum(n for (kind, _), n in count_launches(module, *args).items() if kind != "sync")
    engine = f"torch eager {autocast or 'fp32'} ({device})"
    return {"engine": engine, "wall_per_call_s": wall, **_classify(by_op), "compute_ops_per_call": launches / calls}


def flow_step_ort(model: Path, calls: int = 3, threads: int = 0) -> dict:
    """Node time per operator type over ``calls`` flow steps in ONNX Runtime (CPU provider)."""
    from vssflow.runtime import extras
    ort = extras.onnxruntime()

    from vssflow.runtime.model_folder import ModelFolder
    folder = ModelFolder.open(model, verify_hashes=False)
    feed = folder.contracts["flow_step"].sample(B=1, T=250, T1=251)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads                             # 0: ORT's default
        sess = ort.InferenceSession(str(folder.file("flow_step.onnx")), opts, providers=["CPUExecutionProvider"])
        sess.run(None, feed)
        opts.enable_profiling, opts.profile_file_prefix = True, os.path.join(tmp, "ort")
        sess = ort.InferenceSession(str(folder.file("flow_step.onnx")), opts, providers=["CPUExecutionProvider"])
        sess.run(None, feed)                                            # warm-up, dropped below
        for _ in range(calls):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[1]["ts"] if len(runs) > 1 else 0                      # skip the warm-up run
    by_op: dict[str, float] = defaultdict(float)
    nodes = 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            by_op[e["args"]["op_name"]] += e["dur"] / 1e6 / calls
            nodes += 1
    return {"engine": "onnxruntime CPU, graph optimisations on", **_classify(by_op),
            "compute_ops_per_call": nodes / calls}


# --- kernel launches (no model folder, no compute) -----------------------------------------------

LAUNCH_SIZES = ("tiny", "small", "full")
LAUNCH_KINDS = ("gemm", "attention", "norm", "other")


def _launch_counter():
    """A TorchDispatchMode counting, by (kind, op), the ATen ops that launch a GPU kernel."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LaunchCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts: Counter = Counter()
            self.paused = 0

        def add(self, op: str, kind: str) -> None:
            if not self.paused:
                self.counts[kind, op] += 1

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if name == "aten::_local_scalar_dense":
                self.add(name, "sync")                # .item(): a device-to-host copy and a sync
            elif name not in NO_KERNEL_OPS:
                self.add(name, "gemm" if name in GEMM_OPS else "norm" if "norm" in name else "other")
            return func(*args, **(kwargs or {}))

    return LaunchCounter()


def _fused_attention(counter):
    """A TorchFunctionMode making ``F.scaled_dot_product_attention`` one launch, as the fused
    CUDA kernels are, returning their output layout (``[B, N, H, Dv]`` memory) uncomputed."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class FusedAttention(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is not F.scaled_dot_product_attention:
                return func(*args, **(kwargs or {}))
            counter.add("aten::_scaled_dot_product_flash_attention", "attention")
            q, v = args[0], args[2]
            b, h, n, _ = q.shape
            return torch.empty(b, n, h, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)

    return FusedAttention()


def flow_step_launches(size: str, *, frames: int = 250, batch: int = 1, device: str = "meta",
                       num_layers: int | None = None) -> Counter:
    """``(kind, op) -> launches`` of one ``FlowStep`` call (both CFG passes) of preset ``size``,
    as eager torch issues them: on ``meta`` (shapes only) the reference path, RoPE in torch ops
    (on eager CUDA the RoPE kernel replaces those: ``kernels/PROFILE.md``); attention counts as
    one fused launch."""
    import torch

    from vssflow.export.flow_step import FlowStep
    from vssflow.export.transformer import FlowDims, FlowTransformer
    dims = FlowDims.preset(size)
    if num_layers is not None:
        dims = dataclasses.replace(dims, num_layers=num_layers)
    with torch.device(device), torch.no_grad():
        step = FlowStep(FlowTransformer(dims), 128).eval()
        kv = (dims.num_layers, batch, dims.num_kv_heads, frames + 1, dims.head_dim)
        args = (torch.randn(batch, 128, frames), torch.full((1,), 0.5), torch.randn(batch, frames, dims.width),
                torch.randn(kv), torch.randn(kv), torch.full((1,), 3.0))
        step(*args)                                             # warm-up: fills the table cache
        return count_launches(step, *args)


def count_launches(fn, *args, counter=None) -> Counter:
    """``(kind, op) -> launches`` of one call ``fn(*args)``: the ATen ops that launch a GPU kernel
    (any device; ``meta`` costs nothing), SDPA as one fused launch whose output is left
    uncomputed: count with it, never use its result.

    Under no_grad, not inference_mode: under inference_mode the dispatch mode would see
    composite ops (linear, layer_norm, to) before they decompose into what runs.
    """
    import torch
    counter = counter or _launch_counter()
    counter.counts.clear()
    with torch.no_grad(), _fused_attention(counter), counter:
        fn(*args)
    return counter.counts


def _launch_summary(counts: Counter) -> dict:
    by_kind = {k: sum(v for (kind, _), v in counts.items() if kind == k) for k in LAUNCH_KINDS}
    return {"total": sum(by_kind.values()), **by_kind}


def launch_report(sizes=LAUNCH_SIZES, frames: int = 250) -> dict:
    """Launches per flow step (B = 1, both CFG passes): totals by kind, the launches outside the
    blocks, and per block."""
    from vssflow.export.transformer import FlowDims
    report = {"device": "meta (shapes only; attention as one fused launch; RoPE as torch ops)",
              "batch": 1, "frames": frames, "dtype": "float32"}
    for size in sizes:
        blocks = FlowDims.preset(size).num_layers
        summary = _launch_summary(flow_step_launches(size, frames=frames))
        outside = _launch_summary(flow_step_launches(size, frames=frames, num_layers=0))["total"]
        report[size] = {"blocks": blocks, **summary, "outside_blocks": outside,
                        "per_block": (summary["total"] - outside) / blocks}
    return report


def solver_launches(shape=(1, 128, 250), frozen_channels: int = 1824, steps: int = 25) -> dict:
    """Each solver's own launches on torch tensors ``shape`` (the velocity's ops not counted), as
    the runtime calls ``solvers.solve`` (dopri5 with the condition channels as ``frozen``); each
    ``sync`` is a ``.item()``: the host waits for the device."""
    import torch

    from vssflow.runtime import solvers
    g = torch.Generator().manual_seed(0)
    x0, target = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    frozen = torch.randn(shape[0], frozen_channels, shape[-1], generator=g)
    out = {}
    for name in solvers.SOLVERS:
        counter = _launch_counter()
        accepted, nfe = [0], [0]

        def velocity(t: float, x):                               # its own ops are not counted
            nfe[0] += 1
            counter.paused += 1
            try:
                return (target - x) * (1.0 + math.sin(4.0 * t))
            finally:
                counter.paused -= 1

        def callback(info):
            accepted[0] += 1
        with counter:
            solvers.solve(name, velocity, x0, steps, callback=callback, frozen=frozen)
        counts = counter.counts
        launches = sum(v for (kind, _), v in counts.items() if kind != "sync")
        syncs = sum(v for (kind, _), v in counts.items() if kind == "sync")
        out[name] = {"accepted_steps": accepted[0], "nfe": nfe[0], "launches": launches, "syncs": syncs,
                     "launches_per_step": round(launches / accepted[0], 2),
                     "launches_per_nfe": round(launches / nfe[0], 2),
                     "syncs_per_step": round(syncs / accepted[0], 2),
                     "by_op": {op: n for (_, op), n in counts.most_common()}}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, nargs="?")
    ap.add_argument("--backend", choices=["torch", "ort"], default="torch")
    ap.add_argument("--video", type=Path, default=None)
    ap.add_argument("--size", default="1280x720", help="synthetic clip size when no --video")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--solver", default="euler")
    ap.add_argument("--repeat", type=int, default=1, help="session runs; the fastest is reported")
    ap.add_argument("--preprocess", choices=PREPROCESS, default="auto",
                    help="where the session prepares frames (device: the kernels on a GPU)")
    ap.add_argument("--skip-session", action="store_true", help="only frames and the flow step")
    ap.add_argument("--device", default="cpu", help="device of the flow-step profile (cuda: GPU kernel times)")
    ap.add_argument("--autocast", choices=["bf16", "fp16"], default=None,
                    help="flow-step profile under torch.autocast in this precision")
    ap.add_argument("--make-model", metavar="SIZE", help="write a random-weight model folder and exit")
    ap.add_argument("--launches", metavar="SIZE", choices=LAUNCH_SIZES + ("all",),
                    help="only count the kernel launches of a flow step and of the solvers (no model folder)")
    a = ap.parse_args(argv)
    if a.launches:
        sizes = LAUNCH_SIZES if a.launches == "all" else (a.launches,)
        print(json.dumps({"launches": launch_report(sizes), "solvers": solver_launches(steps=a.steps)}, indent=1))
        return
    if a.model is None:
        ap.error("MODEL_DIR is required unless --launches")
    if a.make_model:
        make_model(a.make_model, a.model)
        return
    import torch
    report = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        clip = a.video
        if clip is None:                           # texture: so decoding does real work
            clip = Path(tmp) / "clip.mp4"
            make_video(clip, 10, 25, tuple(map(int, a.size.split("x"))), texture=48)
        report["frames"] = frame_breakdown(clip)
        if not a.skip_session:
            report["session"] = session_profile(a.model, a.backend, clip, a.steps, a.solver, a.repeat, a.preprocess)
    if a.backend == "torch":
        report["flow_step"] = flow_step_torch(a.model, device=a.device, autocast=a.autocast)
    else:
        report["flow_step"] = flow_step_ort(a.model, threads=int(os.environ.get("OMP_NUM_THREADS", 0)))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
