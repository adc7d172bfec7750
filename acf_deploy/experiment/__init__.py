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
epoch checkpoint). Runs are independent, so ``jobs`` worker processes can train them side by side
(``threads`` torch threads each): these small models use a second thread poorly, so on 2 cores two
single-thread workers are the better split (the full budget's 35 runs took 30 minutes that way).

Statistics: for each comparison the per-seed paired difference ``d_s = variant_s - host_s`` gets a
two-sided 95% Student-t interval, ``mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n)``; an interval that
contains 0 makes the comparison inconclusive.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..data import digits_split
from ..errors import BadInput
from ..fileio import atomic_path, check_output_dir, write_json
from ..flows.presets import preset_config
from .budgets import ABLATIONS, BUDGETS, CLAIMS, COMPARISONS, PRESETS, SIGMAS, VERDICTS, Budget
from .figures import plot_awgn, plot_curves, plot_samples
from .report import protocol_text, render_report
from .runs import fit_classifier, git_commit, noisy_bpd, quantise, read_json, run_one
from .statistics import aggregate, analyse, outcome, paired_interval, t_interval

__all__ = [
    "ABLATIONS",
    "BUDGETS",
    "CLAIMS",
    "COMPARISONS",
    "PRESETS",
    "SIGMAS",
    "VERDICTS",
    "Budget",
    "aggregate",
    "noisy_bpd",
    "outcome",
    "paired_interval",
    "protocol_text",
    "quantise",
    "run_experiment",
    "t_interval",
]


def command_line(budget: str, out_dir: Path, seeds: int | None, threads: int, jobs: int = 1) -> str:
    parts = ["acf-deploy experiment paper", f"--budget {budget}", f"--out {out_dir}"]
    if seeds is not None:
        parts.append(f"--seeds {seeds}")
    parts.append(f"--threads {threads}")
    if jobs > 1:
        parts.append(f"--jobs {jobs}")
    return " ".join(parts)


def _check_fairness(budget: Budget) -> None:
    """The fairness the protocol promises, checked rather than assumed: every preset gets the same budget."""
    configs = {p: preset_config(p, **budget.overrides()) for p in PRESETS}
    shared = ("hidden", "scales", "heads", "coeff", "train", "data", "n_levels", "logit_alpha")
    for key in shared:
        if len({json.dumps(c[key], sort_keys=True) for c in configs.values()}) != 1:
            raise AssertionError(f"presets differ in {key!r}: the budget is not identical")


def _write_protocol(out_dir: Path, protocol: str, budget: Budget, seed_list: list[int]) -> str:
    """Write PROTOCOL.md before the first run, or check that a resumed run has the same; returns when it
    was written."""
    protocol_path = out_dir / "PROTOCOL.md"
    if protocol_path.is_file():
        if protocol_path.read_text() != protocol:
            raise BadInput(
                f"{protocol_path} holds a different protocol (another budget or seed count); use a new --out"
            )
        return read_json(out_dir / "protocol.json")["written"] if (out_dir / "protocol.json").is_file() else "unknown"
    written = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with atomic_path(protocol_path) as tmp:
        tmp.write_text(protocol)
    write_json(out_dir / "protocol.json", {"written": written, "budget": asdict(budget), "seeds": seed_list})
    return written


def _plot_all(results: list[dict], analysis: dict[str, Any], out_dir: Path, test_data) -> None:
    plot_curves(results, analysis, out_dir / "bpd_vs_epoch.png", "epoch")
    plot_curves(results, analysis, out_dir / "bpd_vs_seconds.png", "seconds")
    plot_awgn(analysis, out_dir / "awgn.png")
    plot_samples(results, out_dir, test_data, out_dir / "samples.png")


def _run_in_worker(preset: str, seed: int, budget: Budget, run_dir: Path, classifier, test_data, threads: int) -> dict:
    """One run in a worker process, with the parent's torch thread count."""
    torch.set_num_threads(threads)
    return run_one(preset, seed, budget, run_dir, classifier, test_data)


