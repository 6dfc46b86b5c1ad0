"""Half precision as one policy, for the FP16 ONNX graphs and the torch half mode.

The policy, written once (`FP32_OPS`, `HALF_OPS`, `PROMOTE_OPS`, `FP32_MODULES`, `FP32_PARAMS`):

* weights, matrix products and convolutions in FP16 (BF16 for the torch bf16 mode);
* LayerNorm/GroupNorm/InstanceNorm/BatchNorm, softmax (attention included), sin/cos and
  reductions computed in FP32: their inputs cast up, their result cast back to the dtype of
  their input, so every node sees one type (what a strongly typed TensorRT network needs);
* the model's own FP32 code stays FP32: RoPE tables and rotation (`transformer.apply_rope`), the
  timestep Fourier features (`time_proj.weight` is kept FP32), and arithmetic that mixes an FP32
  tensor (a stage input: `cond_bias`, `cfg`) with an FP16 one is promoted to FP32 explicitly, so
  the flow step's residual stream and its guidance mix are FP32;
* stage inputs and outputs stay FP32: the contracts are the same at every precision.

How: `half_stage(module)` copies a stage module with its parameters in half (norm parameters and
`time_proj.weight` kept FP32) and runs it under `Fp16Policy`, a `TorchFunctionMode` that applies
the rules above to every torch call. The same wrapper is traced by the TorchScript exporter into
`<stage>.fp16.onnx` (the casts become explicit `Cast` nodes) and is the torch backend's half mode
(eager, CUDA; CPU for checking). Why this way and not a graph converter (onnxconverter-common's
`convert_float_to_float16` with a block list) or ModelOpt AutoCast: a graph converter sees only op
types, so the FP32 arithmetic that feeds sin/cos (RoPE positions x frequencies, 2 pi t W) and the
guidance mix become FP16 unless blocked node by node, by names the exporter makes up; it also
clamps weights to +-1e4 and needs the whole FP32 proto in memory (the full flow step is 1.7 GB,
the protobuf limit 2 GB). ModelOpt pulls cupy, onnxruntime-gpu and a pinned onnx. Measurements:
export/PRECISION.md.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .errors import ExportError

# --- the policy ---------------------------------------------------------------------------------
# torch functions by name (`torch.softmax`, `F.softmax` and `Tensor.softmax` are all "softmax").
FP32_OPS = frozenset({
    "layer_norm", "group_norm", "instance_norm", "batch_norm",          # normalizations
    "softmax", "log_softmax",                                           # attention weights
    "sin", "cos",                                                       # RoPE, timestep features
    "mean", "sum", "var", "std", "var_mean", "std_mean", "norm", "logsumexp", "cumsum",  # reductions
})
HALF_OPS = frozenset({
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "einsum",
})
PROMOTE_OPS = frozenset({
    "add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "mul", "__mul__", "__rmul__",
    "div", "__truediv__", "__rtruediv__", "cat", "concat", "concatenate", "stack", "where",
    "maximum", "minimum",
})
ATTENTION_OPS = frozenset({"scaled_dot_product_attention"})
# Parameters that stay FP32 in a half module: those of the FP32 ops above, and the stored
# Fourier frequencies of the time token (2 pi t W must be exact before sin/cos).
FP32_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
FP32_PARAMS = ("time_proj.weight",)

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _floating(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


class Fp16Policy(TorchFunctionMode):
    """Applies the policy to every torch call made while it is active (eager or traced).

    `half`: the reduced dtype (float16, or bfloat16 for the torch bf16 mode).
    """

    def __init__(self, half: torch.dtype = torch.float16):
        super().__init__()
        self.half = half

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [a for a in _leaves((args, kwargs)) if _floating(a)]
        if not tensors:
            return func(*args, **kwargs)
        has_half = any(t.dtype == self.half for t in tensors)
        has_fp32 = any(t.dtype == torch.float32 for t in tensors)
        if name in ATTENTION_OPS:
            return _attention(self.half, *args, **kwargs)
        if name in HALF_OPS and has_half and has_fp32:
            args, kwargs = _cast((args, kwargs), torch.float32, self.half)
        elif name in FP32_OPS and has_half:
            out_dtype = tensors[0].dtype
            args, kwargs = _cast((args, kwargs), self.half, torch.float32)
            return tree_map(lambda o: o.to(out_dtype) if _floating(o) else o, func(*args, **kwargs))
        elif name in PROMOTE_OPS and has_half and has_fp32:
            args, kwargs = _cast((args, kwargs), self.half, torch.float32)
        return func(*args, **kwargs)


def _leaves(tree):
    out = []
    tree_map(out.append, tree)
    return out


def _cast(tree, src: torch.dtype, dst: torch.dtype):
    return tree_map(lambda a: a.to(dst) if isinstance(a, torch.Tensor) and a.dtype == src else a, tree)


def _attention(half: torch.dtype, q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
               scale: float | None = None, **kw) -> torch.Tensor:
    """Softmax attention, the products in half and the softmax in FP32.

    Eager CUDA keeps the fused kernel (flash / memory-efficient attention accumulate and take the
    softmax in FP32 themselves); traced or on a CPU it is written out, so the graph shows the casts.
    """
    if attn_mask is not None or is_causal or dropout_p or kw:
        raise NotImplementedError("Fp16Policy: attention with a mask, causality or dropout")
    q, k, v = (x.to(half) for x in (q, k, v))
    if q.is_cuda and not _in_graph():
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    weights = torch.softmax(((q * scale) @ k.transpose(-2, -1)).float(), dim=-1)   # [.., Nq, Nk] fp32
    return weights.to(half) @ v


def _in_graph() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def half_module(module: nn.Module, half: torch.dtype = torch.float16, copy_: bool = True) -> nn.Module:
    """`module` with its parameters and buffers in `half`, except `FP32_MODULES`' and
    `FP32_PARAMS`'. Integer buffers are untouched. A copy (the original unchanged), or with
    `copy_=False` the module itself, converted in place (the torch backend: one set of weights)."""
    m = (copy.deepcopy(module) if copy_ else module).to(half)
    for sub in m.modules():
        if isinstance(sub, FP32_MODULES):
            sub.float()
    for name, p in m.named_parameters():
        if name.endswith(FP32_PARAMS):
            p.data = p.data.float()
    return m


class HalfStage(nn.Module):
    """A stage under the policy: FP32 inputs and outputs, `half` inside (`half_module` + `Fp16Policy`)."""

    def __init__(self, module: nn.Module, half: torch.dtype = torch.float16, copy_: bool = True):
        super().__init__()
        self.module, self.half = half_module(module, half, copy_), half

    def forward(self, *args):
        with Fp16Policy(self.half):
            out = self.module(*args)
        if isinstance(out, tuple):
            return tuple(o.float() if _floating(o) else o for o in out)
        return out.float()


def half_stage(module: nn.Module, precision: str = "fp16", copy_: bool = True) -> nn.Module:
    """`module` as the policy runs it at `precision` (fp16 or bf16); fp32: the module itself.
    `copy_=False` converts `module`'s own weights (no second copy in memory)."""
    if precision == "fp32":
        return module
    if precision not in HALF_DTYPES:
        raise ValueError(f"unknown precision {precision!r}: expected fp32, fp16 or bf16")
    return HalfStage(module, HALF_DTYPES[precision], copy_).eval()


