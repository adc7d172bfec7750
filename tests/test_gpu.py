"""The traced modules on a CUDA GPU match the artifact's golden outputs (skips without CUDA).

Uses an artifact exported on the CPU and carried along (``ACF_GPU_ARTIFACT``), or the session's
small export when none is given.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from acf_deploy.artifact import open_artifact
from acf_deploy.checkpoint import load_checkpoint
from acf_deploy.computations import DensityGraph, SampleGraph
from acf_deploy.runtime.parity import LIMITS, load_golden

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch on this machine"),
]


@pytest.fixture(scope="module")
def artifact(exports):
    carried = os.environ.get("ACF_GPU_ARTIFACT")
    return open_artifact(Path(carried) if carried else exports.artifact("digits-acf-l2"))


def test_cuda_modules_match_golden(artifact):
    flow, _ = load_checkpoint(artifact.root / "checkpoint")
    flow.bake()
    flow = flow.cuda()
    golden = load_golden(artifact)
    counts = [b["n_iter"] for b in artifact.manifest["blocks"]]
    mode = artifact.logdet_mode
    terms = int(artifact.manifest["logdet"].get("terms", 0))
    with torch.inference_mode():
        x, _ = SampleGraph(flow, counts)(torch.from_numpy(golden["in_z"]).cuda(), torch.ones(1, device="cuda"))
        probes = golden.get("in_probes")
        outputs = DensityGraph(flow, mode, terms)(
            torch.from_numpy(golden["in_x"]).cuda(), None if probes is None else torch.from_numpy(probes).cuda()
        )
    assert np.abs(x.cpu().numpy() - golden["sample_x"]).max() <= LIMITS["sample_max_abs"]
    bpd = outputs[2].double().mean().item()
    assert abs(bpd - golden["density_bits_per_dim"].astype(np.float64).mean()) <= LIMITS["bits_per_dim_delta"]
