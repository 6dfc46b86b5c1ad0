"""`python -m vssflow.benchmarks`: ours beside the authors' way, same weights, inputs and noise.

    python -m vssflow.benchmarks --size small --quick          # random weights, CPU-sized
    python -m vssflow.benchmarks --model models/vssflow --backend torch --device cuda
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from vssflow.runtime.solvers import FIXED_STEP_SOLVERS

from .run import DEFAULT_OUT, Progress, run_benchmark
from .settings import BenchSettings


def _ints(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _names(ctx, param, value):
    if value is None:
        return None
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in FIXED_STEP_SOLVERS]
    if bad:
        raise click.BadParameter(f"unknown solver(s) {', '.join(bad)}: choose from {', '.join(FIXED_STEP_SOLVERS)}")
    return names


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Exported model folder (with weights.pt for the baseline). Default: random weights of --size.")
@click.option("--size", type=click.Choice(["tiny", "small", "full"]), default="small", show_default=True,
              help="Random-weight model in the authors' layout, exported once into $VSSFLOW_HOME/bench-models.")
@click.option("--backend", type=click.Choice(["ort", "torch"]), default="ort", show_default=True, help="Ours.")
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA where present). Both ways use it.")
@click.option("--repeats", type=int, default=None, help="Timed runs per light stage (decode, condition, one NFE) [5].")
@click.option("--heavy-repeats", type=int, default=None,
              help="Timed runs of encoders, decoders, ODE loops, end to end [= --repeats; --quick 1].")
@click.option("--warmup", type=int, default=None, help="Untimed runs before the timed ones [1].")
@click.option("--encoder-fraction", type=float, default=None,
              help="Share of a window's frames the encoders run on, scaled up to a window [1; --quick 0.05].")
@click.option("--end-to-end", "end_to_end", type=click.Choice(["measured", "composed"]), default=None,
              help="measured: Session.generate/stream on the clip; composed: sum of stage medians "
                   "[measured; --quick composed].")
@click.option("--solver", type=click.Choice(FIXED_STEP_SOLVERS), default="euler", show_default=True,
              help="Ours, for the headline figures.")
@click.option("--steps", type=int, default=25, show_default=True, help="Ours, for the headline figures.")
@click.option("--sweep-solvers", callback=_names, default=None, help="Quality sweep solvers [euler,midpoint,heun,rk4].")
@click.option("--sweep-steps", callback=_ints, default=None, help="Quality sweep steps [4,8,16,25,32; --quick 4,8].")
@click.option("--video", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Your own clip instead of the synthetic 10-second one.")
@click.option("--seconds", type=float, default=10.0, show_default=True,
              help="Length of the synthetic clip (at most one 10-second window).")
@click.option("--seed", type=int, default=0, show_default=True, help="Weights (random models) and noise.")
@click.option("--no-parity", is_flag=True, help="Skip ours with dopri5 (the same-solver comparison).")
@click.option("--no-isolate", is_flag=True, help="Run both ways in this process (peak memory then shared).")
@click.option("--quick", is_flag=True, help="Cheap settings (see the bracketed defaults) for a slow machine.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True,
              help="Folder for <name>.json, .md and the plot.")
@click.option("--name", default=None, help="File name stem [cpu|cuda-<size or folder>].")
@click.option("--render", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Only rewrite the table and plot of an earlier run's JSON (into --out, same name).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines; the table still prints.")
def main(model, size, backend, device, repeats, heavy_repeats, warmup, encoder_fraction, end_to_end, solver, steps,
         sweep_solvers, sweep_steps, video, seconds, seed, no_parity, no_isolate, quick, out, name, render, quiet):
    """Latency, real-time factor, memory and quality of vssflow beside the authors' way of running VSSFlow."""
    if render is not None:
        import json

        from .report import markdown, write
        summary = json.loads(render.read_text())
        paths = write(summary, out, name or render.stem)
        click.echo(markdown(summary))
        click.echo(f"md: {paths['md']}\nplot: {paths['plot']}", err=True)
        return
    base = BenchSettings.quick_variant() if quick else BenchSettings()
    given = {"repeats": repeats, "warmup": warmup, "encoder_fraction": encoder_fraction,
             "end_to_end": end_to_end, "sweep_solvers": sweep_solvers, "sweep_steps": sweep_steps}
    changes = {k: v for k, v in given.items() if v is not None}
    if heavy_repeats is not None:
        changes["heavy_repeats"] = heavy_repeats
    elif repeats is not None and not quick:
        changes["heavy_repeats"] = repeats
    if encoder_fraction is not None and encoder_fraction < 1 and end_to_end is None:
        changes["end_to_end"] = "composed"
    settings = dataclasses.replace(base, model=model, size=size, backend=backend, device=device, solver=solver,
                                   steps=steps, video=video, seconds=seconds, seed=seed, parity=not no_parity,
                                   isolate=not no_isolate, **changes)
    try:
        settings.check()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    from .report import markdown
    summary, paths = run_benchmark(settings, out, name, Progress(quiet=quiet))
    click.echo(markdown(summary))
    for kind, p in paths.items():
        click.echo(f"{kind}: {p}", err=True)


if __name__ == "__main__":
    main()
