#!/usr/bin/env python3
"""Regenerate MODELS.md from the metadata of the models shipped in acf_deploy/models/."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "acf_deploy" / "models"


def section(directory: Path) -> str:
    meta = json.loads((directory / "model.json").read_text())
    metrics, config = meta["metrics"], meta["config"]
    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    hp = config["train"]
    key = "heldout_bits_per_dim" if "heldout_bits_per_dim" in metrics else "heldout_nll_nats"
    unit = "bits/dim" if key == "heldout_bits_per_dim" else "nats (mean negative log-likelihood)"
    lines = [
        f"## `{meta['preset']}`",
        "",
        f"- Reproduce: `acf-deploy train {meta['preset']} --out runs/{meta['preset']} --seed {metrics['seed']}`"
        f" (epochs {hp['epochs']}, batch {hp['batch_size']}, lr {hp['lr']}, EMA {hp['ema_decay']})",
        f"- Held-out {unit}, exact log-det, EMA weights after bake: **{metrics[key]:.4f}**",
        f"- Training time on the 2-core machine: {metrics['train_seconds']:.0f} s; files: {size / 1e6:.2f} MB",
        "",
        "| block | kind | guarantee | L certified | L measured | gate b | gain/bound of F/B | attention share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in metrics["blocks"]:
        cert = row.get("lipschitz_certified")
        lines.append(
            f"| {row['block']} | {row['kind']} | {row['guarantee']} | {'-' if cert is None else f'{cert:.4f}'} "
            f"| {row['lipschitz_measured']:.4f} | {_fmt(row.get('gate'))} | {_fmt(row.get('attention_gain'))} "
            f"| {_fmt(row.get('attention_share'))} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def main() -> None:
    header = (
        "# Shipped models\n\n"
        "Trained checkpoints inside the package (`acf_deploy/models/<preset>/`: `model.safetensors` + `model.json`).\n"
        "Regenerate this page with `python scripts/models_md.py`. L certified is the exact operator-norm bound of the\n"
        "baked block; L measured is the largest constant found by power iteration and an adversarial search on\n"
        "held-out data and prior samples (a lower bound). For attention inside g, gate b is the weight of `F/B` in the\n"
        "gate `a h + b F/B`, the gain/bound ratio is F/B's measured constant (its certified bound is 1) on the maps h that\n"
        "reach it, and the attention share is `||b F/B|| / ||h||`, averaged over held-out data.\n\n"
        "Training times are wall-clock on the 2-core CPU machine with 2 torch threads.\n\n"
    )
    body = "\n".join(section(d) for d in sorted(MODELS.iterdir()) if (d / "model.json").is_file())
    (ROOT / "MODELS.md").write_text(header + body)


if __name__ == "__main__":
    main()
