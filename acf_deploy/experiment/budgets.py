"""The experiment's fixed choices: the presets and comparisons, the seeds of every random stream, the
claims, and the budgets (everything a run may depend on, identical for every preset)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..data import DIGITS_LEVELS

PRESETS = (
    "digits-resflow",
    "digits-acf-l2",
    "digits-acf-dp",
    "digits-glow",
    "digits-glow-acf",
    "digits-acf-l2-abs-gate",
    "digits-acf-l2-open-gate",
)
HOST = {
    "digits-resflow": "digits-resflow",
    "digits-acf-l2": "digits-resflow",
    "digits-acf-dp": "digits-resflow",
    "digits-glow": "digits-glow",
    "digits-glow-acf": "digits-glow",
    "digits-acf-l2-abs-gate": "digits-resflow",
    "digits-acf-l2-open-gate": "digits-resflow",
}
#: (variant, host): every claim is judged on these paired comparisons.
COMPARISONS = (
    ("digits-acf-l2", "digits-resflow"),
    ("digits-acf-dp", "digits-resflow"),
    ("digits-glow-acf", "digits-glow"),
)
#: (variant, ablation): reported beside the claims, never counted in a verdict. The convex gate, which
#: the data move, against the first gate ``(h + gamma F/B) / (1 + |gamma|)`` from gamma = 0 and against
#: a gate held at ``(h + F/B) / 2``.
ABLATIONS = (("digits-acf-l2", "digits-acf-l2-abs-gate"), ("digits-acf-l2", "digits-acf-l2-open-gate"))
SIGMAS = (0.01, 0.05, 0.1)
THRESHOLD_MARGIN = 0.05  # bits/dim above the host's final value
CONFIDENCE = 0.9  # a sample is "confidently classified" when the classifier's top probability is at least this
LEVEL_ALPHA = 0.05  # two-sided: 95% intervals
EVAL_SEED = 0  # dequantisation noise of every held-out evaluation (the same for every run: paired)
NOISE_SEED = 1_000  # AWGN stream, + sigma index (the same for every run)
SAMPLE_SEED = 2_000  # latent z of the quality samples (the same for every run)
UNIFORM_BPD = math.log2(DIGITS_LEVELS)
VERDICTS = ("supported", "not supported", "inconclusive")
CLAIMS = (
    ("bits/dim", "Self-attention improves held-out bits/dim over the host flow."),
    ("convergence", "Flows with self-attention converge significantly faster in training."),
    ("samples", "Samples are more realistic."),
    (
        "robustness",
        "Flows with self-attention are more robust to additive white Gaussian noise, the dot-product variant most.",
    ),
)


@dataclass(frozen=True)
class Budget:
    """Everything a run may depend on; identical for every preset (only the architecture family differs)."""

    name: str
    seeds: int
    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int
    ema_decay: float
    grad_clip: float
    hidden: int
    scales: tuple[int, ...]
    heads: int
    coeff: float
    train_size: int | None  # training images (None: the whole 1,438-image training split)
    curve_size: int  # first test images scored after every epoch (the convergence curves)
    test_size: int | None  # test images for the final scores (None: all 359)
    n_samples: int  # samples per run for the classifier
    sample_iters: int  # fixed-point iterations per residual block when sampling
    lip_inputs: int  # data and prior inputs per block for the measured Lipschitz constant
    lip_iters: int  # power iterations and adversarial steps per block
    notes: tuple[str, ...] = field(default_factory=tuple)

    def overrides(self) -> dict[str, Any]:
        """Config overrides applied to every preset: the shared budget."""
        train_hp = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "ema_decay": self.ema_decay,
            "grad_clip": self.grad_clip,
        }
        if self.train_size is not None:
            train_hp["train_size"] = self.train_size
        return {
            "hidden": self.hidden,
            "scales": list(self.scales),
            "heads": self.heads,
            "coeff": self.coeff,
            "train": train_hp,
        }


BUDGETS: dict[str, Budget] = {
    # Sized from single-thread CPU seconds measured through this code path (run_one, 2 epochs, width 32,
    # [4, 4] blocks) on a loaded 2-core machine. Per epoch, training + the 128-image curve evaluation:
    # resflow 3.4 + 1.8, acf-l2 8.6 + 4.3, acf-dp 7.7 + 4.9, glow 1.0 + 0.0, glow-acf 2.8 + 1.1, so
    # 36 s per epoch of all five presets, 179 s for five seeds. Final scoring per run (bake, clean and
    # three AWGN scores of 359 images, 256 samples, per-block Lipschitz measurements): 31, 70, 77, 0.2,
    # 21 s, 995 s for all 25 runs. 20 epochs: 20 * 179 + 995 = 4,575 s = 76 min on one thread, inside
    # the 90-minute budget with a margin (less with --threads 2 on an idle machine). Measured since, with
    # windowed attention and the two gate ablations: 35 runs in 30 min with --jobs 2 on an idle 2-core machine.
    "full": Budget(
        name="full",
        seeds=5,
        epochs=20,
        batch_size=64,
        lr=2e-3,
        warmup_steps=100,
        ema_decay=0.99,
        grad_clip=1.0,
        hidden=32,
        scales=(4, 4),
        heads=2,
        coeff=0.9,
        train_size=None,
        curve_size=128,
        test_size=None,
        n_samples=256,
        sample_iters=100,
        lip_inputs=32,
        lip_iters=30,
        notes=("20 epochs instead of the presets' 30, so that 25 runs fit in 90 minutes on 2 cores",),
    ),
    # CI smoke test: the same code path on a toy scale; its numbers mean nothing.
    "small": Budget(
        name="small",
        seeds=2,
        epochs=2,
        batch_size=32,
        lr=2e-3,
        warmup_steps=2,
        ema_decay=0.5,
        grad_clip=1.0,
        hidden=8,
        scales=(1, 1),
        heads=2,
        coeff=0.9,
        train_size=64,
        curve_size=16,
        test_size=32,
        n_samples=32,
        sample_iters=20,
        lip_inputs=2,
        lip_iters=3,
        notes=("smoke test: tiny models, 64 training images, 2 epochs; the verdicts below mean nothing",),
    ),
}
