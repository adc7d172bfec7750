"""Rough per-sample sizes of a flow, so that work on it (measurement, calibration, chunked JVPs) can be
made proportionate: a digits model and a 16-million-parameter MNIST model must not get the same budget."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def widest_per_sample(g: nn.Module, input_numel: int) -> int:
    """Elements of the widest intermediate of ``g`` per sample: its input, a convolution's output map, or an
    attention's ``heads x N x N`` scores."""
    widest = input_numel
    for module in g.modules():
        n_tokens = getattr(module, "n_tokens", None)
        if n_tokens:
            widest = max(widest, getattr(module, "heads", 1) * n_tokens * n_tokens)
        hw = getattr(module, "input_hw", None)
        if hw is not None and getattr(module, "weight", None) is not None:
            widest = max(widest, module.weight.shape[0] * hw[0] * hw[1])
    return widest


def macs_per_sample(g: nn.Module) -> int:
    """Multiply-accumulates of one evaluation of ``g`` for one sample (weights times pixels, attention scores)."""
    total = 0
    for module in g.modules():
        weight = getattr(module, "weight", None)
        hw = getattr(module, "input_hw", None)
        if weight is not None and hw is not None:
            total += weight.numel() * hw[0] * hw[1]
        elif weight is not None and weight.dim() == 2:
            total += weight.numel()
        n_tokens = getattr(module, "n_tokens", None)
        if n_tokens:
            width = getattr(module, "channels", None) or getattr(module, "dim", 1)
            total += 2 * n_tokens * n_tokens * width
    return total


def sweep_macs_per_sample(branches: Iterable[nn.Module]) -> int:
    """One evaluation of every residual branch ``g``, per sample: the cost of one fixed-point sweep."""
    return sum(macs_per_sample(g) for g in branches)
