"""Engine building and the trt backend against a fake ``tensorrt`` module, on the CPU.

Covers profile shapes, precision handling, the engine cache key and reuse, the timing cache, hash
refusal, parser errors and every exit-3 path. The fake's engines run the graph with ONNX Runtime on
the addresses of CPU torch tensors, so results are compared with the numpy reference of the toy flow.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from acf_deploy import trt_util
from acf_deploy.artifact import open_artifact
from acf_deploy.errors import BackendUnavailable, BadInput, CheckFailed
from acf_deploy.exporters import tensorrt as trt_export
from acf_deploy.fileio import sha256_file
from acf_deploy.manifest import write_manifest
from acf_deploy.runtime import trt_backend
from acf_deploy.runtime.trt_backend import TrtBackend

from .fake_tensorrt import make_fake_tensorrt
from .toy_artifact import (
    DATA_SHAPE,
    DIM,
    PROBES,
    toy_density_reference,
    toy_sample_graph,
    toy_sample_reference,
    write_artifact,
)

FAKE_GPU = trt_util.DeviceInfo("Fake GPU", "9.0", "13.0", "cpu")


class FakeStream:
    """Stands in for the torch CUDA stream: a handle, a no-op context, and capture that replays."""

    def __init__(self, device: str):
        self.handle = 7
        self.replays = 0

    @contextmanager
    def active(self):
        yield

    def capture(self, launch):
        def replay():
            self.replays += 1
            launch()

        return replay


@pytest.fixture
def fake_trt(monkeypatch):
    module = make_fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(trt_util, "cuda_device", lambda index=0: FAKE_GPU)
    monkeypatch.setattr(trt_backend, "_CudaStream", FakeStream)
    return module


@pytest.fixture
def artifact_dir(tmp_path):
    return write_artifact(tmp_path / "toy")


def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


# -- exit code 3 ----------------------------------------------------------------------------------


def test_missing_library_is_exit_3(monkeypatch, artifact_dir):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match="TensorRT libraries are missing") as caught:
        trt_export.build_engines(artifact_dir)
    assert caught.value.exit_code == 3 and "\n" not in str(caught.value)
    with pytest.raises(BackendUnavailable, match="libraries are missing"):
        TrtBackend(open_artifact(artifact_dir))
    available, reason = trt_util.trt_builder_available()
    assert not available and "libraries are missing" in reason


def test_builder_failure_is_exit_3_with_tensorrt_reason(monkeypatch, artifact_dir):
    module = make_fake_tensorrt(builder_error="CUDA initialization failure with error: 35")
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(trt_util, "cuda_device", lambda index=0: FAKE_GPU)
    with pytest.raises(BackendUnavailable, match="builder creation failed: CUDA initialization failure"):
        trt_export.build_engines(artifact_dir)
    assert trt_util.trt_builder_available() == (
        False,
        "TensorRT builder creation failed: CUDA initialization failure with error: 35",
    )


def test_no_gpu_and_cuda_init_failure_are_exit_3(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(BackendUnavailable, match="no CUDA support"):
        trt_util.cuda_device()
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def broken_init():
        raise RuntimeError("CUDA driver initialization failed, you might not have a CUDA gpu.")

    monkeypatch.setattr(torch.cuda, "init", broken_init)
    with pytest.raises(BackendUnavailable, match="CUDA initialisation failed: CUDA driver"):
        trt_util.cuda_device()
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(BackendUnavailable, match="no CUDA GPU 0 is visible"):
        trt_util.cuda_device()


def test_builder_available_with_fake(fake_trt):
    assert trt_util.trt_builder_available() == (
        True,
        "TensorRT 10.13.0.35 on Fake GPU (compute capability 9.0)",
    )


# -- building -------------------------------------------------------------------------------------


def test_profile_shapes_flags_and_workspace(fake_trt, artifact_dir):
    result = trt_export.build_engines(artifact_dir, batch=(2, 8, 32), workspace_mb=256)
    builds = {b["graph"]: b for b in fake_trt.state.builds}
    assert builds["sample"]["profile"] == {"z": ((2, DIM), (8, DIM), (32, DIM))}  # temperature is static
    assert builds["density"]["profile"] == {
        "x": tuple((b, *DATA_SHAPE) for b in (2, 8, 32)),
        "probes": tuple((b, PROBES, DIM) for b in (2, 8, 32)),
    }
    strongly_typed = 1 << int(fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert all(b["flags"] == strongly_typed and b["workspace"] == 256 << 20 for b in builds.values())
    assert {g: r["reused"] for g, r in result["engines"].items()} == {"sample": False, "density": False}


def test_engines_are_recorded_hashed_and_reused(fake_trt, artifact_dir):
    first = trt_export.build_engines(artifact_dir)["engines"]
    manifest = _manifest(artifact_dir)
    for graph, info in first.items():
        assert info["file"] == f"engines/{info['key']}/{graph}.plan"
        assert manifest["files"][info["file"]] == sha256_file(artifact_dir / info["file"]) == info["sha256"]
        entry = manifest["engines"][info["key"]]
        assert entry["graph"] == graph and entry["tensorrt"] == "10.13.0.35" and entry["gpu"] == "Fake GPU"
        assert entry["compute_capability"] == "9.0" and entry["cuda"] == "13.0" and entry["precision"] == "fp32"
    open_artifact(artifact_dir)  # every hash, engines included, still verifies
    second = trt_export.build_engines(artifact_dir)["engines"]
    assert all(info["reused"] for info in second.values())
    assert {g: i["key"] for g, i in second.items()} == {g: i["key"] for g, i in first.items()}
    assert len(fake_trt.state.builds) == 2


def test_key_changes_with_profile_tensorrt_and_gpu(fake_trt, artifact_dir, monkeypatch):
    keys = [trt_export.build_engines(artifact_dir)["engines"]["sample"]["key"]]
    keys.append(trt_export.build_engines(artifact_dir, batch=(1, 64, 2048))["engines"]["sample"]["key"])
    monkeypatch.setattr(trt_util, "cuda_device", lambda index=0: trt_util.DeviceInfo("Other", "8.9", "13.0", "cpu"))
    keys.append(trt_export.build_engines(artifact_dir)["engines"]["sample"]["key"])
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(version="11.4.0.106"))
    keys.append(trt_export.build_engines(artifact_dir)["engines"]["sample"]["key"])
    assert len(set(keys)) == 4
    assert len(_manifest(artifact_dir)["engines"]) == 8


def test_key_covers_external_data(fake_trt, tmp_path):
    root = write_artifact(tmp_path / "ext", external_data=True)
    info = trt_export.build_engines(root)["engines"]["density"]
    entry = _manifest(root)["engines"][info["key"]]
    assert set(entry["files"]) == {"density.onnx", "density.onnx.data"}
    assert entry["files"]["density.onnx.data"] == sha256_file(root / "density.onnx.data")


def test_timing_cache_is_loaded_and_saved(fake_trt, artifact_dir, tmp_path):
    cache = tmp_path / "shared.cache"
    trt_export.build_engines(artifact_dir, timing_cache=cache)
    trt_export.build_engines(artifact_dir, batch=(1, 32, 256), timing_cache=cache)
    assert [b["cache_entries_in"] for b in fake_trt.state.builds] == [0, 1, 2, 3]
    assert json.loads(cache.read_bytes()) == {"entries": 4}
    default = trt_export.build_engines(artifact_dir, batch=(1, 2, 4))["timing_cache"]
    assert default.startswith(str(artifact_dir / "engines" / "timing-"))


def test_tampered_engine_is_rebuilt(fake_trt, artifact_dir):
    info = trt_export.build_engines(artifact_dir)["engines"]["sample"]
    (artifact_dir / info["file"]).write_bytes(b"not what was built")
    again = trt_export.build_engines(artifact_dir)["engines"]
    assert not again["sample"]["reused"] and again["density"]["reused"]
    open_artifact(artifact_dir)


def test_precision_must_match_the_export(fake_trt, artifact_dir):
    with pytest.raises(BadInput, match="exported at fp32; a fp16 engine needs a fp16 export"):
        trt_export.build_engines(artifact_dir, precision="fp16")
    with pytest.raises(BadInput, match="precision must be one of"):
        trt_export.build_engines(artifact_dir, precision="int8")
    assert fake_trt.state.builds == []


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_export_builds_with_half_layers(fake_trt, tmp_path, precision):
    root = write_artifact(tmp_path / precision, precision=precision)
    engines = trt_export.build_engines(root, precision=precision)["engines"]
    assert all(0 < info["half_layers"] < 1 for info in engines.values())
    assert all(e["precision"] == precision for e in _manifest(root)["engines"].values())


def test_half_precision_manifest_with_fp32_graph_fails(fake_trt, tmp_path):
    root = write_artifact(tmp_path / "liar", sample=toy_sample_graph("fp32"), precision="fp16")
    with pytest.raises(CheckFailed, match="no fp16 tensors .* the engine would be fp32"):
        trt_export.build_engines(root, precision="fp16")
    assert fake_trt.state.builds == []


def test_parser_errors_are_reported_node_by_node(fake_trt, tmp_path):
    det = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Relu", ["x"], ["r"], name="ok"),
                helper.make_node("Det", ["r"], ["y"], name="bad_det"),
            ],
            "density",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 2, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    root = write_artifact(tmp_path / "det", density=det)
    with pytest.raises(CheckFailed) as caught:
        trt_export.build_engines(root)
    assert "node 1 'bad_det' (Det): No importer registered for op: Det" in str(caught.value)
    assert caught.value.exit_code == 1


def test_external_data_outside_the_artifact_is_refused(fake_trt, tmp_path):
    root = write_artifact(tmp_path / "ext", external_data=True)
    model = onnx.load(root / "density.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save_model(model, root / "density.onnx")
    manifest = _manifest(root)
    manifest["files"]["density.onnx"] = sha256_file(root / "density.onnx")
    write_manifest(root / "manifest.json", manifest)
    with pytest.raises(BadInput, match="'../outside.data' outside the artifact directory"):
        trt_export.build_engines(root)


def test_unhashed_graph_is_refused(fake_trt, artifact_dir):
    (artifact_dir / "sample.onnx").write_bytes((artifact_dir / "sample.onnx").read_bytes() + b"\0")
    with pytest.raises(BadInput, match="does not match the sha256"):
        trt_export.build_engines(artifact_dir)


def test_other_dynamic_dims_and_bad_profiles_are_refused(fake_trt, tmp_path):
    model = toy_sample_graph()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "width"
    root = write_artifact(tmp_path / "wide", sample=model)
    with pytest.raises(BadInput, match="dynamic dim 1 \\(width\\) besides the batch axis 'batch'"):
        trt_export.build_engines(root)
    with pytest.raises(BadInput, match="1 <= MIN <= OPT <= MAX"):
        trt_export.build_engines(root, batch=(8, 4, 16))
    assert trt_export.parse_batch("1:64:1024") == (1, 64, 1024)
    with pytest.raises(BadInput, match="MIN:OPT:MAX"):
        trt_export.parse_batch("64")


# -- the trt backend ------------------------------------------------------------------------------


def _inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, DIM)).astype(np.float32)
    x = rng.uniform(0, 1, (n, *DATA_SHAPE)).astype(np.float32)
    probes = rng.choice([-1.0, 1.0], (n, PROBES, DIM)).astype(np.float32)
    return z, x, probes


def test_backend_matches_reference_and_chunks_by_profile(fake_trt, artifact_dir):
    trt_export.build_engines(artifact_dir, batch=(1, 4, 8))
    z, x, probes = _inputs(20)
    with TrtBackend(open_artifact(artifact_dir)) as backend:
        sample = backend.sample(z, temperature=0.7)
        density = backend.density(x, probes)
    want = toy_sample_reference(z, 0.7)
    assert sample["x"].shape == (20, *DATA_SHAPE) and sample["residual"].shape == (20,)
    np.testing.assert_allclose(sample["x"], want["x"], atol=1e-5)
    assert np.all(sample["residual"] < 1e-5)
    want = toy_density_reference(x, probes)
    for name in ("z", "log_prob", "bits_per_dim"):
        np.testing.assert_allclose(density[name], want[name], atol=1e-4, rtol=1e-5)
    batches = [e["shapes"].get("z", e["shapes"].get("x"))[0] for e in fake_trt.state.executions]
    assert batches == [8, 8, 4, 8, 8, 4]
    assert all(e["stream"] == 7 for e in fake_trt.state.executions)


def test_backend_pads_below_the_profile_minimum(fake_trt, artifact_dir):
    trt_export.build_engines(artifact_dir, batch=(4, 4, 8))
    z, _, _ = _inputs(3)
    out = TrtBackend(open_artifact(artifact_dir)).sample(z)
    np.testing.assert_allclose(out["x"], toy_sample_reference(z, 1.0)["x"], atol=1e-5)
    assert fake_trt.state.executions[-1]["shapes"]["z"] == (4, DIM)


def test_cuda_graph_replays_fixed_shapes(fake_trt, artifact_dir):
    trt_export.build_engines(artifact_dir, batch=(1, 4, 8))
    backend = TrtBackend(open_artifact(artifact_dir), use_cuda_graph=True)
    first, second = _inputs(8, seed=1)[0], _inputs(8, seed=2)[0]
    backend.sample(first)
    out = backend.sample(second)
    assert backend._stream.replays == 1
    np.testing.assert_allclose(out["x"], toy_sample_reference(second, 1.0)["x"], atol=1e-5)


def test_cuda_graph_capture_failure_falls_back(fake_trt, artifact_dir, monkeypatch):
    def refuse(self, launch):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(FakeStream, "capture", refuse)
    trt_export.build_engines(artifact_dir, batch=(1, 4, 8))
    backend = TrtBackend(open_artifact(artifact_dir), use_cuda_graph=True)
    z = _inputs(8)[0]
    for _ in range(2):
        np.testing.assert_allclose(backend.sample(z)["x"], toy_sample_reference(z, 1.0)["x"], atol=1e-5)
    assert len(fake_trt.state.executions) == 2


def test_backend_refuses_engines_whose_hash_differs(fake_trt, artifact_dir):
    info = trt_export.build_engines(artifact_dir)["engines"]["density"]
    plan = artifact_dir / info["file"]
    plan.write_bytes(plan.read_bytes()[:-1] + b"!")
    with pytest.raises(BadInput, match="refusing to deserialize"):
        TrtBackend(open_artifact(artifact_dir, verify=False))
    assert fake_trt.state.deserialized == 1  # the sample engine only


def test_backend_without_engines_says_build(fake_trt, artifact_dir):
    with pytest.raises(BackendUnavailable, match="run `acf-deploy build"):
        TrtBackend(open_artifact(artifact_dir))


def test_backend_rejects_bad_inputs(fake_trt, artifact_dir):
    trt_export.build_engines(artifact_dir)
    backend = TrtBackend(open_artifact(artifact_dir))
    z, x, probes = _inputs(2)
    with pytest.raises(BadInput, match="z must have shape"):
        backend.sample(z[:, :3])
    with pytest.raises(BadInput, match="NaN"):
        backend.sample(np.full_like(z, np.nan))
    with pytest.raises(BadInput, match="pass probes"):
        backend.density(x)
    with pytest.raises(BadInput, match="probes has batch 1"):
        backend.density(x, probes[:1])
