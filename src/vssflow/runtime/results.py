"""What a generation gives back: `Result` (the whole sound track with its record) and
`AudioStream` (the chunks as they are ready, the record complete once they are read)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from .inputs import GenerateOptions, StreamInfo
from .window import Run


@dataclasses.dataclass
class Result:
    audio: np.ndarray                 # float32 [samples], 16 kHz, cut to the video's length
    sample_rate: int
    info: StreamInfo
    timings: dict[str, float]         # seconds per stage, summed over windows
    nfe: int                          # flow_step calls (each runs both CFG passes)
    intermediates: dict[str, np.ndarray] | None = None
    notes: tuple[str, ...] = ()
    fallbacks: tuple[dict, ...] = ()  # windows (or vocoder chunks) generated again in FP32: window.Run

    @property
    def options(self) -> GenerateOptions:
        return self.info.options

    @classmethod
    def of(cls, audio: np.ndarray, info: StreamInfo, run: Run) -> Result:
        """The result of `run`, whose audio is `audio`."""
        return cls(audio, info.sample_rate, info, dict(run.timings), run.nfe, run.kept(), tuple(run.notes),
                   tuple(run.fallbacks))


class AudioStream(Iterator[np.ndarray]):
    """The chunks of one generation, float32 at 16 kHz, each as soon as it is ready, with the
    run's own record (`nfe`, `timings`, `intermediates`, `notes`), complete once iterated."""

    def __init__(self, chunks: Iterator[np.ndarray], info: StreamInfo, run: Run):
        self._chunks, self.info, self.run = chunks, info, run

    def __next__(self) -> np.ndarray:
        return next(self._chunks)

    def close(self) -> None:
        """Stop early: the generation ends and holds nothing."""
        self._chunks.close()

    @property
    def nfe(self) -> int:
        return self.run.nfe

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.run.timings)

    @property
    def intermediates(self) -> dict[str, np.ndarray] | None:
        return self.run.kept()

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(self.run.notes)

    @property
    def fallbacks(self) -> tuple[dict, ...]:
        """Windows (or vocoder chunks) generated again in FP32 so far (see `window.Run`)."""
        return tuple(self.run.fallbacks)

    def result(self) -> Result:
        """Every (remaining) chunk, joined, with the record."""
        pieces = list(self)
        audio_ = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        return Result.of(audio_, self.info, self.run)
