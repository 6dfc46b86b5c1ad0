"""What the kernel tests share: Triton's interpreter check, and a fresh process for compiled kernels."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def require_interpreted(kernel, module: str):
    """Skip unless Triton is present and ``kernel`` was built for its interpreter (``TRITON_INTERPRET=1``
    set before ``module`` imported triton). Returns the triton module."""
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(kernel, InterpretedFunction):
        pytest.skip(f"{module} was imported before TRITON_INTERPRET=1 was set")
    return triton


def run_compiled(code: str, *, timeout: int = 300, env: dict[str, str] | None = None) -> None:
    """Run ``code`` in a fresh Python without the interpreter (this process holds the interpreted
    kernels), and assert that it printed ``ok``."""
    pytest.importorskip("triton")
    clean = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**clean, **(env or {})},
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
