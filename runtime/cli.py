"""`vssflow-run VIDEO`: generate the sound track of a silent video (sound effects and speech)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click
import numpy as np

from . import extras
from .backends import BACKENDS, PREPROCESS
from .errors import OutputError, VssflowError, VssflowInputError
from .files import atomic_output
from .output import SOUND_EXTENSIONS, VIDEO_EXTENSIONS, plan_output, write_output
from .precision import PRECISIONS
from .solvers import SOLVERS

EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 1
DEBUG_ENV = "VSSFLOW_DEBUG"          # "1": let unexpected errors end in their traceback


def exit_on_internal_error(tool: str, e: Exception, outcome: str) -> None:
    """An error no check foresaw (a bug, or the machine out of memory): one line and exit 1, or
    its traceback with ``VSSFLOW_DEBUG=1``. ``outcome`` says what became of the output."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        raise e
    if isinstance(e, MemoryError):
        line = f"{tool}: error: out of memory (try a shorter video, --backend ort, or a smaller model)"
    else:
        line = (f"{tool}: internal error: {type(e).__name__}: {e} (a bug; {DEBUG_ENV}=1 shows the traceback, "
                "please report it)")
    click.echo(f"{line}; {outcome}", err=True)
    sys.exit(EXIT_INTERNAL)


def _ensure_demo(model_dir: Path, say) -> None:
    """Export the demo model on first use (needs the export extra: torch, onnx)."""
    if (model_dir / "manifest.json").is_file():
        return
    export_cli = extras.load("export.cli", "export", "no --model given, and exporting the demo model")
    say(f"no model given: exporting the demo model (random weights) to {model_dir}")
    export_cli.export_demo(model_dir, replace=True, progress=lambda m: say(m), verify=not extras.missing("cpu"))


def _raise_on_sigterm() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("video", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model folder from vssflow-export. Default: the demo model (random weights: noise), "
                   "exported on first use.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Output: the sound alone ({', '.join(SOUND_EXTENSIONS)}), or a video "
                   f"({', '.join(VIDEO_EXTENSIONS)}: the input's video stream copied without re-encoding, plus "
                   "the new sound). Default: VIDEO_with_sound.EXT beside the input, in the input's container "
                   "when it can hold the video, else .mkv.")
