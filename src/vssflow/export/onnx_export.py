"""Trace each stage to ONNX, check it against PyTorch, and write the model folder.

At `--precision fp16` each stage of `FP16_STAGES` also gets `<stage>.fp16.onnx`, the same stage
under the half-precision policy (`export/precision.py`), compared with its FP32 graph on the
contract's sample inputs: the SNR goes into the report, and a half graph that gives a
non-finite value stops the export, naming the stage.

The folder is built under a temporary name beside `out` and renamed into place at the end, so
it is either complete or untouched. `manifest.json` records the model dimensions, the stage
contracts, the graph precisions, every file with its sha256, and the versions used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from vssflow.runtime import extras
from vssflow.runtime.contracts import LATENT_RATE, ModelSizes, StageContract, stage_contracts
from vssflow.runtime.errors import OutputError
from vssflow.runtime.files import atomic_folder
from vssflow.runtime.model_folder import FORMAT_VERSION, sha256, write_stamp
from vssflow.runtime.precision import FP16_STAGES, graph_name, weights_name

from .checkpoint import RAWNET, SYNCHFORMER, AuthorsCheckpoint, build_modules, read_aux, read_checkpoint
from .errors import ExportError
from .flow_step import ConditionStage, FlowStep
from .options import PRECISIONS, ExportOptions

OPSET = 18
STAGES = ("clip_encoder", "synch_encoder", "speaker_encoder", "condition", "flow_step", "vae_decoder", "vocoder")
# Compared by SNR, not max abs error: long convolution stacks (and RawNet3's log filterbank)
# amplify float rounding differences between ONNX Runtime and PyTorch.
SNR_STAGES = ("speaker_encoder", "vae_decoder", "vocoder")
# The export check's sizes: other shapes than the trace's, small enough for any CPU.
CHECK_SIZES = {"N": 3, "S": 2, "B": 1, "T": 40, "T1": 41, "M": 80}


def model_sizes(ckpt: AuthorsCheckpoint, synch_dims) -> ModelSizes:
    d = ckpt.dims
    return ModelSizes(audio_channels=d.audio_channels, width=d.flow.width, layers=d.flow.num_layers,
                      kv_heads=d.flow.num_kv_heads, head_dim=d.flow.head_dim, clip_dim=d.clip.width,
                      synch_dim=synch_dims.embed_dim, speaker_dim=d.conditions.speaker_in,
                      image_size=d.clip.image_size, synch_frames=synch_dims.temporal_tokens * synch_dims.tubelet,
                      condition_channels=d.conditions.channel_dim)


def stage_modules(ckpt: AuthorsCheckpoint, synchformer: torch.nn.Module,
                  rawnet: torch.nn.Module | None = None) -> dict[str, torch.nn.Module]:
    """Every stage's module; `speaker_encoder` only when RawNet3 weights are given."""
    from .rawnet import SpeakerEmbedding
    m = build_modules(ckpt)
    speaker = {} if rawnet is None else {"speaker_encoder": _Batch1(SpeakerEmbedding(rawnet)).eval()}
    return {"clip_encoder": m["clip"], "synch_encoder": synchformer, **speaker,
            "condition": ConditionStage(m["flow"], m["conditions"]).eval(),
            "flow_step": FlowStep(m["flow"], ckpt.dims.audio_channels).eval(),
            "vae_decoder": LatentToMel(m["decoder"]).eval(), "vocoder": m["decoder"].vocoder}


class _Batch1(torch.nn.Module):
    """Adds the leading batch axis of 1 that the condition stage takes: `[D]` -> `[1, D]`."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)[None]


class LatentToMel(torch.nn.Module):
    """The flow model's audio channels `[B, 128, T]` -> log-mel `[B, 4T, 64]`."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder.latent_to_mel(z)


