r"""Fixed-point iteration counts per residual block, both ways (docs/guarantees.md §3).

* *certified*: the smallest ``n`` with ``L^n / (1 - L) * r0 <= tol`` where ``r0 <= ||g(0)|| + L R``
  and ``R`` bounds ``||y||`` over the inputs the block can receive when sampling: a chi quantile
  of ``||z||`` carried backwards through the later layers' inverses. Affine couplings have no
  closed-form bound; there ``R`` is the largest norm seen on prior samples times a margin, and the
  block's count is labelled ``empirical``.
* *calibrated*: the smallest ``n`` whose fp32 iterate is within ``tol_factor * tol`` (max-abs) of a
  float64 reference on held-out data and on prior samples, plus an optional relative count margin.
  The margin is taken in accuracy (calibrating to half the tolerance by default) rather than as a
  fixed extra iteration: a block that converges in 2 or 3 iterations would otherwise pay 33-50% for
  its margin, while halving the error costs a fraction of an iteration when the contraction is
  strong. When fp32 stagnates above the target the count where progress stopped is used and the
  block is flagged ``fp32_floor``.
* *oracle* (for reporting only): per sample and per block, the fewest fp32 iterations that bring
  that sample within ``tol`` of its float64 reference (or to the best accuracy fp32 reaches). Its
  per-sample total is a lower bound on what any fixed per-block schedule can cost; the calibrated
  total is compared with its mean and maximum over samples.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from itertools import islice

import torch
from scipy.stats import chi

from ..flows.blocks import LogdetSpec, ResidualBlock, iterations_for
from ..flows.flow import Flow
from ..flows.layers import ActNorm, AffineCoupling, InvConv1x1, Squeeze
from ..progress import Reporter

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
    oracle: Oracle | None = None
    schedule: str = "plain"  # what the calibrated and oracle counts iterate; certified counts are plain


@dataclass
class Oracle:
    """Per-sample oracle counts ``(samples, blocks)``; samples are the data rows, then the prior rows."""

    counts: torch.Tensor
    n_data: int

    @property
    def totals(self) -> torch.Tensor:
        return self.counts.sum(1)

    def summary(self) -> dict[str, float]:
        totals = self.totals.double()
        return {
            "oracle_mean_total": float(totals.mean()),
            "oracle_max_total": float(totals.max()),
            "oracle_block_mean": [float(c) for c in self.counts.double().mean(0)],
            "oracle_block_max": [int(c) for c in self.counts.max(0).values],
        }


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
    shape = flow.latent_shape  # the shape each layer outputs, walking backwards
    for layer, index in flow.inverse_steps():
        if index is not None:
            lip = layer.contraction()
            g0 = float(layer.g(torch.zeros(1, *prior_inputs[index].shape[1:])).norm())
            if empirical:
                radius = max(radius, EMPIRICAL_MARGIN * float(prior_inputs[index].flatten(1).norm(dim=1).max()))
            counts[index] = iterations_for(lip, g0 + lip * radius, tol)
            # a count from a measured constant (no bound below 1) is only as good as the measurement
            measured = lip != layer.lipschitz()
            radii[index], kinds[index] = radius, "empirical" if empirical or measured else "certified"
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

        def solve(index: int, block: ResidualBlock, y: torch.Tensor) -> torch.Tensor:
            x_star = block.solve(y, iters)
            pairs[index].append((y, x_star))
            return x_star

        flow64.invert(z.double(), solve)
    return pairs


@torch.no_grad()
def calibrate(
    flow: Flow,
    data_x: torch.Tensor,
    prior_z: torch.Tensor,
    tol: float,
    max_iters: int = 400,
    margin: float = 0.0,
    tol_factor: float = 0.5,
    schedule: str = "plain",
    progress: Reporter | None = None,
) -> Calibration:
    """Certified, calibrated and per-sample oracle counts for every residual block of a baked float32 flow.

    ``tol_factor`` (accuracy margin) and ``margin`` (relative count margin, rounded up) make the
    calibrated count safer than the largest count seen on the calibration samples. The calibrated and oracle
    counts iterate ``schedule``; the certified counts bound plain iterations. ``progress`` hears a
    stage ``calibrate``: the float64 reference inverse, then a step per block.
    """
    progress = progress or Reporter()
    progress.stage("calibrate", 1 + len(flow.residual_blocks()))
    flow64 = copy.deepcopy(flow).double()
    pairs = block_pairs(flow64, data_x, prior_z)
    progress.advance("float64 reference")
    prior_inputs = [torch.cat([y for y, _ in block_pairs_][-1:]).float() for block_pairs_ in pairs]
    certified, radii, kinds = certified_counts(flow, tol, prior_inputs)
    calibrated, errors, floors, oracle = [], [], [], []
    for block, block_pairs_, cap in zip(flow.residual_blocks(), pairs, certified, strict=True):
        y = torch.cat([p[0] for p in block_pairs_]).float()
        truth = torch.cat([p[1] for p in block_pairs_])
        n, err, floor = _smallest_count(block, y, truth, tol * tol_factor, min(max_iters, max(cap, 1)), schedule)
        n = min(cap, n + math.ceil(margin * n))
        calibrated.append(n)
        errors.append(err)
        floors.append(floor)
        oracle.append(oracle_block_counts(block, y, truth, tol, min(max_iters, max(cap, 1)), schedule))
        progress.advance(f"{n} of at most {cap} iterations")
    n_data = 0 if data_x is None else len(data_x)
    n_rows = n_data + (0 if prior_z is None else len(prior_z))
    counts = torch.stack(oracle, 1) if oracle else torch.zeros(n_rows, 0, dtype=torch.long)  # no residual block
    return Calibration(certified, calibrated, radii, kinds, errors, floors, Oracle(counts, n_data), schedule)


@torch.no_grad()
def oracle_block_counts(
    block: ResidualBlock, y: torch.Tensor, truth: torch.Tensor, tol: float, cap: int, schedule: str = "plain"
) -> torch.Tensor:
    """Per sample, the fewest fp32 iterations from ``x0 = y`` whose max-abs error to ``truth`` is at most
    ``tol``; a sample that never gets there (fp32 floor) counts the first iteration reaching its best error.

    Stops once every sample is within ``tol``, or once the samples still outside it stop contracting.
    """
    first = torch.zeros(len(y), dtype=torch.int64)
    best = torch.full((len(y),), math.inf, dtype=torch.float64)
    best_at = torch.zeros(len(y), dtype=torch.int64)
    history: list[float] = []
    for n, (x, _) in enumerate(islice(block.iterates(y, schedule), cap), start=1):
        err = (x.double() - truth).flatten(1).abs().amax(1)
        first[(first == 0) & (err <= tol)] = n
        improved = err < best
        best[improved], best_at[improved] = err[improved], n
        open_ = first == 0
        if not bool(open_.any()):
            break
        history.append(float(err[open_].max()))
        if n > 4 and history[-1] > 0.8 * history[-5]:  # the rest sit at the fp32 floor
            break
    return torch.where(first > 0, first, best_at)


def _smallest_count(
    block: ResidualBlock, y: torch.Tensor, truth: torch.Tensor, tol: float, cap: int, schedule: str = "plain"
) -> tuple[int, float, bool]:
    """Iterate in fp32 until the max-abs error to ``truth`` is below ``tol`` or stops improving."""
    history: list[float] = []
    for n, (x, _) in enumerate(islice(block.iterates(y, schedule), cap), start=1):
        err = float((x.double() - truth).abs().max())
        history.append(err)
        if err <= tol:
            return n, err, False
        if n > 4 and err > 0.8 * history[-5]:  # no longer contracting: fp32 floor reached
            return n, err, True
    return cap, history[-1], False


@torch.no_grad()
def per_sample_inverse(flow: Flow, z: torch.Tensor, counts: torch.Tensor, schedule: str = "plain") -> torch.Tensor:
    """``Flow.inverse`` with a separate iteration count per sample and block (``counts``: (B, blocks)).

    Runs each block's largest count and freezes a sample's iterate once its own count is reached. Plain
    iterations stop early once an iteration changes nothing (an exact fp32 fixed point: every later
    iteration would return the same values) or, with one count for all samples, once the iterates
    alternate between two values, so long certified schedules cost what they change. Accelerated ones
    (each sample mixes only its own iterates) take each sample's result at its count.
    """

    def solve_accelerated(index: int, block: ResidualBlock, y: torch.Tensor) -> torch.Tensor:
        need = counts[:, index].view(-1, *([1] * (y.dim() - 1)))
        x = y
        for n, (x_n, _) in enumerate(islice(block.iterates(y, schedule), int(need.max())), start=1):
            x = torch.where(need == n, x_n, x)
        return x

    def solve(index: int, block: ResidualBlock, y: torch.Tensor) -> torch.Tensor:
        if schedule != "plain":
            return solve_accelerated(index, block, y)
        x, x_prev, need = y, None, counts[:, index]
        total = int(need.max()) if len(need) else 0
        uniform = bool((need == total).all())
        for n in range(total):
            active = (need > n).view(-1, *([1] * (y.dim() - 1)))
            x_new = torch.where(active, block.inverse_step(x, y)[0], x)
            if torch.equal(x_new, x):
                break
            if uniform and x_prev is not None and torch.equal(x_new, x_prev):
                # a 2-cycle at the fp32 floor: the iterate after ``total`` steps follows from the parity
                x = x_new if (total - n - 1) % 2 == 0 else x
                break
            x_prev, x = x, x_new
        return x

    return flow.invert(z, solve)


@torch.no_grad()
def roundtrip_errors(
    flow: Flow, counts: list[int] | Oracle, data_x: torch.Tensor, prior_z: torch.Tensor, schedule: str = "plain"
) -> dict[str, float]:
    """fp32 round trips with ``counts``: data -> z -> data (max-abs, data space) and z -> x -> z (relative to ||z||).

    ``counts`` is one count per block, or an :class:`Oracle` (data rows then prior rows, in the same order
    as ``data_x`` and ``prior_z``) whose per-sample counts are used instead.
    """
    z = flow(data_x, LogdetSpec(mode="none")).z
    if isinstance(counts, Oracle):
        n = counts.n_data
        x_back = per_sample_inverse(flow, z, counts.counts[:n], schedule)
        x_prior = per_sample_inverse(flow, prior_z, counts.counts[n : n + len(prior_z)], schedule)
    else:
        per_block = torch.tensor(list(counts), dtype=torch.int64)
        x_back = per_sample_inverse(flow, z, per_block.expand(len(z), -1), schedule)
        x_prior = per_sample_inverse(flow, prior_z, per_block.expand(len(prior_z), -1), schedule)
    z_back = flow(x_prior, LogdetSpec(mode="none")).z
    rel = (z_back - prior_z).norm(dim=1) / prior_z.norm(dim=1)
    return {"data_max_abs": float((x_back - data_x).abs().max()), "latent_max_rel": float(rel.max())}


@torch.no_grad()
def latent_roundtrip_floor(flow: Flow, z: torch.Tensor) -> torch.Tensor:
    """Per sample, the z -> x -> z error (relative to ``||z||``) of a perfect fp32 sampler.

    The float64 inverse is iterated to convergence, its ``x`` rounded to fp32 and pushed through the
    fp32 forward pass (the density graph's reference), so no fp32 sampler can do better. Near the edges
    of the logit's domain (``x`` slightly above 1 or below 0) the forward map is so steep that this
    floor alone exceeds 1e-4.
    """
    flow64 = copy.deepcopy(flow).double()
    z64 = z.double()
    x = flow64.solve_inverse(z64)
    z_back = flow(x.float(), LogdetSpec(mode="none")).z.double()
    return (z_back - z64).norm(dim=1) / z64.norm(dim=1)
