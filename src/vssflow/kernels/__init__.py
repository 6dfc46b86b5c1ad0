"""GPU kernels with reference fallbacks.

- `preprocess`: decoded uint8 frames -> normalised encoder input, Triton kernels and a torch
  reference, bit-exact with the CPU path (`runtime/resize.py`).
- `frames`: a window's picked frames (`video.windows(upload=...)`) -> both encoders' inputs on
  the device; the Session's path when its backend runs on a GPU.
- `rope`: rotary embedding applied in place to q/k heads, one launch (q and k together in
  self-attention), bit-exact with `export/transformer.apply_rope`; the transformer uses it on CUDA.
- `dispatch`: which runs: the kernel on CUDA when Triton imports, the reference elsewhere;
  `VSSFLOW_KERNELS=0` or `use_kernel=False` turns kernels off.
- `profiling`: where one clip's time goes (figures in `PROFILE.md`).

Nothing is imported here: torch and triton load only with the module that needs them.
"""
