"""``acf-deploy bench`` runs end to end on a tiny model and reports what it promises (structure only: CI
never asserts speed), the ONNX FLOP counter counts what it says, the Residual-Flows baseline stops on
its tolerance, and exported graphs do no weight-only or per-iteration shape work."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from acf_deploy.artifact import open_artifact
from acf_deploy.checkpoint import load_checkpoint
from acf_deploy.cli import app
from acf_deploy.exporters.optimize import weight_only_nodes
from acf_deploy.runtime.bench import graph_flops

from .export_fixtures import all_graphs

runner = CliRunner()


@pytest.mark.slow  # the whole bench: matmul peak, every backend and cell timed
def test_bench_cli_json_has_every_cell(exports):
    root = exports.artifact("digits-acf-l2")
    args = ["bench", str(root), "--backends", "ort,resflow", "--batch", "1,3", "--what", "sample,density"]
    args += ["--repeats", "2", "--warmup", "1", "--threads", "1", "--max-seconds", "5", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"machine", "artifact", "options", "graphs", "results"} <= set(report)
    assert report["machine"]["threads"] == 1 and report["machine"]["matmul_peak"]["gflops"] > 0
    rows = report["results"]
    cells = {(r["backend"], r["what"], r["batch"]) for r in rows}
    expected = {(b, w, n) for b in ("torch", "ort") for w in ("sample", "density") for n in (1, 3)}
    expected |= {("resflow", "sample", n) for n in (1, 3)}  # the baseline only samples
    assert cells == expected
    for row in rows:
        for key in ("backend", "what", "batch", "samples_per_s", "speedup_vs_torch", "median_ms", "p90_ms"):
            assert key in row
        assert row["samples_per_s"] > 0 and row["p90_ms"] >= row["median_ms"] > 0
        assert row["speedup_vs_torch"] > 0
        if row["backend"] == "torch":
            assert row["speedup_vs_torch"] == pytest.approx(1.0)
        if row["backend"] == "ort":  # same inputs, same work: outputs agree, FLOP/s is a fraction of peak
            assert row["max_abs_diff_vs_torch"] < 1e-3
            assert 0 < row["peak_fraction"] and row["gflops_per_s"] > 0
    assert report["graphs"]["sample"]["unknown_nodes"] == 0
    assert report["resflow"]["search"]["matched"]


def test_bench_rejects_bad_options(exports):
    root = exports.artifact("digits-acf-l2")
    result = runner.invoke(app, ["bench", str(root), "--what", "train"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["bench", str(root), "--batch", "0"])
    assert result.exit_code == 2


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_flops_count_matmul_conv_elementwise_and_loop_trips():
    w = onnx.numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    k = onnx.numpy_helper.from_array(np.ones((3, 2, 3, 3), np.float32), "k")
    trips = onnx.numpy_helper.from_array(np.array(5, np.int64), "trips")
    body = helper.make_graph(
        [
            helper.make_node("Sigmoid", ["h_in"], ["h_out"]),  # 4 per batch row
            helper.make_node("Identity", ["c_in"], ["c_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", 4]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", 4]),
        ],
    )
    model = _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),  # 2 * 8 * 4 per row
            helper.make_node("Loop", ["trips", "", "h"], ["y"], body=body),
            helper.make_node("Conv", ["img", "k"], ["c"], pads=[1, 1, 1, 1]),  # 2 * (3*4*4) * (2*3*3) per row
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 2, 4, 4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", 3, 4, 4]),
        ],
        [w, k, trips],
    )
    counted = graph_flops(model, batch=3)
    assert counted["unknown_nodes"] == 0
    assert counted["by_op"]["MatMul"] == 3 * 2 * 8 * 4
    assert counted["by_op"]["Sigmoid"] == 5 * 3 * 4
    assert counted["by_op"]["Conv"] == 3 * 2 * 48 * 18
    assert counted["flops"] == sum(counted["by_op"].values())


def test_resflow_baseline_stops_on_its_tolerance_and_inverts(exports):
    flow, _ = load_checkpoint(exports.checkpoint("digits-acf-l2"))
    flow.bake()
    z = torch.randn(16, flow.dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        x_loose, loose = flow.adaptive_inverse(z, 1e-2)
        x_tight, tight = flow.adaptive_inverse(z, 1e-7)
        reference, _ = flow.inverse(z, 200)
    assert all(a >= 1 for a in loose) and sum(tight) > sum(loose)  # tighter tolerance, more iterations
    assert float((x_tight - reference).abs().max()) < 1e-5
    assert float((x_loose - reference).abs().max()) > float((x_tight - reference).abs().max())


@pytest.mark.parametrize("inverse", ["loop", "unroll"])
def test_exported_graphs_do_no_weight_only_or_per_iteration_shape_work(exports, inverse: str):
    root = exports.artifact("digits-acf-l2", "exact", inverse)
    artifact = open_artifact(root)
    for graph in ("sample", "density"):
        model = onnx.load(str(artifact.graph_path(graph)))
        assert weight_only_nodes(model) == [], graph  # input-independent work was folded at export
    sample = onnx.load(str(artifact.graph_path("sample")))
    bodies = [g for g in all_graphs(sample.graph) if g is not sample.graph]
    for body in bodies:  # nothing in a fixed-point iteration recomputes shapes or unused step norms
        ops = {node.op_type for node in body.node}
        assert not ops & {"Shape", "Gather", "Concat", "ReduceL2", "Flatten"}, ops
    constants = {init.name for g in all_graphs(sample.graph) for init in g.initializer}
    for g in all_graphs(sample.graph):  # every reshape target is static but for the batch axis
        for node in g.node:
            if node.op_type == "Reshape":
                assert node.input[1] in constants, node.name
