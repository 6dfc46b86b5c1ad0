"""Frame preprocessing kernels against their reference, the CPU path, Pillow and torch.

The Triton kernels run on CPU tensors through Triton's interpreter; ``TRITON_INTERPRET`` must
be set before triton is imported (our kernels are decorated when ``preprocess`` is imported).
Every comparison is exact: both paths sum the same integer taps and map uint8 levels through
the same normalisation table, so a wrong tap, offset, crop, rounding or constant shows.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tests.kernels.support import require_interpreted, run_compiled  # noqa: E402
from vssflow.kernels import dispatch  # noqa: E402
from vssflow.kernels import preprocess as P  # noqa: E402
from vssflow.runtime import resize  # noqa: E402
from vssflow.runtime.contracts import CLIP, STREAMS  # noqa: E402

# (height, width): up both ways; portrait (vertical crop, CLIP downscales rows); both down with
# antialias; width already 224 (CLIP skips the horizontal pass); height 224 (synch: identity + crop).
SIZES = [(48, 64), (300, 160), (260, 400), (64, 224), (224, 300)]


def frames(h: int, w: int, n: int = 2, seed: int = 0) -> np.ndarray:
    """uint8 ``[n, h, w, 3]``: smooth ramps plus noise, with saturated patches (clip to 0/255)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    out = np.clip(base[None] + rng.integers(-40, 41, (n, h, w, 3)), 0, 255).astype(np.uint8)
    out[:, h // 4:h // 2, w // 4:w // 2] = 255
    out[:, h // 2:3 * h // 4, w // 2:3 * w // 4] = 0
    return out


def cpu_path(f: np.ndarray, stream: str) -> np.ndarray:
    """The runtime's own path: the stream's resizer (``runtime/resize.py``) then its normalisation,
    as ``video.windows`` runs them. ``[n, 3, 224, 224]``."""
    spec = STREAMS[stream]
    resizer = spec.resizer(*f.shape[1:3])
    return spec.normalise(np.stack([resizer(x) for x in f]))


@pytest.fixture
def interpreted():
    """Triton present, and our kernels built for its interpreter (skip otherwise)."""
    return require_interpreted(P._rows_kernel, "vssflow.kernels.preprocess")


# --- the reference (no triton needed) -----------------------------------------------------------

@pytest.mark.parametrize("stream", tuple(STREAMS))
@pytest.mark.parametrize("hw", SIZES + [(360, 640)])
def test_reference_equals_cpu_path(stream, hw):
    f = frames(*hw)
    want = cpu_path(f, stream)
    got = P.preprocess_reference(f, stream).numpy()
    assert got.shape == (2, 3, 224, 224) and np.ptp(want) >= 1.99, f"{got.shape=} {np.ptp(want)=}"
    np.testing.assert_array_equal(got, want)


def test_reference_against_pillow_and_torch():
    """Independent oracles: Pillow's bicubic for CLIP, torch's antialiased uint8 bicubic + centre
    crop (what torchvision's v2.Resize/CenterCrop run) for the Synchformer."""
    from PIL import Image
    f = frames(150, 260, n=1)
    levels = np.asarray(Image.fromarray(f[0]).resize((224, 224), Image.BICUBIC))          # [224, 224, 3]
    mean, std = np.float32(CLIP.mean), np.float32(CLIP.std)
    want = (levels.transpose(2, 0, 1).astype(np.float32) / np.float32(255) - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_array_equal(P.preprocess_reference(f, "clip")[0].numpy(), want)

    oh, ow = resize.short_side_size(150, 260, 224)                                         # (224, 388)
    x = torch.nn.functional.interpolate(torch.from_numpy(f).permute(0, 3, 1, 2), size=(oh, ow),
                                        mode="bicubic", antialias=True)
    top, left = (oh - 224) // 2, (ow - 224) // 2
    want = (x[0, :, top:top + 224, left:left + 224].float() * np.float32(1 / 255) - 0.5) / 0.5
    torch.testing.assert_close(P.preprocess_reference(f, "synch")[0], want, rtol=0, atol=0)


def test_plan_tables():
    p = P.plan("synch", 300, 160)                          # portrait: rows cropped from the resize
    assert p.horizontal.size == p.vertical.size == 224
    assert p.rows[0] > 0 and p.rows[1] < 300, p.rows        # only the rows the crop needs
    assert (p.vertical.first >= 0).all() and (p.vertical.first + 1 <= p.n_rows).all()
    for axis in (p.horizontal, p.vertical):                 # taps sum to one in fixed point
        sums = axis.weights.astype(np.int64).sum(1)
        assert np.abs(sums - (1 << axis.precision)).max() <= axis.taps, sums
    ident = P.plan("clip", 64, 224).horizontal              # unchanged width: one tap of 1.0
    assert ident.taps == 1 and (ident.weights == 1 << ident.precision).all()
    assert (ident.first == np.arange(224)).all()
    assert P.plan("clip", 64, 224).table.shape == (3, 256)


def test_dispatch_switch(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(dispatch.ENV_SWITCH, raising=False)
    assert not dispatch.use_kernel(cpu)                       # reference on CPU tensors
    assert dispatch.use_kernel(cuda) == dispatch.triton_available()
    monkeypatch.setenv(dispatch.ENV_SWITCH, "0")
    assert not dispatch.use_kernel(cuda)                      # VSSFLOW_KERNELS=0: references only
    assert not dispatch.use_kernel(cuda, False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if dispatch.triton_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            dispatch.use_kernel(cpu, True)


def test_preprocess_picks_reference_on_cpu(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("kernel chosen for a CPU tensor")
    monkeypatch.setattr(P, "preprocess_triton", boom)
    f = frames(48, 64)
    np.testing.assert_array_equal(P.preprocess(f, "clip").numpy(), cpu_path(f, "clip"))


def test_bad_inputs():
    f = frames(48, 64)
    with pytest.raises(ValueError, match="uint8"):
        P.preprocess_reference(f.astype(np.float32), "clip")
    with pytest.raises(ValueError, match="stream"):
        P.preprocess_reference(f, "clap")
    with pytest.raises(IndexError):
        P.preprocess_reference(f, "clip", index=[0, 2])
    with pytest.raises(ValueError, match="out must be"):
        P.preprocess_reference(f, "clip", out=torch.empty(3, 3, 224, 224))


# --- the kernels through the interpreter ---------------------------------------------------------

@pytest.mark.parametrize("stream", tuple(STREAMS))
@pytest.mark.parametrize("hw", SIZES)
def test_kernel_equals_reference(interpreted, stream, hw):
    f = torch.from_numpy(frames(*hw))
    got = P.preprocess_triton(f, stream)
    want = P.preprocess_reference(f, stream)
    assert got.dtype == torch.float32 and want.max() - want.min() >= 1.99
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    np.testing.assert_array_equal(got.numpy(), cpu_path(f.numpy(), stream))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_precision(interpreted, dtype):
    f = frames(48, 64)
    for stream in STREAMS:
        got = P.preprocess(f, stream, dtype=dtype, use_kernel=True)
        assert got.dtype == dtype
        torch.testing.assert_close(got, P.preprocess_reference(f, stream, dtype=dtype), rtol=0, atol=0)
        # within 1/255 of the fp32 CPU path in pixel units (normalised error times std)
        std = np.float32(STREAMS[stream].std)[None, :, None, None]
        err = (np.abs(got.float().numpy() - cpu_path(f, stream)) * std).max()
        assert 0 < err <= 1 / 255, err


def test_kernel_index_strides_and_out(interpreted):
    """One upload, frames picked by index; a channels-first tensor viewed as [N, H, W, 3]
    (non-contiguous); results written into rows of a preallocated window buffer."""
    f = frames(48, 64, n=3, seed=1)
    planar = torch.from_numpy(f).permute(0, 3, 1, 2).contiguous()          # [3, 3, H, W]
    view = planar.permute(0, 2, 3, 1)                                       # [3, H, W, 3] strided
    assert not view.is_contiguous()
    index = [2, 0, 2, 1]
    window = torch.full((6, 3, 224, 224), 7.0)
    got = P.preprocess(view, "synch", index=index, out=window[1:5], use_kernel=True)
    assert got.data_ptr() == window[1].data_ptr()
    np.testing.assert_array_equal(window[1:5].numpy(), cpu_path(f[index], "synch"))
    assert (window[0] == 7).all() and (window[5] == 7).all()


def test_kernels_compile_for_cuda():
    """The interpreter forgives what the compiler does not (types, casts, pointer arithmetic):
    build both kernels ahead of time to an sm_90 cubin, which needs no GPU (a fresh process,
    since this one holds the interpreter's versions)."""
    run_compiled("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from vssflow.kernels import preprocess as P
        ints = lambda *names: {n: "i32" for n in names}
        rows = {"src": "*u8", "index": "*i32", "mid": "*u8", "first": "*i32", "weights": "*i32",
                **ints("n_taps", "rows", "row0", "in_w", "out_w"), "stride_n": "i64",
                **ints("stride_h", "stride_w", "stride_c"),
                "PRECISION": "constexpr", "BLOCK_R": "constexpr", "BLOCK_W": "constexpr"}
        target = GPUTarget("cuda", 90, 32)
        k = triton.compile(ASTSource(P._rows_kernel, rows, {"PRECISION": 22, "BLOCK_R": 16, "BLOCK_W": 32}),
                           target=target)
        assert k.asm["cubin"]
        for dt in ("fp32", "fp16"):
            cols = {"mid": "*u8", "out": "*" + dt, "first": "*i32", "weights": "*i32", "table": "*" + dt,
                    **ints("n_taps", "rows", "width", "out_h"),
                    "PRECISION": "constexpr", "BLOCK_H": "constexpr", "BLOCK_W": "constexpr"}
            k = triton.compile(ASTSource(P._columns_kernel, cols, {"PRECISION": 13, "BLOCK_H": 32, "BLOCK_W": 32}),
                               target=target)
            assert k.asm["cubin"]
        print("ok")
    """, env={"TRITON_DEFAULT_FP_FUSION": "0"})  # silence 3.9's FP-fusion notice; no float math here


@pytest.mark.gpu
def test_cuda_kernel_equals_reference():
    """The compiled kernels on a real GPU (a fresh process: no interpreter there)."""
    run_compiled("""
        import numpy as np, torch
        from vssflow.kernels import preprocess as P
        rng = np.random.default_rng(0)
        for hw in [(48, 64), (720, 1280), (1080, 1920), (1920, 1080)]:
            f = torch.from_numpy(rng.integers(0, 256, (5, *hw, 3), dtype=np.uint8)).cuda()
            for stream in STREAMS:
                for dtype in (torch.float32, torch.float16):
                    got = P.preprocess(f, stream, index=[4, 0, 2], dtype=dtype, use_kernel=True)
                    want = P.preprocess_reference(f, stream, index=[4, 0, 2], dtype=dtype)
                    assert torch.equal(got, want), (hw, stream, dtype, (got - want).abs().max())
        print("ok")
    """, timeout=600)
