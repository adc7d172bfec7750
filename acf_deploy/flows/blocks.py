r"""Residual flow steps ``y = x + g(x)`` with ``Lip(g) < 1`` (docs/guarantees.md §2 to §4).

The log-determinant ``log det(I + J_g)`` comes in three forms:

* ``exact``: ``J`` from ``D`` hand-written JVPs, then an unrolled LU without pivoting. Every
  pivot is at least ``1 - L`` because all leading principal submatrices of ``J`` have norm
  ``<= L < 1``, so no pivoting is needed and no ``Det`` op appears in exported graphs.
* ``series``: ``K`` terms of ``sum_k (-1)^(k+1) v^T J^k v / k`` with Rademacher probes ``v``
  given as inputs; the per-probe truncation error is at most ``D L^(K+1) / ((K+1)(1-L))``.
* ``roulette``: the training estimator, an unbiased Russian-roulette series whose value is
  the log-det estimate and whose gradient is the Neumann-series gradient (Chen et al. 2019).

The inverse is a fixed number of Banach iterations ``x <- y - g(x)`` from ``x0 = y``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import torch
from torch import nn

from .base import Branch, Tensor
from .cost import widest_per_sample


@dataclass
class LogdetSpec:
    """How residual steps compute their log-determinant."""

    mode: str = "exact"  # exact | series | roulette
    terms: int = 8  # series: number of terms K
    probes: Tensor | None = None  # series: (B, P, D) Rademacher probes
    n_exact_terms: int = 2  # roulette: terms always included
    poisson_lambda: float = 2.0  # roulette: extra terms ~ Poisson(lambda)
    max_terms: int = 24  # roulette: hard cap, keeps a batch's cost bounded


def lu_logdet(a: Tensor) -> tuple[Tensor, Tensor]:
    """``log det`` and the smallest pivot of each ``(D, D)`` matrix by an unrolled LU without pivoting."""
    dim = a.shape[-1]
    logdet = a.new_zeros(a.shape[0])
    pivots = []
    for k in range(dim):
        pivot = a[:, 0, 0]
        pivots.append(pivot)
        logdet = logdet + torch.log(pivot)
        if k < dim - 1:
            a = a[:, 1:, 1:] - a[:, 1:, :1] * (a[:, :1, 1:] / pivot[:, None, None])
    return logdet, torch.stack(pivots, 1).min(1).values


class _LuLogdetOp(torch.autograd.Function):
    """Marks the LU as one ``acf::LuLogdet`` node while exporting; the exporter expands it into a ``Loop``."""

    @staticmethod
    def forward(ctx, a: Tensor, dim: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return lu_logdet(a)

    @staticmethod
    def symbolic(g, a, dim):  # type: ignore[no-untyped-def]
        logdet, pivot = g.op("acf::LuLogdet", a, dim_i=dim, outputs=2)
        per_sample = a.type().with_sizes([None])  # (B,): declared, so the tracer need not guess
        logdet.setType(per_sample)
        pivot.setType(per_sample)
        return logdet, pivot


def lu_logdet_graph(a: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`lu_logdet`, exported as a single loop instead of ``D`` unrolled elimination steps."""
    if torch.onnx.is_in_onnx_export():
        return _LuLogdetOp.apply(a, int(a.shape[-1]))
    return lu_logdet(a)


#: Elements of the widest intermediate that one eager JVP batch may hold (about 256 MB in float32).
EAGER_JVP_ELEMENTS = 1 << 26