def export_onnx(module: torch.nn.Module, contract: StageContract, path: Path, device: str = "cpu") -> None:
    """Trace `module` (on `device`) into `path`; the graph is checked by onnx's checker."""
    # A small but non-trivial trace shape: the graph is shape-generic along the dynamic axes.
    feed = contract.sample("min", **{a: max(lo, min(hi, 2 if a in ("N", "S", "B") else 30 if a != "T1" else 31))
                                     for a, (lo, _, hi) in contract.axes.items()})
    args = tuple(torch.from_numpy(feed[s.name]).to(device) for s in contract.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=[s.name for s in contract.inputs],
                          output_names=[s.name for s in contract.outputs], dynamic_axes=contract.dynamic_axes(),
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    externalize(path)
    import onnx
    onnx.checker.check_model(str(path), full_check=True)


# Weights of at least EXTERNAL_MIN bytes are moved out of the graph into its weights file
# (`precision.weights_name`), each at an offset that is a multiple of WEIGHTS_ALIGN (a page on
# 4-KiB and 64-KiB page kernels alike), where ONNX Runtime maps them from the file instead of
# reading a copy into its heap: at full size a stage's load then adds a few MiB instead of its
# graph's bytes, and the pages it maps are the page cache's, shared between processes and
# reclaimable. Smaller tensors stay in the graph.
EXTERNAL_MIN = 64 * 1024
WEIGHTS_ALIGN = 64 * 1024
# A metadata entry of the graph: its weights file's sha256, so that the graph's own sha256 (which
# names the TensorRT engines built from it) changes with its weights.
WEIGHTS_SHA256 = "vssflow.weights_sha256"


def externalize(path: Path, min_bytes: int = EXTERNAL_MIN) -> int:
    """Move the initializers of graph file `path` of `min_bytes` or more into its weights file,
    aligned, and record that file's sha256 in the graph; returns the bytes moved (0: no weights
    file is written)."""
    import hashlib

    import onnx
    from onnx.external_data_helper import set_external_data
    model = onnx.load(str(path))
    data = path.with_name(weights_name(path.name))
    digest, moved = hashlib.sha256(), 0
    with open(data, "wb") as f:
        for t in model.graph.initializer:
            if not t.HasField("raw_data") or len(t.raw_data) < min_bytes:
                continue
            pad = b"\0" * (-f.tell() % WEIGHTS_ALIGN)
            f.write(pad)
            digest.update(pad)
            offset = f.tell()
            f.write(t.raw_data)
            digest.update(t.raw_data)
            moved += len(t.raw_data)
            set_external_data(t, data.name, offset, len(t.raw_data))
            t.ClearField("raw_data")
    if not moved:
        data.unlink()
        return 0
    entry = model.metadata_props.add()
    entry.key, entry.value = WEIGHTS_SHA256, digest.hexdigest()
    onnx.save_model(model, str(path))
    return moved


def half_trace_device() -> str:
    """Where the FP16 graphs are traced: tracing runs the half module once, and torch's FP16
    kernels on a CPU without AVX512-FP16 are 40-250x slower than FP32 (minutes per stage at full
    size), so on CUDA when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def half_copy(module: torch.nn.Module, device: str = "cpu") -> Iterator[torch.nn.Module]:
    """The stage under the half-precision policy (`precision.half_stage`) on `device`, freed on exit:
    one copy serves the trace and the export's check."""
    from .precision import half_stage
    half = half_stage(module).to(device)
    try:
        yield half
    finally:
        del half
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def export_half(module: torch.nn.Module, contract: StageContract, path: Path, device: str = "cpu") -> None:
    """`<stage>.fp16.onnx`: the stage under the half-precision policy, traced on `device`."""
    with half_copy(module, device) as half:
        export_onnx(half, contract, path, device)


def check_feed(contract: StageContract) -> dict[str, np.ndarray]:
    """The inputs the export's FP16 check runs both graphs and the half module on."""
    return contract.sample("opt", seed=1, **CHECK_SIZES)


def nonfinite_outputs(half: torch.nn.Module, contract: StageContract, device: str = "cpu") -> list[str]:
    """The outputs of the half module (`half_copy`, on `device`) that are not finite on `check_feed`.

    ONNX Runtime's CPU provider computes a run of FP16 nodes in FP32 and rounds only at the graph's
    casts, so an activation past 65504 inside such a run stays finite there while a GPU (and the
    torch half mode) overflows; the half module stores every activation in half, as a GPU does."""
    feed = check_feed(contract)
    with torch.inference_mode():
        out = half(*(torch.from_numpy(feed[s.name]).to(device) for s in contract.inputs))
    out = out if isinstance(out, tuple) else (out,)
    return [spec.name for spec, o in zip(contract.outputs, out) if not bool(torch.isfinite(o).all())]


def check_half(contract: StageContract, fp32_path: Path, fp16_path: Path, nonfinite: Iterable[str] = ()) -> dict:
    """The FP16 graph against the FP32 graph (ONNX Runtime, CPU) on `check_feed`: output ->
    {snr_db, max_abs_err, finite}, the outputs in `nonfinite` (`nonfinite_outputs` of the module
    traced) counted as not finite. Raises ExportError naming the stage if a value is not finite."""
    from .precision import Agreement, check_fp16, compare_graphs
    report = compare_graphs(fp32_path, fp16_path, contract, feed=check_feed(contract))
    report.update({name: Agreement(float("nan"), float("inf"), False) for name in nonfinite})
    check_fp16(contract.name, report)
    return {k: a.to_json() for k, a in report.items()}


def verify_onnx(module: torch.nn.Module, contract: StageContract, path: Path, sizes: dict) -> dict:
    """Run ONNX Runtime (CPU) beside PyTorch on a sample of other shapes than the trace's."""
    ort = extras.onnxruntime()
    feed = contract.sample("opt", seed=1, **sizes)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feed)
    with torch.no_grad():
        ref = module(*(torch.from_numpy(feed[s.name]) for s in contract.inputs))
    ref = ref if isinstance(ref, tuple) else (ref,)
    report = {}
    for spec, g, r in zip(contract.outputs, got, ref):
        r = r.numpy()
        if g.shape != r.shape:
            raise ExportError(f"{contract.name}: ONNX output {spec.name} has shape {g.shape}, PyTorch {r.shape}")
        err = float(np.abs(g - r).max())
        snr = float(10 * np.log10(np.sum(r.astype(np.float64) ** 2) / max(np.sum((g - r).astype(np.float64) ** 2), 1e-30)))
        report[spec.name] = {"max_abs_err": err, "snr_db": snr}
        ok = snr >= 60 if contract.name in SNR_STAGES else err <= 1e-4 * max(1.0, float(np.abs(r).max()))
        if not ok:
            raise ExportError(f"{contract.name}: ONNX Runtime differs from PyTorch on {spec.name} "
                              f"(max abs err {err:.3g}, SNR {snr:.1f} dB)")
    return report


