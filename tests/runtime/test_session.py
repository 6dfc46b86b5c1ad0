"""Session end to end on the tiny model: backends agree, equal the reference, stream == generate."""

import numpy as np
import pytest
import torch

from vssflow.runtime import video
from vssflow.runtime.session import Session
from vssflow.runtime.window import nearest_indices


@pytest.fixture(scope="module")
def ort_session(tiny_model):
    return Session(tiny_model, backend="ort")


def _noise(windows=2, seed=3):
    return np.random.default_rng(seed).standard_normal((windows, 128, 250), dtype=np.float32)


def test_nearest_indices_match_torch():
    for n_in, n_out in [(100, 250), (240, 250), (100, 60), (7, 3), (250, 250)]:
        for exact, mode in [(False, "nearest"), (True, "nearest-exact")]:
            x = torch.arange(n_in, dtype=torch.float32)[None, None]
            ref = torch.nn.functional.interpolate(x, size=n_out, mode=mode)[0, 0].long().numpy()
            assert np.array_equal(nearest_indices(n_in, n_out, exact), ref), (n_in, n_out, mode)


def test_ort_and_torch_backends_agree(tiny_model, clip4, ort_session):
    kw = dict(transcript="hello world", speech_start=1.0, speech_end=3.0, steps=4, noise=_noise(1))
    a = ort_session.generate(clip4, **kw)
    b = Session(tiny_model, backend="torch").generate(clip4, **kw)
    assert a.audio.shape == b.audio.shape == (4 * 16000,)
    assert np.abs(a.audio).max() > 1e-3
    assert np.abs(a.audio - b.audio).max() <= 1e-4
    assert a.nfe == b.nfe == 4


def test_stream_concatenated_equals_generate(clip12, ort_session):
    kw = dict(steps=3, noise=_noise())
    chunks, info = ort_session.stream(clip12, **kw)
    assert info.n_windows == 2 and info.sample_rate == 16000 and abs(info.duration - 12) < 1e-6
    pieces = list(chunks)
    assert len(pieces) > 2  # the vocoder streams several chunks per window
    whole = ort_session.generate(clip12, **kw).audio
    assert np.array_equal(np.concatenate(pieces), whole)


def _authors_window(tiny_assets, path, phone_ids, noise, speaker_dim, *, steps, cfg):
    """The authors' computation of the first window of `path`: their CLIP and Synchformer on its
    frames, the unfolded flow with two CFG passes (euler), their VAE and vocoder, no speaker.
    Returns (clip features, synch features, final latent, audio of the whole window)."""
    from vssflow.export.checkpoint import SYNCHFORMER, build_modules, read_aux, read_checkpoint
    from vssflow.export.reference import ReferencePipeline
    from vssflow.export.synchformer import load_synchformer

    modules = build_modules(read_checkpoint(tiny_assets["checkpoint"]))
    synch = load_synchformer(read_aux(SYNCHFORMER, tiny_assets["synchformer"])[1])
    window = next(video.windows(path))
    with torch.no_grad():
        clip_ref = modules["clip"](torch.from_numpy(window.clip_frames)).numpy()
        synch_ref = synch(torch.from_numpy(np.ascontiguousarray(window.synch_segments()))).numpy()
    ref = ReferencePipeline(modules["flow"], modules["conditions"], modules["decoder"])
    out = ref.generate(torch.from_numpy(clip_ref)[None], torch.from_numpy(synch_ref)[None],
                       torch.from_numpy(phone_ids)[None], torch.zeros(1, speaker_dim),
                       torch.from_numpy(noise[:1]), solver="euler", steps=steps, cfg=cfg)
    return clip_ref, synch_ref.reshape(240, -1), out["latent"][0].numpy(), out["audio"][0].numpy()


def test_equals_the_reference_pipeline(tiny_assets, clip4, ort_session):
    """Same features and noise through the authors' way (unfolded, two CFG passes) give the same audio."""
    noise = _noise(1)
    result = ort_session.generate(clip4, transcript="the quick brown fox", speech_start=0.5, speech_end=4.0,
                                  steps=5, cfg=2.5, noise=noise, keep_intermediates=True)
    kept = result.intermediates
    clip_ref, synch_ref, latent_ref, audio_ref = _authors_window(tiny_assets, clip4, kept["phone_ids"][0], noise,
                                                                 ort_session.sizes.speaker_dim, steps=5, cfg=2.5)
    assert np.abs(kept["clip_features"][0] - clip_ref).max() <= 1e-4
    assert np.abs(kept["synch_features"][0] - synch_ref).max() <= 1e-4
    assert np.abs(kept["final_latent"][0] - latent_ref).max() <= 1e-4
    audio_ref = audio_ref[:4 * 16000]   # the authors generate 10 s and cut to the clip
    assert np.abs(result.audio - audio_ref).max() <= 1e-4


