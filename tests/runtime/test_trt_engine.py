"""The trt backend's engine checks, against a stand-in engine (no TensorRT or GPU here): I/O
against the stage contract at load, every return value of the calls that run it, the scratch size
and hand-over on 10.x and 11.x, and that none of it imports torch."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import types

import pytest

from tests.export import fake_trt
from vssflow.runtime import trt_engine
from vssflow.runtime.contracts import ModelSizes, stage_contracts
from vssflow.runtime.errors import BackendError

TRT = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"),
                            ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="user"),
                            float32="DataType.FLOAT", float16="DataType.HALF", int32="DataType.INT32",
                            int64="DataType.INT64", bool="DataType.BOOL")
CONTRACT = stage_contracts(ModelSizes())["flow_step"]


class Engine(fake_trt.TensorTable):
    """What `check_io` reads of an ICudaEngine: the contract's tensors, dynamic where it is symbolic,
    with `changes` (name -> (dtype, shape)) applied."""

    def __init__(self, contract=CONTRACT, changes=None, drop=(), extra=()):
        names = {v: k for k, v in trt_engine.dtype_names(TRT).items()}
        self.tensors = {s.name: ("in" if s in contract.inputs else "out", names[s.dtype],
                                 tuple(-1 if isinstance(a, str) else a for a in s.shape))
                        for s in contract.inputs + contract.outputs if s.name not in drop}
        for name, (dtype, shape) in (changes or {}).items():
            self.tensors[name] = (self.tensors[name][0], dtype, shape)
        for name in extra:
            self.tensors[name] = ("out", "DataType.FLOAT", (1,))
        self.num_io_tensors = len(self.tensors)


def test_an_engine_of_the_contract_passes():
    trt_engine.check_io("flow_step", Engine(), CONTRACT, TRT, "flow_step.x.engine")


@pytest.mark.parametrize("engine,needle", [
    (Engine(drop=("cfg",)), "has inputs ['cond_bias', 'keys', 't', 'values', 'z'], the stage contract"),
    (Engine(extra=("attn",)), "has outputs ['attn', 'velocity']"),
    (Engine(changes={"z": ("DataType.HALF", (-1, 128, -1))}), "input z is float16 [-1, 128, -1], the stage contract says float32"),
    (Engine(changes={"velocity": ("DataType.FLOAT", (-1, 64, -1))}), "output velocity is float32 [-1, 64, -1]"),
    (Engine(changes={"keys": ("DataType.FLOAT", (-1, -1, 12, -1))}), "input keys is float32 [-1, -1, 12, -1]"),
], ids=["missing input", "extra output", "dtype", "fixed size", "rank"])
def test_an_engine_of_another_model_is_refused_at_load(engine, needle):
    with pytest.raises(BackendError) as e:
        trt_engine.check_io("flow_step", engine, CONTRACT, TRT, "flow_step.x.engine")
    message = str(e.value)
    assert message.startswith("flow_step: flow_step.x.engine") and "\n" not in message
    assert needle in message


class Context:
    def __init__(self, refuse=()):
        self.refuse, self.calls = set(refuse), []

    def set_input_shape(self, name, shape):
        self.calls.append(("shape", name, shape))
        return ("shape", name) not in self.refuse

    def set_tensor_address(self, name, ptr):
        self.calls.append(("address", name, ptr))
        return ("address", name) not in self.refuse

    def get_tensor_shape(self, name):
        return (1, 128, 250) if name == "velocity" else (-1,)

    def execute_async_v3(self, stream):
        self.calls.append(("run", stream))
        return "run" not in self.refuse


@pytest.mark.parametrize("refuse,needle", [
    ({("shape", "z")}, "flow_step: TensorRT refused the shape [1, 128, 250] of z"),
    ({("address", "z")}, "flow_step: TensorRT refused the address of z"),
    ({("address", "velocity")}, "flow_step: TensorRT refused the address of velocity"),
    ({"run"}, "flow_step: TensorRT failed to run the engine"),
])
def test_every_return_value_is_checked(refuse, needle):
    ctx = Context(refuse)
    with pytest.raises(BackendError, match="^" + re.escape(needle)):
        trt_engine.set_inputs("flow_step", ctx, {"z": ((1, 128, 250), 0x1000)})
        assert trt_engine.output_shape("flow_step", ctx, "velocity") == (1, 128, 250)
        trt_engine.execute("flow_step", ctx, {"velocity": 0x2000}, stream=0x77)


def test_a_run_enqueues_on_the_given_stream():
    ctx = Context()
    trt_engine.set_inputs("flow_step", ctx, {"z": ((1, 128, 250), 0x1000)})
    trt_engine.execute("flow_step", ctx, {"velocity": 0x2000}, stream=0x77)
    assert ctx.calls == [("shape", "z", (1, 128, 250)), ("address", "z", 0x1000), ("address", "velocity", 0x2000),
                         ("run", 0x77)]
    with pytest.raises(BackendError, match="cannot tell the shape of cond"):
        trt_engine.output_shape("flow_step", ctx, "cond")


def test_scratch_memory_on_10_3_and_11():
    """10.3 has device_memory_size_v2 and set_device_memory(ptr, size); 11 only those; 10.0 the old pair."""
    v11 = types.SimpleNamespace(device_memory_size_v2=4096)
    v10_0 = types.SimpleNamespace(device_memory_size=2048)
    assert trt_engine.device_memory_size(v11) == 4096 and trt_engine.device_memory_size(v10_0) == 2048
    got = []
    new = types.SimpleNamespace(set_device_memory=lambda ptr, size: got.append((ptr, size)))
    trt_engine.set_device_memory(new, 0x100, 4096)
    old = types.SimpleNamespace()
    trt_engine.set_device_memory(old, 0x200, 2048)
    assert got == [(0x100, 4096)] and old.device_memory == 0x200


def test_contexts_own_no_scratch_memory():
    asked = []
    engine = types.SimpleNamespace(create_execution_context=lambda strategy: asked.append(strategy) or "ctx")
    assert trt_engine.context_without_memory("vocoder", engine, TRT) == "ctx" and asked == ["user"]
    engine = types.SimpleNamespace(create_execution_context=lambda strategy: None)
    with pytest.raises(BackendError, match="^vocoder: TensorRT could not create an execution context"):
        trt_engine.context_without_memory("vocoder", engine, TRT)


def test_engine_matching_and_checks_import_no_torch():
    code = textwrap.dedent("""
        import sys
        from vssflow.runtime import engines, trt_engine, cuda_driver  # noqa: F401
        from vssflow.export import trt_build  # noqa: F401
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
