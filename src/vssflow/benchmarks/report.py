"""Turn the two ways' measurements into figures: ratios, end to end, SNR; JSON, markdown and a plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from vssflow.runtime import contracts as C

from .timing import fmt_seconds

RANDOM_WEIGHTS_NOTE = ("With random weights the SNR figures measure each solver's error on this model's vector "
                       "field against the authors' dopri5 solution from the same noise, not audio quality.")

# (key, label, what ours runs, what theirs runs) in pipeline order.
STAGES = (
    ("decode", "video decode + frame preparation", "runtime", "same code (counted in both)"),
    ("clip_encoder", "CLIP encoder, per window", "", "eager torch fp32"),
    ("synch_encoder", "Synchformer encoder, per window", "", "eager torch fp32"),
    ("condition", "condition", "projections + fold + K/V cache", "projections"),
    ("flow_step", "one function evaluation (NFE)", "batched CFG, folded, cached", "2 unbatched passes, whole state"),
    ("sampling", "ODE loop, whole window", "", ""),
    ("vae_decoder", "VAE decoder, per window", "", "eager torch fp32"),
    ("vocoder", "vocoder, per window", "", "one call, whole window"),
)


def snr_db(reference: np.ndarray, x: np.ndarray) -> float:
    """`10 log10(sum ref^2 / sum (x - ref)^2)` in float64; inf when identical."""
    ref = np.asarray(reference, np.float64)
    err = np.sum((np.asarray(x, np.float64) - ref) ** 2)
    if err == 0:
        return math.inf
    return float(10 * np.log10(np.sum(ref ** 2) / err))


def median(stat: dict | None) -> float | None:
    return None if stat is None else stat["median"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def end_to_end(stages: dict, decode: dict, flow_stage: str = "sampling", vocoder: str = "vocoder",
               first_vocoder: str | None = None) -> dict:
    """Per-window seconds composed from stage medians (total, and to the first audio)."""
    parts = [median(decode), *(median(stages[k]) for k in ("clip_encoder", "synch_encoder", "condition",
                                                           flow_stage, "vae_decoder"))]
    before_audio = sum(parts)
    total = before_audio + median(stages[vocoder])
    first = before_audio + (median(stages[first_vocoder]) if first_vocoder else median(stages[vocoder]))
    return {"total": {"median": total}, "first_chunk": {"median": first}, "how": "composed from stage medians"}


def summarize(settings, machine: dict, model: dict, ours: dict, theirs: dict, wall_s: float,
              audio_seconds: float = C.WINDOW_SECONDS) -> dict:
    """Every figure of the run as one JSON-ready dict (arrays dropped, SNRs computed)."""
    ref_latent, ref_mel = theirs["latent"], theirs["mel"]
    sweep = []
    for r in ours["sweep"]:
        sweep.append({"solver": r["solver"], "steps": r["steps"], "nfe": r["nfe"], "loop": r["loop"],
                      "latent_snr_db": snr_db(ref_latent, r["latent"]), "mel_snr_db": snr_db(ref_mel, r["mel"]),
                      "headline": r["headline"]})
    head = next(r for r in sweep if r["headline"])
    parity = None
    if ours.get("parity"):
        p = ours["parity"]
        parity = {"nfe": {"ours": p["nfe"], "theirs": theirs["nfe"]}, "ours": p["loop"],
                  "theirs": theirs["stages"]["sampling"],
                  "ratio": _ratio(median(p["loop"]), median(theirs["stages"]["sampling"])),
                  "latent_snr_db": snr_db(ref_latent, p["latent"]), "mel_snr_db": snr_db(ref_mel, p["mel"])}

    stages = {}
    for key, *_ in STAGES:
        o = ours["stages"].get(key)
        t = theirs["stages"].get(key) if key != "decode" else o
        stages[key] = {"ours": o, "theirs": t, "ratio": _ratio(median(o), median(t))}
    stages["sampling"]["nfe"] = {"ours": ours["nfe"], "theirs": theirs["nfe"]}
    o, t = ours["stages"]["flow_step_in_loop"], theirs["stages"]["flow_step_in_loop"]
    stages["flow_step_in_loop"] = {"ours": o, "theirs": t, "ratio": _ratio(median(o), median(t)),
                                   "note": "every call inside the timed ODE loops (the sampling stage)"}
    stages["vocoder"]["ours_per_chunk"] = ours["stages"]["vocoder_chunk"]
    stages["vocoder"]["chunks"] = ours["vocoder_chunks"]

    if settings.end_to_end == "measured":
        e2e_ours, e2e_theirs = ours["end_to_end"], theirs["end_to_end"]
    else:
        e2e_ours = end_to_end(ours["stages"], ours["stages"]["decode"], first_vocoder="vocoder_first_chunk")
        e2e_theirs = end_to_end(theirs["stages"], ours["stages"]["decode"])
    seconds = audio_seconds
    e2e = {
        "audio_seconds": seconds,
        "how": e2e_ours["how"],
        "ours": e2e_ours, "theirs": e2e_theirs,
        "ratio": _ratio(median(e2e_ours["total"]), median(e2e_theirs["total"])),
        "rtf": {"ours": median(e2e_ours["total"]) / seconds, "theirs": median(e2e_theirs["total"]) / seconds},
        "first_chunk_ratio": _ratio(median(e2e_ours["first_chunk"]), median(e2e_theirs["first_chunk"])),
    }
    fp16 = ours.get("fp16", {})
    if "variants" in fp16:
        base = fp16["variants"]["fp32"]
        fp16 = {"solver": fp16["solver"], "steps": fp16["steps"], "variants": {
            k: {"loop_s": v["loop_s"], "latent_snr_vs_dopri5_db": snr_db(ref_latent, v["latent"]),
                "mel_snr_vs_dopri5_db": snr_db(ref_mel, v["mel"]),
                "latent_snr_vs_fp32_db": snr_db(base["latent"], v["latent"]),
                "mel_snr_vs_fp32_db": snr_db(base["mel"], v["mel"])} for k, v in fp16["variants"].items()}}
    return {
        "title": "vssflow benchmark: ours beside the authors' way, same weights, inputs and noise",
        "note": RANDOM_WEIGHTS_NOTE if model.get("random_weights") else None,
        "machine": machine,
        "settings": settings.to_json(),
        "model": model,
        "ours": {"backend": ours["backend"], "load_s": ours["load_s"], "solver": settings.solver,
                 "steps": settings.steps, "nfe": ours["nfe"], "peak_rss_bytes": ours["peak_rss_bytes"],
                 "peak_device_bytes": ours["peak_device_bytes"]},
        "theirs": {"way": "eager torch fp32, two unbatched CFG passes per NFE, nothing cached or folded, "
                          "dopri5 rtol=atol=1e-5 on linspace(0, 1, 11)",
                   "device": theirs["device"], "load_s": theirs["load_s"], "solver": "dopri5", "nfe": theirs["nfe"],
                   "peak_rss_bytes": theirs["peak_rss_bytes"], "peak_device_bytes": theirs["peak_device_bytes"],
                   "torch_threads": theirs["torch_threads"]},
        "stages": stages,
        "end_to_end": e2e,
        "headline": {"solver": settings.solver, "steps": settings.steps, "nfe": head["nfe"],
                     "theirs_nfe": theirs["nfe"], "end_to_end_ratio": e2e["ratio"],
                     "end_to_end_speedup": None if not e2e["ratio"] else 1 / e2e["ratio"],
                     "sampling_ratio": stages["sampling"]["ratio"], "flow_step_ratio": stages["flow_step"]["ratio"],
                     "flow_step_in_loop_ratio": stages["flow_step_in_loop"]["ratio"],
                     "latent_snr_db": head["latent_snr_db"], "mel_snr_db": head["mel_snr_db"],
                     "same_solver_sampling_ratio": parity["ratio"] if parity else None},
        "quality": {"reference": {"solver": "dopri5", "nfe": theirs["nfe"], "loop": theirs["stages"]["sampling"]},
                    "sweep": sweep, "parity": parity, "fp16": fp16},
        "wall_seconds": wall_s,
    }


# --- markdown -------------------------------------------------------------------------------------

def _s(stat: dict | None) -> str:
    if stat is None:
        return "-"
    if stat.get("n", 1) <= 1 or "min" not in stat:
        return fmt_seconds(stat["median"])
    return f"{fmt_seconds(stat['median'])} ({fmt_seconds(stat['min'])}-{fmt_seconds(stat['max'])})"


def _r(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.3f} ({1 / ratio:.1f}x)" if ratio else "-"


def _db(x: float | None) -> str:
    return "exact" if x is None or math.isinf(x) else f"{x:.1f}"          # None: infinity read back from JSON


def _mb(b: int | None) -> str:
    return "-" if b is None else f"{b / 2 ** 20:,.0f} MiB"


def markdown(s: dict) -> str:
    st, e2e, h, m = s["stages"], s["end_to_end"], s["headline"], s["machine"]
    cfg = s["settings"]
    lines = [f"# {s['title']}", ""]
    lines.append(f"Machine: {m['cpu']}, {m['cpu_affinity'] or m['cpu_count']} cores"
                 + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
                 + (f"; 1-min load average {m['load_average'][0]:.1f} at start, "
                    f"{m['load_average_end'][0]:.1f} at end" if m.get("load_average") and m.get("load_average_end")
                    else ""))
    lines.append(f"Model: {s['model']['name']} ({s['model']['describe']}). Ours: {s['ours']['backend']}, "
                 f"{h['solver']} {h['steps']} steps. Theirs: {s['theirs']['way']} ({s['theirs']['device']}).")
    lines.append(f"Timings: median (min-max) of {cfg['repeats']} runs (light stages) / {cfg['heavy_repeats']} "
                 f"(encoders, decoders, loops), after {cfg['warmup']} warm-up run(s)"
                 + ("; heavy stages warmed up on a small input" if cfg["light_warmup"] else "")
                 + ". The timed runs of each stage alternate between the two ways, so both see the same load.")
    if cfg["encoder_fraction"] < 1:
        lines.append(f"Encoders run on {cfg['encoder_fraction']:.0%} of a window's frames/segments; their "
                     "per-window times are scaled up linearly (frames and segments are independent).")
    lines += ["", "## Headline", ""]
    lines.append(f"**{h['solver']} {h['steps']} steps ({h['nfe']} NFE) vs the authors' dopri5 ({h['theirs_nfe']} NFE): "
                 f"end to end {h['end_to_end_speedup']:.1f}x faster (ours/theirs = {h['end_to_end_ratio']:.3f}), "
                 f"ODE loop {1 / h['sampling_ratio']:.1f}x, per NFE {1 / h['flow_step_ratio']:.1f}x as single calls"
                 + (f" ({1 / h['flow_step_in_loop_ratio']:.1f}x inside the loops)" if h.get("flow_step_in_loop_ratio")
                    else "") + "; "
                 f"it costs {_db(h['latent_snr_db'])} dB latent SNR and {_db(h['mel_snr_db'])} dB log-mel SNR "
                 "against the dopri5 result.**"
                 + (f" With the authors' solver on both sides, ours is {1 / h['same_solver_sampling_ratio']:.1f}x "
                    "faster in the ODE loop." if h.get("same_solver_sampling_ratio") else ""))
    if s.get("note"):
        lines += ["", f"> {s['note']}"]
    lines += ["", "## Per stage (one 10-second window)", "",
              "| stage | ours | theirs | ours/theirs (speed-up) | ours runs | theirs runs |",
              "|---|---|---|---|---|---|"]
    for key, label, how_ours, how_theirs in STAGES:
        row = st[key]
        if key == "sampling":
            n = row["nfe"]
            how_ours, how_theirs = f"{h['solver']} {h['steps']} steps, {n['ours']} NFE", f"dopri5, {n['theirs']} NFE"
        if key == "vocoder":
            how_ours = f"{row['chunks']} chunks, {_s(row['ours_per_chunk'])} each"
        ratio = "-" if key == "decode" else _r(row["ratio"])
        theirs = "(same)" if key == "decode" else _s(row["theirs"])
        lines.append(f"| {label} | {_s(row['ours'])} | {theirs} | {ratio} | {how_ours} | {how_theirs} |")
        if key == "flow_step":
            loop = st["flow_step_in_loop"]
            lines.append(f"| one NFE, every call inside the timed ODE loops | {_s(loop['ours'])} n={loop['ours']['n']} | "
                         f"{_s(loop['theirs'])} n={loop['theirs']['n']} | {_r(loop['ratio'])} | | |")
    how = e2e["how"]
    lines.append(f"| **end to end** ({how}) | {_s(e2e['ours']['total'])} | {_s(e2e['theirs']['total'])} | "
                 f"{_r(e2e['ratio'])} | | |")
    lines.append(f"| real-time factor (s per s of audio) | {e2e['rtf']['ours']:.3f} | {e2e['rtf']['theirs']:.3f} | | | |")
    lines.append(f"| first-chunk latency ({how}) | {_s(e2e['ours']['first_chunk'])} | "
                 f"{_s(e2e['theirs']['first_chunk'])} | {_r(e2e['first_chunk_ratio'])} | first vocoder chunk | "
                 "audio only at the end |")
    if cfg["encoder_fraction"] < 1:
        rss_note = " (encoders on the reduced batch: a whole window's encoder activations need more)"
    else:
        rss_note = ""
    lines.append(f"| peak host RSS{rss_note} | {_mb(s['ours']['peak_rss_bytes'])} | "
                 f"{_mb(s['theirs']['peak_rss_bytes'])} | | {'own process' if cfg['isolate'] else 'shared process'} | |")
    lines.append(f"| peak device memory | {_mb(s['ours']['peak_device_bytes'])} | "
                 f"{_mb(s['theirs']['peak_device_bytes'])} | | torch CUDA only | |")

    q = s["quality"]
    lines += ["", "## Quality against steps (vs the authors' dopri5, same noise and conditions)", "",
              "| solver | steps | NFE | ODE loop | latent SNR (dB) | log-mel SNR (dB) |", "|---|---|---|---|---|---|"]
    for r in q["sweep"]:
        mark = " **(default)**" if r["headline"] else ""
        lines.append(f"| {r['solver']}{mark} | {r['steps']} | {r['nfe']} | {_s(r['loop'])} | "
                     f"{_db(r['latent_snr_db'])} | {_db(r['mel_snr_db'])} |")
    ref, par = q["reference"], q.get("parity")
    if par:
        lines.append(f"| dopri5 (ours: the runtime's graphs) | adaptive | {par['nfe']['ours']} | {_s(par['ours'])} | "
                     f"{_db(par['latent_snr_db'])} | {_db(par['mel_snr_db'])} |")
    lines.append(f"| dopri5 (theirs, reference) | adaptive | {ref['nfe']} | {_s(ref['loop'])} | reference | reference |")
    if par:
        lines += ["", f"Same solver on both sides (dopri5, {par['nfe']['ours']} vs {par['nfe']['theirs']} NFE): ours/theirs = "
                  f"{_r(par['ratio'])}; the folded, cached, batched graphs match the authors' computation to "
                  f"{_db(par['latent_snr_db'])} dB (latent), so the SNR figures above are the solvers' own error."]
    lines += ["", "ODE loop: ours through the runtime's backend, the configurations one after another (the "
              "default one again, so its time here may differ from the per-stage table's); encoders and decoders "
              "are the same for every solver and not included.", f"_{RANDOM_WEIGHTS_NOTE}_", ""]
    fp16 = q["fp16"]
    lines += ["## FP16 vs FP32", ""]
    if "skipped" in fp16:
        lines.append(f"Skipped: {fp16['skipped']}.")
    else:
        lines += [f"{fp16['solver']} {fp16['steps']} steps, torch CUDA.", "",
                  "| variant | ODE loop | latent SNR vs dopri5 | log-mel SNR vs dopri5 | latent SNR vs fp32 "
                  "| log-mel SNR vs fp32 |",
                  "|---|---|---|---|---|---|"]
        for k, v in fp16["variants"].items():
            lines.append(f"| {k} | {fmt_seconds(v['loop_s'])} | {_db(v['latent_snr_vs_dopri5_db'])} | "
                         f"{_db(v['mel_snr_vs_dopri5_db'])} | {_db(v['latent_snr_vs_fp32_db'])} | "
                         f"{_db(v['mel_snr_vs_fp32_db'])} |")
    lines += ["", f"Whole benchmark: {s['wall_seconds']:.0f} s wall.", ""]
    return "\n".join(lines)


# --- plot -----------------------------------------------------------------------------------------

def _points(s: dict) -> dict[str, list[tuple[float, float, int]]]:
    series: dict[str, list[tuple[float, float, int]]] = {}
    for r in s["quality"]["sweep"]:
        snr = math.inf if r["latent_snr_db"] is None else r["latent_snr_db"]
        series.setdefault(r["solver"], []).append((r["loop"]["median"], snr, r["steps"]))
    return {k: sorted(v, key=lambda p: p[2]) for k, v in series.items()}          # in order of steps


def plot(s: dict, path: Path) -> Path:
    """Latent SNR against ODE-loop seconds per solver, dopri5's time marked; PNG via matplotlib, else SVG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg(s, path.with_suffix(".svg"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for solver, pts in _points(s).items():
        xs, ys, ns = zip(*[(x, min(y, 200), n) for x, y, n in pts])
        ax.plot(xs, ys, marker="o", label=solver)
        for x, y, n in zip(xs, ys, ns):
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ref = s["quality"]["reference"]["loop"]["median"]
    ax.axvline(ref, color="grey", linestyle="--", label=f"authors' dopri5 ({fmt_seconds(ref)})")
    ax.set_xscale("log")
    ax.set_xlabel("ODE loop, seconds (log)")
    ax.set_ylabel("latent SNR vs dopri5, dB")
    ax.set_title("Quality vs time (labels: steps). Random weights: solver error on the vector field", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def _tick(x: float) -> str:
    return f"{x:g} s" if x >= 1 else f"{x * 1e3:g} ms"


def _svg(s: dict, path: Path) -> Path:
    """The same plot as a hand-written SVG (no plotting library needed)."""
    series = _points(s)
    ref = s["quality"]["reference"]["loop"]["median"]
    xs = [p[0] for pts in series.values() for p in pts] + [ref]
    ys = [min(p[1], 200) for pts in series.values() for p in pts]
    W, H, L, R, T, B = 720, 450, 70, 170, 40, 55
    lx0, lx1 = math.log10(min(xs)) - 0.05, math.log10(max(xs)) + 0.05
    y0, y1 = math.floor(min(ys) / 10) * 10, math.ceil(max(ys) / 10) * 10 + (10 if max(ys) == min(ys) else 0)

    def px(x):
        return L + (math.log10(x) - lx0) / (lx1 - lx0) * (W - L - R)

    def py(y):
        return H - B - (min(y, 200) - y0) / (y1 - y0) * (H - T - B)

    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
          f'<rect width="{W}" height="{H}" fill="white"/>',
          f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="12">Quality vs time (labels: steps). '
          'Random weights: solver error on the vector field</text>',
          f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
          f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
          f'<text x="{(L + W - R) / 2}" y="{H - 15}" text-anchor="middle">ODE loop, seconds (log scale)</text>',
          f'<text x="18" y="{(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 18 {(T + H - B) / 2})">'
          'latent SNR vs dopri5 (dB)</text>']
    for y in range(int(y0), int(y1) + 1, max(10, int((y1 - y0) / 6) // 10 * 10)):
        el.append(f'<line x1="{L - 4}" y1="{py(y):.1f}" x2="{W - R}" y2="{py(y):.1f}" stroke="#ddd"/>')
        el.append(f'<text x="{L - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y}</text>')
    for e in range(math.floor(lx0), math.ceil(lx1) + 1):
        for mant in (1, 2, 5):
            x = mant * 10.0 ** e
            if lx0 <= math.log10(x) <= lx1:
                el.append(f'<line x1="{px(x):.1f}" y1="{H - B}" x2="{px(x):.1f}" y2="{H - B + 4}" stroke="black"/>')
                el.append(f'<text x="{px(x):.1f}" y="{H - B + 16}" text-anchor="middle">{_tick(x)}</text>')
    el.append(f'<line x1="{px(ref):.1f}" y1="{T}" x2="{px(ref):.1f}" y2="{H - B}" stroke="grey" stroke-dasharray="5,4"/>')
    for i, (solver, pts) in enumerate(series.items()):
        c = _COLOURS[i % len(_COLOURS)]
        path_d = " ".join(f"{'M' if j == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for j, (x, y, _) in enumerate(pts))
        el.append(f'<path d="{path_d}" fill="none" stroke="{c}" stroke-width="1.5"/>')
        for x, y, n in pts:
            el.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>')
            el.append(f'<text x="{px(x) + 4:.1f}" y="{py(y) - 4:.1f}" font-size="9">{n}</text>')
        el.append(f'<rect x="{W - R + 15}" y="{T + 18 * i}" width="12" height="3" fill="{c}"/>')
        el.append(f'<text x="{W - R + 32}" y="{T + 18 * i + 5}">{solver}</text>')
    k = len(series)
    el.append(f'<line x1="{W - R + 15}" y1="{T + 18 * k + 1}" x2="{W - R + 27}" y2="{T + 18 * k + 1}" '
              'stroke="grey" stroke-dasharray="3,2"/>')
    el.append(f'<text x="{W - R + 32}" y="{T + 18 * k + 5}">authors\' dopri5</text>')
    el.append(f'<text x="{W - R + 32}" y="{T + 18 * k + 19}">({fmt_seconds(ref)})</text>')
    el.append("</svg>")
    path.write_text("\n".join(el) + "\n")
    return path


def write(s: dict, out: Path, name: str) -> dict[str, Path]:
    """`<name>.json`, `<name>.md` and `<name>.png|svg` in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(_finite(s), indent=1, default=_json_default, allow_nan=False) + "\n")
    paths["plot"] = plot(s, out / f"{name}.png")
    paths["md"].write_text(markdown(s) + f"\n![quality vs time]({paths['plot'].name})\n")
    return paths


def _finite(o):
    """JSON has no infinity: an exact match (infinite SNR) is written as null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
