"""Media of the batch tests: two good clips and one broken file in a folder."""

from __future__ import annotations

import pytest

from vssflow.benchmarks.media import make_video

STEPS = 2


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    """clips/a.mp4 (4 s), clips/sub/b.mp4 (3 s, 30 fps), clips/broken.mp4 (an MP4 cut short)."""
    d = tmp_path_factory.mktemp("batch") / "clips"
    (d / "sub").mkdir(parents=True)
    make_video(d / "a.mp4", seconds=4, fps=25, size=(96, 64))
    make_video(d / "sub" / "b.mp4", seconds=3, fps=30, size=(64, 96))
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    return d


@pytest.fixture(scope="session")
def ort_session(tiny_model):
    from vssflow.runtime.session import Session
    return Session(tiny_model, backend="ort")


@pytest.fixture(scope="session")
def singles(ort_session, clips, clip12):
    """Each good clip generated alone with `generate` (the reference of every batch test)."""
    return {name: ort_session.generate(path, steps=STEPS, seed=seed)
            for name, path, seed in (("a", clips / "a.mp4", 0), ("b", clips / "sub" / "b.mp4", 0),
                                     ("b7", clips / "sub" / "b.mp4", 7), ("long", clip12, 0))}
