r"""The flow: data space ``[0, 1]^D`` (or ``R^2``) to a standard normal latent (docs/guarantees.md §1).

``log p(x) = log N(z; 0, I) + sum_layers log|det|`` including the logit preprocessing term; the
data-space density is on ``[0, 1]^D`` and bits/dim refer to the discrete levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .base import Tensor
from .blocks import LogdetSpec, ResidualBlock
from .layers import ActNorm, LogitTransform, Squeeze, bits_per_dim


@dataclass
class FlowOutput:
    z: Tensor  # (B, D)
    logdet: Tensor  # (B,) sum of all layers' log|det|
    log_prob: Tensor  # (B,) data-space log-density
    min_pivot: Tensor | None  # (B,) smallest LU pivot over blocks (exact mode)


class InverseStep(NamedTuple):
    """One layer of the inverse pass: ``block`` is its index among the residual blocks, ``None`` for a layer
    with a closed-form inverse (``layer.inverse(h)``)."""

    layer: nn.Module
    block: int | None


#: How a caller inverts residual block ``index``: ``solve(index, block, y) -> x`` with ``x + g(x) = y``.
BlockSolver = Callable[[int, ResidualBlock, Tensor], Tensor]


def standard_normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * (z * z).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


class Flow(nn.Module):
    """A sequence of invertible layers and residual steps with a standard normal prior."""

    def __init__(
        self,
        layers: Sequence[nn.Module],
        data_shape: Sequence[int],
        n_levels: int | None,
        logit_alpha: float | None,
    ):
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.dim = math.prod(self.data_shape)
        self.n_levels = n_levels
        self.preprocess = LogitTransform(logit_alpha) if logit_alpha is not None else None
        self.layers = nn.ModuleList(layers)

    # ------------------------------------------------------------------ structure
    def residual_blocks(self) -> list[ResidualBlock]:
        return [layer for layer in self.layers if isinstance(layer, ResidualBlock)]

    def block_names(self) -> list[str]:
        return [f"layers.{i}" for i, layer in enumerate(self.layers) if isinstance(layer, ResidualBlock)]

    def bake(self) -> Flow:
        """Freeze every layer for export and certification; returns ``self`` in eval mode."""
        self.eval()
        for layer in self.layers:
            layer.bake()
        return self

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent initialisation of every ActNorm, layer by layer."""
        h = self.preprocess(x)[0] if self.preprocess is not None else x
        for layer in self.layers:
            if isinstance(layer, ActNorm):
                layer.initialize(h)
            h = self._apply_layer(layer, h, LogdetSpec(mode="none"))[0]

    # ------------------------------------------------------------------ density
    @staticmethod
    def _apply_layer(layer: nn.Module, h: Tensor, spec: LogdetSpec) -> tuple[Tensor, Tensor, Tensor | None]:
        if isinstance(layer, ResidualBlock):
            return layer(h, spec)
        y, logdet = layer(h)
        return y, logdet, None

    def forward(self, x: Tensor, spec: LogdetSpec | None = None, trace: list[Tensor] | None = None) -> FlowOutput:
        """Data to latents with the log-det of ``spec``; ``trace`` collects each residual block's output."""
        spec = spec or LogdetSpec()
        h = x
        logdet = x.new_zeros(x.shape[0])
        if self.preprocess is not None:
            h, ld = self.preprocess(h)
            logdet = logdet + ld
        min_pivot = None
        for layer in self.layers:
            h, ld, pivot = self._apply_layer(layer, h, spec)
            logdet = logdet + ld
            if trace is not None and isinstance(layer, ResidualBlock):
                trace.append(h)
            if pivot is not None:
                min_pivot = pivot if min_pivot is None else torch.minimum(min_pivot, pivot)
        z = h.flatten(1)
        return FlowOutput(z=z, logdet=logdet, log_prob=standard_normal_log_prob(z) + logdet, min_pivot=min_pivot)

    def log_prob(self, x: Tensor, spec: LogdetSpec | None = None) -> Tensor:
        return self.forward(x, spec).log_prob

    def bits_per_dim(self, log_prob: Tensor) -> Tensor:
        return bits_per_dim(log_prob, self.dim, self.n_levels)

    # ------------------------------------------------------------------ sampling
    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The shape a latent row ``(D,)`` takes as input to the last layer: ``data_shape`` after every Squeeze."""
        shape = self.data_shape
        for layer in self.layers:
            if isinstance(layer, Squeeze):
                shape = layer.output_shape(shape)
        return shape

    def inverse_steps(self) -> Iterator[InverseStep]:
        """The layers in inverse order, last first, each with its residual-block index (see :class:`InverseStep`).

        Every inverse walks the flow through this one generator: :meth:`invert` and the samplers built on it,
        calibration's radius bounds, and the exporter's ``Loop`` sampling graph.
        """
        index = len(self.residual_blocks())
        for layer in reversed(self.layers):
            if isinstance(layer, ResidualBlock):
                index -= 1
                yield InverseStep(layer, index)
            else:
                yield InverseStep(layer, None)

    def invert(self, z: Tensor, solve: BlockSolver) -> Tensor:
        """Latents ``(B, D)`` to data: closed-form layers inverted exactly, residual blocks by ``solve``."""
        h = z.reshape(z.shape[0], *self.latent_shape)
        for step in self.inverse_steps():
            h = step.layer.inverse(h) if step.block is None else solve(step.block, step.layer, h)
        return self.preprocess.inverse(h) if self.preprocess is not None else h

    def inverse(self, z: Tensor, n_iters: int | Sequence[int], schedule: str = "plain") -> tuple[Tensor, Tensor]:
        """Latents ``(B, D)`` to data with fixed iteration counts per residual block, plain or accelerated
        (:data:`~acf_deploy.flows.blocks.SCHEDULES`).

        Returns ``(x, residual)`` where ``residual`` is each sample's largest final fixed-point
        step over all blocks (a convergence and NaN flag).
        """
        blocks = self.residual_blocks()
        counts = [n_iters] * len(blocks) if isinstance(n_iters, int) else list(n_iters)
        if len(counts) != len(blocks):
            raise ValueError(f"expected {len(blocks)} iteration counts, got {len(counts)}")
        residual = z.new_zeros(z.shape[0])

        def solve(index: int, block: ResidualBlock, y: Tensor) -> Tensor:
            nonlocal residual
            x, step = block.inverse(y, counts[index], schedule)
            residual = torch.maximum(residual, step)
            return x

        return self.invert(z, solve), residual

    def sample(
        self, z: Tensor, n_iters: int | Sequence[int], temperature: float | Tensor = 1.0, schedule: str = "plain"
    ) -> tuple[Tensor, Tensor]:
        return self.inverse(z * temperature, n_iters, schedule)

    @torch.no_grad()
    def solve_inverse(self, z: Tensor, max_iters: int = 400, stop: float = 1e-13) -> Tensor:
        """Latents to data with every residual block iterated until it converges (see
        :meth:`ResidualBlock.solve`): the reference inverse in float64, cheap model samples with a loose ``stop``."""
        return self.invert(z, lambda _index, block, y: block.solve(y, max_iters, stop))

    def adaptive_inverse(self, z: Tensor, tol: float, max_iters: int = 1000) -> tuple[Tensor, list[int]]:
        """The Residual Flows sampler: every block iterated until an element-wise tolerance is met.

        As in the reference code's ``iresblock.py`` ``_inverse_fixed_point``: start at ``x = y - g(y)`` and
        iterate ``x <- y - g(x)`` until every element satisfies ``|x - x_prev| < tol + tol |y|``, at most
        ``max_iters`` more times. The reference compares the *squared* step with that unsquared tolerance,
        which makes its real criterion ``sqrt(tol)``; here the test is done as written. The number of
        iterations depends on the data, so this runs eagerly only (the baseline ``acf-deploy bench`` times
        the exported fixed-count sampler against). Returns ``(x, g evaluations per block)``.
        """
        evaluations = [0] * len(self.residual_blocks())

        def solve(index: int, block: ResidualBlock, y: Tensor) -> Tensor:
            threshold = tol + tol * y.abs()
            x_prev, x = y, y - block.g(y)
            count = 1
            while not bool(((x - x_prev).abs() < threshold).all()) and count <= max_iters:
                x_prev, x = x, y - block.g(x)
                count += 1
            evaluations[index] = count
            return x

        return self.invert(z, solve), evaluations
