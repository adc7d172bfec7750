"""The contract every map inside a residual branch follows.

A residual step is ``y = x + g(x)`` with ``Lip(g) < 1``. ``g`` is a chain of :class:`Branch`
modules, each of which offers its value, a hand-written forward-mode JVP that shares the
forward computation (so exported graphs need no autograd), and an upper bound on its
2-norm Lipschitz constant.
"""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


class Branch(nn.Module):
    """A map inside a residual branch.

    Subclasses implement :meth:`jvp`; :meth:`forward` defaults to its primal part only when a
    subclass does not provide a cheaper one.
    """

    #: "certified" when :meth:`lipschitz` is a proven bound, "verified" when it is measured.
    guarantee: str = "certified"

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden everywhere
        raise NotImplementedError

    def jvp(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        r"""Return ``(f(x), J_f(x) v)`` for a tangent ``v`` of the same shape as ``x``."""
        raise NotImplementedError

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

    def jvp(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        for part in self.parts:
            x, v = part.jvp(x, v)
        return x, v

    def lipschitz(self) -> float:
        bound = 1.0
        for part in self.parts:
            bound *= part.lipschitz()
        return bound

    def bake(self) -> None:
        for part in self.parts:
            part.bake()
