r"""``experiment paper``: do the ACF paper's four claims hold on digits, at a scale this machine can run?

The claims (from the paper's abstract; its numbers are not used): Lipschitz-constrained self-attention
in contractive flows (1) improves bits/dim over the host flow, (2) converges faster in training,
(3) gives more realistic samples and (4) is more robust to additive white Gaussian noise, the
dot-product variant most of all.

Five presets are trained with one budget (epochs, batch size, optimiser, learning-rate schedule,
width, depth, training images) over the same seeds: ``digits-resflow`` (host) against
``digits-acf-l2`` and ``digits-acf-dp``; ``digits-glow`` (host) against ``digits-glow-acf``. The
protocol (metrics, thresholds, the inconclusive rule, how each claim is judged) is rendered from this
module's constants and the budget, written to ``PROTOCOL.md`` before the first run and copied verbatim
to the top of ``REPORT.md``; resuming in a directory whose protocol differs is refused.

Every run writes ``runs/<preset>/seed<k>/result.json`` when it is complete and is skipped when that file
exists, so a stopped experiment continues where it stopped (a half-trained run resumes from its last
epoch checkpoint).

Statistics: for each comparison the per-seed paired difference ``d_s = variant_s - host_s`` gets a
two-sided 95% Student-t interval, ``mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n)``; an interval that
contains 0 makes the comparison inconclusive.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .data import DIGITS_LEVELS, digits_split, digits_split_labelled
from .errors import BadInput
from .fileio import atomic_path, check_output_dir, write_json
from .flows.flow import Flow
from .flows.presets import build_flow, preset_config
from .report import block_report
from .train import STATE_META, evaluate_bpd, to_model_space, train

__all__ = [
    "BUDGETS",
    "COMPARISONS",
    "PRESETS",
    "SIGMAS",
    "Budget",
    "noisy_bpd",
    "paired_interval",
    "protocol_text",
    "run_experiment",
    "t_interval",
]

PRESETS = ("digits-resflow", "digits-acf-l2", "digits-acf-dp", "digits-glow", "digits-glow-acf")
HOST = {
    "digits-resflow": "digits-resflow",
    "digits-acf-l2": "digits-resflow",
    "digits-acf-dp": "digits-resflow",
    "digits-glow": "digits-glow",
    "digits-glow-acf": "digits-glow",
}
#: (variant, host): every claim is judged on these paired comparisons.
COMPARISONS = (
    ("digits-acf-l2", "digits-resflow"),
    ("digits-acf-dp", "digits-resflow"),
    ("digits-glow-acf", "digits-glow"),
)
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
    # the 90-minute budget with a margin (less with --threads 2 on an idle machine).
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


# ---------------------------------------------------------------------------------------------- statistics
def t_interval(values: list[float] | np.ndarray, alpha: float = LEVEL_ALPHA) -> dict[str, Any]:
    """Mean and two-sided ``1 - alpha`` Student-t interval over seeds (``lo``/``hi`` None when n < 2)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    if n < 2 or not np.all(np.isfinite(x)):
        return {"n": n, "mean": mean, "lo": None, "hi": None}
    half = float(stats.t.ppf(1 - alpha / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half}


def paired_interval(variant: dict[int, float], host: dict[int, float]) -> dict[str, Any]:
    """t interval of ``variant - host`` over the seeds both have."""
    seeds = sorted(set(variant) & set(host))
    return t_interval([variant[s] - host[s] for s in seeds])


def outcome(ci: dict[str, Any], better: str) -> str:
    """``better`` / ``worse`` for the variant when the interval excludes 0, else ``inconclusive``."""
    lo, hi = ci["lo"], ci["hi"]
    if lo is None or hi is None:
        return "inconclusive"
    if hi < 0:
        return "better" if better == "lower" else "worse"
    if lo > 0:
        return "worse" if better == "lower" else "better"
    return "inconclusive"


def aggregate(outcomes: list[str]) -> str:
    """A claim is supported when every comparison supports it, not supported when one contradicts it."""
    if outcomes and all(o == "better" for o in outcomes):
        return "supported"
    if any(o == "worse" for o in outcomes):
        return "not supported"
    return "inconclusive"


# ---------------------------------------------------------------------------------------------- protocol
def protocol_text(budget: Budget, seeds: list[int]) -> str:
    """The pre-registered protocol: a pure function of the budget and the seeds (no result enters it)."""
    b = budget
    train_images = "all 1,438" if b.train_size is None else f"the first {b.train_size}"
    test_images = "all 359" if b.test_size is None else f"the first {b.test_size}"
    sigmas = ", ".join(f"{s:g}" for s in SIGMAS)
    comparisons = "; ".join(f"`{v}` vs `{h}`" for v, h in COMPARISONS)
    lines = [
        f"Budget `{b.name}`, identical for all five presets (`{'`, `'.join(PRESETS)}`) and the same seeds "
        f"{seeds} for each; a run is one (preset, seed).",
        "",
        "| setting | value |",
        "|---|---|",
        f"| epochs | {b.epochs} |",
        f"| batch size | {b.batch_size} |",
        f"| optimiser | Adam, lr {b.lr:g}, linear warm-up over {b.warmup_steps} steps then constant; gradient-norm clip {b.grad_clip:g}; EMA of weights, decay {b.ema_decay:g} (EMA weights are what is scored) |",
        "| log-det in training | residual blocks (i-ResBlocks, ACF layers): unbiased Russian-roulette estimator with the Neumann gradient; Glow's ActNorm, 1x1 conv and coupling: analytic |",
        f"| width | {b.hidden} (ResFlow host: hidden channels of each i-ResBlock; Glow host: hidden channels of each coupling network) |",
        f"| depth | {list(b.scales)} (blocks per scale; a Glow step is ActNorm, 1x1 conv, affine coupling [, ACF layer]) |",
        f"| attention | {b.heads} heads; Lipschitz coefficient {b.coeff:g} per layer |",
        f"| training images | {train_images} of the fixed digits training split |",
        f"| seeds | {seeds} (a seed fixes initialisation, data order, dequantisation and roulette noise) |",
        *(f"| note | {note} |" for note in b.notes),
        "",
        f"Comparisons (variant vs host, paired by seed): {comparisons}.",
        "",
        "**Metrics** (all held-out scores use the exact log-det, the uniform dequantisation noise of seed "
        f"{EVAL_SEED}, identical for every run, and DESIGN 1.4's bits/dim of the 17-level data; a uniform model scores "
        f"{UNIFORM_BPD:.3f}):",
        "",
        f"1. *Held-out bits/dim*: {test_images} test images, the final EMA weights after `bake()` (exact spectral "
        "norms; the weights a deployment ships). Mean and 95% t interval over seeds.",
        f"2. *Convergence*: after every epoch the EMA weights (not baked) are scored on the first {b.curve_size} test "
        "images (a fixed subset, to keep the per-epoch cost bounded); plotted against epochs and against cumulative "
        "training seconds (evaluation time excluded). Threshold per host: the mean over seeds of the host's "
        f"final-epoch curve value plus {THRESHOLD_MARGIN:g} bits/dim; the same threshold for the host and its "
        "variants. *Epochs to reach*: first epoch whose curve value is at or below it; *seconds to reach*: the "
        f"cumulative training seconds at that epoch. A run that never reaches it is censored at {b.epochs + 1} epochs "
        "and at its total training seconds plus one mean epoch.",
        f"3. *AWGN robustness*: the held-out score of metric 1 after adding sigma * N(0, I) to the dequantised x in "
        f"[0, 1] and clipping to [0, 1], for sigma in {sigmas} (noise stream fixed, identical for every run); "
        "relative degradation = (bits/dim at sigma - clean bits/dim) / clean bits/dim.",
        "4. *Sample quality*: a multinomial logistic regression (scikit-learn, C = 1) fitted on the whole digits "
        f"training split (levels / 16) classifies {b.n_samples} samples per run drawn at temperature 1 from a fixed "
        f"latent batch ({b.sample_iters} fixed-point iterations per residual block, baked weights), each quantised "
        f"to the 17 levels (floor(17 x) clipped to 0..16, then / 16). *Confident fraction*: the fraction of samples whose "
        f"top class probability is at least {CONFIDENCE:g}. *Class entropy*: entropy in bits of the histogram of "
        "predicted classes over the samples (log2 10 = 3.32 is uniform over digits; low means few digit classes). "
        "Samples have no labels, so no accuracy is computed; the classifier's accuracy and confident fraction on the "
        "real test images are given as the reference. Sample grids are shown side by side.",
        "5. *Cost and internals*: parameter count, training seconds per epoch (wall clock on this machine; "
        "depends on its load), per residual block after training: gamma, attention share "
        "`||gamma F/B|| / ||h||` on test data, certified Lipschitz bound and the measured constant (power iteration "
        f"and adversarial search on {b.lip_inputs} test inputs and {b.lip_inputs} prior samples per block).",
        "",
        "**Inconclusive rule**: for each comparison and metric the paired per-seed difference variant - host gets a "
        "two-sided 95% Student-t interval over seeds; if it contains 0 the comparison is *inconclusive*, otherwise "
        "the variant is *better* or *worse* by the sign.",
        "",
        "**Verdicts**: a claim is *supported* when every comparison is better, *not supported* when at least one "
        "comparison is worse, *inconclusive* otherwise.",
        "",
        "- Claim 1 (bits/dim): metric 1, lower is better.",
        "- Claim 2 (convergence): epochs to reach the threshold, lower is better; seconds to reach are reported "
        "beside it and do not change the verdict.",
        "- Claim 3 (samples): confident fraction, higher is better; a comparison that is better on it but whose "
        "class-entropy interval lies wholly below 0 (confidence bought with fewer digit classes) counts as inconclusive.",
        f"- Claim 4 (AWGN): relative degradation, lower is better; a comparison is better when better at every sigma "
        f'({sigmas}), worse when worse at any. "DP most" adds one comparison, `digits-acf-dp` vs `digits-acf-l2` '
        "(paired by seed, the same rule); the claim is judged on all four comparisons together.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- scoring
def noisy_bpd(
    flow: Flow, data: np.ndarray, config: dict[str, Any], sigma: float, noise_seed: int, batch_size: int = 128
) -> float:
    """Held-out bits/dim after AWGN ``sigma`` in data space (clipped to [0, 1]); ``sigma = 0`` is :func:`evaluate_bpd`."""
    noise = torch.Generator().manual_seed(noise_seed)

    def awgn(x: torch.Tensor) -> torch.Tensor:
        return (x + sigma * torch.randn(x.shape, generator=noise, dtype=x.dtype)).clamp(0.0, 1.0)

    return evaluate_bpd(flow, data, config, batch_size, seed=EVAL_SEED, perturb=awgn if sigma > 0 else None)


def fit_classifier() -> tuple[Any, dict[str, Any]]:
    """Multinomial logistic regression on the digits training split (levels / 16); its scores on the test split."""
    from sklearn.linear_model import LogisticRegression

    train, test, y_train, y_test = digits_split_labelled()
    clf = LogisticRegression(C=1.0, max_iter=5000)
    clf.fit(train.reshape(len(train), -1) / 16.0, y_train)
    x_test = test.reshape(len(test), -1) / 16.0
    reference = classify(clf, x_test)
    reference["accuracy"] = float((clf.predict(x_test) == y_test).mean())
    return clf, reference


def classify(clf, features: np.ndarray) -> dict[str, Any]:
    """Confident fraction, mean top probability and predicted-class entropy (bits) of flattened images."""
    proba = clf.predict_proba(features)
    top = proba.max(1)
    counts = np.bincount(proba.argmax(1), minlength=10).astype(np.float64)
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    return {
        "confident_fraction": float((top >= CONFIDENCE).mean()),
        "mean_top_probability": float(top.mean()),
        "class_entropy_bits": entropy,
        "class_counts": counts.astype(int).tolist(),
    }


def quantise(samples: np.ndarray) -> np.ndarray:
    """Data-space samples to the 17 levels (floor(17 x) clipped), as features ``levels / 16``; NaN -> 0."""
    x = np.nan_to_num(np.asarray(samples, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    levels = np.clip(np.floor(x * DIGITS_LEVELS), 0, DIGITS_LEVELS - 1)
    return levels / (DIGITS_LEVELS - 1)


def _param_count(flow: Flow) -> int:
    return int(sum(p.numel() for p in flow.parameters()))


# ---------------------------------------------------------------------------------------------- one run
def _git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def run_one(
    preset: str,
    seed: int,
    budget: Budget,
    run_dir: Path,
    classifier,
    test_data: np.ndarray,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume) one (preset, seed), score it, write ``result.json``; skipped when that exists."""
    config = preset_config(preset, **budget.overrides())
    result_path = run_dir / "result.json"
    if result_path.is_file():
        result = _read_json(result_path)
        if result.get("config") != config:
            raise BadInput(f"{result_path} was produced with a different config; use a new --out")
        result["skipped"] = True
        return result

    curve_data = test_data[: budget.curve_size]
    curve_path = run_dir / "curve.json"
    curve: list[dict[str, float]] = []
    resume = (run_dir / STATE_META).is_file()
    if resume:
        done = _read_json(run_dir / STATE_META)["epoch"] + 1
        curve = [c for c in (_read_json(curve_path)["curve"] if curve_path.is_file() else []) if c["epoch"] <= done]
        if len(curve) == done - 1:  # stopped between the checkpoint and its curve point: score that checkpoint
            flow, _ = load_checkpoint(run_dir)
            seconds = _read_json(run_dir / STATE_META)["seconds"]
            curve.append(
                {"epoch": done, "seconds": seconds, "bpd": evaluate_bpd(flow, curve_data, config, seed=EVAL_SEED)}
            )
        elif len(curve) != done:
            resume, curve = False, []  # the curve cannot be rebuilt: train this run again from scratch
    run_dir.mkdir(parents=True, exist_ok=True)

    def epoch_done(epoch: int, record: dict[str, float]) -> None:
        flow, _ = load_checkpoint(run_dir)  # the EMA weights train() just checkpointed
        started = time.perf_counter()
        bpd = evaluate_bpd(flow, curve_data, config, seed=EVAL_SEED)
        curve.append(
            {
                "epoch": epoch + 1,
                "seconds": record["seconds"],
                "bpd": bpd,
                "eval_seconds": time.perf_counter() - started,
            }
        )
        write_json(curve_path, {"curve": curve})
        if on_epoch:
            on_epoch(epoch + 1, bpd)

    flow, metrics = train(config, run_dir, seed=seed, resume=resume, on_epoch=epoch_done)
    started = time.perf_counter()
    baked = build_flow(config)
    baked.load_state_dict(flow.state_dict())
    baked.bake()
    final_data = test_data if budget.test_size is None else test_data[: budget.test_size]
    clean = noisy_bpd(baked, final_data, config, 0.0, NOISE_SEED)
    awgn = {f"{s:g}": noisy_bpd(baked, final_data, config, s, NOISE_SEED + i + 1) for i, s in enumerate(SIGMAS)}

    z = torch.randn(budget.n_samples, baked.dim, generator=torch.Generator().manual_seed(SAMPLE_SEED))
    with torch.no_grad():
        samples, residual = baked.sample(z, budget.sample_iters)
    samples_np = samples.numpy()
    quality = classify(classifier, quantise(samples_np).reshape(len(samples_np), -1))
    quality["non_finite"] = int((~np.isfinite(samples_np.reshape(len(samples_np), -1)).all(1)).sum())
    quality["max_fixed_point_residual"] = float(residual.max()) if residual.numel() else 0.0
    np.save(run_dir / "samples.npy", samples_np[:64].astype(np.float32))

    n_lip = budget.lip_inputs
    gen = torch.Generator().manual_seed(EVAL_SEED)
    try:
        blocks = block_report(
            baked,
            to_model_space(final_data[:n_lip], config, gen),
            samples[:n_lip],
            n_iter=budget.lip_iters,
            steps=budget.lip_iters,
        )
    except FloatingPointError as exc:  # a diverged run is reported, not allowed to stop the experiment
        blocks = [{"error": str(exc)}]
    result = {
        "preset": preset,
        "seed": seed,
        "config": config,
        "git": _git_commit(),
        "parameters": _param_count(flow),
        "epochs": len(metrics["history"]),
        "train_seconds": metrics["train_seconds"],
        "seconds_per_epoch": metrics["train_seconds"] / max(1, len(metrics["history"])),
        "curve": curve,
        "heldout_bpd": clean,
        "heldout_images": len(final_data),
        "awgn_bpd": awgn,
        "awgn_relative_degradation": {k: (v - clean) / clean for k, v in awgn.items()},
        "samples": quality,
        "blocks": blocks,
        "scoring_seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }
    write_json(result_path, result)
    return result


# ---------------------------------------------------------------------------------------------- analysis
def _by_seed(results: list[dict], preset: str, key: Callable[[dict], float]) -> dict[int, float]:
    return {r["seed"]: float(key(r)) for r in results if r["preset"] == preset}


def _to_reach(result: dict, threshold: float, epochs: int) -> tuple[float, float, bool]:
    for point in result["curve"]:
        if point["bpd"] <= threshold:
            return float(point["epoch"]), float(point["seconds"]), True
    return float(epochs + 1), result["train_seconds"] + result["seconds_per_epoch"], False


def analyse(results: list[dict], budget: Budget) -> dict[str, Any]:
    """Per-preset summaries, paired comparisons and the four verdicts."""
    present = [p for p in PRESETS if any(r["preset"] == p for r in results)]
    summary: dict[str, dict[str, Any]] = {}
    thresholds: dict[str, float] = {}
    for host in sorted(set(HOST.values())):
        finals = [r["curve"][-1]["bpd"] for r in results if r["preset"] == host and r["curve"]]
        if finals:
            thresholds[host] = float(np.mean(finals)) + THRESHOLD_MARGIN
    for preset in present:
        runs = [r for r in results if r["preset"] == preset]
        threshold = thresholds.get(HOST[preset])
        reach = [_to_reach(r, threshold, budget.epochs) for r in runs] if threshold is not None else []
        summary[preset] = {
            "runs": len(runs),
            "heldout_bpd": t_interval([r["heldout_bpd"] for r in runs]),
            "parameters": runs[0]["parameters"],
            "seconds_per_epoch": t_interval([r["seconds_per_epoch"] for r in runs]),
            "epochs_to_reach": t_interval([e for e, _, _ in reach]),
            "seconds_to_reach": t_interval([s for _, s, _ in reach]),
            "reached": sum(ok for _, _, ok in reach),
            "awgn_bpd": {k: t_interval([r["awgn_bpd"][k] for r in runs]) for k in runs[0]["awgn_bpd"]},
            "awgn_relative": {
                k: t_interval([r["awgn_relative_degradation"][k] for r in runs]) for k in runs[0]["awgn_bpd"]
            },
            "confident_fraction": t_interval([r["samples"]["confident_fraction"] for r in runs]),
            "class_entropy_bits": t_interval([r["samples"]["class_entropy_bits"] for r in runs]),
            "non_finite_samples": sum(r["samples"]["non_finite"] for r in runs),
            "max_fixed_point_residual": max(r["samples"]["max_fixed_point_residual"] for r in runs),
        }

    comparisons: list[dict[str, Any]] = []
    pairs = [(v, h) for v, h in COMPARISONS if v in summary and h in summary]
    for variant, host in pairs + (
        [("digits-acf-dp", "digits-acf-l2")] if {"digits-acf-dp", "digits-acf-l2"} <= set(summary) else []
    ):
        thr = thresholds.get(HOST[host])

        def diff(key: Callable[[dict], float], variant=variant, host=host) -> dict[str, Any]:
            return paired_interval(_by_seed(results, variant, key), _by_seed(results, host, key))

        row: dict[str, Any] = {
            "variant": variant,
            "host": host,
            "heldout_bpd": diff(lambda r: r["heldout_bpd"]),
            "epochs_to_reach": diff(lambda r, thr=thr: _to_reach(r, thr, budget.epochs)[0]),
            "seconds_to_reach": diff(lambda r, thr=thr: _to_reach(r, thr, budget.epochs)[1]),
            "confident_fraction": diff(lambda r: r["samples"]["confident_fraction"]),
            "class_entropy_bits": diff(lambda r: r["samples"]["class_entropy_bits"]),
            "awgn_relative": {f"{s:g}": diff(lambda r, k=f"{s:g}": r["awgn_relative_degradation"][k]) for s in SIGMAS},
        }
        row["outcome"] = {
            "heldout_bpd": outcome(row["heldout_bpd"], "lower"),
            "epochs_to_reach": outcome(row["epochs_to_reach"], "lower"),
            "seconds_to_reach": outcome(row["seconds_to_reach"], "lower"),
            "confident_fraction": outcome(row["confident_fraction"], "higher"),
            "class_entropy_bits": outcome(row["class_entropy_bits"], "higher"),
            "awgn_relative": {k: outcome(v, "lower") for k, v in row["awgn_relative"].items()},
        }
        per_sigma = list(row["outcome"]["awgn_relative"].values())
        # better at every sigma, worse at any: the claim rule of aggregate(), in comparison words
        row["outcome"]["awgn"] = {"supported": "better", "not supported": "worse"}.get(
            aggregate(per_sigma), "inconclusive"
        )
        samples = row["outcome"]["confident_fraction"]
        if samples == "better" and row["outcome"]["class_entropy_bits"] == "worse":
            samples = "inconclusive"
        row["outcome"]["samples"] = samples
        comparisons.append(row)

    main = [c for c in comparisons if (c["variant"], c["host"]) in COMPARISONS]
    dp_vs_l2 = [c for c in comparisons if (c["variant"], c["host"]) == ("digits-acf-dp", "digits-acf-l2")]
    verdicts = {
        "bits/dim": aggregate([c["outcome"]["heldout_bpd"] for c in main]),
        "convergence": aggregate([c["outcome"]["epochs_to_reach"] for c in main]),
        "samples": aggregate([c["outcome"]["samples"] for c in main]),
        "robustness": aggregate([c["outcome"]["awgn"] for c in main + dp_vs_l2]) if dp_vs_l2 else "inconclusive",
    }
    return {"summary": summary, "thresholds": thresholds, "comparisons": comparisons, "verdicts": verdicts}


# ---------------------------------------------------------------------------------------------- figures
def _plot_curves(results: list[dict], analysis: dict, target: Path, x_key: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hosts = [h for h in ("digits-resflow", "digits-glow") if any(HOST[r["preset"]] == h for r in results)]
    fig, axes = plt.subplots(1, max(1, len(hosts)), figsize=(6 * max(1, len(hosts)), 4), squeeze=False)
    for ax, host in zip(axes[0], hosts, strict=False):
        for preset in [p for p in PRESETS if HOST[p] == host]:
            runs = [r for r in results if r["preset"] == preset and r["curve"]]
            if not runs:
                continue
            n = min(len(r["curve"]) for r in runs)
            y = np.array([[p["bpd"] for p in r["curve"][:n]] for r in runs])
            x = np.array(
                [[p["epoch"] if x_key == "epoch" else p["seconds"] for p in r["curve"][:n]] for r in runs]
            ).mean(0)
            line = ax.plot(x, y.mean(0), marker="o", ms=3, label=f"{preset} (n={len(runs)})")[0]
            ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.15)
        if host in analysis["thresholds"]:
            ax.axhline(analysis["thresholds"][host], color="grey", ls="--", lw=1, label="threshold")
        ax.set_xlabel("epoch" if x_key == "epoch" else "cumulative training seconds")
        ax.set_ylabel("held-out bits/dim (curve subset)")
        ax.set_title(f"host: {host}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("mean over seeds; band: min to max over seeds")
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return target


def _plot_awgn(analysis: dict, target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for preset, s in analysis["summary"].items():
        ks = list(s["awgn_relative"])
        means = [s["awgn_relative"][k]["mean"] for k in ks]
        lo = [s["awgn_relative"][k]["lo"] for k in ks]
        hi = [s["awgn_relative"][k]["hi"] for k in ks]
        yerr = None
        if all(v is not None for v in lo + hi):
            yerr = [np.subtract(means, lo), np.subtract(hi, means)]
        ax.errorbar([float(k) for k in ks], means, yerr=yerr, marker="o", capsize=3, label=preset)
    ax.set_xscale("log")
    ax.set_xlabel("AWGN sigma (data in [0, 1])")
    ax.set_ylabel("relative bits/dim degradation")
    ax.set_title("mean over seeds, 95% t interval")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return target


def _plot_samples(results: list[dict], out_dir: Path, test_data: np.ndarray, target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import tile_images

    panels = [("real test digits", test_data[:64] / (DIGITS_LEVELS - 1))]
    for preset in PRESETS:
        runs = sorted((r for r in results if r["preset"] == preset), key=lambda r: r["seed"])
        if runs:
            path = out_dir / "runs" / preset / f"seed{runs[0]['seed']}" / "samples.npy"
            if path.is_file():
                samples = quantise(np.load(path)).reshape(-1, 1, 8, 8)
                panels.append((f"{preset}\n(seed {runs[0]['seed']})", samples))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3))
    for ax, (title, images) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.imshow(tile_images(images, cols=8)[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return target


# ---------------------------------------------------------------------------------------------- report
def _ci(s: dict[str, Any], digits: int = 4, signed: bool = False) -> str:
    if s["mean"] is None or not np.isfinite(s["mean"]):
        return "-"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    if s["lo"] is None:
        return fmt.format(s["mean"]) + " (n=1)"
    return f"{fmt.format(s['mean'])} [{fmt.format(s['lo'])}, {fmt.format(s['hi'])}]"


def _why(analysis: dict[str, Any], claim: str) -> str:
    parts = []
    for c in analysis["comparisons"]:
        name = f"{c['variant'].removeprefix('digits-')} vs {c['host'].removeprefix('digits-')}"
        main = (c["variant"], c["host"]) in COMPARISONS
        if claim == "bits/dim" and main:
            parts.append(f"{name}: {_ci(c['heldout_bpd'], signed=True)} bits/dim ({c['outcome']['heldout_bpd']})")
        elif claim == "convergence" and main:
            parts.append(
                f"{name}: {_ci(c['epochs_to_reach'], 2, True)} epochs ({c['outcome']['epochs_to_reach']}); "
                f"{_ci(c['seconds_to_reach'], 1, True)} s ({c['outcome']['seconds_to_reach']})"
            )
        elif claim == "samples" and main:
            parts.append(
                f"{name}: confident fraction {_ci(c['confident_fraction'], 3, True)} ({c['outcome']['confident_fraction']}), "
                f"class entropy {_ci(c['class_entropy_bits'], 3, True)} bits"
            )
        elif claim == "robustness":
            per = ", ".join(f"sigma {k}: {_ci(v, 4, True)}" for k, v in c["awgn_relative"].items())
            parts.append(f"{name}: {per} ({c['outcome']['awgn']})")
    return "; ".join(parts) if parts else "no comparison ran"


def render_report(
    analysis: dict[str, Any],
    results: list[dict],
    budget: Budget,
    protocol: str,
    header: dict[str, Any],
    reference: dict[str, Any],
) -> str:
    """REPORT.md: provenance, the protocol verbatim, verdicts, then every table and figure."""
    summary = analysis["summary"]
    commits = sorted({(r["git"]["commit"], r["git"]["dirty"]) for r in results})
    commit_list = ", ".join(f"`{c[:12]}`{' (with uncommitted changes)' if d else ''}" for c, d in commits) or "-"
    lines = [
        f"# Do the ACF paper's claims hold on digits? (budget `{budget.name}`)",
        "",
        "Every number in this file was produced by the command below; nothing was edited by hand.",
        "",
        f"- Command: `{header['command']}`",
        f"- Commit at report time: `{header['git']['commit']}`{' (with uncommitted changes)' if header['git']['dirty'] else ''}; runs trained at: {commit_list}",
        f"- Protocol written to `PROTOCOL.md` at {header['protocol_written']} (before the first run; a resumed experiment must match it)",
        f"- Report written at {header['finished']}; torch {torch.__version__}, {header['threads']} torch thread(s), {header['cpus']} CPU(s), {platform.machine()}",
        f"- Runs: {len(results)} of {len(PRESETS) * len(header['seeds'])} ({len(header['skipped'])} reused from an earlier invocation)",
        "",
        "## 1. Pre-registered protocol",
        "",
        protocol.rstrip(),
        "",
        "## 2. Claims and verdicts",
        "",
        "Differences are variant - host, mean [95% t interval] over paired seeds.",
        "",
        "| # | claim (from the paper's abstract) | verdict | why |",
        "|---|---|---|---|",
    ]
    for i, (key, text) in enumerate(CLAIMS, 1):
        lines.append(f"| {i} | {text} | **{analysis['verdicts'][key]}** | {_why(analysis, key)} |")
    lines += [
        "",
        "## 3. Results",
        "",
        "### 3.1 Held-out bits/dim, convergence and cost",
        "",
        f"Uniform model: {UNIFORM_BPD:.3f} bits/dim. Thresholds for *to reach*: "
        + ", ".join(f"`{h}` {t:.4f}" for h, t in analysis["thresholds"].items())
        + ".",
        "",
        "| preset | runs | held-out bits/dim | epochs to reach | seconds to reach | reached | parameters | s / epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset, s in summary.items():
        lines.append(
            f"| `{preset}` | {s['runs']} | {_ci(s['heldout_bpd'])} | {_ci(s['epochs_to_reach'], 2)} | "
            f"{_ci(s['seconds_to_reach'], 1)} | {s['reached']}/{s['runs']} | {s['parameters']:,} | {_ci(s['seconds_per_epoch'], 2)} |"
        )
    lines += [
        "",
        "![bits/dim vs epoch](bpd_vs_epoch.png)",
        "",
        "![bits/dim vs wall-clock](bpd_vs_seconds.png)",
        "",
        "### 3.2 AWGN robustness",
        "",
        "| preset | clean | " + " | ".join(f"sigma {s:g}: bits/dim | relative" for s in SIGMAS) + " |",
        "|---|---|" + "---|---|" * len(SIGMAS),
    ]
    for preset, s in summary.items():
        cells = " | ".join(
            f"{_ci(s['awgn_bpd'][f'{g:g}'], 3)} | {_ci(s['awgn_relative'][f'{g:g}'], 4)}" for g in SIGMAS
        )
        lines.append(f"| `{preset}` | {_ci(s['heldout_bpd'], 3)} | {cells} |")
    lines += ["", "![AWGN](awgn.png)", "", "### 3.3 Sample quality", ""]
    lines += [
        f"Classifier on the real test images: accuracy {reference['accuracy']:.3f}, confident fraction "
        f"{reference['confident_fraction']:.3f}, class entropy {reference['class_entropy_bits']:.3f} bits.",
        "",
        "| preset | confident fraction | class entropy (bits) | mean top probability | non-finite samples | largest fixed-point residual |",
        "|---|---|---|---|---|---|",
    ]
    for preset, s in summary.items():
        top = t_interval([r["samples"]["mean_top_probability"] for r in results if r["preset"] == preset])
        lines.append(
            f"| `{preset}` | {_ci(s['confident_fraction'], 3)} | {_ci(s['class_entropy_bits'], 3)} | {_ci(top, 3)} | "
            f"{s['non_finite_samples']} | {s['max_fixed_point_residual']:.2e} |"
        )
    lines += ["", "![samples](samples.png)", "", "### 3.4 Paired comparisons", ""]
    lines += [
        "| variant vs host | bits/dim | epochs to reach | seconds to reach | confident fraction | class entropy | "
        + " | ".join(f"AWGN rel. sigma {s:g}" for s in SIGMAS)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(SIGMAS),
    ]
    for c in analysis["comparisons"]:
        o = c["outcome"]
        awgn = " | ".join(
            f"{_ci(c['awgn_relative'][f'{s:g}'], 4, True)} ({o['awgn_relative'][f'{s:g}']})" for s in SIGMAS
        )
        lines.append(
            f"| `{c['variant']}` vs `{c['host']}` | {_ci(c['heldout_bpd'], 4, True)} ({o['heldout_bpd']}) | "
            f"{_ci(c['epochs_to_reach'], 2, True)} ({o['epochs_to_reach']}) | {_ci(c['seconds_to_reach'], 1, True)} ({o['seconds_to_reach']}) | "
            f"{_ci(c['confident_fraction'], 3, True)} ({o['confident_fraction']}) | {_ci(c['class_entropy_bits'], 3, True)} ({o['class_entropy_bits']}) | {awgn} |"
        )
    lines += ["", "### 3.5 Per-block Lipschitz constants, gamma and attention share (mean over seeds)", ""]
    lines += [
        "| preset | block | kind | guarantee | certified L | L bound | measured L (max over seeds) | gamma | attention share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for preset in summary:
        failed = [r for r in results if r["preset"] == preset and any("error" in b for b in r["blocks"])]
        for r in failed:
            lines.append(
                f"| `{preset}` | seed {r['seed']} | measurement failed: {r['blocks'][0]['error']} | - | - | - | - | - | - |"
            )
        runs = [r for r in results if r["preset"] == preset and r not in failed]
        if not runs:
            continue
        if not runs[0]["blocks"]:
            lines.append(f"| `{preset}` | - | no residual blocks | - | - | - | - | - | - |")
            continue
        for i, row in enumerate(runs[0]["blocks"]):
            rows = [r["blocks"][i] for r in runs]

            def mean(key: str, rows=rows) -> str:
                values = [r.get(key) for r in rows]
                return "-" if any(v is None for v in values) else f"{np.mean(values):.4g}"

            measured = max(r["lipschitz_measured"] for r in rows)
            lines.append(
                f"| `{preset}` | {row['block']} | {row['kind']} | {row['guarantee']} | {mean('lipschitz_certified')} | "
                f"{mean('lipschitz_bound')} | {measured:.4g} | {mean('gamma')} | {mean('attention_share')} |"
            )
    lines += [
        "",
        "## 4. Per-run data",
        "",
        "`runs/<preset>/seed<k>/result.json` (every number above, per run), `curve.json`, `samples.npy`, the EMA "
        "checkpoint `model.safetensors` + `model.json`; `results.json` holds this report's aggregates.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- driver
def command_line(budget: str, out_dir: Path, seeds: int | None, threads: int) -> str:
    parts = ["acf-deploy experiment paper", f"--budget {budget}", f"--out {out_dir}"]
    if seeds is not None:
        parts.append(f"--seeds {seeds}")
    parts.append(f"--threads {threads}")
    return " ".join(parts)


def run_experiment(
    budget_name: str = "small",
    out_dir: str | Path = "experiments/paper",
    seeds: int | None = None,
    threads: int = 1,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every (preset, seed) of the budget sequentially, then write REPORT.md and figures."""
    if budget_name not in BUDGETS:
        raise BadInput(f"unknown budget {budget_name!r}; choose one of {', '.join(BUDGETS)}")
    if seeds is not None and seeds < 1:
        raise BadInput("--seeds must be at least 1")
    if threads < 1:
        raise BadInput("--threads must be at least 1")
    budget = BUDGETS[budget_name]
    seed_list = list(range(seeds if seeds is not None else budget.seeds))
    out_dir = check_output_dir(out_dir, lambda path: (path / "protocol.json").is_file(), "an experiment run")
    emit = on_event or (lambda kind, info: None)
    torch.set_num_threads(threads)

    configs = {p: preset_config(p, **budget.overrides()) for p in PRESETS}
    shared = ("hidden", "scales", "heads", "coeff", "train", "data", "n_levels", "logit_alpha")
    for key in shared:  # the fairness the protocol promises, checked rather than assumed
        if len({json.dumps(c[key], sort_keys=True) for c in configs.values()}) != 1:
            raise AssertionError(f"presets differ in {key!r}: the budget is not identical")

    protocol = protocol_text(budget, seed_list)
    protocol_path = out_dir / "PROTOCOL.md"
    if protocol_path.is_file():
        if protocol_path.read_text() != protocol:
            raise BadInput(
                f"{protocol_path} holds a different protocol (another budget or seed count); use a new --out"
            )
        written = (
            _read_json(out_dir / "protocol.json")["written"] if (out_dir / "protocol.json").is_file() else "unknown"
        )
    else:
        written = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        with atomic_path(protocol_path) as tmp:
            tmp.write_text(protocol)
        write_json(out_dir / "protocol.json", {"written": written, "budget": asdict(budget), "seeds": seed_list})

    _, test_data = digits_split()
    classifier, reference = fit_classifier()
    total = len(PRESETS) * len(seed_list)
    emit("start", {"total": total, "budget": budget_name, "seeds": seed_list, "epochs": budget.epochs})
    results, skipped = [], []
    index = 0
    for seed in seed_list:  # seeds outermost: a stopped experiment has whole seeds of every preset first
        for preset in PRESETS:
            index += 1
            run_dir = out_dir / "runs" / preset / f"seed{seed}"
            emit("run", {"index": index, "total": total, "preset": preset, "seed": seed, "epochs": budget.epochs})

            def on_epoch(epoch: int, bpd: float, preset=preset, seed=seed) -> None:
                emit("epoch", {"preset": preset, "seed": seed, "epoch": epoch, "epochs": budget.epochs, "bpd": bpd})

            result = run_one(preset, seed, budget, run_dir, classifier, test_data, on_epoch)
            if result.pop("skipped", False):
                skipped.append(f"{preset}/seed{seed}")
            results.append(result)
            emit(
                "run_done",
                {"index": index, "total": total, "preset": preset, "seed": seed, "heldout_bpd": result["heldout_bpd"]},
            )

    analysis = analyse(results, budget)
    _plot_curves(results, analysis, out_dir / "bpd_vs_epoch.png", "epoch")
    _plot_curves(results, analysis, out_dir / "bpd_vs_seconds.png", "seconds")
    _plot_awgn(analysis, out_dir / "awgn.png")
    _plot_samples(results, out_dir, test_data, out_dir / "samples.png")
    header = {
        "command": command_line(budget_name, out_dir, seeds, threads),
        "git": _git_commit(),
        "protocol_written": written,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "threads": threads,
        "cpus": os.cpu_count(),
        "seeds": seed_list,
        "skipped": skipped,
    }
    report = render_report(analysis, results, budget, protocol, header, reference)
    with atomic_path(out_dir / "REPORT.md") as tmp:
        tmp.write_text(report)
    payload = {"header": header, "budget": asdict(budget), "classifier_reference": reference, **analysis}
    write_json(out_dir / "results.json", json.loads(json.dumps(payload, default=float)))
    emit("done", {"report": str(out_dir / "REPORT.md"), "verdicts": analysis["verdicts"]})
    return {"report": out_dir / "REPORT.md", "verdicts": analysis["verdicts"], "analysis": analysis, "header": header}
