"""Choices the runtime makes for a GPU that can be checked without one: where frames are prepared,
and the torch backend's FP32 reference in true FP32."""

from __future__ import annotations

import pytest

from vssflow.runtime.errors import BackendError
from vssflow.runtime.inputs import frames_device


@pytest.mark.parametrize("preprocess,device,triton,expected", [
    ("auto", "cuda", True, "cuda"),
    ("auto", "cuda:1", True, "cuda:1"),
    ("auto", "cuda", False, None),          # no Triton: the host path, not the FP64 reference
    ("auto", "cpu", True, None),
    ("auto", None, True, None),             # ort: frames from the host
    ("host", "cuda", True, None),
    ("device", "cuda", False, "cuda"),      # asked for: the reference runs (for checking)
    ("device", "cpu", False, "cpu"),
])
def test_frames_on_the_device_only_with_triton_under_auto(preprocess, device, triton, expected):
    assert frames_device(preprocess, device, "torch", triton) == expected


def test_device_preprocessing_needs_a_backend_that_takes_tensors():
    with pytest.raises(BackendError, match="the ort backend takes frames from the host"):
        frames_device("device", None, "ort", True)


def test_fp32_reference_runs_without_tf32():
    import torch

    from vssflow.runtime.backends import no_tf32
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with no_tf32(torch):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
