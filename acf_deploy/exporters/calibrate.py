r"""Fixed-point iteration counts per residual block, both ways (DESIGN 2).

* *certified*: the smallest ``n`` with ``L^n / (1 - L) * r0 <= tol`` where ``r0 <= ||g(0)|| + L R``
  and ``R`` bounds ``||y||`` over the inputs the block can receive when sampling: a chi quantile
  of ``||z||`` carried backwards through the later layers' inverses. Affine couplings have no
  closed-form bound; there ``R`` is the largest norm seen on prior samples times a margin, and the
  block's count is labelled ``empirical``.
* *calibrated*: the smallest ``n`` whose fp32 iterate is within ``tol`` (max-abs) of a float64
  reference on held-out data and on prior samples, plus a margin. When fp32 stagnates above
  ``tol`` the count where progress stopped is used and the block is flagged ``fp32_floor``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from scipy.stats import chi

from ..flows.blocks import LogdetSpec, ResidualBlock, iterations_for
from ..flows.flow import Flow
from ..flows.layers import ActNorm, AffineCoupling, InvConv1x1, Squeeze

CHI_QUANTILE = 1 - 1e-6
EMPIRICAL_MARGIN = 1.5


@dataclass
class Calibration:
    certified: list[int]
    calibrated: list[int]
    radius: list[float]
    bound_kind: list[str]  # "certified" | "empirical" radius per block
    calibration_error: list[float]  # max-abs fp32 error at the calibrated count
    fp32_floor: list[bool] = field(default_factory=list)


def _prior_radius(dim: int) -> float:
    return float(chi.ppf(CHI_QUANTILE, dim))


@torch.no_grad()
def certified_counts(
    flow: Flow, tol: float, prior_inputs: list[torch.Tensor]
) -> tuple[list[int], list[float], list[str]]:
    """Certified counts, the radius ``R`` each assumes, and whether ``R`` is certified or empirical."""
    blocks = flow.residual_blocks()
    counts, radii, kinds = [0] * len(blocks), [0.0] * len(blocks), ["certified"] * len(blocks)
    radius, empirical = _prior_radius(flow.dim), False
    index = len(blocks)
    shape = tuple(flow._latent_shape())  # the shape each layer outputs, walking backwards
    for layer in reversed(flow.layers):
        if isinstance(layer, ResidualBlock):
            index -= 1
            lip = layer.lipschitz()
            g0 = float(layer.g(torch.zeros(1, *prior_inputs[index].shape[1:])).norm())
            if empirical:
                radius = max(radius, EMPIRICAL_MARGIN * float(prior_inputs[index].flatten(1).norm(dim=1).max()))
            counts[index] = iterations_for(lip, g0 + lip * radius, tol)
            radii[index], kinds[index] = radius, "empirical" if empirical else "certified"
            radius = (radius + g0) / (1 - lip)
        elif isinstance(layer, ActNorm):
            pixels = shape[1] * shape[2] if layer.spatial else 1
            radius = float(torch.exp(-layer.log_scale).max()) * radius + float(layer.bias.norm()) * math.sqrt(pixels)
        elif isinstance(layer, InvConv1x1):
            w_inv = torch.linalg.inv(layer.weight.double())
            radius *= float(torch.linalg.matrix_norm(w_inv, ord=2))
        elif isinstance(layer, AffineCoupling):
            empirical = True
        elif isinstance(layer, Squeeze):
            c, h, w = shape
            shape = (c // 4, 2 * h, 2 * w)
        else:
            raise TypeError(f"no radius rule for {type(layer).__name__}")
    return counts, radii, kinds


@torch.no_grad()
def block_pairs(flow64: Flow, x: torch.Tensor | None, z: torch.Tensor | None, iters: int = 400) -> list[list[tuple]]:
    """``(y, x*)`` pairs per block in float64: data pushed forward, prior samples pulled back."""
    pairs: list[list[tuple]] = [[] for _ in flow64.residual_blocks()]
    if x is not None:
        h = flow64.preprocess(x.double())[0] if flow64.preprocess is not None else x.double()
        index = 0
        for layer in flow64.layers:
            y = flow64._apply_layer(layer, h, LogdetSpec(mode="none"))[0]
            if isinstance(layer, ResidualBlock):
                pairs[index].append((y, h))
                index += 1
            h = y
    if z is not None:
        h = z.double().reshape(z.shape[0], *flow64._latent_shape())
        index = len(pairs)
        for layer in reversed(flow64.layers):
            if isinstance(layer, ResidualBlock):
                index -= 1
                x_star, _ = layer.inverse(h, iters)
                pairs[index].append((h, x_star))
                h = x_star
            else:
                h = layer.inverse(h)
    return pairs


@torch.no_grad()
def calibrate(
    flow: Flow, data_x: torch.Tensor, prior_z: torch.Tensor, tol: float, max_iters: int = 400, margin: float = 0.1
) -> Calibration:
    """Certified and calibrated counts for every residual block of a baked float32 flow."""
    flow64 = copy.deepcopy(flow).double()
    pairs = block_pairs(flow64, data_x, prior_z)
    prior_inputs = [torch.cat([y for y, _ in block_pairs_][-1:]).float() for block_pairs_ in pairs]
    certified, radii, kinds = certified_counts(flow, tol, prior_inputs)
    calibrated, errors, floors = [], [], []
    for block, block_pairs_, cap in zip(flow.residual_blocks(), pairs, certified, strict=True):
        y = torch.cat([p[0] for p in block_pairs_]).float()
        truth = torch.cat([p[1] for p in block_pairs_])
        n, err, floor = _smallest_count(block, y, truth, tol, min(max_iters, max(cap, 1)))
        n = min(cap, n + max(1, math.ceil(margin * n)))
        calibrated.append(n)
        errors.append(err)
        floors.append(floor)
    return Calibration(certified, calibrated, radii, kinds, errors, floors)


def _smallest_count(
    block: ResidualBlock, y: torch.Tensor, truth: torch.Tensor, tol: float, cap: int
) -> tuple[int, float, bool]:
    """Iterate in fp32 until the max-abs error to ``truth`` is below ``tol`` or stops improving."""
    x = y
    history: list[float] = []
    for n in range(1, cap + 1):
        x, _ = block.inverse_step(x, y)
        err = float((x.double() - truth).abs().max())
        history.append(err)
        if err <= tol:
            return n, err, False
        if n > 4 and err > 0.8 * history[-5]:  # no longer contracting: fp32 floor reached
            return n, err, True
    return cap, history[-1], False


@torch.no_grad()
def roundtrip_errors(flow: Flow, counts: list[int], data_x: torch.Tensor, prior_z: torch.Tensor) -> dict[str, float]:
    """fp32 round trips with ``counts``: data -> z -> data (max-abs, data space) and z -> x -> z (relative to ||z||)."""
    z = flow(data_x, LogdetSpec(mode="none")).z
    x_back, _ = flow.inverse(z, counts)
    x_prior, _ = flow.inverse(prior_z, counts)
    z_back = flow(x_prior, LogdetSpec(mode="none")).z
    rel = (z_back - prior_z).norm(dim=1) / prior_z.norm(dim=1)
    return {"data_max_abs": float((x_back - data_x).abs().max()), "latent_max_rel": float(rel.max())}
