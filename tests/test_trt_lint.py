"""The TensorRT lint names the offending node for every construct docs/guarantees.md §6 and TensorRT forbid."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from acf_deploy.errors import CheckFailed
from acf_deploy.exporters.trt_lint import (
    OPSET_RANGE,
    LintIssue,
    errors,
    lint_artifact,
    lint_file,
    lint_model,
    require_clean,
)

from .toy_artifact import toy_density_graph, toy_sample_graph, write_artifact

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "main", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _x(shape=("batch", 4)):
    return helper.make_tensor_value_info("x", F, list(shape))


def _y(shape=None):
    return helper.make_tensor_value_info("y", F, shape)


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _loop_body(nodes, cond_out="cond_out", cond_nodes=None):
    cond_nodes = cond_nodes if cond_nodes is not None else [helper.make_node("Identity", ["cond_in"], [cond_out])]
    return helper.make_graph(
        [*cond_nodes, *nodes],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_in", F, None),
        ],
        [
            helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_out", F, None),
        ],
    )


def _loop_model(body, trip="n", cond="", initializers=None, extra_nodes=()):
    inits = [_const("n", 10, np.int64)] if initializers is None else initializers
    loop = helper.make_node("Loop", [trip, cond, "x"], ["y"], body=body, name="fixed_point")
    return _model([*extra_nodes, loop], [_x()], [_y()], inits)


def _tanh_body():
    return _loop_body([helper.make_node("Tanh", ["s_in"], ["s_out"], name="step")])


def _only(issues: list[LintIssue], node: str) -> list[LintIssue]:
    found = [i for i in issues if i.node == node]
    assert found, f"no issue names {node!r}: {issues}"
    return found


def test_clean_graph_with_constant_trip_count_loop_passes():
    assert lint_model(_loop_model(_tanh_body())) == []


def test_toy_flow_graphs_are_clean():
    assert lint_model(toy_sample_graph()) == []
    assert lint_model(toy_density_graph()) == []
    assert lint_model(toy_sample_graph("fp16")) == []


def test_det_is_reported_by_node_name():
    model = _model(
        [helper.make_node("Det", ["x"], ["y"], name="logdet_det")],
        [helper.make_tensor_value_info("x", F, ["batch", 3, 3])],
        [_y(["batch"])],
    )
    (issue,) = _only(lint_model(model), "logdet_det")
    assert issue.op_type == "Det" and issue.severity == "error" and "LU" in issue.message


def test_random_normal_is_reported():
    model = _model(
        [
            helper.make_node("RandomNormal", [], ["noise"], shape=[2, 4], name="noise_src"),
            helper.make_node("Add", ["x", "noise"], ["y"], name="add"),
        ],
        [_x((2, 4))],
        [_y([2, 4])],
    )
    issues = lint_model(model)
    (issue,) = _only(issues, "noise_src")
    assert issue.severity == "error" and "graph input" in issue.message
    assert [i.node for i in errors(issues)] == ["noise_src"]


def test_condition_only_loop_is_reported():
    # torch's while_loop export: no trip count, a runtime condition, the body recomputes it.
    body = _loop_body(
        [helper.make_node("Tanh", ["s_in"], ["s_out"])],
        cond_nodes=[
            helper.make_node("ReduceMax", ["s_in"], ["m"], keepdims=0),
            helper.make_node("Greater", ["m", "tol"], ["cond_out"], name="still_moving"),
        ],
    )
    first = helper.make_node("Constant", [], ["go"], value=helper.make_tensor("v", TensorProto.BOOL, [], [True]))
    model = _loop_model(body, trip="", cond="go", initializers=[_const("tol", 1e-6)], extra_nodes=[first])
    messages = [i.message for i in _only(lint_model(model), "fixed_point") if i.severity == "error"]
    assert any("condition-only Loop" in m for m in messages)
    assert any("exit condition" in m for m in messages)


def test_runtime_trip_count_is_reported():
    shape = helper.make_node("Shape", ["x"], ["shape"], start=1, end=2)
    squeeze = helper.make_node("Squeeze", ["shape"], ["n_dyn"])
    model = _loop_model(_tanh_body(), trip="n_dyn", initializers=[], extra_nodes=[shape, squeeze])
    (issue,) = [i for i in _only(lint_model(model), "fixed_point") if "trip count" in i.message]
    assert issue.severity == "error" and "n_dyn" in issue.message


def test_loop_carried_shape_change_is_reported():
    body = _loop_body([helper.make_node("Concat", ["s_in", "s_in"], ["s_out"], axis=1, name="grow")])
    (issue,) = _only(lint_model(_loop_model(body)), "fixed_point")
    assert issue.severity == "error"
    assert "changes shape [batch, 4] -> [batch, 8]" in issue.message


def test_shapes_flow_through_chained_loops():
    # ONNX's own inference forgets a Loop's carried shapes; the lint restores them when proven kept.
    first = helper.make_node("Loop", ["n", "", "x"], ["h"], body=_tanh_body(), name="first")
    grow = _loop_body([helper.make_node("Concat", ["s_in", "s_in"], ["s_out"], axis=1)])
    second = helper.make_node("Loop", ["n", "", "h"], ["y"], body=grow, name="second")
    model = _model([first, second], [_x()], [_y()], [_const("n", 4, np.int64)])
    (issue,) = lint_model(model)
    assert issue.node == "second" and "changes shape [batch, 4] -> [batch, 8]" in issue.message


def test_nested_det_names_its_loop_path():
    body = _loop_body(
        [
            helper.make_node("Reshape", ["s_in", "sq"], ["mat"]),
            helper.make_node("Det", ["mat"], ["d"], name="inner_det"),
            helper.make_node("Identity", ["s_in"], ["s_out"]),
        ]
    )
    model = _loop_model(body, initializers=[_const("n", 3, np.int64), _const("sq", [-1, 2, 2], np.int64)])
    (issue,) = _only(lint_model(model), "inner_det")
    assert issue.graph == "main/fixed_point.body" and issue.op_type == "Det"


def test_float64_initializer_and_cast_are_reported():
    model = _model(
        [
            helper.make_node("Cast", ["x"], ["x64"], to=TensorProto.DOUBLE, name="to_double"),
            helper.make_node("Add", ["x64", "w64"], ["s"], name="add64"),
            helper.make_node("Cast", ["s"], ["y"], to=F, name="back"),
        ],
        [_x((2, 4))],
        [_y([2, 4])],
        [_const("w64", np.ones(4), np.float64)],
    )
    issues = lint_model(model)
    assert _only(issues, "w64")[0].op_type == "initializer"
    assert "DOUBLE" in _only(issues, "to_double")[0].message
    assert "float64 output 's'" in _only(issues, "add64")[0].message
    assert not [i for i in issues if i.node == "back"]


def test_float64_constant_input_and_output_are_reported():
    value = helper.make_tensor("v", TensorProto.DOUBLE, [1], [2.0])
    model = _model(
        [
            helper.make_node("Constant", [], ["c"], value=value, name="c64"),
            helper.make_node("Mul", ["x", "c"], ["y"], name="mul"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])],
    )
    issues = lint_model(model)
    assert {(i.node, i.op_type) for i in issues} >= {("x", "input"), ("y", "output"), ("c64", "Constant")}


def test_opset_outside_range_is_reported():
    low, high = OPSET_RANGE
    for opset in (low - 1, high + 1):
        model = _model([helper.make_node("Relu", ["x"], ["y"])], [_x()], [_y()], opset=opset)
        (issue,) = lint_model(model)
        assert issue.severity == "error" and f"opset {opset}" in issue.message


def test_operator_constraints_are_reported():
    model = _model(
        [
            helper.make_node("ReduceSum", ["x", "axes_in"], ["s"], name="sum_dyn_axes"),
            helper.make_node("Einsum", ["x", "x"], ["e"], equation="bI,bI->b", name="upper_einsum"),
            helper.make_node("Unique", ["x"], ["u"], name="uniq"),
            helper.make_node("Add", ["s", "e"], ["y"], name="add"),
        ],
        [_x(), helper.make_tensor_value_info("axes_in", TensorProto.INT64, [1])],
        [_y()],
    )
    issues = lint_model(model)
    assert "build-time constant" in _only(issues, "sum_dyn_axes")[0].message
    assert "lower-case" in _only(issues, "upper_einsum")[0].message
    assert "not supported" in _only(issues, "uniq")[0].message


def test_lint_file_and_artifact_with_external_data(tmp_path):
    root = write_artifact(tmp_path / "art", external_data=True)
    assert lint_file(root / "density.onnx") == []
    report = lint_artifact(root)
    assert set(report) == {"sample", "density"} and not any(report.values())
    require_clean(report)


def test_require_clean_lists_every_error(tmp_path):
    det = _model(
        [helper.make_node("Det", ["x"], ["y"], name="bad_det")],
        [helper.make_tensor_value_info("x", F, ["batch", 1, 2, 2])],
        [_y(["batch", 1])],
    )
    root = write_artifact(tmp_path / "art", density=det)
    with pytest.raises(CheckFailed) as caught:
        require_clean(lint_artifact(root))
    assert caught.value.exit_code == 1 and "density: error" in str(caught.value) and "bad_det" in str(caught.value)
