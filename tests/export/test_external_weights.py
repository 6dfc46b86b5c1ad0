"""Graph weights in a file of their own (`onnx_export.externalize`), which ONNX Runtime maps."""

import shutil
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

from vssflow.export.onnx_export import EXTERNAL_MIN, WEIGHTS_ALIGN, WEIGHTS_SHA256, externalize
from vssflow.runtime.model_folder import sha256
from vssflow.runtime.precision import weights_name


def _linear_graph(path, seed):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(3, 256),), str(path), input_names=["x"], output_names=["y"],
                          dynamo=False)
    return path


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_weights_move_to_an_aligned_file_and_give_the_same_outputs(tmp_path):
    inline = _linear_graph(tmp_path / "inline.onnx", 0)
    graph = tmp_path / "stage.onnx"
    shutil.copy(inline, graph)
    moved = externalize(graph)
    data = tmp_path / weights_name("stage.onnx")
    assert moved == 256 * 256 * 4 and data.is_file()            # the big matrix; the small ones stay
    model = onnx.load(str(graph), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert [dict((e.key, e.value) for e in t.external_data)["location"] for t in external] == [data.name]
    assert all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % WEIGHTS_ALIGN == 0 for t in external)
    assert all(len(t.raw_data) < EXTERNAL_MIN for t in model.graph.initializer if t not in external)
    assert graph.stat().st_size < 16 * 1024                      # the structure and the 8-KiB matrix
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[WEIGHTS_SHA256] == sha256(data)
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    np.testing.assert_array_equal(_run(graph, x), _run(inline, x))      # the same bits


def test_onnx_runtime_maps_the_weights_file(tmp_path):
    """The weights are the file's pages, not a copy in ONNX Runtime's heap (as the runtime's
    sessions run: without prepacking, which would copy them into MLAS's layout)."""
    graph = _linear_graph(tmp_path / "stage.onnx", 0)
    externalize(graph)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    with open("/proc/self/maps") as f:
        mapped = [line for line in f if line.rstrip().endswith(weights_name(graph.name))]
    assert mapped, "ONNX Runtime read the weights file instead of mapping it"
    del session


def test_the_graph_hash_follows_its_weights(tmp_path):
    """Two graphs of the same structure and other weights differ in their own sha256 (it names the
    TensorRT engines built from them), although their structure files would otherwise be equal."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _linear_graph(tmp_path / "a" / "stage.onnx", 0)
    b = _linear_graph(tmp_path / "b" / "stage.onnx", 1)
    externalize(a)
    externalize(b)
    assert sha256(a) != sha256(b)


def test_a_graph_without_large_weights_keeps_them_inline(tmp_path):
    graph = _linear_graph(tmp_path / "stage.onnx", 0)
    before = graph.read_bytes()
    assert externalize(graph, 1 << 30) == 0
    assert not (tmp_path / weights_name(graph.name)).exists() and graph.read_bytes() == before
