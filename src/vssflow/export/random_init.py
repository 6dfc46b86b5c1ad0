"""Random tensors of realistic scale for checkpoints written in the authors' layout.

Every component's `authors_state_dict(dims, generator=..., device=...)` builds its tensors with
`init_tensor`; with device="meta" nothing is allocated, which the loader uses to check shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def randn(shape: Sequence[int], std: float, generator: torch.Generator | None = None,
          device: str | torch.device = "cpu") -> torch.Tensor:
    if str(device) == "meta":
        return torch.empty(tuple(shape), device="meta")
    return torch.randn(tuple(shape), generator=generator) * std


def const(shape: Sequence[int], value: float, device: str | torch.device = "cpu") -> torch.Tensor:
    if str(device) == "meta":
        return torch.empty(tuple(shape), device="meta")
    return torch.full(tuple(shape), float(value))


def init_tensor(name: str, shape: Sequence[int], generator: torch.Generator | None = None,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """A tensor whose scale keeps activations O(1) through the network it belongs to.

    Matrices and kernels: N(0, 1/fan_in) with fan_in = prod(shape[1:]); 1-d `weight` of a norm:
    1 + N(0, 0.05); 1-d biases: N(0, 0.02).
    """
    shape = tuple(int(s) for s in shape)
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return randn(shape, 1.0 / math.sqrt(max(fan_in, 1)), generator, device)
    if leaf == "weight":
        w = randn(shape, 0.05, generator, device)
        return w if str(device) == "meta" else w + 1.0
    return randn(shape, 0.02, generator, device)
