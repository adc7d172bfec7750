"""Export: ONNX Runtime matches PyTorch for every preset and mode (docs/guarantees.md §5), graphs are clean
(no Det, no random ops, no float64, TensorRT-lint clean, constant-trip Loops), the manifest is
complete and hashes every file, and a failed export leaves nothing behind.

Every preset is checked with the default export (``--logdet exact --inverse loop``); every
``--logdet`` x ``--inverse`` combination is checked on ``digits-acf-l2`` and ``toy-resflow``
(``ACF_FULL_MATRIX=1`` runs all combinations on all presets).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from acf_deploy.artifact import open_artifact
from acf_deploy.cli import app
from acf_deploy.errors import BadInput, CheckFailed
from acf_deploy.exporters import export as export_module
from acf_deploy.exporters.trt_lint import lint_artifact, require_clean
from acf_deploy.pipeline import ExportOptions, export_artifact
from acf_deploy.runtime import open_backend
from acf_deploy.runtime.parity import LIMITS, compare_backends

from .export_fixtures import all_graphs, matrix

CASES = matrix()
IDS = ["-".join(case) for case in CASES]
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
DOUBLE = onnx.TensorProto.DOUBLE


def _parity(artifact_dir: Path, n: int = 48):
    artifact = open_artifact(artifact_dir)
    with open_backend("ort", artifact, threads=1) as ort, open_backend("torch", artifact) as torch_ref:
        return artifact, compare_backends(artifact, ort, torch_ref, n, seed=1)


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize(("preset", "logdet", "inverse"), CASES, ids=IDS)
def test_onnx_runtime_matches_pytorch(exports, preset: str, logdet: str, inverse: str):
    artifact, result = _parity(exports.artifact(preset, logdet, inverse))
    m = result.metrics
    assert result.passed, result.summary()
    # docs/guarantees.md §5, fp32: the binding bits/dim limit, sample and log p in data space, round trips
    assert m["bits_per_dim_delta"] <= 1e-5
    assert m["sample_max_abs"] <= 1e-4
    assert m["log_prob_max_abs"] <= 1e-3
    assert m["roundtrip_max_abs"] <= 1e-4
    assert m["roundtrip_latent_max_rel"] <= 1e-4
    assert m["nonfinite"] == 0
    assert set(LIMITS) <= set(m)
    assert artifact.manifest["logdet"]["mode"] == logdet
    assert artifact.manifest["inverse"]["mode"] == inverse
    if logdet == "exact" and artifact.manifest["blocks"]:
        assert 0 < m["min_pivot"] <= 1.0 + 1e-6


# ---------------------------------------------------------------------------------------------- graphs
def _graphs(artifact_dir: Path) -> dict[str, onnx.ModelProto]:
    return {name: onnx.load(str(artifact_dir / f"{name}.onnx")) for name in ("sample", "density")}


@pytest.mark.parametrize(("preset", "logdet", "inverse"), CASES, ids=IDS)
def test_graphs_have_no_det_random_ops_or_float64(exports, preset: str, logdet: str, inverse: str):
    for name, model in _graphs(exports.artifact(preset, logdet, inverse)).items():
        inferred = onnx.shape_inference.infer_shapes(model)
        for graph in all_graphs(inferred.graph):
            ops = {node.op_type for node in graph.node}
            assert "Det" not in ops, name
            assert not ops & RANDOM_OPS, (name, ops & RANDOM_OPS)
            assert all(init.data_type != DOUBLE for init in graph.initializer), name
            for value in [*graph.input, *graph.output, *graph.value_info]:
                assert value.type.tensor_type.elem_type != DOUBLE, (name, value.name)
            for node in graph.node:
                for attr in node.attribute:
                    if attr.name == "to":
                        assert attr.i != DOUBLE, (name, node.name)
                    if attr.type == onnx.AttributeProto.TENSOR:
                        assert attr.t.data_type != DOUBLE, (name, node.name)


@pytest.mark.parametrize(("preset", "logdet", "inverse"), CASES, ids=IDS)
def test_tensorrt_lint_is_clean(exports, preset: str, logdet: str, inverse: str):
    report = lint_artifact(exports.artifact(preset, logdet, inverse))
    assert set(report) == {"sample", "density"}
    require_clean(report)  # raises on any error-severity issue


@pytest.mark.parametrize("preset", ["digits-acf-l2", "toy-resflow"])
def test_loops_have_constant_trip_counts_and_keep_shapes(exports, preset: str):
    loop, unroll = (_graphs(exports.artifact(preset, "exact", inverse))["sample"] for inverse in ("loop", "unroll"))
    manifest = json.loads((exports.artifact(preset) / "manifest.json").read_text())
    n_blocks = len(manifest["blocks"])
    n_iter = {f"block{i}/": block["n_iter"] for i, block in enumerate(manifest["blocks"])}
    loops = [node for node in loop.graph.node if node.op_type == "Loop"]
    assert 1 <= len(loops) <= n_blocks  # at most one Loop per residual block, none elsewhere
    initializers = {init.name: init for init in loop.graph.initializer}
    for node in loops:
        trip = initializers[node.input[0]]  # the trip count is a constant initializer
        assert trip.data_type == onnx.TensorProto.INT64 and list(trip.dims) == []
        block = next(prefix for prefix in n_iter if node.name.startswith(prefix))
        # all of the block's iterations, or all but a last one peeled off after the Loop
        assert int(onnx.numpy_helper.to_array(trip)) in (n_iter[block], n_iter[block] - 1)
        assert node.input[1] == ""  # no data-dependent condition
        body = next(attr.g for attr in node.attribute if attr.name == "body")
        for carried_in, carried_out in zip(body.input[2:], body.output[1:], strict=True):
            assert carried_in.type == carried_out.type  # loop-carried values keep their shapes
    assert not any(node.op_type == "Loop" for node in unroll.graph.node)
    assert len(unroll.graph.node) > len(loop.graph.node)
    for model in (loop, unroll):  # the batch axis is dynamic and named
        for value in [*model.graph.input, *model.graph.output]:
            if value.name != "temperature":
                assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name


def test_dynamic_batch_runs_any_size(exports):
    artifact = open_artifact(exports.artifact("digits-acf-l2"))
    rng = np.random.default_rng(0)
    with open_backend("ort", artifact, threads=1) as ort:
        for batch in (1, 5):
            out = ort.sample(rng.standard_normal((batch, artifact.dim)).astype(np.float32))
            assert out["x"].shape == (batch, *artifact.data_shape) and out["residual"].shape == (batch,)
            density = ort.density(out["x"])
            assert density["log_prob"].shape == (batch,) and density["z"].shape == (batch, artifact.dim)


# -------------------------------------------------------------------------------------------- manifest
@pytest.mark.parametrize("preset", ["digits-acf-l2", "digits-acf-dp", "digits-glow", "toy-resflow"])
def test_manifest_hashes_every_file_and_records_iterations(exports, preset: str):
    root = exports.artifact(preset)
    manifest = json.loads((root / "manifest.json").read_text())
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {"sample.onnx", "density.onnx", "golden.npz"} <= on_disk
    assert manifest["batch_axis"] == "batch" and manifest["max_safe_batch"] >= 1
    assert not [p for p in root.parent.iterdir() if p.name.startswith(f".{root.name}.")]  # no temp dirs left
    for block in manifest["blocks"]:
        assert block["guarantee"] in ("certified", "verified")
        assert 1 <= block["n_iter_calibrated"] <= block["n_iter_certified"]
        assert block["n_iter"] == block["n_iter_calibrated"]
        assert block["lipschitz_bound"] < 1
    if preset == "digits-acf-dp":
        assert {b["guarantee"] for b in manifest["blocks"]} == {"verified"}
        assert all(b["lipschitz_measured"] <= 0.95 for b in manifest["blocks"])
    iterations = manifest["iterations"]
    assert iterations["calibrated_total"] == sum(b["n_iter_calibrated"] for b in manifest["blocks"])
    assert iterations["certified_total"] == sum(b["n_iter_certified"] for b in manifest["blocks"])
    for kind in ("calibrated", "certified", "exported"):  # the round trip each choice gives
        assert set(manifest["roundtrip"][kind]) == {"data_max_abs", "latent_max_rel"}
    assert manifest["roundtrip"]["exported"]["data_max_abs"] <= 1e-4
    golden = np.load(root / "golden.npz")
    assert {"in_z", "in_x", "sample_x", "density_log_prob"} <= set(golden.files)


def test_glow_without_residual_blocks_exports(exports):
    """Regression: calibration used to index the (empty) per-block inputs of a flow with no residual block."""
    manifest = json.loads((exports.artifact("digits-glow") / "manifest.json").read_text())
    assert manifest["blocks"] == [] and manifest["iterations"]["exported_total"] == 0


# ------------------------------------------------------------------------------- failure leaves nothing
def _listing(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def _break_golden(monkeypatch):
    """Make the stored PyTorch reference disagree with the graphs, so verification fails."""
    real = export_module._golden

    def wrong(*args, **kwargs):
        golden = real(*args, **kwargs)
        golden["density_log_prob"] = golden["density_log_prob"] + 0.5
        return golden

    monkeypatch.setattr(export_module, "_golden", wrong)


def test_failed_verification_exits_1_and_leaves_nothing(exports, tmp_path: Path, monkeypatch):
    _break_golden(monkeypatch)
    target = tmp_path / "art"
    result = CliRunner().invoke(app, ["export", str(exports.checkpoint("toy-resflow")), "--out", str(target)])
    assert result.exit_code == 1, result.output
    assert "does not match PyTorch" in result.stderr and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary directory


def test_failed_export_over_an_existing_artifact_keeps_it(exports, tmp_path: Path, monkeypatch):
    target = tmp_path / "art"
    runner = CliRunner()
    ok = runner.invoke(app, ["export", str(exports.checkpoint("toy-resflow")), "--out", str(target)])
    assert ok.exit_code == 0, ok.output
    before = _listing(target)
    _break_golden(monkeypatch)
    failed = runner.invoke(app, ["export", str(exports.checkpoint("toy-resflow")), "--out", str(target)])
    assert failed.exit_code == 1
    assert _listing(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    open_artifact(target)  # still valid


def test_unroll_refuses_above_the_node_budget(exports, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(export_module, "UNROLL_NODE_BUDGET", 20)
    target = tmp_path / "art"
    with pytest.raises(BadInput, match="above the budget of 20"):
        export_artifact(exports.checkpoint("toy-resflow"), target, ExportOptions(inverse="unroll"))
    assert not target.exists()
    result = CliRunner().invoke(
        app, ["export", str(exports.checkpoint("toy-resflow")), "--out", str(target), "--inverse", "unroll"]
    )
    assert result.exit_code == 2
    assert "budget of 20" in result.stderr and "--inverse loop" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("logdet", "lu", "--logdet"),
        ("inverse", "scan", "--inverse"),
        ("iters", "many", "--iters"),
        ("precision", "fp8", "--precision"),
        ("opset", 9, "--opset"),
        ("terms", 0, "--terms"),
        ("tol", -1.0, "--tol"),
    ],
)
def test_bad_export_options_are_bad_input(exports, tmp_path: Path, option: str, value, message: str):
    with pytest.raises(BadInput, match=message):
        export_artifact(exports.checkpoint("toy-resflow"), tmp_path / "art", ExportOptions(**{option: value}))
    assert list(tmp_path.iterdir()) == []


def test_verify_export_rejects_a_graph_with_wrong_inputs(exports, tmp_path: Path):
    """verify_export's IO check: a density graph whose input was renamed does not count as an export."""
    from acf_deploy.runtime.verify import verify_export

    from .export_fixtures import copy_artifact, rehash

    root = copy_artifact(exports.artifact("toy-resflow"), tmp_path / "art")
    model = onnx.load(str(root / "density.onnx"))
    old = model.graph.input[0].name
    model.graph.input[0].name = "data"
    for graph in all_graphs(model.graph):
        for node in graph.node:
            node.input[:] = ["data" if name == old else name for name in node.input]
    onnx.save(model, str(root / "density.onnx"))
    rehash(root)
    with pytest.raises(CheckFailed, match="has inputs"):
        verify_export(open_artifact(root, verify=False))  # opening it verified would refuse it first


