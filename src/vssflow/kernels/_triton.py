"""Triton, or stand-ins so that a module defining kernels imports without it (its reference runs).

    from ._triton import jit, tl, triton        # triton and tl are None where Triton is missing

Kernels read ``tl`` from their own module's globals, hence the names bound there by this import.
"""

try:
    import triton
    import triton.language as tl
    jit = triton.jit
except Exception:        # ImportError, or a broken install failing on load
    triton = tl = None

    def jit(fn):
        """No Triton: the kernel stays a plain function that nothing launches."""
        return fn
