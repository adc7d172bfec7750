"""One run: train (or resume) a (preset, seed), score it held out, under AWGN and by its samples."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..data import DIGITS_LEVELS, digits_split_labelled, to_model_space
from ..errors import BadInput
from ..fileio import write_json
from ..flows.flow import Flow
from ..flows.presets import build_flow, preset_config
from ..report import block_report
from ..train import STATE_META, evaluate_bpd, train
from .budgets import CONFIDENCE, EVAL_SEED, NOISE_SEED, SAMPLE_SEED, SIGMAS, Budget


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
def git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
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


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _resumed_curve(
    run_dir: Path, curve_path: Path, curve_data: np.ndarray, config: dict[str, Any]
) -> tuple[bool, list[dict[str, float]]]:
    """Whether training resumes, and the convergence curve so far (empty for a fresh run)."""
    curve: list[dict[str, float]] = []
    resume = (run_dir / STATE_META).is_file()
    if resume:
        done = read_json(run_dir / STATE_META)["epoch"] + 1
        curve = [c for c in (read_json(curve_path)["curve"] if curve_path.is_file() else []) if c["epoch"] <= done]
        if len(curve) == done - 1:  # stopped between the checkpoint and its curve point: score that checkpoint
            flow, _ = load_checkpoint(run_dir)
            seconds = read_json(run_dir / STATE_META)["seconds"]
            curve.append(
                {"epoch": done, "seconds": seconds, "bpd": evaluate_bpd(flow, curve_data, config, seed=EVAL_SEED)}
            )
        elif len(curve) != done:
            resume, curve = False, []  # the curve cannot be rebuilt: train this run again from scratch
    return resume, curve


def _sample_quality(baked: Flow, budget: Budget, classifier, run_dir: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """The run's quality samples (the first 64 saved) and what the classifier makes of them."""
    z = torch.randn(budget.n_samples, baked.dim, generator=torch.Generator().manual_seed(SAMPLE_SEED))
    with torch.no_grad():
        samples, residual = baked.sample(z, budget.sample_iters)
    samples_np = samples.numpy()
    quality = classify(classifier, quantise(samples_np).reshape(len(samples_np), -1))
    quality["non_finite"] = int((~np.isfinite(samples_np.reshape(len(samples_np), -1)).all(1)).sum())
    quality["max_fixed_point_residual"] = float(residual.max()) if residual.numel() else 0.0
    np.save(run_dir / "samples.npy", samples_np[:64].astype(np.float32))
    return samples, quality


def _block_rows(
    baked: Flow, final_data: np.ndarray, samples: torch.Tensor, budget: Budget, config: dict[str, Any]
) -> list[dict[str, Any]]:
    """Per-block Lipschitz constants, gate, gain/bound ratio and attention share; one error row when the run diverged."""
    n_lip = budget.lip_inputs
    gen = torch.Generator().manual_seed(EVAL_SEED)
    try:
        return block_report(
            baked,
            to_model_space(final_data[:n_lip], config, gen),
            samples[:n_lip],
            n_iter=budget.lip_iters,
            steps=budget.lip_iters,
        )
    except FloatingPointError as exc:  # a diverged run is reported, not allowed to stop the experiment
        return [{"error": str(exc)}]


def _curve_recorder(
    run_dir: Path,
    curve_path: Path,
    curve: list[dict[str, float]],
    curve_data: np.ndarray,
    config: dict[str, Any],
    on_epoch: Callable[[int, float], None] | None,
) -> Callable[[int, dict[str, float]], None]:
    """The per-epoch hook of ``train``: score the checkpoint it just wrote on the curve subset, save the curve."""

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

    return epoch_done


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
        result = read_json(result_path)
        if result.get("config") != config:
            raise BadInput(f"{result_path} was produced with a different config; use a new --out")
        result["skipped"] = True
        return result

    curve_data = test_data[: budget.curve_size]
    curve_path = run_dir / "curve.json"
    resume, curve = _resumed_curve(run_dir, curve_path, curve_data, config)
    run_dir.mkdir(parents=True, exist_ok=True)

    epoch_done = _curve_recorder(run_dir, curve_path, curve, curve_data, config, on_epoch)
    flow, metrics = train(config, run_dir, seed=seed, resume=resume, on_epoch=epoch_done)
    started = time.perf_counter()
    baked = build_flow(config)
    baked.load_state_dict(flow.state_dict())
    baked.bake()
    final_data = test_data if budget.test_size is None else test_data[: budget.test_size]
    clean = noisy_bpd(baked, final_data, config, 0.0, NOISE_SEED)
    awgn = {f"{s:g}": noisy_bpd(baked, final_data, config, s, NOISE_SEED + i + 1) for i, s in enumerate(SIGMAS)}

    samples, quality = _sample_quality(baked, budget, classifier, run_dir)
    blocks = _block_rows(baked, final_data, samples, budget, config)
    result = {
        "preset": preset,
        "seed": seed,
        "config": config,
        "git": git_commit(),
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
