"""Runtime: parity against golden.npz with no PyTorch model (and no PyTorch), divergence localised to
the corrupted block, backends that refuse files whose hash does not match, and jobs that leave no
half-written output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from acf_deploy.artifact import open_artifact
from acf_deploy.cli import app
from acf_deploy.errors import BackendUnavailable, BadInput
from acf_deploy.runtime import open_backend
from acf_deploy.runtime.jobs import sample_to_file
from acf_deploy.runtime.ort_backend import OrtBackend
from acf_deploy.runtime.parity import compare_golden, load_golden
from acf_deploy.runtime.torch_backend import TorchBackend

from .export_fixtures import copy_artifact, corrupt_block

NO_TORCH = "import sys; sys.modules['torch'] = None; from acf_deploy.cli import app; app()"


# ------------------------------------------------------------------------------------- golden parity
def test_golden_check_passes_without_the_checkpoint_copy(exports, tmp_path: Path):
    root = copy_artifact(exports.artifact("digits-acf-l2"), tmp_path / "art")
    shutil.rmtree(root / "checkpoint")
    artifact = open_artifact(root)  # the manifest still lists (and hashes) the checkpoint copy
    assert any(name.startswith("checkpoint/") for name in artifact.manifest["files"])
    with open_backend("ort", artifact, threads=1) as ort:
        result = compare_golden(artifact, ort)
    assert result.passed, result.summary()
    assert result.against == "golden" and result.metrics["bits_per_dim_delta"] <= 1e-5
    with pytest.raises(BadInput, match="--against golden"):
        TorchBackend(artifact)
    cli = CliRunner().invoke(app, ["check", str(root), "--against", "golden", "--json"])
    assert cli.exit_code == 0, cli.output
    payload = json.loads(cli.stdout)
    assert payload["passed"] is True and payload["against"] == "golden"
    metrics = payload["metrics"]
    assert metrics["sample_max_abs"] <= 1e-4 and metrics["log_prob_max_abs"] <= 1e-3
    assert metrics["bits_per_dim_delta"] <= 1e-5 and metrics["roundtrip_max_abs"] <= 1e-4  # no PyTorch needed
    torch_check = CliRunner().invoke(app, ["check", str(root), "--against", "torch"])
    assert torch_check.exit_code == 2 and "--against golden" in torch_check.stderr


def test_golden_check_needs_no_pytorch_at_all(exports, tmp_path: Path):
    """On a host without PyTorch (``import torch`` fails) and without the checkpoint copy."""
    root = copy_artifact(exports.artifact("toy-resflow", "series", "loop"), tmp_path / "art")
    shutil.rmtree(root / "checkpoint")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", NO_TORCH, "check", str(root), "--against", "golden", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    payload = json.loads(run.stdout)
    assert payload["passed"] is True and payload["metrics"]["roundtrip_max_abs"] <= 1e-4


# ---------------------------------------------------------------------------------- corrupted block
@pytest.mark.parametrize("k", [0, 1])
def test_check_names_the_corrupted_block(exports, tmp_path: Path, k: int):
    root = copy_artifact(exports.artifact("digits-acf-l2"), tmp_path / "art")
    blocks = json.loads((root / "manifest.json").read_text())["blocks"]
    assert len(blocks) >= 2
    layer = blocks[k]["block"]
    assert corrupt_block(root, layer), f"no initializer belongs to {layer} alone"
    open_artifact(root)  # re-hashed: only parity can fail
    result = CliRunner().invoke(app, ["check", str(root), "--n", "32", "--json"])
    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout)
    assert payload["passed"] is False
    assert payload["first_divergent_block"] == layer
    assert f"first divergent block: {layer}" in result.stderr
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------------ hash checking
def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name", ["sample.onnx", "density.onnx", "golden.npz", "checkpoint/model.safetensors", "checkpoint/model.json"]
)
def test_backends_refuse_a_file_whose_hash_does_not_match(exports, tmp_path: Path, name: str):
    root = copy_artifact(exports.artifact("toy-resflow"), tmp_path / "art")
    _tamper(root / name)
    with pytest.raises(BadInput, match="sha256"):
        open_artifact(root)
    artifact = open_artifact(root, verify=False)  # skip the up-front check: each consumer checks itself
    if name.endswith(".onnx"):
        with pytest.raises(BadInput, match="sha256"):
            OrtBackend(artifact, threads=1)
    elif name == "golden.npz":
        with pytest.raises(BadInput, match="sha256"):
            load_golden(artifact)
    else:
        with pytest.raises(BadInput, match="sha256"):
            TorchBackend(artifact)


def test_unknown_and_unavailable_backends(exports):
    artifact = open_artifact(exports.artifact("toy-resflow"))
    with pytest.raises(BadInput, match="unknown backend"):
        open_backend("onnx", artifact)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
            open_backend("ort-cuda", artifact)
    with pytest.raises(BackendUnavailable):
        open_backend("trt", artifact)  # no TensorRT here, or no engine built for this artifact


def test_series_density_needs_probes(exports):
    artifact = open_artifact(exports.artifact("toy-resflow", "series", "loop"))
    with OrtBackend(artifact, threads=1) as ort, pytest.raises(BadInput, match="probes"):
        ort.density(np.zeros((2, 2), np.float32))


# ------------------------------------------------------------------------------------------ jobs
class _FailingBackend:
    """Delegates to a real backend, then fails on the second batch."""

    name = "failing"

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def sample(self, z, temperature=1.0):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("device lost")
        return self.inner.sample(z, temperature)

    def density(self, x, probes=None):
        return self.inner.density(x, probes)


@pytest.mark.parametrize(("preset", "suffix"), [("toy-resflow", ".npy"), ("digits-acf-l2", ".png")])
def test_failed_sample_leaves_no_file(exports, tmp_path: Path, preset: str, suffix: str):
    artifact = open_artifact(exports.artifact(preset))
    target = tmp_path / f"samples{suffix}"
    with OrtBackend(artifact, threads=1) as ort:
        with pytest.raises(RuntimeError, match="device lost"):
            sample_to_file(_FailingBackend(ort), artifact, 40, target, batch=16)
        assert list(tmp_path.iterdir()) == []
        stats = sample_to_file(ort, artifact, 40, target, batch=16)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert stats["nonfinite"] == 0
    if suffix == ".npy":
        assert np.load(target).shape == (40, *artifact.data_shape)


def test_ort_batch_shards_give_the_same_outputs_as_one_run(exports):
    """``threads`` split a batch over concurrent single-threaded runs; no sample may notice."""
    artifact = open_artifact(exports.artifact("digits-acf-l2"))
    rng = np.random.default_rng(3)
    z = rng.standard_normal((50, artifact.dim)).astype(np.float32)  # 3 shards of unequal size
    x = np.clip(rng.random((50, *artifact.data_shape)), 0.05, 0.95).astype(np.float32)
    with OrtBackend(artifact, threads=1) as single, OrtBackend(artifact, threads=3) as sharded:
        assert sharded.workers == 3
        for got, want in ((sharded.sample(z, 0.8), single.sample(z, 0.8)), (sharded.density(x), single.density(x))):
            assert got.keys() == want.keys()
            for name in want:
                np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)
