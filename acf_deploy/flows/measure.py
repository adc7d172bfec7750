"""Measured Lipschitz constants of per-sample maps (lower bounds, for checking certified ones).

``fn`` maps a batch ``(B, ...)`` to ``(B, ...)`` with each output row depending only on its own input
row, so the batch Jacobian is block-diagonal and one batched power iteration runs ``B`` independent
ones. Everything returned is attained by some input (or pair of inputs): a *lower* bound on the true
constant, which a certified bound must never fall below and which "verified" blocks are judged by.
Autograd (``torch.func``) is used freely: this is measurement, never exported. Use float64 for tight
secant ratios.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

Tensor = torch.Tensor
Fn = Callable[[Tensor], Tensor]

__all__ = ["adversarial_lipschitz", "jacobian_norm", "measured_lipschitz"]


def _norms(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)


def _per_sample(s: Tensor, like: Tensor) -> Tensor:
    return s.reshape(-1, *([1] * (like.dim() - 1)))


def _unit(t: Tensor) -> Tensor:
    return t / _per_sample(_norms(t).clamp_min(1e-300 if t.dtype == torch.float64 else 1e-30), t)


def _jvp_at(fn: Fn, x: Tensor) -> Fn:
    """``v -> J v`` at ``x``: a branch's own linearization where it has one (its primal computed once; the
    tests hold it to autodiff), else forward-mode autodiff, which recomputes the primal for every ``v``."""
    linearize = getattr(fn, "linearize", None)
    if linearize is None:
        return lambda v: torch.func.jvp(fn, (x,), (v,))[1]
    with torch.no_grad():
        apply = linearize(x)[1]
    return lambda v: apply(v.unsqueeze(1)).squeeze(1)


def _power(fn: Fn, x: Tensor, n_iter: int, v: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Power iteration on ``J^T J`` at ``x``: best ``||J v||`` per sample and the last ``v``."""
    x = x.detach()
    _, vjp_fn = torch.func.vjp(fn, x)
    jvp_fn = _jvp_at(fn, x)
    v = _unit(torch.randn_like(x) if v is None else v.detach())
    best = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(n_iter):
        jv = jvp_fn(v)
        best = torch.maximum(best, _norms(jv))
        v = _unit(vjp_fn(jv)[0])
    return best.detach(), v.detach()


def jacobian_norm(fn: Fn, x: Tensor, n_iter: int = 50) -> Tensor:
    """Per-sample spectral norm of the Jacobian of ``fn`` at ``x`` by power iteration, shape ``(B,)``."""
    return _power(fn, x, n_iter)[0]


def adversarial_lipschitz(
    fn: Fn, x: Tensor, steps: int = 100, lr: float = 0.05, radius: float = 1e-2, n_iter: int = 20
) -> Tensor:
    """Largest constant found near ``x`` by gradient ascent, per sample, shape ``(B,)``.

    Ascends the secant ratio ``||f(y) - f(x)|| / ||y - x||`` over both the point ``x`` and the offset
    ``y - x`` (direction and log-length, starting from the top singular vector at ``radius * ||x||``), so it
    looks for both steep points (short offsets) and steep pairs (long ones); the result also includes
    the power-iteration Jacobian norm at the start and at the final point.
    """
    x0 = x.detach()
    best, direction = _power(fn, x0, n_iter)
    scale = _norms(x0).clamp_min(1.0)
    point = x0.clone().requires_grad_(True)
    raw = direction.clone().requires_grad_(True)
    log_r = (scale * radius).log().clone().requires_grad_(True)
    opt = torch.optim.Adam([point, raw, log_r], lr=lr)
    for _ in range(steps):
        r = log_r.exp()
        delta = _unit(raw) * _per_sample(r, x0)
        ratio = _norms(fn(point + delta) - fn(point)) / r
        best = torch.maximum(best, ratio.detach())
        opt.zero_grad()
        (-ratio.clamp_min(1e-300).log().sum()).backward()
        opt.step()
        with torch.no_grad():  # keep offsets meaningful: not below rounding noise, not absurdly long
            log_r.clamp_(min=(scale * 1e-6).log(), max=(scale * 10.0).log())
    final = _power(fn, point.detach(), n_iter, raw.detach())[0]
    return torch.maximum(best, final)


def measured_lipschitz(fn: Fn, inputs_list: Iterable[Tensor], n_iter: int = 50, steps: int = 100) -> float:
    """Max over all inputs of the adversarial estimate, which includes the power-iteration Jacobian norm at
    each input, or of that norm alone with ``steps=0`` (a lower bound on Lip either way)."""
    found = 0.0
    for x in inputs_list:
        estimate = adversarial_lipschitz(fn, x, steps=steps, n_iter=n_iter) if steps else jacobian_norm(fn, x, n_iter)
        found = max(found, float(estimate.max()))
    if not math.isfinite(found):
        raise FloatingPointError("non-finite Lipschitz measurement")
    return found
