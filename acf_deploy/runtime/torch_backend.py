"""The PyTorch reference backend: the very modules that were traced, run eagerly in fp32."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..artifact import Artifact
from ..checkpoint import load_checkpoint
from ..errors import BadInput
from ..exporters.graphs import DensityGraph, SampleGraph, density_io
from ..flows.flow import Flow
from .base import Arrays, Backend


@torch.inference_mode()
def reference_sample(flow: Flow, counts: Sequence[int], z: np.ndarray, temperature: np.ndarray) -> Arrays:
    x, residual = SampleGraph(flow, counts)(torch.from_numpy(z), torch.from_numpy(temperature))
    return {"x": x.numpy(), "residual": residual.numpy()}


@torch.inference_mode()
def reference_density(
    flow: Flow, mode: str, terms: int, x: np.ndarray, probes: np.ndarray | None, trace: bool = False
) -> Arrays:
    graph = DensityGraph(flow, mode, terms, with_trace=trace)
    outputs = graph(torch.from_numpy(x), None if probes is None else torch.from_numpy(probes))
    names = density_io(mode, len(flow.residual_blocks()) if trace else 0)[1]
    return {name: value.numpy() for name, value in zip(names, outputs, strict=True)}


class TorchBackend(Backend):
    """Rebuilds the flow from the artifact's own checkpoint copy and runs it with the manifest's settings."""

    name = "torch"

    def __init__(self, artifact: Artifact):
        super().__init__(artifact)
        for name in ("checkpoint/model.safetensors", "checkpoint/model.json"):
            if not (artifact.root / name).is_file():
                raise BadInput(
                    f"{artifact.root / name} is missing: the torch reference needs the checkpoint copy; "
                    "check against golden.npz with `--against golden` instead"
                )
            artifact.verify_file(name)
        self.flow, _ = load_checkpoint(artifact.root / "checkpoint")
        self.flow.bake()
        self.counts = [block["n_iter"] for block in artifact.manifest["blocks"]]
        self.terms = int(artifact.manifest["logdet"].get("terms", 0))

    def sample(self, z: np.ndarray, temperature: float = 1.0) -> Arrays:
        return reference_sample(self.flow, self.counts, z, np.array([temperature], dtype=np.float32))

    def density(self, x: np.ndarray, probes: np.ndarray | None = None) -> Arrays:
        return reference_density(self.flow, self.artifact.logdet_mode, self.terms, x, probes)

    def density_trace(self, x: np.ndarray, probes: np.ndarray | None = None) -> Arrays:
        """Density outputs plus every residual block's output (``trace_i``), to localise divergence."""
        return reference_density(self.flow, self.artifact.logdet_mode, self.terms, x, probes, trace=True)