# --- checks on the graphs -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Agreement:
    """How an FP16 output compares with the FP32 one."""

    snr_db: float
    max_abs_err: float
    finite: bool

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def agreement(ref: np.ndarray, got: np.ndarray) -> Agreement:
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    finite = bool(np.isfinite(got64).all())
    if not finite:
        return Agreement(float("nan"), float("inf"), False)
    noise = float(np.sum((got64 - ref64) ** 2))
    signal = float(np.sum(ref64 ** 2))
    snr = float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)
    return Agreement(float(snr), float(np.abs(got64 - ref64).max()), True)


def compare_graphs(fp32_path, fp16_path, contract, *, which: str = "opt", seed: int = 1,
                   sizes: Mapping[str, int] | None = None, feed: Mapping[str, np.ndarray] | None = None,
                   threads: int | None = None) -> dict[str, Agreement]:
    """Both graphs on ONNX Runtime (CPU) with the contract's sample inputs: output name -> Agreement."""
    from vssflow.runtime.extras import onnxruntime
    ort = onnxruntime()
    feed = dict(feed) if feed is not None else contract.sample(which, seed=seed, **(sizes or {}))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    outs = []
    for path in (fp32_path, fp16_path):
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, feed))
        del sess
    return {s.name: agreement(r, g) for s, r, g in zip(contract.outputs, *outs)}


