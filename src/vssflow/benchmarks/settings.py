"""What a benchmark run measures and how often: one frozen dataclass, written into the results."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from vssflow.runtime import contracts as C
from vssflow.runtime.solvers import FIXED_STEP_SOLVERS

DEFAULT_STEPS = (4, 8, 16, 25, 32)
QUICK_STEPS = (4, 8)
DEFAULT_TRANSCRIPT = "The quick brown fox jumps over the lazy dog."


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """One run's settings. `quick()` gives the cheaper variant; change one with `dataclasses.replace`."""

    model: Path | None = None             # an exported model folder; else `size` with random weights
    size: str = "small"                   # tiny | small | full (random weights, authors' layout)
    backend: str = "ort"                  # ort | torch: ours
    device: str | None = None             # None: the backend's choice (CUDA where present)
    repeats: int = 5                      # timed runs of each light stage (decode, condition, flow_step)
    heavy_repeats: int = 5                # timed runs of the encoders, the VAE and vocoder, end to end
    warmup: int = 1                       # untimed runs before the timed ones
    light_warmup: bool = False            # warm heavy stages up on a small input (saves a full run)
    encoder_fraction: float = 1.0         # share of a window's frames/segments the encoders run on
    end_to_end: str = "measured"          # measured (Session.generate / stream) | composed (from stages)
    solver: str = "euler"                 # the headline configuration: ours ...
    steps: int = 25
    sweep_solvers: tuple[str, ...] = FIXED_STEP_SOLVERS
    sweep_steps: tuple[int, ...] = DEFAULT_STEPS
    cfg: float = 3.0
    seed: int = 0
    seconds: float = C.WINDOW_SECONDS     # length of the synthetic clip (one window: 10 s)
    video: Path | None = None             # a video of your own instead of the synthetic one
    transcript: str | None = DEFAULT_TRANSCRIPT
    speech: tuple[float, float] = (1.0, 4.0)
    parity: bool = True                   # ours also runs dopri5: same solver, so only the rewrite differs
    isolate: bool = True                  # ours and theirs each in a child process (separate peak RSS)
    quick: bool = False

    @classmethod
    def quick_variant(cls, **kw) -> BenchSettings:
        """Few repeats, encoders on 5% of a window (scaled up), end to end composed, a short sweep."""
        base = dict(repeats=5, heavy_repeats=1, warmup=1, light_warmup=True, encoder_fraction=0.05,
                    end_to_end="composed", sweep_steps=QUICK_STEPS, quick=True)
        base.update(kw)
        return cls(**base)

    def check(self) -> None:
        if self.model is None and self.size not in ("tiny", "small", "full"):
            raise ValueError(f"size must be tiny, small or full, got {self.size!r}")
        if self.backend not in ("ort", "torch"):
            raise ValueError(f"backend must be ort or torch, got {self.backend!r}")
        if self.end_to_end not in ("measured", "composed"):
            raise ValueError(f"end_to_end must be measured or composed, got {self.end_to_end!r}")
        if not 0 < self.encoder_fraction <= 1:
            raise ValueError(f"encoder_fraction must be in (0, 1], got {self.encoder_fraction}")
        if self.end_to_end == "measured" and self.encoder_fraction < 1:
            raise ValueError("a measured end-to-end time runs the encoders on whole windows: "
                             "use encoder_fraction 1, or end_to_end composed")
        if min(self.repeats, self.heavy_repeats) < 1 or self.warmup < 0:
            raise ValueError("repeats must be at least 1 and warmup at least 0")
        bad = [s for s in self.sweep_solvers if s not in FIXED_STEP_SOLVERS]
        if bad or self.solver not in FIXED_STEP_SOLVERS:
            raise ValueError(f"solvers must be among {', '.join(FIXED_STEP_SOLVERS)}; got {bad or self.solver}")
        if not 0 < self.seconds <= C.WINDOW_SECONDS:
            raise ValueError(f"seconds must be in (0, {C.WINDOW_SECONDS:g}], got {self.seconds}")

    @property
    def clip_frames(self) -> int:
        """CLIP frames the encoder runs on per measurement (of 100 per window)."""
        return max(1, math.ceil(self.encoder_fraction * C.CLIP.frames - 1e-9))

    @property
    def synch_segments(self) -> int:
        """Synchformer segments the encoder runs on per measurement (of 30 per window)."""
        return max(1, math.ceil(self.encoder_fraction * C.SYNCH_SEGMENTS - 1e-9))

    def sweep(self) -> list[tuple[str, int]]:
        """(solver, steps) of the quality sweep, the headline configuration always included."""
        configs = [(s, n) for s in self.sweep_solvers for n in self.sweep_steps]
        if (self.solver, self.steps) not in configs:
            configs.append((self.solver, self.steps))
        return configs

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
