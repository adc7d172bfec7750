"""Per-block facts about a baked flow: certified vs measured Lipschitz constant, and for attention its gate, gain/bound ratio and share.

Measured constants are lower bounds found by power iteration and an adversarial search on the
inputs each block really receives (data pushed forward, prior samples pulled back); a certified
bound below a measured one would be a bug. ACF-DP blocks are *verified*: their measured constant
must be at most :data:`VERIFIED_LIMIT`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .flows.attention import ACFBranch, GatedAttention
from .flows.blocks import LogdetSpec, ResidualBlock
from .flows.cost import widest_per_sample
from .flows.flow import Flow
from .flows.measure import measured_lipschitz
from .progress import Reporter

VERIFIED_LIMIT = 0.95
#: Elements of the widest per-sample intermediate that one measurement batch may touch (32 digits samples).
MEASUREMENT_BUDGET = 1 << 17


def model_samples(flow: Flow, z: torch.Tensor, max_iters: int = 60) -> torch.Tensor:
    """Samples good enough to stand in for data (measurement seeds, calibration inputs of a model without
    data): each block iterated to a 1e-4 relative step, at most ``max_iters`` times."""
    return flow.solve_inverse(z, max_iters=max_iters, stop=1e-4)


def measurement_batch(flow: Flow) -> int:
    """Samples per measurement input set: 32 for small models, down to 4 for wide ones (attention over many
    tokens, hundreds of channels at full resolution), whose measurement would otherwise take minutes per block."""
    widest = max((widest_per_sample(block.g, flow.dim) for block in flow.residual_blocks()), default=1)
    return int(min(32, max(4, MEASUREMENT_BUDGET // widest)))


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
    flow: Flow,
    data: torch.Tensor,
    prior: torch.Tensor | None = None,
    n_iter: int = 30,
    steps: int = 30,
    progress: Reporter | None = None,
) -> list[dict[str, Any]]:
    """One row per residual block: kind, guarantee, certified L, measured L, and for attention blocks the gate's
    attention weight ``b``, the attention share ``||b F/B|| / ||h||`` on data and the measured gain of ``F/B``
    (its certified bound is 1, so the gain is the gain/bound ratio).

    ``progress`` hears a stage ``measure blocks`` with a step per block (measuring a large model takes minutes)."""
    progress = progress or Reporter()
    names = flow.block_names()
    from_data = block_inputs(flow, data)
    from_prior = block_inputs(flow, prior) if prior is not None else [None] * len(from_data)
    rows = []
    progress.stage("measure blocks", len(names))
    for name, block, xd, xp in zip(names, flow.residual_blocks(), from_data, from_prior, strict=True):
        inputs = [xd] + ([xp] if xp is not None else [])
        # a certified block's measurement only checks its bound, so power iteration suffices; a verified
        # block is judged by its measurement, which therefore includes the adversarial search
        verified = block.guarantee == "verified"
        measured = measured_lipschitz(block.g, inputs, n_iter=n_iter, steps=steps if verified else 0)
        block.measured_constant = measured
        row: dict[str, Any] = {
            "block": name,
            "kind": block.kind,
            "guarantee": block.guarantee,
            "lipschitz_certified": block.lipschitz() if block.guarantee == "certified" else None,
            # an infinite bound (no bound exists) is stored as null: JSON has no infinity
            "lipschitz_bound": block.lipschitz() if math.isfinite(block.lipschitz()) else None,
            "lipschitz_measured": measured,
        }
        gates = [m for m in block.g.modules() if hasattr(m, "attention_share") and hasattr(m, "attention_weight")]
        if gates:
            gate = gates[0]
            hidden = _gate_input(block, gate, xd)
            row["gate"] = gate.attention_weight()
            if hasattr(gate, "gamma"):
                row["gamma"] = float(gate.gamma.detach().reshape(()))
            row["attention_share"] = float(gate.attention_share(hidden).mean())
            if isinstance(gate, GatedAttention):  # F/B is certified 1-Lipschitz: its measured gain is the ratio
                row["attention_gain"] = measured_lipschitz(gate.attn, [hidden], n_iter=n_iter, steps=steps)
        elif isinstance(block.g, ACFBranch):  # standalone ACF layer: share ||c F(x)/B|| / ||x||, no gamma
            with torch.no_grad():
                share = block.g(xd).flatten(1).norm(dim=1) / xd.flatten(1).norm(dim=1)
            row["attention_share"] = float(share.mean())
        rows.append(row)
        progress.advance(f"{name} ({block.guarantee}): {measured:.3g}")
    return rows


@torch.no_grad()
def _gate_input(block: ResidualBlock, gate: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The hidden map ``h`` that reaches the attention sub-map inside ``g``."""
    h = x
    for part in block.g.parts:
        if part is gate:
            return h
        h = part(h)
    raise ValueError("gate not found in block")


def bound_failures(flow: Flow) -> list[str]:
    """Certified blocks whose bound (from the baked weights) is not below 1: the construction that was to
    guarantee contraction did not, so the fixed-point inverse is not guaranteed to converge."""
    return [
        f"{name} has Lipschitz bound {block.lipschitz():.4f}, not below 1"
        for name, block in zip(flow.block_names(), flow.residual_blocks(), strict=True)
        if block.guarantee == "certified" and not block.lipschitz() < 1.0
    ]


def verification_failures(rows: list[dict[str, Any]]) -> list[str]:
    """Blocks that fail their guarantee: a certified bound not below 1 or a measured constant above it (a
    bug), a verified constant above :data:`VERIFIED_LIMIT`. NaN fails every test."""
    failures = []
    for row in rows:
        bound, measured = row["lipschitz_bound"], row["lipschitz_measured"]
        if row["guarantee"] == "certified":
            if not (bound is not None and bound < 1.0):
                failures.append(f"{row['block']} has Lipschitz bound {bound:.4f}, not below 1")
                continue
            limit = bound * (1 + 1e-4)
        else:
            limit = VERIFIED_LIMIT
        if not measured <= limit:
            failures.append(f"{row['block']} measures L = {measured:.4f} > {limit:.4f}")
    return failures
