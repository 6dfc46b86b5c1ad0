"""`vssflow-export`: the authors' checkpoint -> ONNX graphs (and TensorRT engines) in a model folder."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from vssflow.runtime import extras
from vssflow.runtime.errors import VssflowError

from .options import EXPORT_BACKENDS, PRECISIONS, ExportOptions

DEMO_NOTE = "DEMO MODEL: random weights in the authors' layout; it runs the whole pipeline but makes noise."


def export_demo(out: Path, *, replace: bool = False, progress=lambda m: None, backend: str = "onnx",
                precision: str = "fp16", verify: bool = True, torch_weights: bool = False) -> dict:
    """Write a `tiny` random-weight checkpoint in the authors' layout and export it to `out`
    (weights.pt, for the torch backend, only with ``torch_weights``, as for any model)."""
    from .onnx_export import export_random
    options = ExportOptions(precision=precision, backend=backend, verify=verify, torch_weights=torch_weights)
    return export_random(out, "tiny", options=options,
                         replace=replace, progress=progress, note=DEMO_NOTE)


def _summary(manifest: dict, out: Path) -> str:
    rows = [("stage", "file", "MB", "export s", "ORT vs torch", "FP16 MB", "FP16 s", "FP16 vs FP32")]
    for name, entry in manifest["report"].items():
        if name == "tensorrt":
            continue
        f = f"{name}.onnx"
        parity = entry.get("parity", {})
        worst = max((v["max_abs_err"] for v in parity.values()), default=None)
        half = entry.get("fp16")
        half_file = manifest["files"].get(f"{name}.fp16.onnx")
        agreement = (half or {}).get("agreement")
        rows.append((name, f, f"{manifest['files'][f]['bytes'] / 1e6:.1f}", f"{entry['seconds']:.1f}",
                     "-" if worst is None else f"max err {worst:.1e}",
                     "-" if half_file is None else f"{half_file['bytes'] / 1e6:.1f}",
                     "-" if half is None else f"{half['seconds']:.1f}",
                     "-" if half is None else "not checked" if agreement is None else
                     "SNR " + " / ".join(f"{a['snr_db']:.1f}" for a in agreement.values()) + " dB"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    trt = manifest["report"].get("tensorrt")
    if trt is not None:
        lines.append("TensorRT: " + (f"skipped: {trt['skipped']}" if "skipped" in trt else
                                     ", ".join(f"{k} {v['precision']} {v['seconds']} s" for k, v in trt.items())))
    lines += memory_lines(manifest)
    lines.append(f"precisions: {', '.join(manifest.get('precisions', ['fp32']))}")
    lines.append(f"model folder: {out}")
    if manifest.get("demo"):
        lines.append(DEMO_NOTE)
    return "\n".join(lines)


def memory_lines(manifest: dict) -> list[str]:
    """What a run of the folder will hold: on a host per graph precision (ONNX Runtime, planned from
    the graphs' bytes), and on the GPU for the TensorRT engines built (`memory.device_budget`)."""
    from vssflow.runtime.contracts import StageContract
    from vssflow.runtime.memory import device_budget, format_bytes, host_budget
    contracts = {k: StageContract.from_json(k, v) for k, v in manifest["contracts"].items()}
    lines = []
    for precision in manifest.get("precisions") or ["fp32"]:
        b = host_budget(manifest, contracts, precision)
        lines.append(f"host memory, {precision.upper()} graphs (ONNX Runtime; planned): weights {format_bytes(b['weights'])}; "
                     f"runs in --max-memory {format_bytes(b['least'])} or more, {format_bytes(b['least_low'])} "
                     f"loading one stage at a time (--low-memory); without one, up to {format_bytes(b['planned'])}")
    d = device_budget(manifest, contracts)
    if d is not None:
        lines.append(f"GPU memory, TensorRT engines: {format_bytes(d['total'])} (engines {format_bytes(d['weights'])}, "
                     f"shared scratch {format_bytes(d['scratch'])}, inputs at their largest {format_bytes(d['io'])})")
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vssflow", prog_name="vssflow-export", message="%(prog)s %(version)s")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              help="The authors' Lightning checkpoint (.ckpt) holding every trained part.")
@click.option("--synchformer", type=click.Path(dir_okay=False, path_type=Path),
              help="MMAudio's synchformer_state_dict.pth.")
@click.option("--rawnet", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="RawNet3 model.pt (speaker embedding for --ref-audio); optional.")
@click.option("--assets", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The authors' assets folder; its vae/, vocoder/ and transformer config.json override "
                   "what tensor shapes cannot tell (vocoder upsample rates, head size).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp16", show_default=True,
              help="fp16: the FP32 graphs and, beside them, mixed-precision FP16 graphs (<stage>.fp16.onnx: "
                   "weights and matrix products in FP16, norms, softmax, sin/cos, the guidance mix and reductions "
                   "in FP32; inputs and outputs FP32), each checked against its FP32 graph, and FP16 TensorRT "
                   "engines built from them; what `vssflow-run --precision fp16` needs. fp32: FP32 graphs and "
                   "engines only. FP16 graphs are traced on CUDA when there is one; on a CPU tracing runs "
                   "torch's FP16 kernels, slow: about 18 minutes more at full size on 2 cores.")
@click.option("--backend", type=click.Choice(EXPORT_BACKENDS), default="all", show_default=True,
              help="onnx: ONNX files only; trt/all: also TensorRT engines where TensorRT and a GPU exist.")
@click.option("--max-seconds", type=float, default=10.0, show_default=True,
              help="Longest window the graphs accept (1-10 s; 25 latent frames per second).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model folder to write (built under a temporary name, renamed when complete).")
@click.option("--demo", is_flag=True, help="Export a tiny random-weight model (makes noise) to try the pipeline.")
@click.option("--force", is_flag=True, help="Replace an existing model folder (atomically).")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime vs PyTorch check of each stage.")
@click.option("--torch-weights", is_flag=True,
              help="Also write weights.pt, the PyTorch weights the torch backend runs (every weight again: "
                   "about 3 GB at full size).")
@click.option("--engines-for", "engines_for", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Build the TensorRT engines for this GPU and TensorRT from the ONNX graphs of an existing model "
                   "folder, and record them in it: no checkpoint, no PyTorch (TensorRT, Polygraphy and a GPU). "
                   "With --precision (default: fp16 where the folder has FP16 graphs).")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and the summary.")
def main(checkpoint, synchformer, rawnet, assets, precision, backend, max_seconds, out, demo, force,
         no_verify, torch_weights, engines_for, quiet):
    """Export VSSFlow, loaded from the authors' files as they are, into a model folder.

    \b
    Example:
      vssflow-export --checkpoint model.ckpt --synchformer synchformer_state_dict.pth \\
                     --out models/vssflow
      vssflow-export --demo --out models/demo
    """
    def progress(msg: str) -> None:
        if not quiet:
            click.echo(f"[vssflow-export] {msg}", err=True)

    if engines_for is not None:
        if checkpoint or synchformer or rawnet or assets or demo or out or torch_weights:
            raise click.UsageError("--engines-for builds engines from the folder's own graphs: "
                                   "leave out --checkpoint/--synchformer/--rawnet/--assets/--demo/--out/--torch-weights")
        source = click.get_current_context().get_parameter_source("precision")
        build_engines_for(engines_for, None if source == click.core.ParameterSource.DEFAULT else precision, progress)
        return

    with _one_line_errors("nothing was written"):
        extras.require("export", "vssflow-export")
        if not no_verify:
            extras.require("cpu", "checking each graph with ONNX Runtime (or pass --no-verify)")
        if demo:
            if checkpoint or synchformer:
                raise click.UsageError("--demo writes its own random checkpoint: leave out --checkpoint/--synchformer")
            from vssflow.runtime.model_folder import demo_model_dir
            out = out or demo_model_dir()
            manifest = export_demo(out, replace=force, progress=progress, backend=backend, precision=precision,
                                   verify=not no_verify, torch_weights=torch_weights)
        else:
            if checkpoint is None or synchformer is None:
                raise click.UsageError("--checkpoint and --synchformer are required (or --demo)")
            if out is None:
                raise click.UsageError("--out is required")
            from .onnx_export import export_model
            manifest = export_model(checkpoint, synchformer, out, assets=assets, rawnet=rawnet,
                                    options=ExportOptions(precision, backend, max_seconds, not no_verify,
                                                          torch_weights),
                                    replace=force, progress=progress)
    click.echo(_summary(manifest, out))


@contextlib.contextmanager
def _one_line_errors(outcome: str):
    """Every failure as one line and its exit code (`outcome`: what became of the model folder, which
    is written under a temporary name), a bug included; click's own usage errors pass through."""
    try:
        yield
    except VssflowError as e:
        click.echo(f"vssflow-export: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo(f"vssflow-export: interrupted; {outcome}", err=True)
        sys.exit(130)
    except click.ClickException:
        raise
    except Exception as e:
        from vssflow.runtime.cli import exit_on_internal_error
        exit_on_internal_error("vssflow-export", e, outcome)


def build_engines_for(folder: Path, precision: str | None, progress) -> None:
    """`--engines-for`: this GPU's engines from the folder's graphs (`trt_build.engines_for`); one
    line and exit 4 where TensorRT cannot build here, the folder unchanged on any failure."""
    with _one_line_errors("the model folder is unchanged"):
        from .trt_build import engines_for
        report = engines_for(folder, precision, progress)
    built = ", ".join(f"{k} {v['precision']} {v['seconds']} s" for k, v in report.items())
    manifest = json.loads((folder / "manifest.json").read_text())
    click.echo("\n".join([f"TensorRT engines: {built or 'all already there'}", *memory_lines(manifest),
                          f"model folder: {folder}"]))


if __name__ == "__main__":
    main()
