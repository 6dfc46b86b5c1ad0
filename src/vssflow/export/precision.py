"""Half precision as one policy, for the FP16 ONNX graphs and the torch half mode.

The policy, written once (`POLICY`, and the islands below that the stage modules call):

* weights, matrix products and convolutions in FP16 (BF16 for the torch bf16 mode);
* LayerNorm/GroupNorm, softmax (attention included), sin/cos and reductions computed in FP32:
  their inputs cast up, their result cast back to the dtype of their input, so every node sees
  one type (what a strongly typed TensorRT network needs);
* the model's own FP32 code stays FP32: RoPE tables and rotation (`transformer.apply_rope`), the
  timestep Fourier features (`time_proj.weight` is kept FP32), the flow step's residual stream and
  its guidance mix (`flow_step.py`, `transformer.Block`, cast explicitly with `like`);
* stage inputs and outputs stay FP32: the contracts are the same at every precision.

How: in the modules' own code, so a half forward costs no more Python than an FP32 one.
`half_module(module)` copies a stage with its parameters in half and gives each module a rule
names its policy class (`POLICY`): a Linear/Conv casts its input to its weight's dtype, a
LayerNorm/GroupNorm (its parameters kept FP32) computes in FP32 and casts back. The functional
islands, `softmax` and `attention`, are what the stage modules call in place of `torch.softmax`
and `F.scaled_dot_product_attention`; on FP32 tensors they are those calls exactly (no cast, no
node), so the FP32 modules and graphs are unchanged. `half_stage` wraps the half module with FP32
outputs. The TorchScript exporter traces that wrapper into `<stage>.fp16.onnx` (the casts become
explicit `Cast` nodes), and the torch backend runs it, eager, captured in a CUDA graph or
compiled: one rule set for both. `policy_violations` checks an ONNX graph against the same
`POLICY`. Why not a graph converter (onnxconverter-common's `convert_float_to_float16`) or
ModelOpt AutoCast, and not `torch.autocast` (it casts FP32 weights on every call, and its op
lists differ between CPU and CUDA): export/PRECISION.md.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ExportError


# --- the policy ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
    """One line of the policy: what computes in which type, as torch modules and as ONNX ops."""

    what: str
    computes_in: str                       # "half" or "float32"
    modules: tuple[type, ...]              # torch modules that follow it (their class swapped in a half module)
    onnx_ops: tuple[str, ...]              # the ONNX ops it becomes


POLICY = (
    Rule("matrix products and convolutions", "half",
         (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
         ("MatMul", "Gemm", "Conv", "ConvTranspose")),    # not Einsum: RoPE's positions x frequencies
    Rule("normalizations", "float32", (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase),
         ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization")),
    Rule("softmax, attention's included (`softmax`, `attention`)", "float32", (), ("Softmax", "LogSoftmax")),
    Rule("sin/cos of RoPE and of the time features (their code is FP32)", "float32", (), ("Sin", "Cos")),
    Rule("reductions", "float32", (),
         ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "CumSum")),
)
# Parameters that stay FP32 in a half module besides the normalizations': the stored Fourier
# frequencies of the time token (2 pi t W must be exact before sin/cos).
FP32_PARAMS = ("time_proj.weight",)

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _floating(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`x` in `ref`'s dtype; `x` itself when it already is (no node in a traced FP32 graph)."""
    return x if x.dtype == ref.dtype else x.to(ref.dtype)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


# --- the islands the stage modules call ----------------------------------------------------------

def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """`torch.softmax` computed in FP32, returned in `x`'s dtype."""
    return like(torch.softmax(_fp32(x), dim=dim), x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Softmax attention (no mask, no dropout): `F.scaled_dot_product_attention` in FP32; in half
    (`q`'s dtype, `k` and `v` cast to it) the products in half and the softmax in FP32.

    Eager or compiled CUDA keeps the fused kernel (flash / memory-efficient attention accumulate and
    take the softmax in FP32 themselves); traced for export, or on a CPU, it is written out, so the
    graph shows the casts.
    """
    if q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    k, v = like(k, q), like(v, q)
    if q.is_cuda and not exporting():
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    weights = torch.softmax(((q * scale) @ k.transpose(-2, -1)).float(), dim=-1)   # [.., Nq, Nk] fp32
    return weights.to(q.dtype) @ v


def exporting() -> bool:
    """True while a graph is traced for export (TorchScript / ONNX): every op must stay in the graph,
    written out. (Not under `torch.compile`, which takes the fused kernels.)"""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


# --- half modules ----------------------------------------------------------------------------------

class _HalfInput:
    """A matrix product or convolution: its input cast to its (half) weight's dtype, so FP32 stage
    inputs and the FP32 residual stream meet half weights."""

    def forward(self, x):
        return super().forward(like(x, self.weight))


class _Fp32Island:
    """A normalization computed in FP32 (its parameters are), its result in its input's dtype."""

    def forward(self, x):
        return like(super().forward(_fp32(x)), x)


_POLICY_MIXINS = {"half": _HalfInput, "float32": _Fp32Island}
_POLICY_CLASSES: dict[type, type] = {}


def _policy_class(cls: type) -> type | None:
    """The class a module of `cls` becomes in a half module (None: unchanged)."""
    if issubclass(cls, (_HalfInput, _Fp32Island)):       # already one (stages share modules)
        return cls
    if cls not in _POLICY_CLASSES:
        rule = next((r for r in POLICY if r.modules and issubclass(cls, r.modules)), None)
        _POLICY_CLASSES[cls] = None if rule is None else \
            type(f"Half{cls.__name__}", (_POLICY_MIXINS[rule.computes_in], cls), {"__module__": __name__})
    return _POLICY_CLASSES[cls]


def half_module(module: nn.Module, half: torch.dtype = torch.float16, copy_: bool = True) -> nn.Module:
    """`module` with its parameters and buffers in `half` (the normalizations' and `FP32_PARAMS`
    kept FP32) and each module of `POLICY` given its rule. Integer buffers are untouched. A copy
    (the original unchanged), or with `copy_=False` the module itself, converted in place (stages
    that share modules, as the condition stage and the flow step share the transformer's blocks,
    may each be converted)."""
    m = (copy.deepcopy(module) if copy_ else module).to(half)
    for sub in m.modules():
        cls = _policy_class(type(sub))
        if cls is not None:
            sub.__class__ = cls
            if issubclass(cls, _Fp32Island):
                sub.float()
    for name, p in m.named_parameters():
        if name.endswith(FP32_PARAMS):
            p.data = p.data.float()
    return m


class HalfStage(nn.Module):
    """A stage under the policy: FP32 inputs and outputs, `half` inside (`half_module`)."""

    def __init__(self, module: nn.Module, half: torch.dtype = torch.float16, copy_: bool = True):
        super().__init__()
        self.module, self.half = half_module(module, half, copy_), half

    def forward(self, *args):
        return fp32_outputs(self.module(*args))


def fp32_outputs(out):
    """A stage's output(s) in FP32: the contract at every precision."""
    if isinstance(out, tuple):
        return tuple(_fp32(o) if _floating(o) else o for o in out)
    return _fp32(out)


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
_HALF_COMPUTE = frozenset(op for r in POLICY if r.computes_in == "half" for op in r.onnx_ops)
_FP32_COMPUTE = frozenset(op for r in POLICY if r.computes_in == "float32" for op in r.onnx_ops)


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
