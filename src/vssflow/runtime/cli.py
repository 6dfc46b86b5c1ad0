"""`vssflow-run VIDEO`: generate the sound track of a silent video (sound effects and speech)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import click
import numpy as np

from . import extras
from .backends import BACKENDS, PREPROCESS
from .errors import OutputError, VideoError, VssflowError, VssflowInputError, describe
from .files import atomic_output, check_writable, remove_stale_partials
from .output import INPUT_AUDIO, OUTPUT_FORMATS, SOUND_EXTENSIONS, VIDEO_EXTENSIONS, plan_output, write_output
from .precision import PRECISIONS
from .session import GenerateOptions
from .solvers import SOLVERS

EXIT_INTERRUPTED = 130
EXIT_STDOUT_CLOSED = 141             # 128 + SIGPIPE: what a shell reports for a Unix tool whose reader left
DEBUG_ENV = "VSSFLOW_DEBUG"          # "1": let unexpected errors end in their traceback


def exit_on_internal_error(tool: str, e: Exception, outcome: str) -> None:
    """An error no check foresaw (a bug, or the machine out of memory): one line and exit 1, or
    its traceback with ``VSSFLOW_DEBUG=1``. ``outcome`` says what became of the output."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        raise e
    message, code = describe(e)
    if isinstance(e, MemoryError):
        line = f"{tool}: error: {message}"
    else:
        line = f"{tool}: {message} (a bug; {DEBUG_ENV}=1 shows the traceback, please report it)"
    click.echo(f"{line}; {outcome}", err=True)
    sys.exit(code)


def _ensure_demo(model_dir: Path, say, backend: str) -> None:
    """Export the demo model on first use (needs the export extra: torch, onnx). Its weights.pt
    only where the torch backend is to run it (asked for, or no onnxruntime here), as for any
    model; a demo exported without it is exported again when it is needed."""
    no_ort = bool(extras.missing("cpu"))
    torch_weights = backend == "torch" or no_ort
    manifest = model_dir / "manifest.json"
    if manifest.is_file():
        try:
            if not torch_weights or "weights.pt" in json.loads(manifest.read_text())["files"]:
                return
        except (OSError, ValueError, KeyError, TypeError):
            return                                # damaged: ModelFolder.open says how
    export_cli = extras.load("export.cli", "export", "no --model given, and exporting the demo model")
    say(f"no model given: exporting the demo model (random weights) to {model_dir}")
    export_cli.export_demo(model_dir, replace=True, progress=lambda m: say(m), verify=not no_ort,
                           torch_weights=torch_weights)


def _raise_on_sigterm() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vssflow", prog_name="vssflow-run", message="%(prog)s %(version)s")
@click.argument("videos", metavar="VIDEO...", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model folder from vssflow-export. Default: the demo model (random weights: noise), "
                   "exported on first use.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Output: the sound alone ({', '.join(SOUND_EXTENSIONS)}), or a video "
                   f"({', '.join(VIDEO_EXTENSIONS)}: the input's video stream copied without re-encoding, plus "
                   "the new sound). Default: VIDEO_with_sound.EXT beside the input, in the input's container "
                   "when it can hold the video, else .mkv.")
@click.option("--input-audio", type=click.Choice(INPUT_AUDIO), default="keep", show_default=True,
              help="The input's own sound tracks in a video output: keep copies them (packets as they are) after "
                   "the generated track, which comes first and is the default one, where the container can hold "
                   "their codec; drop leaves them out. Either way one line (and --json's notes) says which.")