def _versions() -> dict:
    import onnx
    v = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__}
    if not extras.missing("cpu"):
        v["onnxruntime"] = extras.onnxruntime().__version__
    try:
        import tensorrt
        v["tensorrt"] = tensorrt.__version__
    except ImportError:
        pass
    return v


def check_out(out: Path, replace: bool) -> None:
    """Refuse, with OutputError (exit 5), a model folder that cannot be written, before anything
    is: one that exists (unless ``replace``), or is not a folder, or whose nearest existing
    parent is not a writable folder (`atomic_folder` writes beside it)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.exists() and not replace:
        raise OutputError(f"{out}: already exists; pass --force to replace it")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{out}: cannot be made: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot be written: the folder {parent} is not writable")


def export_random(out: str | os.PathLike, size: str = "tiny", seed: int = 0, *,
                  options: ExportOptions = ExportOptions(), replace: bool = False,
                  progress: Callable[[str], None] = lambda msg: None, note: str = "") -> dict:
    """Random weights of `size` written in the authors' layout (checkpoint, Synchformer, RawNet3),
    exported to `out` and labelled as a demo model (it makes noise)."""
    from .checkpoint import write_random_assets
    check_out(Path(out), replace)                # before the random checkpoint is written
    with tempfile.TemporaryDirectory(prefix="vssflow-random-") as tmp:
        progress(f"writing a {size} random-weight checkpoint (authors' layout)")
        paths = write_random_assets(tmp, size, seed)
        return export_model(paths["checkpoint"], paths["synchformer"], out, rawnet=paths["rawnet"],
                            options=options, replace=replace, progress=progress,
                            extra={"demo": True, "note": note})


def export_model(checkpoint: str | os.PathLike, synchformer: str | os.PathLike, out: str | os.PathLike, *,
                 assets: str | os.PathLike | None = None, rawnet: str | os.PathLike | None = None,
                 options: ExportOptions = ExportOptions(), replace: bool = False,
                 progress: Callable[[str], None] = lambda msg: None, extra: dict | None = None) -> dict:
    """Export every stage into `out`; returns the manifest."""
    out = Path(out)
    check_out(out, replace)
    if options.precision not in PRECISIONS:
        raise ExportError(f"unknown export precision {options.precision!r}: expected {' or '.join(PRECISIONS)}")
    if not 1 <= options.max_seconds <= 10:
        raise ExportError(f"--max-seconds must be between 1 and 10 (one window), got {options.max_seconds}")
    progress("reading checkpoint")
    ckpt = read_checkpoint(checkpoint, assets)
    from .synchformer import load_synchformer
    synch_dims, synch_sd, ignored = read_aux(SYNCHFORMER, synchformer)
    progress(f"Synchformer: {len(synch_sd)} {SYNCHFORMER.keep}* tensors read; {ignored} other "
             f"tensor{'' if ignored == 1 else 's'} ignored (the authors' loader drops them too)")
    synch = load_synchformer(synch_sd)
    rawnet_module = rawnet_sd = None
    if rawnet is not None:
        from .rawnet import load_rawnet
        _, rawnet_sd, _ = read_aux(RAWNET, rawnet, unwrap="model")
        rawnet_module = load_rawnet(rawnet_sd)
        if rawnet_module.dims.out != ckpt.dims.conditions.speaker_in:
            raise ExportError(f"{rawnet}: RawNet3 gives {rawnet_module.dims.out}-d embeddings but the "
                              f"checkpoint's ref_proj takes {ckpt.dims.conditions.speaker_in}")
    sizes = model_sizes(ckpt, synch_dims)
    contracts = stage_contracts(sizes, max_latents=int(round(options.max_seconds * LATENT_RATE)))
    modules = stage_modules(ckpt, synch, rawnet_module)
    contracts = {k: c for k, c in contracts.items() if k in modules}

    with atomic_folder(out, replace=True) as tmp:
        files, report = {}, {}
        half_device = half_trace_device()
        for name in (s for s in STAGES if s in modules and options.graphs):
            t0 = time.perf_counter()
            progress(f"{name}: tracing to ONNX")
            path = tmp / graph_name(name)
            export_onnx(modules[name], contracts[name], path)
            entry = {"seconds": round(time.perf_counter() - t0, 2)}
            if options.verify:
                progress(f"{name}: checking ONNX Runtime against PyTorch")
                entry["parity"] = verify_onnx(modules[name], contracts[name], path, CHECK_SIZES)
            if options.precision == "fp16" and name in FP16_STAGES:
                t0 = time.perf_counter()
                progress(f"{name}: tracing the FP16 graph on {half_device}"
                         + (" (torch's FP16 CPU kernels: minutes at full size)" if half_device == "cpu" else ""))
                half_path = tmp / graph_name(name, "fp16")
                with half_copy(modules[name], half_device) as half:     # one copy: the trace, then the check
                    export_onnx(half, contracts[name], half_path, half_device)
                    entry["fp16"] = {"seconds": round(time.perf_counter() - t0, 2)}
                    overflow = nonfinite_outputs(half, contracts[name], half_device) if options.verify else []
                if options.verify:
                    progress(f"{name}: checking the FP16 graph against the FP32 graph")
                    entry["fp16"]["agreement"] = check_half(contracts[name], path, half_path, overflow)
            report[name] = entry
        if options.torch_weights:
            from .torch_stages import save_weights
            progress("weights.pt: the PyTorch weights for the torch backend")
            save_weights(ckpt, synch_sd, tmp / "weights.pt", rawnet_sd)
        if options.backend in ("trt", "all") and options.graphs:
            from .trt_build import build_engines
            report["tensorrt"] = build_engines(tmp, contracts, options.precision, progress)
        for p in sorted(tmp.iterdir()):
            if p.is_file():
                files[p.name] = {"sha256": sha256(p), "bytes": p.stat().st_size}
        manifest = {
            "format_version": FORMAT_VERSION,
            "dims": ckpt.dims.to_json(),
            "synchformer_dims": dataclasses.asdict(synch_dims),
            "sizes": dataclasses.asdict(sizes),
            "contracts": {k: c.to_json() for k, c in contracts.items()},
            "options": dataclasses.asdict(options),
            # the graph precisions written (runtime.precision.folder_precisions reads this)
            "precisions": [] if not options.graphs else ["fp32", "fp16"] if options.precision == "fp16" else ["fp32"],
            "files": files,
            "versions": _versions(),
            "report": report,
            "source": {"checkpoint": str(checkpoint), "synchformer": str(synchformer)},
            **(extra or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        write_stamp(tmp, sha256(tmp / "manifest.json"), list(files))       # hashed just now
    return manifest
