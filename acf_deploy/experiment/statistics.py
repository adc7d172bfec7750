"""Statistics over seeds: Student-t intervals, paired differences, outcomes and the claims' verdicts."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .budgets import ABLATIONS, COMPARISONS, HOST, LEVEL_ALPHA, PRESETS, SIGMAS, THRESHOLD_MARGIN, Budget


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


def _by_seed(results: list[dict], preset: str, key: Callable[[dict], float]) -> dict[int, float]:
    return {r["seed"]: float(key(r)) for r in results if r["preset"] == preset}


def _to_reach(result: dict, threshold: float, epochs: int) -> tuple[float, float, bool]:
    for point in result["curve"]:
        if point["bpd"] <= threshold:
            return float(point["epoch"]), float(point["seconds"]), True
    return float(epochs + 1), result["train_seconds"] + result["seconds_per_epoch"], False


def analyse(results: list[dict], budget: Budget) -> dict[str, Any]:
    """Per-preset summaries, paired comparisons and the four verdicts."""
    thresholds: dict[str, float] = {}
    for host in sorted(set(HOST.values())):
        finals = [r["curve"][-1]["bpd"] for r in results if r["preset"] == host and r["curve"]]
        if finals:
            thresholds[host] = float(np.mean(finals)) + THRESHOLD_MARGIN
    summary = {
        preset: _preset_summary([r for r in results if r["preset"] == preset], thresholds.get(HOST[preset]), budget)
        for preset in PRESETS
        if any(r["preset"] == preset for r in results)
    }
    pairs = [(v, h) for v, h in COMPARISONS if v in summary and h in summary]
    if {"digits-acf-dp", "digits-acf-l2"} <= set(summary):
        pairs.append(("digits-acf-dp", "digits-acf-l2"))
    pairs += [(v, a) for v, a in ABLATIONS if v in summary and a in summary]
    comparisons = [_comparison(results, v, h, thresholds.get(HOST[h]), budget) for v, h in pairs]
    main = [c for c in comparisons if (c["variant"], c["host"]) in COMPARISONS]
    dp_vs_l2 = [c for c in comparisons if (c["variant"], c["host"]) == ("digits-acf-dp", "digits-acf-l2")]
    verdicts = {
        "bits/dim": aggregate([c["outcome"]["heldout_bpd"] for c in main]),
        "convergence": aggregate([c["outcome"]["epochs_to_reach"] for c in main]),
        "samples": aggregate([c["outcome"]["samples"] for c in main]),
        "robustness": aggregate([c["outcome"]["awgn"] for c in main + dp_vs_l2]) if dp_vs_l2 else "inconclusive",
    }
    return {"summary": summary, "thresholds": thresholds, "comparisons": comparisons, "verdicts": verdicts}


def _preset_summary(runs: list[dict], threshold: float | None, budget: Budget) -> dict[str, Any]:
    """Means and t intervals over one preset's seeds."""
    reach = [_to_reach(r, threshold, budget.epochs) for r in runs] if threshold is not None else []
    return {
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


def _comparison(results: list[dict], variant: str, host: str, thr: float | None, budget: Budget) -> dict[str, Any]:
    """Paired differences variant - host over the seeds both have, and the outcome of each."""

    def diff(key: Callable[[dict], float]) -> dict[str, Any]:
        return paired_interval(_by_seed(results, variant, key), _by_seed(results, host, key))

    row: dict[str, Any] = {
        "variant": variant,
        "host": host,
        "heldout_bpd": diff(lambda r: r["heldout_bpd"]),
        "epochs_to_reach": diff(lambda r: _to_reach(r, thr, budget.epochs)[0]),
        "seconds_to_reach": diff(lambda r: _to_reach(r, thr, budget.epochs)[1]),
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
    row["outcome"]["awgn"] = {"supported": "better", "not supported": "worse"}.get(aggregate(per_sigma), "inconclusive")
    samples = row["outcome"]["confident_fraction"]
    if samples == "better" and row["outcome"]["class_entropy_bits"] == "worse":
        samples = "inconclusive"
    row["outcome"]["samples"] = samples
    return row