def _run_all(
    budget: Budget,
    budget_name: str,
    seed_list: list[int],
    out_dir: Path,
    classifier: Any,
    test_data: Any,
    emit: Callable[[str, dict[str, Any]], None],
    jobs: int = 1,
) -> tuple[list[dict], list[str]]:
    """Every (preset, seed), seeds outermost: a stopped experiment has whole seeds of every preset first.

    With ``jobs`` > 1 the runs go to that many worker processes (spawned, not forked, so no worker
    inherits torch's thread pools); only whole runs are reported then, as they finish."""
    runs = [(preset, seed) for seed in seed_list for preset in PRESETS]
    total = len(runs)
    emit("start", {"total": total, "budget": budget_name, "seeds": seed_list, "epochs": budget.epochs})
    by_run: dict[tuple[str, int], dict] = {}

    def finished(preset: str, seed: int, result: dict) -> None:
        by_run[preset, seed] = result
        info = {"index": len(by_run), "total": total, "preset": preset, "seed": seed}
        emit("run_done", {**info, "heldout_bpd": result["heldout_bpd"]})

    if jobs > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            threads = torch.get_num_threads()
            futures = {
                pool.submit(
                    _run_in_worker, p, s, budget, out_dir / "runs" / p / f"seed{s}", classifier, test_data, threads
                ): (p, s)
                for p, s in runs
            }
            for future in as_completed(futures):
                finished(*futures[future], future.result())
    else:
        for index, (preset, seed) in enumerate(runs, 1):
            emit("run", {"index": index, "total": total, "preset": preset, "seed": seed, "epochs": budget.epochs})

            def on_epoch(epoch: int, bpd: float, preset=preset, seed=seed) -> None:
                emit("epoch", {"preset": preset, "seed": seed, "epoch": epoch, "epochs": budget.epochs, "bpd": bpd})

            finished(
                preset,
                seed,
                run_one(
                    preset, seed, budget, out_dir / "runs" / preset / f"seed{seed}", classifier, test_data, on_epoch
                ),
            )
    results = [by_run[run] for run in runs]
    skipped = [
        f"{preset}/seed{seed}" for (preset, seed), r in zip(runs, results, strict=True) if r.pop("skipped", False)
    ]
    return results, skipped


def run_experiment(
    budget_name: str = "small",
    out_dir: str | Path = "experiments/paper",
    seeds: int | None = None,
    threads: int = 1,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run (or resume) every (preset, seed) of the budget, in ``jobs`` processes, then write REPORT.md and figures."""
    if budget_name not in BUDGETS:
        raise BadInput(f"unknown budget {budget_name!r}; choose one of {', '.join(BUDGETS)}")
    if seeds is not None and seeds < 1:
        raise BadInput("--seeds must be at least 1")
    if threads < 1:
        raise BadInput("--threads must be at least 1")
    if jobs < 1:
        raise BadInput("--jobs must be at least 1")
    budget = BUDGETS[budget_name]
    seed_list = list(range(seeds if seeds is not None else budget.seeds))
    out_dir = check_output_dir(out_dir, lambda path: (path / "protocol.json").is_file(), "an experiment run")
    emit = on_event or (lambda kind, info: None)
    torch.set_num_threads(threads)

    _check_fairness(budget)
    protocol = protocol_text(budget, seed_list)
    written = _write_protocol(out_dir, protocol, budget, seed_list)

    _, test_data = digits_split()
    classifier, reference = fit_classifier()
    results, skipped = _run_all(budget, budget_name, seed_list, out_dir, classifier, test_data, emit, jobs)

    analysis = analyse(results, budget)
    _plot_all(results, analysis, out_dir, test_data)
    header = {
        "command": command_line(budget_name, out_dir, seeds, threads, jobs),
        "git": git_commit(),
        "protocol_written": written,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "threads": threads,
        "jobs": jobs,
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