def check_fp16(stage: str, report: Mapping[str, Agreement]) -> None:
    """Raise ExportError if the FP16 graph of `stage` gave a non-finite value: it must not be written."""
    bad = [name for name, a in report.items() if not a.finite]
    if bad:
        raise ExportError(f"{stage}: the FP16 graph gives non-finite values in {', '.join(bad)} on the "
                          "contract's sample inputs (FP16 overflows past 65504), so it is not written; "
                          "export with --precision fp32")


# --- what a strongly typed TensorRT network needs of the graph ------------------------------------

_FLOAT = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64"}
# ops whose float inputs legitimately differ in type (a cast, or a float operand that is a shape)
_MIXED_OK = {"Cast", "CastLike", "Resize", "Upsample"}
_HALF_COMPUTE = {"MatMul", "Gemm", "Conv", "ConvTranspose"}   # not Einsum: RoPE's positions x frequencies
_FP32_COMPUTE = {"LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
                 "Softmax", "LogSoftmax", "Sin", "Cos", "ReduceMean", "ReduceSum", "ReduceSumSquare",
                 "ReduceL2", "ReduceLogSumExp", "CumSum"}


def graph_types(model) -> dict[str, str]:
    """Float element type of every tensor in an ONNX model (after shape inference)."""
    import onnx
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    g = model.graph
    types = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type.elem_type
        if t in _FLOAT:
            types[vi.name] = _FLOAT[t]
    for init in g.initializer:
        if init.data_type in _FLOAT:
            types[init.name] = _FLOAT[init.data_type]
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in _FLOAT:
                    types[node.output[0]] = _FLOAT[a.t.data_type]
    return types


def policy_violations(model, half: str = "float16") -> list[str]:
    """What keeps an FP16 graph from being the policy's, and from a strongly typed build.

    * a node whose float inputs differ in type (outside casts and Resize's scales);
    * a matrix product or convolution not in `half`, a normalization/softmax/sin/cos/reduction
      not in float32;
    * a graph input or output not float32 (the stage contract).
    Empty: the graph is fine.
    """
    import onnx
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    types = graph_types(model)
    problems = []
    for node in model.graph.node:
        ins = [types[i] for i in node.input if i in types]
        if node.op_type not in _MIXED_OK and len(set(ins)) > 1:
            problems.append(f"{node.name} ({node.op_type}): mixed input types {ins}")
        elif node.op_type in _HALF_COMPUTE and ins and ins[0] != half:
            problems.append(f"{node.name} ({node.op_type}): computes in {ins[0]}, not {half}")
        elif node.op_type in _FP32_COMPUTE and ins and ins[0] != "float32":
            problems.append(f"{node.name} ({node.op_type}): computes in {ins[0]}, not float32")
    for vi in list(model.graph.input) + list(model.graph.output):
        t = _FLOAT.get(vi.type.tensor_type.elem_type)
        if t is not None and t != "float32":
            problems.append(f"graph {'input' if vi in model.graph.input else 'output'} {vi.name} is {t}")
    return problems


def op_precisions(model) -> dict[str, dict[str, int]]:
    """op type -> {dtype of its first float input: count}: what the graph computes in which type."""
    import onnx
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    types = graph_types(model)
    out: dict[str, dict[str, int]] = {}
    for node in model.graph.node:
        t = next((types[i] for i in node.input if i in types), None)
        if t is not None:
            d = out.setdefault(node.op_type, {})
            d[t] = d.get(t, 0) + 1
    return out
