"""The contract every map inside a residual branch follows.

A residual step is ``y = x + g(x)`` with ``Lip(g) < 1``. ``g`` is a chain of :class:`Branch`
modules, each of which offers its value, a hand-written linearization (so exported graphs need no
autograd), and an upper bound on its 2-norm Lipschitz constant.

The linearization is computed once per input and then applied to any number of tangents: the exact
log-det pushes all ``D`` basis vectors through ``J_g(x)`` and the series log-det pushes its probes through
it once per term, so recomputing ``g``'s primal for every tangent would repeat the same work ``D`` times.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Tensor = torch.Tensor
#: ``J_g(x)`` applied to tangents ``(T, K, *shape)``, ``T`` the batch or 1 (the same tangents for every sample).
Linear = Callable[[Tensor], Tensor]


def lift(primal: Tensor) -> Tensor:
    """A primal intermediate ``(B, ...)`` shaped to broadcast against tangents ``(T, K, ...)``."""
    return primal.unsqueeze(1)


def per_tangent(op: Callable[[Tensor], Tensor], vs: Tensor) -> Tensor:
    """Apply a per-sample ``op`` (a convolution, say) to tangents ``(T, K, *shape)`` as one batch of ``T K``."""
    out = op(vs.reshape(-1, *vs.shape[2:]))  # a target of -1 and static sizes, which an exported graph can fold
    return out.reshape(vs.shape[0], vs.shape[1], *out.shape[1:])


class Branch(nn.Module):
    """A map inside a residual branch.

    Subclasses implement :meth:`linearize` (or, for maps whose JVP cannot share work across tangents,
    :meth:`jvp`; each method falls back on the other) and :meth:`forward`.
    """

    #: "certified" when :meth:`lipschitz` is a proven bound, "verified" when it is measured.
    guarantee: str = "certified"

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden everywhere
        raise NotImplementedError

    def linearize(self, x: Tensor) -> tuple[Tensor, Linear]:
        """``(f(x), v -> J_f(x) v)`` for tangents ``(T, K, *shape)``: the primal is computed once.

        The fallback repeats ``x`` for every tangent and calls :meth:`jvp`.
        """

        def apply(vs: Tensor) -> Tensor:
            b, k, shape = x.shape[0], vs.shape[1], x.shape[1:]
            x_rep = lift(x).expand(b, k, *shape).reshape(b * k, *shape)
            dy = self.jvp(x_rep, vs.expand(b, k, *shape).reshape(b * k, *shape))[1]
            return dy.reshape(b, k, *dy.shape[1:])

        return self(x), apply

    def jvp(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        r"""Return ``(f(x), J_f(x) v)`` for a tangent ``v`` of the same shape as ``x``."""
        y, apply = self.linearize(x)
        return y, apply(lift(v)).squeeze(1)

    def lipschitz(self) -> float:
        """Upper bound on the 2-norm Lipschitz constant (exact operator norms after ``bake``)."""
        raise NotImplementedError

    def bake(self) -> None:
        """Freeze weights for export: plain tensors, exact operator norms, folded constants."""


class Chain(Branch):
    """Composition ``f_n o ... o f_1``; its bound is the product of the parts' bounds."""

    def __init__(self, *parts: Branch):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    @property
    def guarantee(self) -> str:  # type: ignore[override]
        labels = {getattr(p, "guarantee", "certified") for p in self.parts}
        return "verified" if "verified" in labels else "certified"

    def forward(self, x: Tensor) -> Tensor:
        for part in self.parts:
            x = part(x)
        return x

    def linearize(self, x: Tensor) -> tuple[Tensor, Linear]:
        maps = []
        for part in self.parts:
            x, apply = part.linearize(x)
            maps.append(apply)

        def apply_all(vs: Tensor) -> Tensor:
            for apply in maps:
                vs = apply(vs)
            return vs

        return x, apply_all

    def lipschitz(self) -> float:
        bound = 1.0
        for part in self.parts:
            bound *= part.lipschitz()
        return bound

    def bake(self) -> None:
        for part in self.parts:
            part.bake()
