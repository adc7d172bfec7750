"""The PyTorch reference backend: the very modules that were traced, run eagerly in fp32.

It is also the eager baseline of ``acf-deploy bench``, so it runs in its fastest honest
form: the same baked module with the same folded constants, built once, in eval mode under
``torch.inference_mode``, with the manifest's iteration counts and an explicit thread count.
"""

from __future__ import annotations

import numpy as np
import torch

from ..artifact import Artifact
from ..checkpoint import load_checkpoint
from ..computations import DensityGraph, SampleGraph, density_io, reference_density
from ..errors import BadInput
from .base import Arrays, Backend


def set_torch_threads(threads: int) -> None:
    """Intra-op threads for eager PyTorch (process-wide; the bench gives ONNX Runtime the same number)."""
    if threads < 1:
        raise BadInput("--threads must be at least 1")
    torch.set_num_threads(threads)


class TorchBackend(Backend):
    """Rebuilds the flow from the artifact's own checkpoint copy and runs it with the manifest's settings."""

    name = "torch"

    def __init__(self, artifact: Artifact, threads: int | None = None):
        super().__init__(artifact)
        if threads is not None:
            set_torch_threads(threads)
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
        self._sample_graph = SampleGraph(self.flow, self.counts, artifact.schedule).eval()
        self._density_graph = DensityGraph(self.flow, self.artifact.logdet_mode, self.terms).eval()
        self._density_names = density_io(self.artifact.logdet_mode)[1]

    @torch.inference_mode()
    def sample(self, z: np.ndarray, temperature: float = 1.0) -> Arrays:
        t = torch.tensor([temperature], dtype=torch.float32)
        x, residual = self._sample_graph(torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)), t)
        return {"x": x.numpy(), "residual": residual.numpy()}

    @torch.inference_mode()
    def density(self, x: np.ndarray, probes: np.ndarray | None = None) -> Arrays:
        x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        p_t = None if probes is None else torch.from_numpy(np.ascontiguousarray(probes, dtype=np.float32))
        outputs = self._density_graph(x_t, p_t)
        return {name: value.numpy() for name, value in zip(self._density_names, outputs, strict=True)}

    def density_trace(self, x: np.ndarray, probes: np.ndarray | None = None) -> Arrays:
        """Density outputs plus every residual block's output (``trace_i``), to localise divergence."""
        return reference_density(self.flow, self.artifact.logdet_mode, self.terms, x, probes, trace=True)