@pytest.fixture(scope="module")
def edge_clips(tmp_path_factory):
    """25 fps clips at the one-window edge: 9.52 s (238 frames: "9.5 s" at 25 fps), exactly 10.0 s,
    and 10.04 s (one frame past 10 s)."""
    from vssflow.benchmarks.media import make_video
    root = tmp_path_factory.mktemp("edges")
    clips = {}
    for seconds in (9.52, 10.0, 10.04):
        clips[seconds] = root / f"clip{seconds:g}.mp4"
        make_video(clips[seconds], seconds, 25, (96, 64))
    return clips


def test_a_ten_second_clip_is_the_authors_one_window(tiny_assets, edge_clips, ort_session):
    """Exactly 10 s is the clip length the authors designed for: one window, their audio cut to
    10 s, and a one-window noise is all it takes (a second window of the frames after 9 s used to
    be generated and crossfaded into the last second, and a one-window noise refused)."""
    path, noise = edge_clips[10.0], _noise(1, seed=4)
    result = ort_session.generate(path, transcript="hello there", speech_start=2.0, speech_end=9.5, steps=4,
                                  noise=noise, keep_intermediates=True)
    kept = result.intermediates
    assert result.nfe == 4 and len(kept["final_latent"]) == 1 and not result.notes
    clip_ref, synch_ref, latent_ref, audio_ref = _authors_window(tiny_assets, path, kept["phone_ids"][0], noise,
                                                                 ort_session.sizes.speaker_dim, steps=4, cfg=3.0)
    assert np.abs(kept["clip_features"][0] - clip_ref).max() <= 1e-4
    assert np.abs(kept["synch_features"][0] - synch_ref).max() <= 1e-4
    assert np.abs(kept["final_latent"][0] - latent_ref).max() <= 1e-4
    assert result.audio.shape == (10 * 16000,)
    assert np.abs(result.audio - audio_ref[:10 * 16000]).max() <= 1e-4


def test_clips_up_to_ten_seconds_take_steps_evaluations(edge_clips, ort_session, tmp_path):
    """9.52 s, 10.0 s and a 10.0 s whose container says 9.9 s: one window, `steps` flow
    evaluations; one frame past 10 s: two windows, twice as many."""
    says_9_9 = _with_header_duration(edge_clips[10.0], tmp_path / "says_9.9.mp4", 0.99)
    assert video.probe(says_9_9).duration == pytest.approx(9.9)
    for path, seconds, windows in ((edge_clips[9.52], 9.52, 1), (edge_clips[10.0], 10.0, 1), (says_9_9, 10.0, 1),
                                   (edge_clips[10.04], 10.04, 2)):
        result = ort_session.generate(path, steps=3, seed=2)
        assert result.nfe == 3 * windows, (path, result.nfe)
        assert result.audio.shape == (round(seconds * 16000),)


def test_dopri5_parity_mode_takes_the_authors_steps(tiny_assets, clip4, ort_session):
    """The runtime's dopri5 on 128 channels takes the steps of the authors' dopri5 on 1952."""
    from vssflow.export.checkpoint import build_modules, read_checkpoint
    from vssflow.export.reference import ReferencePipeline

    noise = _noise(1, seed=5)
    result = ort_session.generate(clip4, solver="dopri5", noise=noise, keep_intermediates=True)
    kept = result.intermediates
    modules = build_modules(read_checkpoint(tiny_assets["checkpoint"]))
    ref = ReferencePipeline(modules["flow"], modules["conditions"])
    ctx, ch = ref.encode_conditions(torch.from_numpy(kept["clip_features"][:1]),
                                    torch.from_numpy(kept["synch_features"][:1]),
                                    torch.from_numpy(kept["phone_ids"][:1]), torch.zeros(1, ort_session.sizes.speaker_dim))
    latent, nfe = ref.sample(ctx, ch, torch.from_numpy(noise[:1]), solver="dopri5")
    assert result.nfe == nfe
    assert np.abs(kept["final_latent"][0] - latent[0].numpy()).max() <= 1e-4


def test_seed_reproducible_and_options_travel(clip4, ort_session):
    a = ort_session.generate(clip4, steps=2, seed=7)
    b = ort_session.generate(clip4, steps=2, seed=7)
    c = ort_session.generate(clip4, steps=2, seed=8)
    assert np.array_equal(a.audio, b.audio) and not np.array_equal(a.audio, c.audio)
    assert a.options.seed == 7 and a.options.steps == 2 and a.options.solver == "euler"


def test_torch_backend_keeps_the_ode_state_in_torch(tiny_model, clip4, ort_session):
    """The loop hands the torch backend its own tensors (device-resident on CUDA), never numpy."""
    session = Session(tiny_model, backend="torch")
    seen = []
    make = session.backend.velocity

    def spy(cond, cfg):
        velocity = make(cond, cfg)

        def watched(t, z):
            seen.append(type(z))
            return velocity(t, z)
        return watched
    session.backend.velocity = spy
    noise = _noise(1)
    a = session.generate(clip4, steps=3, noise=noise).audio
    assert seen and all(t is torch.Tensor for t in seen)
    assert np.abs(a - ort_session.generate(clip4, steps=3, noise=noise).audio).max() <= 1e-4


