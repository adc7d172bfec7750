"""High-level Python API shared by the CLI: train a preset end to end with its final report, and export a
checkpoint to a verified artifact.

This is where the layers meet: :func:`export_artifact` has the exporter write the artifact and hands it
the runtime's verification, so neither ``exporters`` nor ``runtime`` imports the other.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifact import Artifact
from .checkpoint import META, save_checkpoint
from .data import to_model_space, training_data
from .exporters.export import ExportOptions, write_artifact
from .fileio import check_output_dir
from .flows.config import validate_config
from .flows.flow import Flow
from .flows.presets import build_flow, preset_config
from .plots import save_density_plot, save_grid
from .progress import Reporter
from .report import block_report
from .runtime.verify import verify_export
from .train import STATE_META, evaluate_bpd, train

SAMPLE_ITERS = 60

__all__ = ["ExportOptions", "export_artifact", "final_report", "train_preset"]


def export_artifact(
    checkpoint: str | Path,
    out_dir: str | Path,
    opts: ExportOptions | None = None,
    progress: Reporter | None = None,
) -> Artifact:
    """Export a checkpoint to a verified artifact directory (``acf-deploy export``).

    The graphs, golden batch and manifest are written into a temporary directory, verified there on ONNX
    Runtime against the PyTorch outputs (:func:`~acf_deploy.runtime.verify.verify_export`), and only then
    renamed into place; on any failure nothing is left behind.
    """
    return write_artifact(checkpoint, out_dir, opts, verify=verify_export, progress=progress)


def train_preset(
    preset: str,
    out_dir: str | Path,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    resume: bool = False,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train ``preset`` into ``out_dir``: checkpoint, held-out bits/dim, per-block report, sample picture."""
    overrides = dict(overrides or {})
    config = validate_config(preset_config(preset, **overrides))
    out_dir = check_output_dir(out_dir, is_checkpoint_dir, "an acf-deploy checkpoint")
    flow, metrics = train(config, out_dir, seed=seed, resume=resume, on_step=on_step, on_epoch=on_epoch)
    metrics.update(final_report(flow, config, out_dir, seed))
    save_checkpoint(flow, config, out_dir, metrics)
    return metrics


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` holds a checkpoint of ours, so that training may write over its files."""
    for name in (META, STATE_META):
        try:
            meta = json.loads((path / name).read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
            return True
    return False


def final_report(flow: Flow, config: dict[str, Any], out_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Held-out score (exact log-det), per-block L, gate, gain/bound and attention share, and a picture of samples."""
    baked = build_flow(config)
    baked.load_state_dict(flow.state_dict())
    baked.bake()
    train_data, test_data = training_data(config, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    heldout = evaluate_bpd(baked, test_data, config)
    data_x = to_model_space(test_data[:64], config, generator)
    z = torch.randn(64, baked.dim, generator=generator)
    with torch.no_grad():
        samples, _ = baked.sample(z, SAMPLE_ITERS)
    rows = block_report(baked, data_x, samples)
    metric = "heldout_bits_per_dim" if config["n_levels"] else "heldout_nll_nats"
    picture = out_dir / ("samples.png" if config["n_levels"] else "density.png")
    if config["n_levels"]:
        save_grid(samples.numpy(), picture)
    else:
        save_density_plot(*toy_density_grid(baked), samples=samples.numpy(), target=picture)
    return {metric: heldout, "blocks": rows, "picture": picture.name}


@torch.no_grad()
def toy_density_grid(flow: Flow, extent: float = 4.0, n: int = 200) -> tuple[np.ndarray, float]:
    """``log p`` of a 2D flow on an ``n x n`` grid over ``[-extent, extent]^2`` (exact log-det)."""
    axis = torch.linspace(-extent, extent, n)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    log_p = torch.cat([flow.log_prob(chunk) for chunk in grid.split(4096)])
    return log_p.reshape(n, n).numpy(), extent
