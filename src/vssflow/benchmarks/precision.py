"""`python -m vssflow.benchmarks.precision SIZE`: FP16 against FP32 on the CPU, per stage and end to end.

    OMP_NUM_THREADS=2 python -m vssflow.benchmarks.precision tiny --out /tmp/precision   # minutes
    OMP_NUM_THREADS=2 python -m vssflow.benchmarks.precision full --out /tmp/precision   # hours on 2 cores

Random weights of SIZE in the authors' layout. Per stage: `<stage>.fp16.onnx` (the policy of
`export/precision.py`) against `<stage>.onnx` on ONNX Runtime's CPU provider, on the contract's
sample inputs at the export check's sizes (`compare_graphs`, as `vssflow-export` does), with the
seconds each graph took to trace and its size; the torch half mode against the torch FP32 module
on the same feed (FP16 where torch's CPU kernels finish: tiny, and the matrix-only condition and
flow step; BF16 everywhere). End to end, one 10-second window: random encoder features at the
latent rate, the condition stage, euler from the same noise, the VAE and the vocoder; FP16 graphs
against FP32 graphs through ONNX Runtime, and the torch half mode against torch FP32; SNR of the
final latent, mel and audio. Results are kept in `<out>/<size>/measure.json` (a rerun skips what
is there) and printed as markdown.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import click
import numpy as np

from vssflow.runtime import solvers
from vssflow.runtime.files import write_atomic
from vssflow.runtime.precision import FP16_STAGES, graph_name

CHECK = {"N": 3, "S": 2, "B": 1, "T": 40, "T1": 41, "M": 80}        # the export check's sizes
TORCH_FP16_STAGES = ("condition", "flow_step")   # torch's FP16 CPU kernels: 40-250x slower than FP32 elsewhere


def _log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def _ort_session(path: Path, threads: int):
    from vssflow.runtime.extras import onnxruntime
    ort = onnxruntime()
    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def _torch_run(module, contract, feed) -> list[np.ndarray]:
    import torch
    with torch.inference_mode():
        o = module(*(torch.from_numpy(feed[s.name]) for s in contract.inputs))
    return [x.float().numpy() for x in (o if isinstance(o, tuple) else (o,))]


def _one_stage_at_a_time(load, call):
    """`run(stage, feed)`: `call(runner, stage, feed)` with `load(stage)`'s runner, only one stage
    loaded at a time (the full model's FP32 and FP16 graphs do not fit side by side in 24 GB)."""
    loaded: dict = {}

    def run(stage, feed):
        if stage not in loaded:
            loaded.clear()
            gc.collect()
            loaded[stage] = load(stage)
        return call(loaded[stage], stage, feed)
    return run


def measure(size: str, out: Path, steps: int = 25, threads: int = 2, torch_e2e: bool = True) -> dict:
    import torch

    from vssflow.export import onnx_export as E
    from vssflow.export import precision as P
    from vssflow.export.checkpoint import SYNCHFORMER, read_aux, read_checkpoint, write_random_assets
    from vssflow.export.synchformer import load_synchformer
    from vssflow.runtime.contracts import stage_contracts

    out.mkdir(parents=True, exist_ok=True)
    path = out / "measure.json"
    results = json.loads(path.read_text()) if path.exists() else {}

    def save():
        write_atomic(path, json.dumps(results, indent=1))

    if not (out / "assets" / "model.ckpt").exists():
        write_random_assets(out / "assets", size, 0)
    ckpt = read_checkpoint(out / "assets" / "model.ckpt")
    synch_dims, synch_sd, _ = read_aux(SYNCHFORMER, out / "assets" / "synchformer_state_dict.pth")
    modules = E.stage_modules(ckpt, load_synchformer(synch_sd))
    contracts = stage_contracts(E.model_sizes(ckpt, synch_dims))
    torch.set_num_threads(threads)

    for name in FP16_STAGES:                                  # --- per stage
        if name in results.get("stages", {}):
            continue
        c, m = contracts[name], modules[name]
        p32, p16 = out / graph_name(name), out / graph_name(name, "fp16")
        row = {}
        t0 = time.perf_counter()
        if not p32.exists():
            E.export_onnx(m, c, p32)
        row["export_fp32_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if not p16.exists():
            E.export_half(m, c, p16, E.half_trace_device())
        row["export_fp16_s"] = time.perf_counter() - t0
        row["bytes_fp32"], row["bytes_fp16"] = p32.stat().st_size, p16.stat().st_size
        feed = c.sample("opt", seed=1, **CHECK)
        row["ort_snr"] = {k: a.to_json() for k, a in P.compare_graphs(p32, p16, c, feed=feed, threads=threads).items()}
        ref = _torch_run(m, c, feed)
        for prec in ("fp16", "bf16"):
            if prec == "fp16" and size != "tiny" and name not in TORCH_FP16_STAGES:
                continue
            got = _torch_run(P.half_stage(m, prec), c, feed)
            row[f"torch_{prec}_snr"] = {s.name: P.agreement(r, g).to_json() for s, r, g in zip(c.outputs, ref, got)}
        _log(name, {k: round(v["snr_db"], 1) for k, v in row["ort_snr"].items()})
        results.setdefault("stages", {})[name] = row
        gc.collect()
        save()

    # --- end to end: one window, the same conditions and noise at both precisions
    T = 250
    rng = np.random.default_rng(7)
    cc = contracts["condition"]
    cond_feed = {"clip": rng.standard_normal((1, T, cc.inputs[0].shape[2]), dtype=np.float32),
                 "synch": rng.standard_normal((1, T, cc.inputs[1].shape[2]), dtype=np.float32),
                 "phone_ids": np.concatenate([np.zeros(50), rng.integers(1, 71, 150), np.zeros(50)]
                                             ).astype(np.int64)[None],
                 "speaker": np.zeros((1, cc.inputs[3].shape[1]), np.float32)}
    z0 = np.random.default_rng(0).standard_normal((1, contracts["flow_step"].inputs[0].shape[1], T), dtype=np.float32)

    def e2e(run) -> dict:
        cond_bias, keys, values, _ = run("condition", cond_feed)
        const = {"cond_bias": cond_bias, "keys": keys, "values": values, "cfg": np.array([3.0], np.float32)}

        def velocity(t: float, z: np.ndarray) -> np.ndarray:
            return run("flow_step", {"z": z, "t": np.array([t], np.float32), **const})[0]
        t0 = time.perf_counter()
        z = solvers.solve("euler", velocity, z0, steps)
        loop_s = time.perf_counter() - t0
        mel = run("vae_decoder", {"z": z})[0]
        return {"latent": z, "mel": mel, "audio": run("vocoder", {"mel": mel})[0], "loop_s": loop_s}

    def ort_runner(prec):
        return _one_stage_at_a_time(lambda stage: _ort_session(out / graph_name(stage, prec), threads).run,
                                    lambda runner, stage, feed: runner(None, feed))

    def torch_runner(prec):
        return _one_stage_at_a_time(lambda stage: P.half_stage(modules[stage], prec),
                                    lambda module, stage, feed: _torch_run(module, contracts[stage], feed))

    def compare(ref, got):
        return {k: P.agreement(ref[k], got[k]).to_json() for k in ("latent", "mel", "audio")}

    key = f"e2e_euler{steps}"
    if key not in results:
        _log("end to end: ORT FP32 graphs, then FP16 graphs")
        a32, a16 = e2e(ort_runner("fp32")), e2e(ort_runner("fp16"))
        results[key] = {"ort": compare(a32, a16) | {"loop_s_fp32": a32["loop_s"], "loop_s_fp16": a16["loop_s"]}}
        save()
    half = "fp16" if size == "tiny" else "bf16"          # torch FP16 on a CPU: hours at full size
    if torch_e2e and f"torch_{half}" not in results[key]:
        _log(f"end to end: torch FP32, then {half}")
        t32, t16 = e2e(torch_runner("fp32")), e2e(torch_runner(half))
        results[key][f"torch_{half}"] = compare(t32, t16)
        save()
    return results


def markdown(size: str, results: dict) -> str:
    lines = [f"### {size}", "", "| stage | FP32 MB | FP16 MB | FP16 trace s | ORT FP16 vs FP32 graph, SNR dB | "
             "torch FP16 | torch BF16 |", "|---|---|---|---|---|---|---|"]

    def dbs(d):
        return " / ".join(f"{v['snr_db']:.1f}" if v["finite"] else "NON-FINITE" for v in d.values()) if d else "-"
    for name, r in results["stages"].items():
        lines.append(f"| {name} | {r['bytes_fp32'] / 1e6:.1f} | {r['bytes_fp16'] / 1e6:.1f} | {r['export_fp16_s']:.1f} | "
                     f"{dbs(r['ort_snr'])} | {dbs(r.get('torch_fp16_snr'))} | {dbs(r.get('torch_bf16_snr'))} |")
    for key, d in results.items():
        if key.startswith("e2e"):
            lines += ["", f"{key} (latent / mel / audio SNR dB): " + "; ".join(
                f"{way}: " + " / ".join(f"{d[way][q]['snr_db']:.1f}" for q in ("latent", "mel", "audio"))
                for way in d)]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("size", type=click.Choice(["tiny", "small", "full"]))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Working folder; <out>/<size>/measure.json keeps the results (a rerun resumes).")
@click.option("--steps", type=int, default=25, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--no-torch-e2e", is_flag=True, help="Skip the torch end-to-end pair (slow at full size).")
def main(size, out, steps, threads, no_torch_e2e):
    """FP16 graphs and the torch half mode against FP32: SNR per stage and end to end, sizes, trace times."""
    results = measure(size, Path(out) / size, steps, threads, not no_torch_e2e)
    click.echo(markdown(size, results))


if __name__ == "__main__":
    main()
