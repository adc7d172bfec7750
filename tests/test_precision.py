"""fp16 / bf16 exports (docs/guarantees.md §5): explicitly cast graphs with fp32 islands, verified honestly.

ONNX Runtime's CPU provider runs fp16 graphs in fp32 arithmetic and has no bf16 kernels, so fp16
numerics are judged on a per-op rounding emulation of the exported graph, and bf16 is reported
unverified, never passed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from acf_deploy.artifact import open_artifact
from acf_deploy.checkpoint import save_checkpoint
from acf_deploy.cli import app
from acf_deploy.data import to_model_space, training_data
from acf_deploy.errors import BadInput
from acf_deploy.exporters.trt_lint import errors, lint_model
from acf_deploy.flows.presets import build_flow, preset_config
from acf_deploy.pipeline import ExportOptions, export_artifact
from acf_deploy.report import block_report
from acf_deploy.runtime.emulate import emulate_rounding
from acf_deploy.runtime.ort_backend import OrtBackend
from acf_deploy.runtime.torch_backend import TorchBackend

FLOAT, HALF, BF16, DOUBLE = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE
#: Where the compute is; all of them sit in residual branches here (the logit's Sigmoid stays fp32).
HEAVY_OPS = {"Conv", "MatMul", "Gemm", "Softmax"}


def _checkpoint(name: str, directory: Path, **overrides) -> Path:
    """A small untrained flow, data-initialised, weights nudged, gates open, with the per-block report training writes."""
    config = preset_config(name, **overrides)
    torch.manual_seed(0)
    flow = build_flow(config)
    train, _ = training_data(config, seed=0)
    data = to_model_space(train[:128], config, torch.Generator().manual_seed(0))
    flow.initialize(data)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the initial values, so that no block is near the identity
        for pname, p in flow.named_parameters():
            if pname.endswith(("gamma", "theta")):
                p.fill_(0.5)
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    baked = build_flow(config)
    baked.load_state_dict(flow.state_dict())
    metrics = {"blocks": block_report(baked.bake(), data[:16], None, n_iter=4, steps=4)}
    save_checkpoint(flow, config, directory, metrics)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("precision")
    digits = _checkpoint("digits-acf-l2", root / "digits", scales=[1, 1], hidden=8)
    toy = _checkpoint("toy-resflow", root / "toy", blocks=2, hidden=8)
    out = {}
    for key, checkpoint, precision in (
        ("digits-fp16", digits, "fp16"),
        ("toy-fp16", toy, "fp16"),
        ("toy-bf16", toy, "bf16"),
    ):
        out[key] = root / key
        export_artifact(checkpoint, out[key], ExportOptions(precision=precision))
    return out


def _graphs(model: onnx.ModelProto):
    yield model.graph
    yield from _graphs_below(model.graph)


def _graphs_below(graph: onnx.GraphProto):
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
                yield from _graphs_below(attr.g)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for graph in _graphs(inferred):
        for value in (*graph.input, *graph.output, *graph.value_info):
            types[value.name] = value.type.tensor_type.elem_type
        for init in graph.initializer:
            types[init.name] = init.data_type
    return types


def _float64_anywhere(model: onnx.ModelProto) -> list[str]:
    found = [name for name, elem in _elem_types(model).items() if elem == DOUBLE]
    for graph in _graphs(model):
        for node in graph.node:
            for attr in node.attribute:
                if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i == DOUBLE:
                    found.append(f"{node.name}.{attr.name}")
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == DOUBLE:
                    found.append(f"{node.name}.{attr.name}")
    return found


def test_emulation_rounds_where_ort_cpu_does_not() -> None:
    """The finding behind the design: ORT CPU computes an fp16 Add in fp32 and drops the rounding."""
    nodes = [
        helper.make_node("Mul", ["x", "one"], ["y"]),
        helper.make_node("Cast", ["y"], ["y16"], to=HALF),
        helper.make_node("Cast", ["one"], ["one16"], to=HALF),
        helper.make_node("Add", ["y16", "one16"], ["s16"]),
        helper.make_node("Cast", ["s16"], ["s"], to=FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, [3])],
        [helper.make_tensor_value_info("s", FLOAT, [3])],
        [helper.make_tensor("one", FLOAT, [1], [1.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([1 / 3, 1e-5, 70000.0], np.float32)
    with np.errstate(over="ignore"):
        exact16 = (x.astype(np.float16) + np.float16(1)).astype(np.float32)  # 1.333, 1.0, inf
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"x": x}
    )[0]
    np.testing.assert_array_equal(run(emulate_rounding(model)), exact16)
    native = run(model)
    assert np.isfinite(native[2]) and native[0] != exact16[0]  # fp32 arithmetic: no rounding, no overflow


def test_fp16_digits_meets_the_bits_per_dim_bound_on_the_test_set(exported: dict[str, Path]) -> None:
    artifact = open_artifact(exported["digits-fp16"])
    manifest = artifact.manifest
    assert manifest["precision"] == "fp16" and manifest["verified"] is True
    assert manifest["verification"]["status"] == "verified"
    assert manifest["verification"]["limits"] == {"bits_per_dim_delta": 1e-3}
    config = manifest["config"]
    _, test = training_data(config, seed=0)
    x = to_model_space(test, config, torch.Generator().manual_seed(1)).numpy()
    z = np.random.default_rng(0).standard_normal((256, artifact.dim)).astype(np.float32)
    with TorchBackend(artifact) as reference:
        ref_bpd = reference.density(x)["bits_per_dim"].astype(np.float64)
        ref_x = reference.sample(z)["x"]
    report = {}
    for emulate in (True, False):  # emulated: the binding numbers; native: ORT CPU's own (fp32 arithmetic)
        with OrtBackend(artifact, emulate=emulate, threads=1) as backend:
            assert backend.unverified_reason is None  # ORT CPU runs the fp16 graph
            bpd = backend.density(x)["bits_per_dim"].astype(np.float64)
            sample = backend.sample(z)
        delta = abs(bpd.mean() - ref_bpd.mean())
        report["emulated" if emulate else "native"] = (delta, float(np.abs(sample["x"] - ref_x).max()))
        assert delta <= 1e-3
        assert np.all(np.isfinite(sample["x"])) and np.all(np.isfinite(sample["residual"]))
    print(f"fp16 digits ({len(x)} test images): bits/dim delta, sample max|dx| = {report}")


@pytest.mark.parametrize("key", ["digits-fp16", "toy-fp16", "toy-bf16"])
def test_half_graphs_are_half_inside_fp32_at_the_boundary(exported: dict[str, Path], key: str) -> None:
    artifact = open_artifact(exported[key])
    half = {"fp16": HALF, "bf16": BF16}[artifact.manifest["precision"]]
    detail = artifact.manifest["precision_detail"]
    for name in ("sample", "density"):
        model = onnx.load(str(artifact.graph_path(name)))
        assert all(v.type.tensor_type.elem_type == FLOAT for v in (*model.graph.input, *model.graph.output))
        assert not _float64_anywhere(model)
        assert not list(errors(lint_model(model))), [str(i) for i in errors(lint_model(model))]
        types = _elem_types(model)
        heavy = [
            (node.op_type, types.get(node.output[0]))
            for graph in _graphs(model)
            for node in graph.node
            if node.op_type in HEAVY_OPS
        ]
        assert heavy and all(elem == half for _, elem in heavy), heavy  # never silently fp32
        assert 0.3 < detail["half_tensor_fraction"][name] < 1.0
        loops = [n for g in _graphs(model) for n in g.node if n.op_type == "Loop"]
        for loop in loops:  # every loop carries fp32 (LU matrices; fixed-point x, with g in half inside)
            body = loop.attribute[0].g
            carried = [v.type.tensor_type.elem_type for v in body.output[1:]]
            assert carried in ([FLOAT], [FLOAT, FLOAT]), (loop.name, carried)
        onnx.checker.check_model(model, full_check=True)  # type-consistent, as strongly typed TensorRT needs
        if name == "density" and artifact.logdet_mode == "exact":
            assert any(loop.name.startswith("lu") for loop in loops)


def test_bf16_is_reported_unverified_not_passed(exported: dict[str, Path]) -> None:
    artifact = open_artifact(exported["toy-bf16"])
    manifest = artifact.manifest
    assert manifest["verified"] is False and manifest["verification"]["status"] == "unverified"
    assert "cannot run the bf16 graph" in manifest["verification"]["reason"]
    assert manifest["opset"] >= 22  # bfloat16 Conv/Gemm are valid ONNX from opset 22
    assert manifest["verification"]["metrics"]["bits_per_dim_delta"] <= 8e-3  # emulated numbers still judged
    result = CliRunner().invoke(app, ["check", str(artifact.root), "--against", "golden", "--json"])
    assert result.exit_code == 3, result.output
    payload = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert payload["status"] == "unverified" and payload["passed"] is False
    assert payload["precision"] == "bf16" and "emulated" in payload["note"]


def test_toy_fp16_check_passes_against_torch(exported: dict[str, Path]) -> None:
    result = CliRunner().invoke(app, ["check", str(exported["toy-fp16"]), "--n", "256", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert payload["status"] == "passed" and payload["limits"] == {"bits_per_dim_delta": 1e-3}
    assert payload["metrics"]["bits_per_dim_delta"] <= 1e-3 and payload["metrics"]["nonfinite"] == 0


def test_torch_backend_cannot_verify_a_half_artifact(exported: dict[str, Path]) -> None:
    result = CliRunner().invoke(
        app, ["check", str(exported["toy-fp16"]), "--backend", "torch", "--against", "golden", "--json"]
    )
    assert result.exit_code == 3, result.output
    assert json.loads(result.stdout[: result.stdout.rindex("}") + 1])["status"] == "unverified"


def test_unknown_precision_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="--precision"):
        export_artifact(tmp_path / "missing", tmp_path / "out", ExportOptions(precision="int8"))