@pytest.mark.parametrize("dim", [5, 16, 37])
def test_phased_lu_loops_match_slogdet(dim: int):
    """The exported LU (phases of masked steps, each on the Schur complement the previous one left) gives
    every pivot: log-det and smallest pivot as float64 ``slogdet`` and an eager LU say, at sizes that are
    below, equal to and not a multiple of the phase length."""
    import onnxruntime as ort
    import torch

    from acf_deploy.exporters.graphs import _export
    from acf_deploy.flows.blocks import lu_logdet, lu_logdet_graph

    class Det(torch.nn.Module):
        def forward(self, a):
            return lu_logdet_graph(a)

    rng = np.random.default_rng(dim)
    a = (np.eye(dim) + 0.4 * rng.standard_normal((3, dim, dim)) / np.sqrt(dim)).astype(np.float32)
    model = _export(Det(), (torch.from_numpy(a),), ["a"], ["logdet", "pivot"], {"a": {0: "batch"}}, 17, True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logdet, pivot = session.run(None, {"a": a})
    sign, expected = np.linalg.slogdet(a.astype(np.float64))
    assert np.all(sign > 0)
    np.testing.assert_allclose(logdet, expected, rtol=0, atol=2e-5 * dim)
    np.testing.assert_allclose(pivot, lu_logdet(torch.from_numpy(a).double())[1].numpy(), rtol=1e-4)


def test_export_reports_every_stage_with_its_steps(exports, tmp_path: Path):
    """The library reports stages of counted steps (the CLI draws a bar per stage): each stage is announced
    once, in pipeline order, and advanced exactly as many times as it announced."""
    from acf_deploy.progress import Reporter

    class Recorder(Reporter):
        def __init__(self) -> None:
            self.stages: list[list] = []

        def stage(self, name: str, total: int) -> None:
            self.stages.append([name, total, 0])

        def advance(self, note: str = "") -> None:
            self.stages[-1][2] += 1

    recorder = Recorder()
    export_artifact(exports.checkpoint("toy-resflow"), tmp_path / "art", ExportOptions(), progress=recorder)
    names = [s[0] for s in recorder.stages]
    assert names == ["measure blocks", "calibrate", "trace", "optimise", "reference outputs", "verify on ONNX Runtime"]
    assert all(total == done for _, total, done in recorder.stages), recorder.stages
    assert recorder.stages[0][1] == 2  # the toy flow's two residual blocks

    result = CliRunner().invoke(app, ["export", str(exports.checkpoint("toy-resflow")), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    for name in names:
        assert name in result.output


@pytest.mark.parametrize("inverse", ["loop", "unroll"])
def test_anderson_schedule_exports_verified_and_lint_clean(exports, tmp_path: Path, inverse: str):
    """An Anderson-accelerated sampler (its own calibrated counts) exports as a Loop carrying the history or
    unrolled, matches the PyTorch reference on ONNX Runtime (the export verifies it), records its schedule,
    and stays TensorRT-clean; the torch backend runs the same schedule."""
    target = tmp_path / "art"
    opts = ExportOptions(inverse=inverse, schedule="anderson")
    artifact = export_artifact(exports.checkpoint("digits-acf-l2"), target, opts)
    assert artifact.manifest["verified"] and artifact.manifest["inverse"]["schedule"] == "anderson"
    require_clean(lint_artifact(target))
    art = open_artifact(target)
    with open_backend("ort", art) as ort, open_backend("torch", art) as ref:
        result = compare_backends(art, ort, ref, 16)
    assert result.passed, result.metrics


def test_certified_counts_are_refused_with_the_anderson_schedule(exports, tmp_path: Path):
    with pytest.raises(BadInput, match="certified"):
        export_artifact(
            exports.checkpoint("toy-resflow"), tmp_path / "a", ExportOptions(schedule="anderson", iters="certified")
        )
    with pytest.raises(BadInput, match="schedule"):
        export_artifact(exports.checkpoint("toy-resflow"), tmp_path / "a", ExportOptions(schedule="newton"))
