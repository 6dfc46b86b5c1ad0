import os
import signal

import pytest

# Tests run on CPU, deterministic, with few threads (CI has 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config):
    # scripts/test.sh ends a run past its budget with SIGINT, for pytest's summary and slowest
    # tests; a shell that started this one in the background had SIGINT ignored, so listen again.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
        return _has_cuda()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_trt = pytest.mark.skip(reason="needs TensorRT and a CUDA GPU")
    has_cuda, has_trt = _has_cuda(), _has_tensorrt()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "trt" in item.keywords and not has_trt:
            item.add_marker(skip_trt)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The authors' files with tiny random weights: model.ckpt, Synchformer and RawNet3 weights."""
    from vssflow.export.checkpoint import write_random_assets
    return write_random_assets(tmp_path_factory.mktemp("assets"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_assets):
    """A model folder exported from `tiny_assets` (ONNX + weights.pt for the torch backend + manifest)."""
    from vssflow.export.onnx_export import ExportOptions, export_model
    out = tmp_path_factory.mktemp("models") / "tiny"
    export_model(tiny_assets["checkpoint"], tiny_assets["synchformer"], out, rawnet=tiny_assets["rawnet"],
                 options=ExportOptions(torch_weights=True))
    return out


@pytest.fixture(scope="session")
def clip12(tmp_path_factory):
    """A 12-second 25 fps clip (two windows), small frames."""
    from vssflow.benchmarks.media import make_video
    path = tmp_path_factory.mktemp("media") / "clip12.mp4"
    make_video(path, seconds=12, fps=25, size=(96, 64))
    return path


@pytest.fixture(scope="session")
def clip4(tmp_path_factory):
    """A 4-second 25 fps clip (one window, padded by the model to 10 s), small frames."""
    from vssflow.benchmarks.media import make_video
    path = tmp_path_factory.mktemp("media") / "clip4.mp4"
    make_video(path, seconds=4, fps=25, size=(96, 64))
    return path
