r"""Invertible flow layers with closed-form inverses and log-determinants.

Each layer maps ``x -> (y, logdet)`` with ``logdet`` of shape ``(B,)`` and has an exact
``inverse``. The residual steps (fixed-point inverse, series log-det) live in ``blocks.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Tensor


class Transform(nn.Module):
    """An invertible layer: ``forward(x) -> (y, logdet)``, ``inverse(y) -> x``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def bake(self) -> None:
        """Fold everything that does not depend on the input into constants."""


def _zeros_like_batch(x: Tensor) -> Tensor:
    return x.new_zeros(x.shape[0])


class LogitTransform(Transform):
    r"""``s = a + (1 - 2a) x``, ``y = log s - log(1 - s)``, mapping ``[0, 1]`` data to the real line."""

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(s) - torch.log1p(-s)
        per_elem = math.log(1 - 2 * self.alpha) - torch.log(s) - torch.log1p(-s)
        return y, per_elem.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)


class ActNorm(Transform):
    """Per-channel affine ``(x + b) * exp(w)``, initialised from data by :meth:`initialize`."""

    def __init__(self, channels: int, spatial: bool = True):
        super().__init__()
        self.spatial = spatial
        shape = (1, channels, 1, 1) if spatial else (1, channels)
        self.bias = nn.Parameter(torch.zeros(shape))
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        dims = [0, 2, 3] if self.spatial else [0]
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-0.5 * torch.log(var.clamp_min(0.2)))
        self.initialized.fill_(1)

    def _pixels(self, x: Tensor) -> int:
        return x.shape[2] * x.shape[3] if self.spatial else 1

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = self.log_scale.sum() * self._pixels(x)
        return y, logdet.expand(x.shape[0]).to(x.dtype)

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class Squeeze(Transform):
    """Space-to-depth by 2: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``; inverse is ``pixel_shuffle``."""

    @staticmethod
    def output_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = shape
        return (4 * c, h // 2, w // 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        return y, _zeros_like_batch(x)

    def inverse(self, y: Tensor) -> Tensor:
        return F.pixel_shuffle(y, 2)


class InvConv1x1(Transform):
    """Glow's invertible 1x1 convolution; ``W^-1`` and ``log|det W|`` are computed once at bake."""

    def __init__(self, channels: int):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        self.weight = nn.Parameter(q)
        self.register_buffer("baked_inverse", torch.empty(0), persistent=False)
        self.register_buffer("baked_logabsdet", torch.empty(0), persistent=False)

    def _logabsdet(self) -> Tensor:
        if self.baked_logabsdet.numel():
            return self.baked_logabsdet
        return torch.linalg.slogdet(self.weight)[1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = F.conv2d(x, self.weight[:, :, None, None])
        logdet = self._logabsdet() * (x.shape[2] * x.shape[3])
        return y, logdet.expand(x.shape[0]).to(x.dtype)

    def inverse(self, y: Tensor) -> Tensor:
        w_inv = self.baked_inverse if self.baked_inverse.numel() else torch.linalg.inv(self.weight)
        return F.conv2d(y, w_inv[:, :, None, None])

    def bake(self) -> None:
        with torch.no_grad():
            w = self.weight.double()
            self.baked_inverse = torch.linalg.inv(w).to(self.weight.dtype)
            self.baked_logabsdet = torch.linalg.slogdet(w)[1].to(self.weight.dtype)


class AffineCoupling(Transform):
    """Glow's affine coupling: the second half is scaled by ``sigmoid(h + 2)`` and shifted by a CNN of the first."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.split = channels // 2
        out = channels - self.split
        self.net = nn.Sequential(
            nn.Conv2d(self.split, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * out, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _scale_shift(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(xa)
        raw, shift = h[:, 0::2], h[:, 1::2]
        return torch.sigmoid(raw + 2.0), shift

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xa, xb = x[:, : self.split], x[:, self.split :]
        scale, shift = self._scale_shift(xa)
        yb = (xb + shift) * scale
        return torch.cat([xa, yb], 1), torch.log(scale).flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        ya, yb = y[:, : self.split], y[:, self.split :]
        scale, shift = self._scale_shift(ya)
        return torch.cat([ya, yb / scale - shift], 1)


def dequantize(levels: Tensor, n_levels: int, generator: torch.Generator | None = None, mid: bool = False) -> Tensor:
    """Map integer levels ``v in {0..K-1}`` to ``x = (v + u) / K`` with ``u ~ U[0, 1)`` (or 0.5 with ``mid``)."""
    levels = levels.to(torch.get_default_dtype()) if not levels.is_floating_point() else levels
    if mid:
        noise = torch.full_like(levels, 0.5)
    else:
        noise = torch.rand(levels.shape, generator=generator, dtype=levels.dtype, device=levels.device)
    return (levels + noise) / n_levels


def bits_per_dim(log_prob: Tensor, dim: int, n_levels: int | None) -> Tensor:
    r"""Bits/dim of the discrete data, ``(D ln K - log p(x)) / (D ln 2)``; ``-log p / (D ln 2)`` without levels."""
    offset = dim * math.log(n_levels) if n_levels else 0.0
    return (offset - log_prob) / (dim * math.log(2.0))