def jacobian_transpose(g: Branch, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(g(x), J^T)`` with ``J^T`` of shape ``(B, D, D)``: ``g`` linearized once, then applied to the basis.

    The basis is the same for every sample, so it enters as one ``(1, D, *shape)`` batch: a linear first map
    computes its columns once for the whole batch (a constant once traced). Traced for export it is one
    application. Run eagerly, the basis is split into chunks whose widest intermediate stays within
    :data:`EAGER_JVP_ELEMENTS`, so large inputs (e.g. attention over 784 pixels) need bounded memory.
    """
    b, shape = x.shape[0], x.shape[1:]
    dim = math.prod(shape)
    basis = torch.eye(dim, dtype=x.dtype, device=x.device).reshape(1, dim, *shape)
    chunk = dim
    if not torch.jit.is_tracing():
        chunk = max(1, min(dim, EAGER_JVP_ELEMENTS // (b * widest_per_sample(g, x[0].numel()))))
    gx, apply = g.linearize(x)
    # one chunk is the basis itself, unsliced: a traced slice would hide the constant (and its shape)
    chunks = [basis] if chunk == dim else [basis[:, start : start + chunk] for start in range(0, dim, chunk)]
    parts = []
    for tangents in chunks:
        columns = apply(tangents)  # (1, n, ...) only if g were linear
        parts.append(columns.expand(b, *columns.shape[1:]).reshape(b, -1, dim))
    return gx, parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def exact_logdet(g: Branch, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(g(x), log det(I + J), smallest LU pivot)``."""
    gx, jt = jacobian_transpose(g, x)
    eye = torch.eye(jt.shape[-1], dtype=x.dtype, device=x.device)
    logdet, min_pivot = lu_logdet_graph(eye + jt)
    return gx, logdet, min_pivot


def series_logdet(g: Branch, x: Tensor, probes: Tensor, terms: int) -> tuple[Tensor, Tensor]:
    """``(g(x), log-det estimate)`` from ``terms`` series terms averaged over the probes ``(B, P, D)``.

    ``g`` is linearized once; each term applies that linearization to the previous term's vectors.
    """
    v = probes.reshape(x.shape[0], probes.shape[1], *x.shape[1:])
    gx, apply = g.linearize(x)
    w, total = v, x.new_zeros(probes.shape[:2])
    for k in range(1, terms + 1):
        w = apply(w)
        total = total + ((-1) ** (k + 1) / k) * (w * v).flatten(2).sum(2)
    return gx, total.mean(1)


def series_truncation_bound(dim: int, lipschitz: float, terms: int) -> float:
    """Per-probe bound on the truncation error of ``terms`` series terms (``||v||^2 = D``)."""
    return dim * lipschitz ** (terms + 1) / ((terms + 1) * (1 - lipschitz))


def _poisson_tail(k: int, lam: float) -> float:
    """``P(N >= k)`` for ``N ~ Poisson(lam)``."""
    if k <= 0:
        return 1.0
    return 1.0 - sum(math.exp(-lam) * lam**i / math.factorial(i) for i in range(k))


def roulette_logdet(g: Branch, x: Tensor, spec: LogdetSpec) -> tuple[Tensor, Tensor]:
    """Training estimator: value is an unbiased log-det estimate, gradient is the Neumann gradient.

    Returns ``(g(x), logdet)`` where ``logdet = surrogate + (estimate - surrogate).detach()``.
    """
    if not x.requires_grad:
        x = x.requires_grad_(True)
    gx = g(x)
    b = x.shape[0]
    extra = torch.poisson(torch.full((b,), spec.poisson_lambda, device=x.device)).long()
    n_terms = min(spec.n_exact_terms + int(extra.max()), spec.max_terms)
    v = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
    vjp, neumann = v, v
    estimate = x.new_zeros(b)
    for k in range(1, n_terms + 1):
        k_rand = k - spec.n_exact_terms
        weight = (extra >= k_rand).to(x.dtype) / _poisson_tail(k_rand, spec.poisson_lambda) if k_rand > 0 else 1.0
        vjp = torch.autograd.grad(gx, x, vjp, retain_graph=True)[0]
        if isinstance(weight, Tensor):
            weight = weight.view(b, *([1] * (x.dim() - 1)))
        estimate = estimate + ((-1) ** (k + 1) / k) * (weight * vjp * v).flatten(1).sum(1).detach()
        neumann = neumann + ((-1) ** k) * weight * vjp.detach()
    vjp_jac = torch.autograd.grad(gx, x, neumann.detach(), create_graph=True)[0]
    surrogate = (vjp_jac * v).flatten(1).sum(1)
    return gx, surrogate + (estimate - surrogate).detach()


class ResidualBlock(nn.Module):
    """``y = x + g(x)``: the i-ResBlock of a Residual Flow and the standalone ACF layer."""

    def __init__(self, g: Branch, kind: str, verify_if_unbounded: bool = False):
        """``verify_if_unbounded``: a block of an imported model whose bound does not prove contraction is
        labelled ``verified`` and judged by measurement (its source promised nothing); a block of ours whose
        bound is not below 1 stays ``certified`` and is refused, because its construction failed."""
        super().__init__()
        self.g = g
        self.kind = kind
        self.verify_if_unbounded = verify_if_unbounded
        #: The measured constant, set by whoever measured it (verification), for blocks no bound makes contractive.
        self.measured_constant: float | None = None

    def lipschitz(self) -> float:
        """Upper bound on ``Lip(g)`` (exact operator norms after ``bake``); may be infinite or above 1."""
        return self.g.lipschitz()

    @property
    def guarantee(self) -> str:
        """``certified`` (a bound proves ``Lip(g) < 1``) or ``verified`` (accepted on measurement)."""
        if self.g.guarantee == "verified" or (self.verify_if_unbounded and not self.lipschitz() < 1):
            return "verified"
        return "certified"

    def contraction(self) -> float:
        """The contraction factor iteration counts are computed with: the bound, or the measured constant."""
        bound = self.lipschitz()
        if bound < 1:
            return bound
        if self.measured_constant is None or not self.measured_constant < 1:
            raise ValueError(
                f"{self.kind} block: no bound below 1 (bound {bound:.4g}) and no measured constant below 1"
            )
        return self.measured_constant

    def forward(self, x: Tensor, spec: LogdetSpec) -> tuple[Tensor, Tensor, Tensor | None]:
        """Return ``(y, logdet, min_pivot)``; ``min_pivot`` only in exact mode."""
        if spec.mode == "exact":
            gx, logdet, min_pivot = exact_logdet(self.g, x)
            return x + gx, logdet, min_pivot
        if spec.mode == "series":
            if spec.probes is None:
                raise ValueError("series log-det needs probes")
            gx, logdet = series_logdet(self.g, x, spec.probes, spec.terms)
            return x + gx, logdet, None
        if spec.mode == "roulette":
            gx, logdet = roulette_logdet(self.g, x, spec)
            return x + gx, logdet, None
        if spec.mode == "none":
            return x + self.g(x), x.new_zeros(x.shape[0]), None
        raise ValueError(f"unknown log-det mode {spec.mode!r}")

    def inverse_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One Banach iteration ``x <- y - g(x)`` and the per-sample step size ``||x_new - x||``."""
        x_new = y - self.g(x)
        return x_new, (x_new - x).flatten(1).norm(dim=1)

    def inverse(self, y: Tensor, n_iter: int, schedule: str = "plain") -> tuple[Tensor, Tensor]:
        """``n_iter`` evaluations of ``g`` from ``x0 = y`` under ``schedule``; returns ``(x, last step size)``.

        Plain iterations compute the step norm only in the last one (the others would compute it for nobody).
        """
        if n_iter < 1:
            return y, y.new_zeros(y.shape[0])
        if schedule == "anderson":
            return next(islice(self.iterates(y, schedule), n_iter - 1, None))
        x = y
        for _ in range(n_iter - 1):
            x = y - self.g(x)
        return self.inverse_step(x, y)

    def iterates(self, y: Tensor, schedule: str = "plain") -> Iterator[tuple[Tensor, Tensor]]:
        """What :meth:`inverse` returns with ``n = 1, 2, ...`` evaluations of ``g``: ``(T(x_(n-1)), step size)``.

        ``T(x) = y - g(x)``. Plain: ``x_n = T(x_(n-1))``. ``anderson`` (Anderson acceleration with one previous
        residual): ``x_n = T(x_(n-1)) - gamma (T(x_(n-1)) - T(x_(n-2)))``, ``gamma`` per sample minimising the
        mixed residual (see :func:`anderson_mix`). Either way the result is one plain step from the last
        iterate, so ``||x - x*|| <= L step / (1 - L)`` holds for what is returned, whatever came before.
        """
        x, image_prev, res_prev = y, None, None
        while True:
            image = y - self.g(x)
            res = image - x
            yield image, res.flatten(1).norm(dim=1)
            accelerate = schedule == "anderson" and image_prev is not None
            x = anderson_mix(image, res, image_prev, res_prev) if accelerate else image
            image_prev, res_prev = image, res

    def anderson_start(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The first accelerated iterate's state ``(x_1, T(x_0), f_0)`` from ``x_0 = y``: a plain step."""
        image = y - self.g(y)
        return image, image, image - y

    def anderson_step(
        self, x: Tensor, image_prev: Tensor, res_prev: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One accelerated iteration on the state ``(x_k, T(x_(k-1)), f_(k-1))``, giving the next state."""
        image = y - self.g(x)
        res = image - x
        return anderson_mix(image, res, image_prev, res_prev), image, res

    @torch.no_grad()
    def solve(self, y: Tensor, max_iters: int = 400, stop: float = 1e-13) -> Tensor:
        """Banach iterations until every step is below ``stop`` relative to ``max(1, ||y||)`` (eager only:
        the number of iterations depends on the data). In float64 the default is a reference inverse."""
        x, threshold = y, stop * max(1.0, float(y.flatten(1).norm(dim=1).max()))
        for _ in range(max_iters):
            x, step = self.inverse_step(x, y)
            if float(step.max()) <= threshold:
                break
        return x

    def bake(self) -> None:
        self.g.bake()


#: How residual blocks are inverted: plain fixed-point iterations, or Anderson-accelerated ones.
SCHEDULES = ("plain", "anderson")


def anderson_mix(image: Tensor, res: Tensor, image_prev: Tensor, res_prev: Tensor) -> Tensor:
    """``T(x_k) - gamma (T(x_k) - T(x_(k-1)))`` with ``gamma = <f_k, f_k - f_(k-1)> / ||f_k - f_(k-1)||^2`` per sample,
    the ``gamma`` that minimises the linearised residual ``||f_k - gamma (f_k - f_(k-1))||`` (``f = T(x) - x``).

    A zero difference (converged, or rounding) gives ``gamma = 0``: the plain step.
    """
    diff = (res - res_prev).flatten(1)
    gamma = (res.flatten(1) * diff).sum(1) / (diff * diff).sum(1).clamp_min(torch.finfo(res.dtype).tiny)
    return image - gamma.reshape(-1, *([1] * (image.dim() - 1))) * (image - image_prev)


def iterations_for(lipschitz: float, r0: float, tol: float) -> int:
    """Smallest ``n`` with ``L^n / (1 - L) * r0 <= tol`` (certified fixed-point count)."""
    if r0 <= 0:
        return 1
    need = math.log(tol * (1 - lipschitz) / r0) / math.log(lipschitz)
    return max(1, math.ceil(need))
