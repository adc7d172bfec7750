"""Triton model repositories: configs parse into Triton's own ModelConfig and match the ONNX
graphs; versions are added, never overwritten; a real tritonserver answers like PyTorch where one runs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from acf_deploy.artifact import open_artifact
from acf_deploy.cli import app
from acf_deploy.errors import BadInput
from acf_deploy.exporters.triton import TritonOptions, write_triton_repository
from acf_deploy.fileio import sha256_file

from .export_fixtures import copy_artifact

TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.INT64: "TYPE_INT64",
}


def model_config_pb2():
    """Triton's ``inference.ModelConfig`` protobuf module, as tritonclient ships it."""
    return pytest.importorskip(
        "tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is not installed (acf-deploy[serve])"
    )


def parse_config(path: Path):
    """``config.pbtxt`` -> ``inference.ModelConfig`` (protobuf text format, Triton's own schema)."""
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2().ModelConfig())


def onnx_io(path: Path) -> dict[str, list[tuple[str, str, list]]]:
    graph = onnx.load(str(path), load_external_data=False).graph

    def entries(values):
        return [
            (
                v.name,
                TYPES[v.type.tensor_type.elem_type],
                [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim],
            )
            for v in values
        ]

    return {"input": entries(graph.input), "output": entries(graph.output)}


def check_against_onnx(config, onnx_path: Path, dim: int) -> None:
    """Every config tensor is the ONNX tensor of that name and type, its dims the ONNX shape after the batch axis."""
    io = onnx_io(onnx_path)
    for key, tensors in (("input", config.input), ("output", config.output)):
        assert [t.name for t in tensors] == [name for name, _, _ in io[key]]
        for tensor, (_, dtype, shape) in zip(tensors, io[key], strict=True):
            assert tensor.data_type == model_config_pb2().DataType.Value(dtype)
            assert shape[0] == "batch", f"{tensor.name}: Triton batches along axis 0, which must be the batch axis"
            rest = [dim if isinstance(d, str) else d for d in shape[1:]]  # z's free axis is D
            if not rest:  # a per-sample scalar [batch]: Triton's [1] reshaped to []
                assert list(tensor.dims) == [1] and tensor.HasField("reshape") and list(tensor.reshape.shape) == []
            else:
                assert list(tensor.dims) == rest and not tensor.HasField("reshape")


@pytest.fixture(scope="module")
def digits(exports):
    return exports.artifact("digits-acf-l2")


@pytest.fixture(scope="module")
def toy_series(exports):
    return exports.artifact("toy-resflow", "series")


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
@pytest.mark.parametrize("which", ["digits", "toy_series"])
def test_configs_parse_and_match_onnx(request, tmp_path, backend, which):
    artifact = open_artifact(request.getfixturevalue(which))
    repo = tmp_path / "repo"
    options = TritonOptions(backend=backend, max_batch=64, instances=2, dynamic_batching=True, name="m")
    summary = write_triton_repository(artifact.root, repo, options)
    assert summary["version"] == 1
    pb = model_config_pb2()
    for graph in ("sample", "density"):
        model_dir = repo / f"m-{graph}"
        config = parse_config(model_dir / "config.pbtxt")
        assert config.name == f"m-{graph}" and config.max_batch_size == 64
        if backend == "tensorrt":
            assert config.platform == "tensorrt_plan" and not config.backend
        else:
            assert config.backend == "onnxruntime" and not config.platform
        assert config.instance_group[0].count == 2
        kind = pb.ModelInstanceGroup.KIND_GPU if backend == "tensorrt" else pb.ModelInstanceGroup.KIND_CPU
        assert config.instance_group[0].kind == kind
        assert config.dynamic_batching.max_queue_delay_microseconds == 100
        assert max(config.dynamic_batching.preferred_batch_size) <= 64
        assert config.version_policy.latest.num_versions == 1
        served = model_dir / "1" / "model.onnx"
        check_against_onnx(config, served, artifact.dim)
        # and against the artifact's own graph, but for temperature, served per row
        original = onnx_io(artifact.graph_path(graph))
        got = onnx_io(served)
        if graph == "density":
            assert sha256_file(served) == artifact.manifest["files"]["density.onnx"]  # byte for byte
            assert got == original
            names = [t.name for t in config.input]
            assert names == (["x", "probes"] if artifact.logdet_mode == "series" else ["x"])
        else:
            assert got["output"] == original["output"]
            assert ("temperature", "TYPE_FP32", [1]) in original["input"]
            assert ("temperature", "TYPE_FP32", ["batch", 1]) in got["input"]
    if backend == "tensorrt":
        script = (repo / "build_engines.sh").read_text()
        assert subprocess.run(["sh", "-n", str(repo / "build_engines.sh")]).returncode == 0
        d = artifact.dim
        assert f"--maxShapes=z:64x{d},temperature:64x1" in script
        shape = "x".join(map(str, artifact.data_shape))
        if artifact.logdet_mode == "series":
            assert f"--maxShapes=x:64x{shape},probes:64x{artifact.n_probes}x{d}" in script
        else:
            assert f"--maxShapes=x:64x{shape} " in script
        assert "model.plan.partial" in script and not list(repo.rglob("model.plan"))