def test_crossfade_windows_joins_overlaps():
    from vssflow.runtime.session import FADE_SAMPLES, HOP_SAMPLES, crossfade_windows
    n_win, length = 3, 160032
    windows = [np.full(length, float(k + 1), np.float32) for k in range(n_win)]

    def pieces(w, size=7001):          # chunk boundaries that do not line up with the fade
        return (w[i:i + size] for i in range(0, len(w), size))
    out = np.concatenate(list(crossfade_windows(pieces(w) for w in windows)))
    assert len(out) == (n_win - 1) * HOP_SAMPLES + length
    assert np.all(out[:HOP_SAMPLES] == 1) and np.all(out[HOP_SAMPLES + FADE_SAMPLES:2 * HOP_SAMPLES] == 2)
    fade = out[HOP_SAMPLES:HOP_SAMPLES + FADE_SAMPLES]          # 1 -> 2, equal power
    assert fade[0] == pytest.approx(1, abs=1e-3) and fade[-1] == pytest.approx(2, abs=1e-3)
    theta = 0.5 * np.pi * (np.arange(FADE_SAMPLES) + 0.5) / FADE_SAMPLES    # equal power: sin^2 + cos^2 = 1
    assert np.allclose(fade, 2 * np.sin(theta) + 1 * np.cos(theta), atol=1e-5)
    assert np.all(out[-(length - FADE_SAMPLES):] == 3)           # the last window whole


def _with_header_duration(src, dst, scale: float):
    """A copy of an MP4 whose media header (mdhd) claims `scale` times the duration its frames have."""
    import struct
    data = bytearray(src.read_bytes())
    at = data.find(b"mdhd") + 20                      # version 0: flags, created, modified, timescale, duration
    data[at:at + 4] = struct.pack(">I", int(struct.unpack(">I", data[at:at + 4])[0] * scale))
    dst.write_bytes(bytes(data))
    return dst


def test_a_wrong_container_duration_follows_the_frames(clip12, ort_session, tmp_path):
    """The header says 8.4 s, the frames run 12 s: the windows come from decoding, so the audio
    is the 12 s the frames show, equal to the honest file's (the second window used to be lost)."""
    lying = _with_header_duration(clip12, tmp_path / "lying.mp4", 0.7)
    assert video.probe(lying).duration == pytest.approx(8.4)
    honest = ort_session.generate(clip12, steps=1, seed=3).audio
    got = ort_session.generate(lying, steps=1, seed=3)
    assert got.info.n_windows == 1                          # what the container said, before decoding
    assert got.audio.shape == honest.shape == (12 * 16000,) and np.array_equal(got.audio, honest)


def test_crossfade_emits_every_window_it_is_given():
    """No count decided in advance: the last window given is emitted whole, however many there are."""
    from vssflow.runtime.session import HOP_SAMPLES, crossfade_windows
    for n_win in (1, 2, 4):
        windows = [np.full(160032, float(k + 1), np.float32) for k in range(n_win)]
        out = np.concatenate(list(crossfade_windows(iter([w]) for w in windows)))
        assert len(out) == (n_win - 1) * HOP_SAMPLES + 160032 and np.all(out[-(160032 - 16000):] == n_win)


def test_long_video_windows_overlap(clip12, ort_session):
    """A 12 s clip: windows at 0 s and 9 s; the second's phoneme ids are the track from 9 s."""
    r = ort_session.generate(clip12, transcript="one two three four", speech_start=8.0, speech_end=11.5,
                             steps=1, keep_intermediates=True)
    ids = r.intermediates["phone_ids"]
    assert r.info.n_windows == 2 and r.audio.shape == (12 * 16000,)
    assert np.array_equal(ids[0][225:], ids[1][:25])             # the shared second
    assert (ids[1][:int(2.5 * 25)] > 0).all() and (ids[1][int(2.6 * 25):] == 0).all()


def test_decoded_frames_give_what_the_file_gives(clip4, ort_session):
    import av

    from vssflow.runtime import VideoFrames
    with av.open(str(clip4)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    noise = _noise(1)
    from_file = ort_session.generate(clip4, steps=2, noise=noise).audio
    from_frames = ort_session.generate(VideoFrames(frames, 25.0), steps=2, noise=noise).audio
    assert from_frames.shape == from_file.shape and np.abs(from_frames - from_file).max() <= 1e-5
    with pytest.raises(video.VideoError, match="uint8"):
        ort_session.generate(VideoFrames(frames.astype(np.float32), 25.0))


def test_session_and_backend_close_what_they_loaded(tiny_model, clip4):
    """Context managers: leaving the block frees the loaded stages (ORT sessions here); a later
    call loads them again and gives the same result."""
    with Session(tiny_model, backend="ort") as session:
        first = session.generate(clip4, steps=1, seed=1).audio
        assert set(session.backend._stages) >= {"flow_step", "vae_decoder", "vocoder"}
    assert session.backend._stages == {}
    assert np.array_equal(session.generate(clip4, steps=1, seed=1).audio, first)
    with session.backend as backend:
        backend.run("vocoder", {"mel": np.zeros((1, 8, 64), np.float32)})
    assert backend._stages == {}
