"""``acf-deploy import``: a Residual Flows or ACF-fork checkpoint becomes an ordinary acf-deploy checkpoint.

Steps: read the file without running its code, rebuild the architecture from its ``args``, copy the
chosen weights, then certify or measure every residual block before anything is written. Blocks whose
bound from exact operator norms is below 1 are ``certified``; blocks no bound proves contractive (every
block with the fork's unconstrained attention) are measured on data and on model samples and are
``verified`` when the measured constant is at most :data:`~acf_deploy.report.VERIFIED_LIMIT`; anything
else is refused, because its fixed-point inverse would not be guaranteed to converge.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_checkpoint
from ..data import heldout_data, to_model_space
from ..errors import BadInput, CheckFailed
from ..fileio import check_output_dir, sha256_file
from ..flows.flow import Flow
from ..flows.presets import build_flow
from ..pipeline import is_checkpoint_dir
from ..progress import TextReporter
from ..report import block_report, measurement_batch, model_samples, verification_failures
from .architecture import config_from_args
from .safe_load import load_reference_checkpoint
from .weights import ReferenceTensors, fill_from_reference

WEIGHTS = ("ema", "raw")


@dataclass
class ImportResult:
    directory: Path
    config: dict[str, Any]
    provenance: dict[str, Any]
    blocks: list[dict[str, Any]]


def _attention_variant(checkpoint: dict[str, Any], globals_found: set[str]) -> tuple[str | None, int]:
    """The fork's attention as the file holds it, ``(None | "dp" | "l2", heads)``, checked against ``args``.

    A head count that does not match the weights surfaces when they are copied (a missing or unused tensor).
    """
    dp = any(name.endswith(".Self_Attn") for name in globals_found)
    l2 = any(name.endswith(".L2_Self_Attn") for name in globals_found)
    if dp and l2:
        raise BadInput("the checkpoint mixes the fork's dot-product and L2 attention, which its args cannot describe")
    args = checkpoint["args"]
    claimed = getattr(args, "attention", False)
    variant = "dp" if dp else "l2" if l2 else None
    if bool(claimed) != bool(variant):
        found = variant or "no attention module"
        raise BadInput(f"args.attention is {claimed!r} but the checkpoint holds {found}; its args do not describe it")
    heads = getattr(args, "heads", 1) if variant == "l2" else 1
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise BadInput(f"args.heads is {heads!r}; expected a positive integer")
    return variant, heads


def _args_dict(args: argparse.Namespace) -> dict[str, Any]:
    """``args`` as JSON-able values (anything else as its repr), for the provenance record."""
    out: dict[str, Any] = {}
    for key, value in sorted(vars(args).items()):
        out[key] = value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)
    return out


def build_imported_flow(path: str | Path, weights: str = "ema") -> tuple[Flow, dict[str, Any], dict[str, Any]]:
    """The reference model in ``path`` as an (unbaked, float32) acf-deploy flow, its config and provenance."""
    if weights not in WEIGHTS:
        raise BadInput(f"--weights must be ema or raw, not {weights!r}")
    path = Path(path)
    checkpoint, globals_found = load_reference_checkpoint(path)
    attention, heads = _attention_variant(checkpoint, globals_found)
    config = config_from_args(checkpoint["args"], attention, heads)
    flow = build_flow(config)
    fill_from_reference(flow, ReferenceTensors(checkpoint, weights))
    source = config["reference"]["source"]
    provenance = {
        "source": source,
        "source_file": path.name,
        "source_sha256": sha256_file(path),
        "weights": weights,
        "args": _args_dict(checkpoint["args"]),
        "reference_test_bpd": _number(checkpoint.get("test_bpd")),
    }
    return flow.eval(), config, provenance


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def judge_blocks(
    flow: Flow, data: torch.Tensor | None, generator: torch.Generator, log: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Per-block report of a baked imported flow; refuses (exit 1) a block neither certified nor verified.

    Blocks are measured on data (when given) and on model samples. Samples that diverge already show that
    some block expands; the blocks are then measured on uniform noise images so the report can name it.
    """
    n = measurement_batch(flow)
    samples = model_samples(flow, torch.randn(n, flow.dim, generator=generator))
    diverged = not bool(torch.isfinite(samples).all())
    if diverged:
        samples = torch.rand(n, *flow.data_shape, generator=generator) * 0.9 + 0.05
    progress = TextReporter(log) if log is not None else None
    if data is None:  # model samples stand in for data
        rows = block_report(flow, samples, None, n_iter=20, steps=20, progress=progress)
    else:
        rows = block_report(flow, data[:n], None if diverged else samples, n_iter=20, steps=20, progress=progress)
    failures = verification_failures(rows)
    if failures:
        raise CheckFailed("not imported, the fixed-point inverse is not guaranteed: " + "; ".join(failures))
    if diverged:
        raise CheckFailed("not imported: sampling the model gives non-finite values, so some block is not contractive")
    return rows


def import_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    weights: str = "ema",
    data: str | Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> ImportResult:
    """Import, judge and write ``out_dir`` (``model.safetensors`` + ``model.json``).

    ``data`` (a file of the model's data in its levels) is what blocks are measured on besides model samples;
    without it, model samples stand in for data.
    """
    say = log or (lambda _msg: None)
    out_dir = check_output_dir(out_dir, is_checkpoint_dir, "an acf-deploy checkpoint")
    say("reading the checkpoint")
    flow, config, provenance = build_imported_flow(path, weights)
    generator = torch.Generator().manual_seed(seed)
    data_x = None
    if data is not None:
        levels = heldout_data(config, data)
        data_x = to_model_space(levels[:32], config, generator)
    say("certifying and measuring every residual block")
    baked = build_flow(config)
    baked.load_state_dict(flow.state_dict())
    baked.bake()
    blocks = judge_blocks(baked, data_x, generator, log=say)
    directory = save_checkpoint(flow, config, out_dir, {"blocks": blocks}, provenance=provenance)
    return ImportResult(Path(directory), config, provenance, blocks)