@click.option("--transcript", default=None, help="Words spoken in the clip (English).")
@click.option("--speech-start", type=float, default=None, help="Second the speech starts (default 0).")
@click.option("--speech-end", type=float, default=None, help="Second the speech ends (default: end of clip, at most 10 s).")
@click.option("--ref-audio", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A recording of the voice to speak with.")
@click.option("--solver", type=click.Choice(SOLVERS), default="euler", show_default=True,
              help="ODE solver; dopri5 reproduces the authors' sampler (slow).")
@click.option("--steps", type=int, default=25, show_default=True, help="Steps of a fixed-step solver.")
@click.option("--cfg", type=float, default=3.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the initial noise: a whole number from 0 up (a negative one is refused, exit 2); "
                   "the same seed gives the same result.")
@click.option("--noise", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Initial latent as .npy [128, 250] (or [windows, 128, 250]), to reproduce a run exactly.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: TensorRT if its engines fit this GPU, else ONNX Runtime, else PyTorch.")
@click.option("--device", default=None, help="cpu or cuda[:N] (default: the best available).")
@click.option("--precision", type=click.Choice(("auto",) + PRECISIONS), default="auto", show_default=True,
              help="auto: fp16 where ort or trt runs on a GPU (and the model folder has FP16 graphs or "
                   "engines), else fp32 (the torch backend's eager half mode is slower on a GPU). fp16: the FP16 graphs (ort; on a CPU through casts: slow, for checking "
                   "accuracy), the FP16 engines (trt) or the torch modules in half; bf16: torch only. A window "
                   "whose FP16 values are not finite is generated again in FP32, and the summary says so.")
@click.option("--compile", "compile_", is_flag=True,
              help="The torch backend (chosen by it) with its flow step through torch.compile; the compiled "
                   "kernels are cached in ~/.cache/vssflow/inductor (or TORCHINDUCTOR_CACHE_DIR) for later starts. "
                   "The seconds spent compiling are in the run's timings.")
@click.option("--preprocess", type=click.Choice(PREPROCESS), default="auto", show_default=True,
              help="Where frames are resized and normalised: auto: on the GPU when the backend runs on one "
                   "(torch) and Triton is installed for the kernels, else on the host. Same result either "
                   "way; device without Triton (or on a CPU) runs the kernels' slow reference.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Memory the run plans for (e.g. 4G, 3500M): the encoders run in pieces that fit what the "
                   "weights leave, one stage loaded at a time where every stage's weights together do not fit "
                   "(as --low-memory); exit 4 where even the largest stage's do not.")
@click.option("--low-memory", is_flag=True, default=None,
              help="Load one stage at a time (ort, trt): the memory of the largest stage's weights instead of "
                   "every stage's. A clip of one window (up to 10 s) runs as fast; longer clips and batches "
                   "load each window's stages again.")
@click.option("--verify", is_flag=True,
              help="Check the sha256 of every model file (by default only files changed since their last check).")
@click.option("--dump-intermediates", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write features, phoneme ids, latents, mel and audio to this .npz for debugging.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a machine-readable summary on stdout (a batch: one line per item, then a summary line).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Many clips: a CSV or JSON Lines file with a row per item; columns video, and optionally "
                   "transcript, speech_start, speech_end, ref_audio, seed, output (relative paths are relative to "
                   "the manifest).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Many clips: the folder for their results, each named after its input (its stem plus the "
                   "format's extension; a folder's subfolders kept). Made if missing.")
@click.option("--format", "out_format", type=click.Choice(OUTPUT_FORMATS, case_sensitive=False), default=None,
              help="Output format of every result without an explicit name (default: the input's container when "
                   "it can hold the video, else mkv).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Many clips: write a JSON Lines report, one row per item (input, output, status, error, "
                   "exit_code, seconds, nfe, wall), then a summary line.")
@click.option("--skip-existing", is_flag=True, help="Skip items whose output exists (outputs appear only complete).")
@click.option("--batch", "batch", type=click.IntRange(1, None), default=None,
              help="Many clips: windows per flow-step call, of one clip or several (default: 1 on a CPU, where "
                   "it does not pay; the model folder's maximum on a GPU).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Many clips: threads decoding and preparing the next clips while the model runs.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Many clips: run the batch as a Ray Data pipeline of Session actors (pip install "
                   "'vssflow[ray]'); a local Ray instance unless --ray-address.")
@click.option("--ray-address", default=None,
              help="An existing Ray cluster (host:port of its head, or auto); implies --ray. Paths must be on a "
                   "filesystem every node shares.")
@click.option("--ray-workers", type=click.IntRange(1, None), default=None,
              help="Actors, one Session each (default: one per GPU of the cluster, else 1).")
def main(videos, model_dir, output, input_audio, transcript, speech_start, speech_end, ref_audio, solver, steps,
         cfg, seed, noise, backend, device, precision, compile_, preprocess, max_memory, low_memory, verify,
         dump_intermediates,
         as_json, quiet,
         manifest,
         output_dir, out_format, report, skip_existing, batch, workers, use_ray, ray_address, ray_workers):
    """Generate sound effects and speech for VIDEO and write them to a file; or for many clips
    (several VIDEOs, folders searched for videos, or --manifest) into --output-dir.

    \b
    Examples:
      vssflow-run clip.mp4 -o clip_with_sound.mp4
      vssflow-run clip.mp4 --model models/vssflow --transcript "hello there" \\
                  --speech-start 1.0 --speech-end 2.5 -o speech.wav
      vssflow-run clips/ more.mp4 --output-dir out/ --format wav --report report.jsonl
      vssflow-run --manifest clips.csv --output-dir out/ --skip-existing --ray

    \b
    Many clips: one model load; an item that fails is reported (its row has the exit code a
    single run would give) and the others go on. Exit 0 when every item is ok or skipped,
    20 when some failed.

    \b
    --json into a pipe whose reader has left (| head -c1): the run ends quietly with exit
    141, as a Unix tool killed by SIGPIPE (outputs written so far are complete).
    """
    ui = _Ui(interactive=sys.stderr.isatty() and not quiet, quiet=quiet, as_json=as_json)
    model = _Model(model_dir, backend, device, preprocess, verify, None if precision == "auto" else precision,
                   compile_, max_memory, low_memory)
    options = GenerateOptions(transcript, speech_start, speech_end, solver, steps, cfg, seed)
    many = (len(videos) != 1 or any(v.is_dir() for v in videos) or manifest is not None
            or output_dir is not None or report is not None or use_ray or ray_address is not None)
    _raise_on_sigterm()
    try:
        if many:
            if output is not None:
                raise VssflowInputError("-o names the output of one input; with several, use --output-dir DIR")
            if noise is not None or dump_intermediates is not None:
                raise VssflowInputError("--noise and --dump-intermediates are for one input")
            code = _run_batch(videos, model, options, ui, ref_audio=ref_audio, manifest=manifest,
                              output_dir=output_dir, out_format=out_format, report_path=report,
                              skip_existing=skip_existing, batch=batch, workers=workers,
                              use_ray=use_ray or ray_address is not None, ray_address=ray_address,
                              ray_workers=ray_workers, input_audio=input_audio)
        else:
            code = _run(videos[0], model, options, ui, output=output, ref_audio=ref_audio, noise=noise,
                        dump_intermediates=dump_intermediates, out_format=out_format, skip_existing=skip_existing,
                        input_audio=input_audio)
    except VssflowError as e:                  # the one mapping of errors to codes, as a batch's rows use it
        message, code = describe(e)
        click.echo(f"vssflow-run: error: {message}", err=True)
        sys.exit(code)
    except KeyboardInterrupt:
        click.echo("vssflow-run: interrupted; " + ("finished outputs were kept, none was left half-written" if many
                                                   else "no output was written"), err=True)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:                    # stdout's reader is gone (`--json | head -c1`): end quietly
        _stdout_closed()
    except click.ClickException:
        raise
    except Exception as e:                     # outputs go to a temporary name: nothing half-written
        exit_on_internal_error("vssflow-run", e, "no output was written" if not many else
                               "finished outputs were kept, none was left half-written")
    sys.exit(code)


def _stdout_closed() -> None:
    """End as a Unix tool killed by SIGPIPE appears to its shell (exit 141), without a word: the
    reader chose to stop. stdout goes to /dev/null first, or Python's own flush at exit would
    fail on the same closed pipe and print an error."""
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())
    sys.exit(EXIT_STDOUT_CLOSED)


@dataclasses.dataclass(frozen=True)
class _Ui:
    """How a run talks: a progress bar on a terminal, one-line messages on stderr, JSON on stdout."""

    interactive: bool
    quiet: bool
    as_json: bool

    def say(self, msg: str) -> None:
        if not self.quiet:
            click.echo(f"[vssflow-run] {msg}", err=True)


@dataclasses.dataclass(frozen=True)
class _Model:
    """The model folder (None: the demo, exported on first use) and how every item runs on it."""

    folder: Path | None
    backend: str
    device: str | None
    preprocess: str
    verify: bool
    precision: str | None = None        # None: the backend's default (fp16 on a GPU)
    compile: bool = False               # the torch backend's flow step through torch.compile
    max_memory: str | None = None       # what the run plans for, "4G" (`memory.MemoryPlan`)
    low_memory: bool | None = None      # one stage loaded at a time (None: where max_memory needs it)

    def path(self, say) -> Path:
        if self.folder is not None:
            return self.folder
        from .model_folder import demo_model_dir
        _ensure_demo(demo_model_dir(), say, self.backend)
        return demo_model_dir()

    def settings(self) -> dict:
        """The `Session` keywords: here, and for each actor of a `--ray` batch."""
        return dict(backend=self.backend, device=self.device, preprocess=self.preprocess, verify_hashes=self.verify,
                    precision=self.precision, compile=self.compile, max_memory=self.max_memory,
                    low_memory=self.low_memory)

    def session(self, say):
        from .session import Session
        session = Session(self.path(say), **self.settings())
        announce(session, say)
        return session


def announce(session, say) -> None:
    """What a Session just loaded says before it runs (vssflow-run's lines, vssflow-serve's log)."""
    for reason in session.backend.passed_over:          # --backend auto: what it could not use, and why
        say(f"backend auto: {reason}")
    for note in session.backend.notes:                  # e.g. ONNX Runtime's CUDA provider did not load
        say(f"backend {session.backend.name}: {note}")
    if session.memory.low_memory:
        say(f"memory: {session.memory.describe()}")
    if session.folder.is_demo:
        say("DEMO MODEL: random weights; the sound it makes is noise")


def _run(video: Path, model: _Model, options: GenerateOptions, ui: _Ui, *, output, ref_audio, noise,
         dump_intermediates, out_format, skip_existing, input_audio) -> int:
    say = ui.say
    options.check()                                     # before the model loads (or the demo exports)
    if not video.is_file():                             # the video's code (10), as a batch's row and Session say it
        raise VideoError(f"{video}: {'not a regular file' if video.exists() else 'no such file'}")
    plan = plan_output(video, output, format=out_format, input_audio=input_audio)
    check_writable(plan.path.parent)                    # before the model loads, not after generating
    remove_stale_partials(plan.path.parent)             # of a killed run into this folder
    if plan.note:
        say(plan.note)
    if skip_existing and plan.path.exists():
        if ui.as_json:
            click.echo(json.dumps({"output": str(plan.path), "skipped": True}))
        say(f"{plan.path} exists: skipped (--skip-existing)")
        return 0
    if dump_intermediates is not None and dump_intermediates.suffix != ".npz":
        raise OutputError(f"{dump_intermediates}: intermediates are written as .npz")
    noise_arr = None
    if noise is not None:
        try:
            noise_arr = np.load(noise, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise VssflowInputError(f"{noise}: not a readable .npy array ({e})") from None

    session = model.session(say)
    bar = None
    said: list[str] = []                                # notes already said as they happened

    def progress(event: dict) -> None:
        if event["kind"] == "fallback" and len(chunks.fallbacks) == 1:      # once, as it happens
            said.append(chunks.notes[-1])
            if bar is not None:
                bar.say(f"[vssflow-run] warning: {said[-1]}")
            else:
                say(f"warning: {said[-1]}")
        if bar is not None:
            bar.event(event)

    chunks, info = session.stream(video, options, ref_audio=ref_audio, noise=noise_arr,
                                  keep_intermediates=dump_intermediates is not None, progress=progress)
    o = info.options
    say(f"{video.name}: {info.duration:.2f} s, {info.n_windows} window(s); backend {info.backend}, "
        f"{o.solver}{'' if o.solver == 'dopri5' else f' {o.steps} steps'}, cfg {o.cfg}")
    if ui.interactive and o.solver != "dopri5":     # the batch's line, for one item of known windows
        from .progress import BatchProgress
        bar = BatchProgress([video.name], [0], sys.stderr, steps=o.steps, windows=[info.n_windows])
    try:
        samples = write_output(plan, chunks, info.sample_rate)
    finally:
        if bar is not None:
            bar.close()
    notes = [*chunks.notes, *plan.notes]
    for note in notes:
        if note not in said:
            say(note)
    if dump_intermediates is not None:
        with atomic_output(dump_intermediates) as tmp, open(tmp, "wb") as f:
            np.savez(f, **chunks.intermediates)
    summary = {"output": str(plan.path), "seconds": round(samples / info.sample_rate, 3),
               "sample_rate": info.sample_rate, "windows": info.n_windows, "backend": info.backend,
               "precision": info.precision, "fallbacks": list(chunks.fallbacks), "solver": o.solver, "steps": o.steps, "cfg": o.cfg, "seed": o.seed, "nfe": chunks.nfe,
               "timings": {k: round(v, 4) for k, v in chunks.timings.items()}, "demo_model": info.demo_model,
               "notes": notes}
    if ui.as_json:
        click.echo(json.dumps(summary))
    else:
        say(f"wrote {plan.path} ({summary['seconds']:.2f} s of audio, {chunks.nfe} flow evaluations)")
    return 0


def _run_batch(videos, model: _Model, options: GenerateOptions, ui: _Ui, *, ref_audio, manifest, output_dir,
               out_format, report_path, skip_existing, batch, workers, use_ray, ray_address, ray_workers,
               input_audio) -> int:
    """Many clips: plan every item (refusing a batch that cannot run), then run them (here, or on
    Ray), writing a row per item as each is done; exit 0, or EXIT_SOME_FAILED if any failed."""
    import time
    from . import runner
    from .items import plan_items
    from .progress import BatchProgress

    t0 = time.perf_counter()
    per_item = {k: getattr(options, k) for k in ("transcript", "speech_start", "speech_end", "seed")}
    options = dataclasses.replace(options, transcript=None, speech_start=None, speech_end=None)  # per item
    options.check()
    planned = plan_items(list(videos), manifest=manifest, output_dir=output_dir, format=out_format,
                         fields={**per_item, "ref_audio": ref_audio}, report=report_path)
    if input_audio == "drop":                   # plans keep the input's own sound unless told
        planned = [p if p.plan is None else
                   dataclasses.replace(p, plan=dataclasses.replace(p.plan, keep_input_audio=False)) for p in planned]
    if use_ray:
        from . import ray_batch
        ray_batch.check_ray()                       # exit 4 with the install line, before any model loads
    remove_stale_partials(output_dir, recursive=True)        # of a killed run into this folder
    report = runner.Report(report_path, sys.stdout if ui.as_json else None, append=skip_existing)
    known, todo = runner.split(planned, skip_existing)
    bar = BatchProgress([str(p.name) for p in planned], [p.index for p in todo], sys.stderr,
                        steps=None if options.solver == "dopri5" else options.steps) if ui.interactive else None

    def tell(msg: str) -> None:                   # above the progress line, if there is one
        if bar is None:
            ui.say(msg)
        else:
            bar.say(f"[vssflow-run] {msg}")

    def fail(msg: str) -> None:                   # -q or not: a single run's error line
        line = f"vssflow-run: error: {msg}"
        if bar is None:
            click.echo(line, err=True)
        else:
            bar.say(line)

    tell(f"{len(planned)} item(s): {len(todo)} to generate, {sum(r['status'] == 'skipped' for r in known.values())} "
         f"skipped, {sum(r['status'] == 'failed' for r in known.values())} refused")
    rows: list[dict] = []
    try:
        if use_ray:
            from . import ray_batch
            stream = ray_batch.run_ray(planned, known, todo, model.path(tell), options, session=model.settings(),
                                       address=ray_address, workers=ray_workers, batch=batch,
                                       status=bar.note if bar is not None else None)
        else:
            session = model.session(tell)
            stream = runner.merge(planned, known, runner.run_local(
                session, todo, options, batch=batch, workers=workers,
                progress=bar.event if bar is not None else None))
        for r in stream:
            rows.append(r)
            report.write(r)
            if bar is not None:
                bar.row(r)
            if r["status"] == "failed":
                fail(r["error"] if str(planned[r["index"]].name) in r["error"]
                     else f"{planned[r['index']].name}: {r['error']}")
            else:
                tell(_row_line(planned[r["index"]].name, r))
        done = runner.summary(rows, time.perf_counter() - t0)
        report.write(done)
    finally:
        if bar is not None:
            bar.close()
        report.close()
    tell(f"{done['ok']} ok, {done['skipped']} skipped, {done['failed']} failed; "
         f"{done['seconds']:.2f} s of audio in {done['wall']:.1f} s")
    return done["exit_code"]


def _row_line(name, r: dict) -> str:
    if r["status"] == "ok":
        return f"ok {name} -> {r['output']} ({r['seconds']:.2f} s)" + "".join(f"; {n}" for n in r.get("notes") or ())
    return f"skipped {name}: {r['output']} exists"


if __name__ == "__main__":
    main()