@click.option("--transcript", default=None, help="Words spoken in the clip (English).")
@click.option("--speech-start", type=float, default=None, help="Second the speech starts (default 0).")
@click.option("--speech-end", type=float, default=None, help="Second the speech ends (default: end of clip, at most 10 s).")
@click.option("--ref-audio", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A recording of the voice to speak with.")
@click.option("--solver", type=click.Choice(SOLVERS), default="euler", show_default=True,
              help="ODE solver; dopri5 reproduces the authors' sampler (slow).")
@click.option("--steps", type=int, default=25, show_default=True, help="Steps of a fixed-step solver.")
@click.option("--cfg", type=float, default=3.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--noise", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Initial latent as .npy [128, 250] (or [windows, 128, 250]), to reproduce a run exactly.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: TensorRT if its engines fit this GPU, else ONNX Runtime, else PyTorch.")
@click.option("--device", default=None, help="cpu or cuda[:N] (default: the best available).")
@click.option("--precision", type=click.Choice(("auto",) + PRECISIONS), default="auto", show_default=True,
              help="auto: fp16 where the backend runs on a GPU (and the model folder has FP16 graphs or "
                   "engines), else fp32. fp16: the FP16 graphs (ort; on a CPU through casts: slow, for checking "
                   "accuracy), the FP16 engines (trt) or the torch modules in half; bf16: torch only. A window "
                   "whose FP16 values are not finite is generated again in FP32, and the summary says so.")
@click.option("--preprocess", type=click.Choice(PREPROCESS), default="auto", show_default=True,
              help="Where frames are resized and normalised: auto: on the GPU when the backend runs on one "
                   "(torch or trt), else on the host. Same result either way; device on a CPU is slow.")
@click.option("--verify", is_flag=True,
              help="Check the sha256 of every model file (by default only files changed since their last check).")
@click.option("--dump-intermediates", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write features, phoneme ids, latents, mel and audio to this .npz for debugging.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def main(video, model_dir, output, transcript, speech_start, speech_end, ref_audio, solver, steps, cfg, seed,
         noise, backend, device, precision, preprocess, verify, dump_intermediates, as_json, quiet):
    """Generate sound effects and speech for VIDEO and write them to a file.

    \b
    Examples:
      vssflow-run clip.mp4 -o clip_with_sound.mp4
      vssflow-run clip.mp4 --model models/vssflow --transcript "hello there" \\
                  --speech-start 1.0 --speech-end 2.5 -o speech.wav
    """
    interactive = sys.stderr.isatty() and not quiet

    def say(msg: str) -> None:
        if not quiet:
            click.echo(f"[vssflow-run] {msg}", err=True)

    _raise_on_sigterm()
    try:
        code = _run(video, model_dir, output, transcript, speech_start, speech_end, ref_audio, solver, steps,
                    cfg, seed, noise, backend, device, precision, preprocess, verify, dump_intermediates, as_json,
                    interactive, say)
    except VssflowError as e:
        click.echo(f"vssflow-run: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("vssflow-run: interrupted; no output was written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException:
        raise
    except Exception as e:                     # outputs go to a temporary name: nothing half-written
        exit_on_internal_error("vssflow-run", e, "no output was written")
    sys.exit(code)


def _run(video, model_dir, output, transcript, speech_start, speech_end, ref_audio, solver, steps, cfg, seed,
         noise, backend, device, precision, preprocess, verify, dump_intermediates, as_json, interactive, say) -> int:
    from .session import Session

    if not video.is_file():
        raise VssflowInputError(f"{video}: no such file")
    plan = plan_output(video, output)
    if plan.note:
        say(plan.note)
    if dump_intermediates is not None and dump_intermediates.suffix != ".npz":
        raise OutputError(f"{dump_intermediates}: intermediates are written as .npz")
    noise_arr = None
    if noise is not None:
        try:
            noise_arr = np.load(noise, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise VssflowInputError(f"{noise}: not a readable .npy array ({e})") from None

    if model_dir is None:
        from .model_folder import demo_model_dir
        model_dir = demo_model_dir()
        _ensure_demo(model_dir, say)
    session = Session(model_dir, backend=backend, device=device, preprocess=preprocess, verify_hashes=verify,
                      precision=None if precision == "auto" else precision)
    for reason in session.backend.passed_over:          # --backend auto: what it could not use, and why
        say(f"backend auto: {reason}")
    bar = None

    said: list[str] = []                                # notes already said as they happened

    def progress(event: dict) -> None:
        if event["kind"] == "fallback" and len(chunks.fallbacks) == 1:      # once, as it happens
            if bar is not None:
                click.echo(file=sys.stderr)
            said.append(chunks.notes[-1])
            say(f"warning: {said[-1]}")
        if bar is not None and event["kind"] == "step":
            bar.label = f"window {event['window'] + 1}/{info.n_windows}"
            bar.update(1)

    chunks, info = session.stream(video, transcript=transcript, speech_start=speech_start, speech_end=speech_end,
                                  solver=solver, steps=steps, cfg=cfg, seed=seed, ref_audio=ref_audio,
                                  noise=noise_arr, keep_intermediates=dump_intermediates is not None,
                                  progress=progress)
    if info.demo_model:
        say("DEMO MODEL: random weights; the sound it makes is noise")
    say(f"{video.name}: {info.duration:.2f} s, {info.n_windows} window(s); backend {info.backend}, "
        f"{solver}{'' if solver == 'dopri5' else f' {steps} steps'}, cfg {cfg}")
    if interactive and solver != "dopri5":
        bar = click.progressbar(length=info.n_windows * steps, label="generating", file=sys.stderr)
        bar.__enter__()
    try:
        samples = write_output(plan, chunks, info.sample_rate)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    for note in chunks.notes:
        if note not in said:
            say(note)
    if dump_intermediates is not None:
        with atomic_output(dump_intermediates) as tmp, open(tmp, "wb") as f:
            np.savez(f, **chunks.intermediates)
    summary = {"output": str(plan.path), "seconds": round(samples / info.sample_rate, 3),
               "sample_rate": info.sample_rate, "windows": info.n_windows, "backend": info.backend,
               "precision": info.precision, "fallbacks": list(chunks.fallbacks),
               "solver": solver, "steps": steps, "cfg": cfg, "seed": seed, "nfe": chunks.nfe,
               "timings": {k: round(v, 4) for k, v in chunks.timings.items()}, "demo_model": info.demo_model,
               "notes": list(chunks.notes)}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        say(f"wrote {plan.path} ({summary['seconds']:.2f} s of audio, {chunks.nfe} flow evaluations)")
    return 0

if __name__ == "__main__":
    main()
