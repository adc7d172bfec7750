"""Real TensorRT engines for the toy artifact, against its numpy reference (docs/guarantees.md §5 tolerances).

Runs only where a TensorRT builder can really be created (GPU + TensorRT libraries); elsewhere every
test is skipped with the reason :func:`trt_builder_available` gives.
"""

from __future__ import annotations

import numpy as np
import pytest

from acf_deploy.artifact import open_artifact
from acf_deploy.exporters.tensorrt import build_engines
from acf_deploy.exporters.trt_lint import errors, lint_artifact
from acf_deploy.runtime.trt_backend import TrtBackend
from acf_deploy.trt_util import trt_builder_available

from .toy_artifact import DATA_SHAPE, DIM, PROBES, toy_density_reference, toy_sample_reference, write_artifact

AVAILABLE, REASON = trt_builder_available()
pytestmark = [pytest.mark.tensorrt, pytest.mark.skipif(not AVAILABLE, reason=f"no TensorRT builder: {REASON}")]


def _inputs(n: int):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((n, DIM)).astype(np.float32)
    x = rng.uniform(0, 1, (n, *DATA_SHAPE)).astype(np.float32)
    probes = rng.choice([-1.0, 1.0], (n, PROBES, DIM)).astype(np.float32)
    return z, x, probes


@pytest.mark.parametrize("use_cuda_graph", [False, True])
def test_fp32_engines_match_the_reference(tmp_path, use_cuda_graph):
    root = write_artifact(tmp_path / "fp32", external_data=True)
    assert not [i for issues in lint_artifact(root).values() for i in errors(issues)]
    build_engines(root, "fp32", batch=(1, 64, 256))
    assert all(info["reused"] for info in build_engines(root, "fp32", batch=(1, 64, 256))["engines"].values())
    z, x, probes = _inputs(300)  # two chunks at the profile's max batch of 256
    with TrtBackend(open_artifact(root), use_cuda_graph=use_cuda_graph) as backend:
        for _ in range(2):  # the second pass replays the captured graphs
            sample = backend.sample(z, temperature=0.8)
            density = backend.density(x, probes)
    want = toy_sample_reference(z, 0.8)
    assert np.abs(sample["x"] - want["x"]).max() <= 1e-4
    want = toy_density_reference(x, probes)
    assert np.abs(density["log_prob"] - want["log_prob"]).max() <= 1e-3
    assert abs(density["bits_per_dim"].astype(np.float64).mean() - want["bits_per_dim"].mean()) <= 1e-5


def test_fp16_engines_stay_within_the_reduced_precision_budget(tmp_path):
    root = write_artifact(tmp_path / "fp16", precision="fp16")
    engines = build_engines(root, "fp16", batch=(1, 64, 256))["engines"]
    assert all(info["half_layers"] > 0 for info in engines.values())
    _, x, probes = _inputs(256)
    with TrtBackend(open_artifact(root)) as backend:
        density = backend.density(x, probes)
    want = toy_density_reference(x, probes)
    assert abs(density["bits_per_dim"].astype(np.float64).mean() - want["bits_per_dim"].mean()) <= 1e-3
