"""A window's decoded frames -> both encoders' inputs, on the device that runs them.

The GPU side of ``runtime/video.py``. ``video.windows(..., upload=uploader(device))`` decodes
and picks frames as always but, instead of resizing each on the CPU, copies the picked RGB
frame to the device once; ``window_inputs`` then resizes and normalises the whole window there
with ``preprocess`` (Triton kernels on CUDA, the reference elsewhere):

    frames picked by either stream, uploaded once   [F, H, W, 3] uint8 (one stack per frame size)
      -> clip_frames                                [100, 3, 224, 224] float32
      -> synch_segments                             [30, 16, 3, 224, 224] float32

Bit for bit what ``VideoWindow.clip_frames`` and ``VideoWindow.synch_segments()`` give on the
CPU, padding included: the padded positions hold what a zero frame normalises to (black for
CLIP, -1 for the Synchformer), read from the same level tables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from vssflow.runtime import video
from vssflow.runtime.contracts import CLIP, SEGMENT_FRAMES, SEGMENT_STEP, SYNCH

from .preprocess import FRAME_SIZE, plan, preprocess


def uploader(device: str | torch.device) -> Callable[[np.ndarray], torch.Tensor]:
    """``upload(rgb [H, W, 3] uint8) -> tensor on device`` for ``video.windows``.

    On the CPU the tensor shares the decoded array's memory (no copy).
    """
    device = torch.device(device)

    def upload(rgb: np.ndarray) -> torch.Tensor:
        frame = torch.from_numpy(rgb)
        return frame if device.type == "cpu" else frame.to(device)
    return upload


def window_inputs(window: video.FrameWindow, *, dtype: torch.dtype = torch.float32,
                  use_kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip_frames ``[100, 3, 224, 224]``, synch_segments ``[30, 16, 3, 224, 224]``), contiguous,
    on the device of the window's frames (``uploader``'s tensors)."""
    stacks = _stacks(window.clip + window.synch)
    clip = _stream(window.clip, CLIP.frames, CLIP.name, stacks, dtype, use_kernel)
    synch = _stream(window.synch, SYNCH.frames, SYNCH.name, stacks, dtype, use_kernel)
    segments = synch.unfold(0, SEGMENT_FRAMES, SEGMENT_STEP)                        # [30, 3, 224, 224, 16]
    return clip, segments.permute(0, 4, 1, 2, 3).contiguous()


class _Stack:
    """The distinct frames of one size, stacked once: ``frames [F, H, W, 3]``, ``slot[id(frame)]``."""

    def __init__(self, frames: list[torch.Tensor]):
        self.frames = torch.stack(frames)
        self.slot = {id(f): i for i, f in enumerate(frames)}


def _stacks(frames: Sequence[torch.Tensor]) -> dict[tuple, _Stack]:
    """One stack per frame size (a stream may change size mid-video; the CPU path resizes each
    frame by its own size, so must we)."""
    by_size: dict[tuple, dict[int, torch.Tensor]] = {}
    for f in frames:
        if f.dtype != torch.uint8 or f.ndim != 3 or f.shape[-1] != 3:
            raise ValueError(f"expected uint8 RGB frames [H, W, 3], got {tuple(f.shape)} {f.dtype}")
        by_size.setdefault(tuple(f.shape), {})[id(f)] = f
    return {size: _Stack(list(group.values())) for size, group in by_size.items()}


def _stream(frames: Sequence[torch.Tensor], length: int, stream: str, stacks: dict[tuple, _Stack],
            dtype: torch.dtype, use_kernel: bool | None) -> torch.Tensor:
    """``[length, 3, 224, 224]``: ``frames`` resized and normalised, then zero frames' values."""
    device = next(iter(stacks.values())).frames.device if stacks else torch.device("cpu")
    out = torch.empty((length, 3, FRAME_SIZE, FRAME_SIZE), dtype=dtype, device=device)
    zero = torch.from_numpy(plan(stream, FRAME_SIZE, FRAME_SIZE).table[:, 0].copy())  # level 0, per channel
    out[len(frames):] = zero.to(device=device, dtype=dtype)[:, None, None]
    positions: dict[tuple, list[int]] = {}
    for i, f in enumerate(frames):
        positions.setdefault(tuple(f.shape), []).append(i)
    for size, where in positions.items():
        stack = stacks[size]
        index = torch.tensor([stack.slot[id(frames[i])] for i in where], device=device)
        if where == list(range(where[0], where[-1] + 1)):                 # one size: out[0:n] in place
            preprocess(stack.frames, stream, index=index, dtype=dtype, out=out[where[0]:where[-1] + 1],
                       use_kernel=use_kernel)
        else:
            out[torch.tensor(where, device=device)] = preprocess(stack.frames, stream, index=index, dtype=dtype,
                                                                 use_kernel=use_kernel)
    return out
