"""The visual encoders over the windows of one or more clips, each distinct input encoded once.

CLIP encodes each frame on its own and Synchformer each 16-frame segment on its own (their
attention never crosses frames or segments), so the features of an input do not depend on what
else shares its call. Encoding each distinct input once and copying its features is therefore
exact, up to the rounding of a different call size (measured: see `tests/batch`). What repeats:

* **padding** of a clip shorter than its window: black CLIP frames and all-padding Synchformer
  segments (zero frames, -1 after normalisation) are the same input in every window: encoded
  once per Session and reused (a 4-second clip pads 60 of 100 CLIP frames and 17 of 30
  segments);
* **identical frames**: a still video, and the 10 CLIP frames two overlapping windows share
  (window k + 1 starts 9 s after window k).

Inputs are known by the digest of their uint8 pixels (`video.VideoWindow.clip_digests`,
computed where the window is prepared, ahead of the model), features kept in a small
most-recently-used cache per Session. Frames prepared on the GPU (`video.FrameWindow`) are not
hashed: there only the padding, which is known by position, is shared.

Calls are filled up to the contract's maximum (`N` frames, `S` segments), across windows, or to
the rows the memory plan allows where fewer (`Backend.pieces`, `memory.py`): the float input of
a call is made only when it runs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from . import video
from .contracts import CLIP, SEGMENT_FRAMES, SEGMENT_STEP, SYNCH, SYNCH_SEGMENTS
from .video import FrameWindow, VideoWindow

# Bytes of features kept per encoder: at full size 3 KB per CLIP frame (768 floats) and 24 KB per
# Synchformer segment (8 x 768): ~10 windows' distinct frames and ~4 windows' segments.
CLIP_CACHE = 3 << 20
SYNCH_CACHE = 3 << 20


class FeatureCache:
    """Features by the digest of their input, at most `max_bytes` of them; the least recently used
    go first. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            self.nbytes += value.nbytes - (0 if old is None else old.nbytes)
            self._items[key] = value
            while self.nbytes > self.max_bytes and self._items:
                self.nbytes -= self._items.popitem(last=False)[1].nbytes


class Encoders:
    """A Session's visual encoders with its caches: `encode(backend, run, windows)`."""

    def __init__(self, clip_bytes: int = CLIP_CACHE, synch_bytes: int = SYNCH_CACHE):
        self.clip = FeatureCache(clip_bytes)
        self.synch = FeatureCache(synch_bytes)

    def encode(self, backend, run, windows: Sequence[VideoWindow | FrameWindow]
               ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each window, its CLIP `[100, Dc]` and Synchformer `[240, Ds]` features.

        `run` records the encoder calls (a `window.Run`, or a `window.Runs` for several clips)."""
        from .window import encoder_inputs
        device = [None if isinstance(w, VideoWindow) else encoder_inputs(backend, run, w) for w in windows]
        clip = _encode(backend, run, "clip_encoder", self.clip, [_clip_inputs(w, d) for w, d in zip(windows, device)])
        synch = _encode(backend, run, "synch_encoder", self.synch,
                        [_synch_inputs(w, d) for w, d in zip(windows, device)])
        return [(c, s.reshape(-1, s.shape[-1])) for c, s in zip(clip, synch)]


class _Inputs:
    """One window's inputs to one encoder: the key of each row (None: unknown, always encoded),
    and `rows(indices)`, the encoder's input for those rows (numpy, or torch on the device)."""

    def __init__(self, keys: list[Hashable | None], rows: Callable[[list[int]], object]):
        self.keys, self.rows = keys, rows


def _clip_inputs(w: VideoWindow | FrameWindow, device) -> _Inputs:
    if device is None:
        return _Inputs(list(w.clip_digests), lambda idx: CLIP.normalise(w.clip_pixels[idx]))
    frames = device[0]                                                   # [100, 3, 224, 224]
    pad = video.padding_digest()
    return _Inputs([None] * w.clip_count + [pad] * (len(frames) - w.clip_count), lambda idx: frames[idx])


def _synch_inputs(w: VideoWindow | FrameWindow, device) -> _Inputs:
    step, size = SEGMENT_STEP, SEGMENT_FRAMES
    if device is None:
        digests = w.synch_digests
        keys = [b"".join(digests[s * step:s * step + size]) for s in range(SYNCH_SEGMENTS)]

        def rows(idx):
            frames = np.stack([w.synch_pixels[s * step:s * step + size] for s in idx])     # [S, 16, 3, H, W]
            return SYNCH.normalise(frames.reshape(-1, *frames.shape[2:])).reshape(frames.shape)
        return _Inputs(keys, rows)
    segments = device[1]                                                 # [30, 16, 3, 224, 224]
    pad = video.padding_digest() * size
    return _Inputs([None if s * step < w.synch_count else pad for s in range(SYNCH_SEGMENTS)],
                   lambda idx: segments[idx])


def _encode(backend, run, stage: str, cache: FeatureCache, inputs: list[_Inputs]) -> list[np.ndarray]:
    """The features of every row of every window, each distinct key encoded once, the calls
    filled up to the stage's maximum batch; rows with no key are always encoded."""
    found: dict[Hashable, np.ndarray] = {}
    todo: list[tuple[int, int, Hashable | None]] = []             # (window, row, key) to encode
    for k, inp in enumerate(inputs):
        for r, key in enumerate(inp.keys):
            if key is not None:
                if key in found:
                    continue
                hit = cache.get(key)
                if hit is not None:
                    found[key] = hit
                    continue
                found[key] = None                                 # to be encoded: once
            todo.append((k, r, key))
    contract = backend.folder.contracts[stage]
    name, axis = contract.inputs[0].name, contract.inputs[0].shape[0]          # frames [N, ...], segments [S, ...]
    # Gathered (normalised to float32) a call at a time: no more rows than the memory plan's pieces,
    # so a window's whole input (30 segments: 289 MB at 224 px) never exists at once.
    most = contract.axes[axis][2]
    limit = min(most, backend.pieces.get(stage, most))
    computed: dict[tuple[int, int], np.ndarray] = {}
    if not todo:                 # every input known: the stage ran in no time, and its record says so
        run.timed(stage, 0.0)
    for a in range(0, len(todo), limit):
        part = todo[a:a + limit]
        feed = _gather(inputs, part)
        features = run.call(backend, stage, {name: feed})["features"]
        for (k, r, key), f in zip(part, features):
            computed[(k, r)] = f
            if key is not None:
                found[key] = f
                cache.put(key, f)
    out = []
    for k, inp in enumerate(inputs):
        rows = [computed[(k, r)] if key is None else found[key] for r, key in enumerate(inp.keys)]
        out.append(np.stack(rows))
    return out


def _gather(inputs: list[_Inputs], part: list[tuple[int, int, Hashable | None]]):
    """The encoder input of `part`'s rows, window by window, concatenated (numpy or torch)."""
    pieces, k0, idx = [], None, []
    for k, r, _ in part + [(None, None, None)]:
        if k != k0 and idx:
            pieces.append(inputs[k0].rows(idx))
            idx = []
        k0 = k
        idx.append(r)
    if isinstance(pieces[0], np.ndarray):
        return np.ascontiguousarray(np.concatenate(pieces)) if len(pieces) > 1 else np.ascontiguousarray(pieces[0])
    import torch
    return torch.cat(pieces).contiguous()
