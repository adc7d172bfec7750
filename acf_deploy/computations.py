"""The two computations an artifact ships, as torch modules: the one place both the exporter and the
runtime take them from.

``DensityGraph`` and ``SampleGraph`` are what the exporter traces into ``density.onnx`` and
``sample.onnx`` (``exporters/graphs.py``); the torch reference backend (``runtime/torch_backend.py``)
runs the very same modules eagerly, and :func:`reference_sample` / :func:`reference_density` compute the
golden outputs an export is checked against. Reference and export therefore share one code path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .flows.blocks import LogdetSpec
from .flows.flow import Flow

Tensor = torch.Tensor
Arrays = dict[str, np.ndarray]

__all__ = ["DensityGraph", "SampleGraph", "density_io", "reference_density", "reference_sample"]


class DensityGraph(nn.Module):
    """``x[, probes] -> z, log_prob, bits_per_dim[, min_pivot]`` plus traced block outputs when asked."""

    def __init__(self, flow: Flow, mode: str, terms: int = 0, with_trace: bool = False):
        super().__init__()
        self.flow, self.mode, self.terms, self.with_trace = flow, mode, terms, with_trace

    def forward(self, x: Tensor, probes: Tensor | None = None) -> tuple[Tensor, ...]:
        trace: list[Tensor] | None = [] if self.with_trace else None
        out = self.flow(x, LogdetSpec(mode=self.mode, terms=self.terms, probes=probes), trace=trace)
        outputs = [out.z, out.log_prob, self.flow.bits_per_dim(out.log_prob)]
        if self.mode == "exact":
            pivot = out.min_pivot if out.min_pivot is not None else torch.ones_like(out.log_prob)
            outputs.append(pivot)
        return tuple(outputs + (trace or []))


class SampleGraph(nn.Module):
    """``z, temperature -> x, residual`` with the fixed-point iterations (plain or accelerated) unrolled."""

    def __init__(self, flow: Flow, n_iters: Sequence[int], schedule: str = "plain"):
        super().__init__()
        self.flow, self.n_iters, self.schedule = flow, list(n_iters), schedule

    def forward(self, z: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow.sample(z, self.n_iters, temperature, self.schedule)


def density_io(mode: str, n_blocks_traced: int = 0) -> tuple[list[str], list[str]]:
    """Input and output names of the density graph in log-det ``mode`` (plus ``trace_i`` per traced block)."""
    inputs = ["x", "probes"] if mode == "series" else ["x"]
    outputs = ["z", "log_prob", "bits_per_dim"] + (["min_pivot"] if mode == "exact" else [])
    return inputs, outputs + [f"trace_{i}" for i in range(n_blocks_traced)]


@torch.inference_mode()
def reference_sample(
    flow: Flow, counts: Sequence[int], z: np.ndarray, temperature: np.ndarray, schedule: str = "plain"
) -> Arrays:
    """:class:`SampleGraph` run eagerly on numpy inputs."""
    x, residual = SampleGraph(flow, counts, schedule)(torch.from_numpy(z), torch.from_numpy(temperature))
    return {"x": x.numpy(), "residual": residual.numpy()}


@torch.inference_mode()
def reference_density(
    flow: Flow, mode: str, terms: int, x: np.ndarray, probes: np.ndarray | None, trace: bool = False
) -> Arrays:
    """:class:`DensityGraph` run eagerly on numpy inputs, outputs named as in the graph."""
    graph = DensityGraph(flow, mode, terms, with_trace=trace)
    outputs = graph(torch.from_numpy(x), None if probes is None else torch.from_numpy(probes))
    names = density_io(mode, len(flow.residual_blocks()) if trace else 0)[1]
    return {name: value.numpy() for name, value in zip(names, outputs, strict=True)}
