"""The exporter's ONNX clean-up passes change how a graph computes, never what: each is checked on a small
hand-built graph against ONNX Runtime's output for the original."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from acf_deploy.exporters.optimize import (
    dense_small_convs,
    drop_softmax_shifts,
    fold_scalar_scales,
    fold_static_shapes,
    optimize_graph,
    weight_only_nodes,
)


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _same(before: onnx.ModelProto, after: onnx.ModelProto, feeds, atol=1e-5) -> None:
    for a, b in zip(_run(before, feeds), _run(after, feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)


def _tensor(name, shape, rng):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_small_convolutions_become_one_gemm_and_large_ones_stay():
    rng = np.random.default_rng(0)
    inits = [_tensor("w", (6, 4, 3, 3), rng), _tensor("b", (6,), rng), _tensor("w2", (6, 4, 3, 3), rng)]
    model = _model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),  # 4x4 map: dense
            helper.make_node("Conv", ["big", "w2"], ["z"], pads=[1, 1, 1, 1]),  # 8x8 map: stays a Conv
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 4, 4]),
            helper.make_tensor_value_info("big", TensorProto.FLOAT, ["batch", 4, 8, 8]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6, 4, 4]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 6, 8, 8]),
        ],
        inits,
    )
    rewritten = onnx.ModelProto.FromString(model.SerializeToString())
    assert dense_small_convs(rewritten) == 1
    assert _ops(rewritten).count("Conv") == 1 and "MatMul" in _ops(rewritten)
    feeds = {"x": rng.standard_normal((3, 4, 4, 4)).astype(np.float32)}
    feeds["big"] = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    _same(model, rewritten, feeds)


def test_scalar_scales_fold_into_linear_neighbours_only():
    rng = np.random.default_rng(1)
    c = numpy_helper.from_array(np.array(1.1, np.float32), "c")
    gate = numpy_helper.from_array(np.array(0.3, np.float32), "gate")
    inits = [c, gate, _tensor("w", (8, 5), rng), _tensor("wo", (5, 5), rng)]
    model = _model(
        [
            helper.make_node("Div", ["x", "c"], ["xs"]),  # into the MatMul weight and the gate's Mul
            helper.make_node("Mul", ["gate", "xs"], ["g"]),
            helper.make_node("MatMul", ["xs", "w"], ["h"]),
            helper.make_node("MatMul", ["h", "wo"], ["o"]),
            helper.make_node("Mul", ["gate", "o"], ["og_"]),  # into W_O
            helper.make_node("Identity", ["og_"], ["og"]),
            helper.make_node("Div", ["x", "c"], ["kept"]),  # feeds a Sigmoid: must stay
            helper.make_node("Sigmoid", ["kept"], ["s"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [
            helper.make_tensor_value_info("g", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("og", TensorProto.FLOAT, ["batch", 5]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", 8]),
        ],
        inits,
    )
    rewritten = onnx.ModelProto.FromString(model.SerializeToString())
    assert fold_scalar_scales(rewritten) == 2
    assert _ops(rewritten).count("Div") == 1 and _ops(rewritten).count("Mul") == 1
    _same(model, rewritten, {"x": rng.standard_normal((4, 8)).astype(np.float32)})


def test_softmax_drops_only_terms_constant_along_its_axis():
    rng = np.random.default_rng(2)
    scale = numpy_helper.from_array(np.array(0.25, np.float32), "scale")
    model = _model(
        [
            helper.make_node("Sub", ["a", "row"], ["t1"]),  # row: (B, N, 1), constant along the axis
            helper.make_node("Sub", ["t1", "col"], ["t2"]),  # col: (B, 1, N), not constant: stays
            helper.make_node("Mul", ["t2", "scale"], ["t3"]),
            helper.make_node("Softmax", ["t3"], ["p"], axis=-1),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 5, 5]),
            helper.make_tensor_value_info("row", TensorProto.FLOAT, ["batch", 5, 1]),
            helper.make_tensor_value_info("col", TensorProto.FLOAT, ["batch", 1, 5]),
        ],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 5, 5])],
        [scale],
    )
    rewritten = onnx.ModelProto.FromString(model.SerializeToString())
    assert drop_softmax_shifts(rewritten) == 1
    assert _ops(rewritten).count("Sub") == 1
    feeds = {
        name: rng.standard_normal(shape).astype(np.float32)
        for name, shape in (("a", (2, 5, 5)), ("row", (2, 5, 1)), ("col", (2, 1, 5)))
    }
    _same(model, rewritten, feeds)


def test_computed_reshape_targets_become_constants():
    model = _model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
            helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
            helper.make_node("Concat", ["b1", "rest"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [
            numpy_helper.from_array(np.array(0, np.int64), "zero"),
            numpy_helper.from_array(np.array([0], np.int64), "axes"),
            numpy_helper.from_array(np.array([16], np.int64), "rest"),
        ],
    )
    rewritten = fold_static_shapes(onnx.ModelProto.FromString(model.SerializeToString()))
    assert _ops(rewritten) == ["Reshape"]
    _same(model, rewritten, {"x": np.arange(96, dtype=np.float32).reshape(6, 4, 4)})


@pytest.mark.parametrize("batch", [1, 7])
def test_weight_only_work_is_found_and_folded(batch: int):
    rng = np.random.default_rng(3)
    model = _model(
        [
            helper.make_node("Exp", ["log_scale"], ["scale"]),  # depends on a weight only
            helper.make_node("Mul", ["x", "scale"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [_tensor("log_scale", (3,), rng)],
    )
    assert weight_only_nodes(model) == ["main/scale (Exp)"]
    rewritten = optimize_graph(onnx.ModelProto.FromString(model.SerializeToString()))
    assert weight_only_nodes(rewritten) == [] and _ops(rewritten) == ["Mul"]
    _same(model, rewritten, {"x": rng.standard_normal((batch, 3)).astype(np.float32)})
