"""Per-block facts about a baked flow: certified vs measured Lipschitz constant, gamma, attention share.

Measured constants are lower bounds found by power iteration and an adversarial search on the
inputs each block really receives (data pushed forward, prior samples pulled back); a certified
bound below a measured one would be a bug. ACF-DP blocks are *verified*: their measured constant
must be at most :data:`VERIFIED_LIMIT`.
"""

from __future__ import annotations

from typing import Any

import torch

from .flows.attention import ACFBranch, GatedAttention
from .flows.blocks import LogdetSpec, ResidualBlock
from .flows.flow import Flow
from .flows.measure import measured_lipschitz

VERIFIED_LIMIT = 0.95


@torch.no_grad()
def block_inputs(flow: Flow, x: torch.Tensor) -> list[torch.Tensor]:
    """The input each residual block receives when ``x`` (data space) is pushed forward."""
    h = flow.preprocess(x)[0] if flow.preprocess is not None else x
    inputs = []
    for layer in flow.layers:
        if isinstance(layer, ResidualBlock):
            inputs.append(h)
        h = flow._apply_layer(layer, h, LogdetSpec(mode="none"))[0]
    return inputs


def block_report(
    flow: Flow, data: torch.Tensor, prior: torch.Tensor | None = None, n_iter: int = 30, steps: int = 30
) -> list[dict[str, Any]]:
    """One row per residual block: kind, guarantee, certified L, measured L, gamma, attention share."""
    names = flow.block_names()
    from_data = block_inputs(flow, data)
    from_prior = block_inputs(flow, prior) if prior is not None else [None] * len(from_data)
    rows = []
    for name, block, xd, xp in zip(names, flow.residual_blocks(), from_data, from_prior, strict=True):
        inputs = [xd] + ([xp] if xp is not None else [])
        measured = measured_lipschitz(block.g, inputs, n_iter=n_iter, steps=steps)
        row: dict[str, Any] = {
            "block": name,
            "kind": block.kind,
            "guarantee": block.guarantee,
            "lipschitz_certified": block.lipschitz() if block.guarantee == "certified" else None,
            "lipschitz_bound": block.lipschitz(),
            "lipschitz_measured": measured,
        }
        gates = [m for m in block.g.modules() if isinstance(m, GatedAttention)]
        if gates:
            gate = gates[0]
            hidden = _gate_input(block, gate, xd)
            row["gamma"] = float(gate.gamma.detach())
            row["attention_share"] = float(gate.attention_share(hidden).mean())
        elif isinstance(block.g, ACFBranch):  # standalone ACF layer: share ||c F(x)/B|| / ||x||, no gamma
            with torch.no_grad():
                share = block.g(xd).flatten(1).norm(dim=1) / xd.flatten(1).norm(dim=1)
            row["attention_share"] = float(share.mean())
        rows.append(row)
    return rows


@torch.no_grad()
def _gate_input(block: ResidualBlock, gate: GatedAttention, x: torch.Tensor) -> torch.Tensor:
    """The hidden map ``h`` that reaches the attention sub-map inside ``g``."""
    h = x
    for part in block.g.parts:
        if part is gate:
            return h
        h = part(h)
    raise ValueError("gate not found in block")


def bound_failures(flow: Flow) -> list[str]:
    """Blocks whose bound (from the baked weights) is not below 1: not contractive, not invertible by iteration."""
    return [
        f"{name} has Lipschitz bound {block.lipschitz():.4f}, not below 1"
        for name, block in zip(flow.block_names(), flow.residual_blocks(), strict=True)
        if not block.lipschitz() < 1.0
    ]


def verification_failures(rows: list[dict[str, Any]]) -> list[str]:
    """Blocks that fail their guarantee: a bound not below 1, a measured constant above the bound
    (certified; a bug), or above :data:`VERIFIED_LIMIT` (verified). NaN fails every test."""
    failures = []
    for row in rows:
        bound, measured = row["lipschitz_bound"], row["lipschitz_measured"]
        if not bound < 1.0:
            failures.append(f"{row['block']} has Lipschitz bound {bound:.4f}, not below 1")
            continue
        limit = VERIFIED_LIMIT if row["guarantee"] == "verified" else bound * (1 + 1e-4)
        if not measured <= limit:
            failures.append(f"{row['block']} measures L = {measured:.4f} > {limit:.4f}")
    return failures
