"""Which implementation runs: the Triton kernel or the reference beside it.

Automatic: the kernel for CUDA tensors when Triton imports, the reference everywhere else.
``VSSFLOW_KERNELS=0`` turns every kernel off (for debugging: compare a run against the
references); a function's ``use_kernel=True/False`` argument overrides both. ``use_kernel=True``
on CPU tensors needs Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), which is how the tests run the kernels without a GPU.
"""

from __future__ import annotations

import functools
import os

ENV_SWITCH = "VSSFLOW_KERNELS"            # "0": references only


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works (installed, and its backend loads)."""
    from ._triton import triton
    return triton is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter on CPU tensors (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_enabled() -> bool:
    """False when ``VSSFLOW_KERNELS=0`` (or ``false``/``off``/``no``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def use_kernel(device, requested: bool | None = None) -> bool:
    """Whether to run the Triton kernel for tensors on ``device`` (a ``torch.device``).

    ``requested``: None chooses automatically; True insists (raising ``RuntimeError`` where the
    kernel cannot run); False always picks the reference.
    """
    if requested is False:
        return False
    on_cuda = getattr(device, "type", str(device)) == "cuda"
    if requested is None:
        return on_cuda and kernels_enabled() and triton_available()
    if not triton_available():
        raise RuntimeError("use_kernel=True needs Triton: pip install triton")
    if not on_cuda and not interpreting():
        raise RuntimeError(f"use_kernel=True on {device} tensors needs a CUDA device, or "
                           "TRITON_INTERPRET=1 set before triton is imported (its CPU interpreter)")
    return True
