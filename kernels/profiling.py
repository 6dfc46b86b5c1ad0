"""Where one clip's time goes: Session stages, frame preprocessing, and the flow step's operators.

    python -m vssflow.kernels.profiling MODEL_DIR --make-model small     # random weights, once
    python -m vssflow.kernels.profiling MODEL_DIR --backend torch [--video clip.mp4 | --size 1280x720]

Prints one JSON report (the figures of ``kernels/PROFILE.md``):

* ``session``: ``Session.generate`` on a 10-second clip (a warm-up run first, so stage loading is
  not counted): seconds per stage from ``result.timings``, the seconds spent inside
  ``video.windows`` (decode + resize + normalise, the frame preprocessing), and the rest.
* ``frames``: the preprocessing split into decode (to RGB), resize (CLIP's 100 frames, the
  Synchformer's 250) and normalisation, each timed alone on the same clip.
* ``flow_step``: one flow step under ``torch.profiler`` (torch backend) or ONNX Runtime's node
  profiler (ort backend): self time in matrix products, in attention, and outside both, and the
  compute operators per call (on a GPU, each is a kernel launch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from vssflow.runtime import video
from vssflow.runtime.resize import clip_resizer, planar, synch_resizer

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
            "MatMul", "Gemm", "FusedMatMul", "MatMulNBits"}
ATTENTION_MARKS = ("scaled_dot_product", "flash_attention", "efficient_attention", "Attention", "Softmax")
NO_KERNEL_OPS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::transpose", "aten::t",
                 "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze",
                 "aten::as_strided", "aten::permute", "aten::chunk", "aten::split", "aten::_unsafe_view",
                 "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::detach", "aten::alias",
                 "aten::narrow", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh",
                 "aten::unflatten", "aten::flatten", "aten::result_type"}


def make_model(size: str, out: Path) -> None:
    """A random-weight model folder of ``size`` (``tiny``, ``small``, ``full``), ONNX + weights.pt."""
    from vssflow.export.onnx_export import ExportOptions, export_random
    export_random(out, size, options=ExportOptions(backend="onnx"), progress=lambda m: print(m, flush=True))


def synthetic_video(path: Path, seconds: float = 10.0, fps: int = 25, size=(1280, 720)) -> Path:
    """An H.264 clip of moving gradients and noise (so the resize has real work)."""
    import av
    w, h = size
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    texture = rng.integers(0, 48, (h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "18"}
        for i in range(int(seconds * fps)):
            img = np.stack([(x + 4 * i) % 256, (y + 2 * i) % 256, (x + y + i) % 256], -1).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(img + texture, format="rgb24")
            c.mux(s.encode(frame))
        c.mux(s.encode(None))
    return path


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
        picks = {video.clip_frame_index(j, fps) for j in range(video.CLIP_FRAMES)}
        frames = iter(c.decode(s))
        for n in range(video.SYNCH_FRAMES):
            t0 = time.perf_counter()
            frame = next(frames, None)
            if frame is None:
                break
            rgb = frame.to_ndarray(format="rgb24")                     # [H, W, 3] uint8
            t1 = time.perf_counter()
            x = planar(rgb)                                            # [3, H, W] float32
            t2 = time.perf_counter()
            synch.append(synch_resizer(*x.shape[1:])(x))
            t3 = time.perf_counter()
            if n in picks:
                clip.append(clip_resizer(*x.shape[1:])(x))
            t4 = time.perf_counter()
            for k, dt in (("decode_rgb_s", t1 - t0), ("to_planar_s", t2 - t1), ("synch_resize_s", t3 - t2),
                          ("clip_resize_s", t4 - t3)):
                t[k] += dt
    t0 = time.perf_counter()
    video._normalise(np.stack(clip), video.CLIP_MEAN, video.CLIP_STD, divide=True)
    video._normalise(np.stack(synch), (video.SYNCH_MEAN,) * 3, (video.SYNCH_STD,) * 3, divide=False)
    t["normalise_s"] = time.perf_counter() - t0
    return {"size": f"{rgb.shape[1]}x{rgb.shape[0]}", "synch_frames": len(synch), "clip_frames": len(clip),
            **t, "total_s": sum(t.values())}


@contextlib.contextmanager
def _timed_windows(total: list):
    """Time spent inside ``video.windows`` (decode + resize + normalise), summed into total[0]."""
    original = video.windows

    def timed(*args, **kw):
        it = original(*args, **kw)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                total[0] += time.perf_counter() - t0
                return
            total[0] += time.perf_counter() - t0
            yield item
    video.windows = timed
    try:
        yield
    finally:
        video.windows = original


def session_profile(model: Path, backend: str, clip: Path, steps: int, solver: str, repeat: int = 1) -> dict:
    """The fastest of ``repeat`` runs (a shared machine's noise only ever adds time)."""
    from vssflow.runtime.session import Session
    session = Session(model, backend=backend)
    session.generate(clip, steps=1, solver="euler")                     # loads every stage
    best: dict | None = None
    for _ in range(repeat):
        frames = [0.0]
        with _timed_windows(frames):
            t0 = time.perf_counter()
            result = session.generate(clip, steps=steps, solver=solver)
            total = time.perf_counter() - t0
        if best is None or total < best["total_s"]:
            best = {"backend": session.backend.describe(), "solver": solver, "steps": steps, "nfe": result.nfe,
                    "total_s": total, "timings_s": result.timings, "frames_s": frames[0],
                    "other_s": total - sum(result.timings.values()) - frames[0],
                    "flow_step_per_nfe_s": result.timings.get("flow_step", 0.0) / max(result.nfe, 1)}
    return {**best, "runs": repeat}


def _classify(by_op: dict[str, float]) -> dict:
    gemm = sum(v for k, v in by_op.items() if k in GEMM_OPS)
    attn = sum(v for k, v in by_op.items() if k not in GEMM_OPS and any(m in k for m in ATTENTION_MARKS))
    total = sum(by_op.values())
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    return {"total_s": total, "gemm_s": gemm, "attention_s": attn, "other_s": total - gemm - attn,
            "other_share": (total - gemm - attn) / total if total else 0.0,
            "top_ops_s": {k: round(v, 5) for k, v in top}}


def flow_step_torch(model: Path, calls: int = 3) -> dict:
    """Self CPU time per operator over ``calls`` flow steps of the torch modules."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vssflow.export.torch_stages import load_stage_modules
    from vssflow.runtime.model_folder import ModelFolder
    folder = ModelFolder.open(model, verify_hashes=False)
    module = load_stage_modules(folder.file("weights.pt"), "cpu")["flow_step"]
    feed = folder.contracts["flow_step"].sample(B=1, T=250, T1=251)
    args = [torch.from_numpy(v) for v in feed.values()]
    with torch.inference_mode():
        module(*args)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                module(*args)
    by_op: dict[str, float] = defaultdict(float)
    launches = 0
    for e in prof.events():
        by_op[e.name] += e.self_cpu_time_total / 1e6 / calls
        launches += not e.cpu_children and e.name not in NO_KERNEL_OPS
    return {"engine": "torch eager fp32 (CPU)", **_classify(by_op), "compute_ops_per_call": launches / calls}


def flow_step_ort(model: Path, calls: int = 3, threads: int = 0) -> dict:
    """Node time per operator type over ``calls`` flow steps in ONNX Runtime (CPU provider)."""
    import onnxruntime as ort

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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--backend", choices=["torch", "ort"], default="torch")
    ap.add_argument("--video", type=Path, default=None)
    ap.add_argument("--size", default="1280x720", help="synthetic clip size when no --video")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--solver", default="euler")
    ap.add_argument("--repeat", type=int, default=1, help="session runs; the fastest is reported")
    ap.add_argument("--skip-session", action="store_true", help="only frames and the flow step")
    ap.add_argument("--make-model", metavar="SIZE", help="write a random-weight model folder and exit")
    a = ap.parse_args(argv)
    if a.make_model:
        make_model(a.make_model, a.model)
        return
    import torch
    report = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        clip = a.video or synthetic_video(Path(tmp) / "clip.mp4", size=tuple(map(int, a.size.split("x"))))
        report["frames"] = frame_breakdown(clip)
        if not a.skip_session:
            report["session"] = session_profile(a.model, a.backend, clip, a.steps, a.solver, a.repeat)
    if a.backend == "torch":
        report["flow_step"] = flow_step_torch(a.model)
    else:
        report["flow_step"] = flow_step_ort(a.model, threads=int(os.environ.get("OMP_NUM_THREADS", 0)))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