def test_onnxruntime_with_tensorrt_accelerator(digits, tmp_path):
    write_triton_repository(digits, tmp_path / "repo", TritonOptions(ort_tensorrt=True, name="m"))
    config = parse_config(tmp_path / "repo" / "m-sample" / "config.pbtxt")
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP32"
    assert int(accelerator.parameters["max_workspace_size_bytes"]) == 4096 << 20
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    with pytest.raises(BadInput, match="onnxruntime backend on --kind gpu"):
        write_triton_repository(digits, tmp_path / "r2", TritonOptions(ort_tensorrt=True, kind="cpu"))


def test_per_row_temperature_model_matches_sample_onnx(digits, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    write_triton_repository(digits, tmp_path / "repo", TritonOptions(name="m"))
    record = json.loads((tmp_path / "repo" / "acf-triton.json").read_text())["models"]["m-sample"]["1"]
    assert record["per_row_inputs"] == ["temperature"] and record["per_row_check"].startswith("bit-identical")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    served = ort.InferenceSession(str(tmp_path / "repo" / "m-sample" / "1" / "model.onnx"), options)
    original = ort.InferenceSession(str(Path(digits) / "sample.onnx"), options)
    z = np.random.default_rng(1).standard_normal((6, 64)).astype(np.float32)
    temps = np.repeat(np.array([0.6, 1.0, 1.3], np.float32), 2)[:, None]
    x, residual = served.run(None, {"z": z, "temperature": temps})
    for t in (0.6, 1.0, 1.3):
        rows = temps[:, 0] == np.float32(t)
        want_x, want_r = original.run(None, {"z": z, "temperature": np.array([t], np.float32)})
        np.testing.assert_array_equal(x[rows], want_x[rows])
        np.testing.assert_array_equal(residual[rows], want_r[rows])


def test_rerun_adds_a_version_and_keeps_the_live_one(digits, tmp_path):
    repo = tmp_path / "repo"
    write_triton_repository(digits, repo, TritonOptions(name="m"))
    live = repo / "m-density" / "1" / "model.onnx"
    before = (sha256_file(live), live.stat().st_mtime_ns)
    summary = write_triton_repository(digits, repo, TritonOptions(name="m", max_batch=32))
    assert summary["version"] == 2
    assert (sha256_file(live), live.stat().st_mtime_ns) == before
    for graph in ("sample", "density"):
        versions = sorted(p.name for p in (repo / f"m-{graph}").iterdir() if p.is_dir())
        assert versions == ["1", "2"], "no staging folder may be left behind"
        assert parse_config(repo / f"m-{graph}" / "config.pbtxt").max_batch_size == 32
    record = json.loads((repo / "acf-triton.json").read_text())["models"]["m-density"]
    assert (
        set(record) == {"1", "2"}
        and record["2"]["source_sha256"] == open_artifact(digits).manifest["files"]["density.onnx"]
    )
    assert "tritonserver --model-repository" in (repo / "README.md").read_text()


def test_refuses_a_tampered_artifact_and_bad_options(digits, tmp_path):
    bad = copy_artifact(Path(digits), tmp_path / "art")
    with open(bad / "density.onnx", "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BadInput, match="sha256"):
        write_triton_repository(bad, tmp_path / "repo", TritonOptions())
    assert not (tmp_path / "repo").exists()
    safe = open_artifact(digits).manifest["max_safe_batch"]
    with pytest.raises(BadInput, match="largest safe batch"):
        write_triton_repository(digits, tmp_path / "repo", TritonOptions(max_batch=safe + 1))
    with pytest.raises(BadInput, match="GPUs only"):
        write_triton_repository(digits, tmp_path / "repo", TritonOptions(backend="tensorrt", kind="cpu"))


def test_cli_triton(digits, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["triton", str(digits), "--repo", str(tmp_path / "r"), "--dynamic-batching", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary["models"]) == {"digits-acf-l2-sample", "digits-acf-l2-density"}
    bad = runner.invoke(app, ["triton", str(digits), "--repo", str(tmp_path / "r"), "--backend", "tensorflow"])
    assert bad.exit_code == 2 and "--backend" in bad.output


# ---------------------------------------------------------------------------------------------------
# A live server. NVIDIA ships no tritonserver wheel with the onnxruntime backend; the nvidia-pytriton wheel
# bundles a tritonserver binary with only the python backend. With a full server (TRITONSERVER=path, its
# backends beside it) the repository is served as written; with PyTriton's, each model's backend is swapped
# for a python-backend stand-in that runs the same model.onnx with ONNX Runtime (see SHIM): the server,
# our configs (batching, dims, reshapes, instance groups, versions) and HTTP are real, the backend is not.

SHIM = '''
"""Python-backend stand-in for Triton's onnxruntime backend: runs this version's model.onnx."""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [(t["name"], [int(d) for d in t["dims"]]) for t in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            # dlpack, not as_numpy(): PyTriton's stub predates NumPy 2
            feeds = {n: np.from_dlpack(pb_utils.get_input_tensor_by_name(request, n)).copy() for n in self.inputs}
            values = self.session.run([name for name, _ in self.outputs], feeds)
            tensors = [
                pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(v.reshape(len(v), *dims)))
                for (name, dims), v in zip(self.outputs, values)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
'''


def find_tritonserver(tmp_path: Path) -> tuple[Path, Path, str, dict[str, str]] | None:
    """(binary, backend dir, mode, environment) of a runnable tritonserver, or None."""
    env = dict(os.environ)
    explicit = os.environ.get("TRITONSERVER") or shutil.which("tritonserver")
    if explicit:
        binary = Path(explicit).resolve()
        backends = Path(os.environ.get("TRITON_BACKENDS", binary.parent.parent / "backends"))
        if (backends / "onnxruntime").is_dir():
            return binary, backends, "onnxruntime", env
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    stub = root / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
    if not (root / "bin" / "tritonserver").is_file() or not stub.is_file():
        return None
    backends = tmp_path / "backends"
    (backends / "python").mkdir(parents=True)
    for item in (root / "backends" / "python").iterdir():
        if item.is_file():
            (backends / "python" / item.name).symlink_to(item)
    (backends / "python" / stub.name).symlink_to(stub)
    libs = root.parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = f"{libs}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else str(libs)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # the stub's Python finds this venv
    return root / "bin" / "tritonserver", backends, "python-shim", env


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_live_tritonserver_answers_like_pytorch(digits, tmp_path):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    found = find_tritonserver(tmp_path)
    if found is None:
        pytest.skip(
            "no tritonserver here: set TRITONSERVER to a server with the onnxruntime backend, or "
            "pip install --no-deps nvidia-pytriton (bundles a tritonserver with the python backend)"
        )
    binary, backends, mode, env = found
    repo = tmp_path / "repo"
    write_triton_repository(digits, repo, TritonOptions(name="m", max_batch=64, dynamic_batching=True))
    if mode == "python-shim":
        for graph in ("sample", "density"):
            config = repo / f"m-{graph}" / "config.pbtxt"
            config.write_text(config.read_text().replace('backend: "onnxruntime"', 'backend: "python"'))
            (repo / f"m-{graph}" / "1" / "model.py").write_text(SHIM)
    http, grpc, metrics = free_ports(3)
    log = open(tmp_path / "tritonserver.log", "w")
    server = subprocess.Popen(
        [str(binary), f"--model-repository={repo}", f"--backend-directory={backends}", f"--http-port={http}",
         f"--grpc-port={grpc}", f"--metrics-port={metrics}", "--exit-timeout-secs=5"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        deadline = time.time() + 90
        while time.time() < deadline and server.poll() is None:
            try:
                if client.is_server_ready():
                    break
            except Exception:  # connection refused while it starts
                pass
            time.sleep(0.5)
        if not client.is_model_ready("m-sample") or not client.is_model_ready("m-density"):
            pytest.fail(
                f"tritonserver ({mode}) did not load the repository:\n"
                + (tmp_path / "tritonserver.log").read_text()[-3000:]
            )
        artifact = open_artifact(digits)
        from acf_deploy.runtime import open_backend

        rng = np.random.default_rng(0)
        z = rng.standard_normal((8, artifact.dim)).astype(np.float32)
        x = (rng.integers(0, 17, (8, *artifact.data_shape)) + rng.random((8, *artifact.data_shape))) / 17
        x = x.astype(np.float32)
        with open_backend("torch", artifact) as torch_ref:
            pending = []
            for t, rows in ((0.7, slice(0, 5)), (1.2, slice(5, 8))):  # concurrent: may share a dynamic batch
                n = rows.stop - rows.start
                inputs = [
                    httpclient.InferInput("z", [n, artifact.dim], "FP32"),
                    httpclient.InferInput("temperature", [n, 1], "FP32"),
                ]
                inputs[0].set_data_from_numpy(z[rows])
                inputs[1].set_data_from_numpy(np.full((n, 1), t, np.float32))
                pending.append((t, rows, client.async_infer("m-sample", inputs)))
            for t, rows, handle in pending:
                result = handle.get_result()
                want = torch_ref.sample(z[rows], t)
                assert result.as_numpy("residual").shape == (rows.stop - rows.start, 1)
                assert np.abs(result.as_numpy("x") - want["x"]).max() <= 1e-4
            inputs = [httpclient.InferInput("x", list(x.shape), "FP32")]
            inputs[0].set_data_from_numpy(x)
            result = client.infer("m-density", inputs)
            want = torch_ref.density(x)
            assert np.abs(result.as_numpy("log_prob")[:, 0] - want["log_prob"]).max() <= 1e-3
            assert (
                abs(
                    float(result.as_numpy("bits_per_dim").astype(np.float64).mean())
                    - float(want["bits_per_dim"].astype(np.float64).mean())
                )
                <= 1e-5
            )
            assert result.as_numpy("z").shape == (8, artifact.dim)
        metadata = client.get_model_metadata("m-density")
        assert [t["name"] for t in metadata["outputs"]] == ["z", "log_prob", "bits_per_dim", "min_pivot"]
    finally:
        if "client" in locals():
            client.close()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
