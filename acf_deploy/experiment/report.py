"""The experiment's documents: the pre-registered protocol and REPORT.md."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import torch

from .budgets import (
    ABLATIONS,
    CLAIMS,
    COMPARISONS,
    CONFIDENCE,
    EVAL_SEED,
    PRESETS,
    SIGMAS,
    THRESHOLD_MARGIN,
    UNIFORM_BPD,
    Budget,
)
from .statistics import t_interval


def protocol_text(budget: Budget, seeds: list[int]) -> str:
    """The pre-registered protocol: a pure function of the budget and the seeds (no result enters it).

    Long because it is one document, written line by line in reading order."""
    b = budget
    train_images = "all 1,438" if b.train_size is None else f"the first {b.train_size}"
    test_images = "all 359" if b.test_size is None else f"the first {b.test_size}"
    sigmas = ", ".join(f"{s:g}" for s in SIGMAS)
    comparisons = "; ".join(f"`{v}` vs `{h}`" for v, h in COMPARISONS)
    ablations = "; ".join(f"`{v}` vs `{a}`" for v, a in ABLATIONS)
    lines = [
        f"Budget `{b.name}`, identical for all {len(PRESETS)} presets (`{'`, `'.join(PRESETS)}`) and the same seeds "
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
        f"| attention | {b.heads} heads; Lipschitz coefficient {b.coeff:g} per layer; ResFlow host: inside each i-ResBlock's g through the gate `a h + b F/B` (`|a| + |b| <= 1`), the presets' convex gate `b = sigmoid(10 theta)` from `b = 0.5`, pixels attending within 2 x 2 windows; Glow host: ACF layers over the whole map |",
        f"| training images | {train_images} of the fixed digits training split |",
        f"| seeds | {seeds} (a seed fixes initialisation, data order, dequantisation and roulette noise) |",
        *(f"| note | {note} |" for note in b.notes),
        "",
        f"Comparisons (variant vs host, paired by seed): {comparisons}.",
        "",
        f"Ablations (paired by seed, reported with the comparisons, never counted in a verdict): {ablations}: "
        "`digits-acf-l2` with, in place of its convex gate and all else equal, the first gate "
        "`(h + gamma F/B) / (1 + |gamma|)` from gamma = 0 (`abs-gate`), or a gate held at `(h + F/B) / 2` (`open-gate`).",
        "",
        "**Metrics** (all held-out scores use the exact log-det, the uniform dequantisation noise of seed "
        f"{EVAL_SEED}, identical for every run, and the bits/dim of docs/guarantees.md §1 for the 17-level data; a uniform model scores "
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
        "depends on its load), per residual block after training: certified Lipschitz bound and the measured "
        f"constant (power iteration and adversarial search on {b.lip_inputs} test inputs and {b.lip_inputs} prior "
        "samples per block); for attention inside g, the gate's attention weight `b`, the attention share "
        "`||b F/B|| / ||h||` on test data (h: the map reaching the gate) and the gain/bound ratio of `F/B` (its "
        "measured constant on those maps, by the same power iteration and adversarial search; the bound is 1).",
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
        elif claim == "robustness" and (c["variant"], c["host"]) not in ABLATIONS:
            per = ", ".join(f"sigma {k}: {_ci(v, 4, True)}" for k, v in c["awgn_relative"].items())
            parts.append(f"{name}: {per} ({c['outcome']['awgn']})")
    return "; ".join(parts) if parts else "no comparison ran"


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """The lines of a markdown table: the header, its ``|---|`` rule, one line per row."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def render_report(
    analysis: dict[str, Any],
    results: list[dict],
    budget: Budget,
    protocol: str,
    header: dict[str, Any],
    reference: dict[str, Any],
) -> str:
    """REPORT.md: provenance, the protocol verbatim, verdicts, then every table and figure.

    Long because it is the document's outline in reading order; each table is built by its own helper."""
    summary = analysis["summary"]
    lines = [
        f"# Do the ACF paper's claims hold on digits? (budget `{budget.name}`)",
        "",
        "Every number in this file was produced by the command below; nothing was edited by hand.",
        "",
        *_provenance(results, header),
        "",
        "## 1. Pre-registered protocol",
        "",
        protocol.rstrip(),
        "",
        "## 2. Claims and verdicts",
        "",
        "Differences are variant - host, mean [95% t interval] over paired seeds.",
        "",
        *markdown_table(
            ["#", "claim (from the paper's abstract)", "verdict", "why"],
            [
                [i, text, f"**{analysis['verdicts'][key]}**", _why(analysis, key)]
                for i, (key, text) in enumerate(CLAIMS, 1)
            ],
        ),
        "",
        "## 3. Results",
        "",
        "### 3.1 Held-out bits/dim, convergence and cost",
        "",
        f"Uniform model: {UNIFORM_BPD:.3f} bits/dim. Thresholds for *to reach*: "
        + ", ".join(f"`{h}` {t:.4f}" for h, t in analysis["thresholds"].items())
        + ".",
        "",
        *_cost_table(summary),
        "",
        "![bits/dim vs epoch](bpd_vs_epoch.png)",
        "",
        "![bits/dim vs wall-clock](bpd_vs_seconds.png)",
        "",
        "### 3.2 AWGN robustness",
        "",
        *_awgn_table(summary),
        "",
        "![AWGN](awgn.png)",
        "",
        "### 3.3 Sample quality",
        "",
        f"Classifier on the real test images: accuracy {reference['accuracy']:.3f}, confident fraction "
        f"{reference['confident_fraction']:.3f}, class entropy {reference['class_entropy_bits']:.3f} bits.",
        "",
        *_samples_table(summary, results),
        "",
        "![samples](samples.png)",
        "",
        "### 3.4 Paired comparisons",
        "",
        *_comparisons_table(analysis["comparisons"]),
        "",
        "### 3.5 Per-block Lipschitz constants, gate, gain/bound ratio and attention share (mean over seeds)",
        "",
        *_blocks_table(summary, results),
        "",
        "## 4. Per-run data",
        "",
        "`runs/<preset>/seed<k>/result.json` (every number above, per run), `curve.json`, `samples.npy`, the EMA "
        "checkpoint `model.safetensors` + `model.json`; `results.json` holds this report's aggregates.",
        "",
    ]
    return "\n".join(lines)


def _provenance(results: list[dict], header: dict[str, Any]) -> list[str]:
    commits = sorted({(r["git"]["commit"], r["git"]["dirty"]) for r in results})
    commit_list = ", ".join(f"`{c[:12]}`{' (with uncommitted changes)' if d else ''}" for c, d in commits) or "-"
    dirty = " (with uncommitted changes)" if header["git"]["dirty"] else ""
    return [
        f"- Command: `{header['command']}`",
        f"- Commit at report time: `{header['git']['commit']}`{dirty}; runs trained at: {commit_list}",
        f"- Protocol written to `PROTOCOL.md` at {header['protocol_written']} (before the first run; a resumed experiment must match it)",
        f"- Report written at {header['finished']}; torch {torch.__version__}, {header.get('jobs', 1)} run(s) at a time with {header['threads']} torch thread(s) each, {header['cpus']} CPU(s), {platform.machine()}",
        f"- Runs: {len(results)} of {len(PRESETS) * len(header['seeds'])} ({len(header['skipped'])} reused from an earlier invocation)",
    ]


def _cost_table(summary: dict[str, Any]) -> list[str]:
    header = ["preset", "runs", "held-out bits/dim", "epochs to reach", "seconds to reach", "reached"]
    rows = [
        [
            f"`{preset}`",
            s["runs"],
            _ci(s["heldout_bpd"]),
            _ci(s["epochs_to_reach"], 2),
            _ci(s["seconds_to_reach"], 1),
            f"{s['reached']}/{s['runs']}",
            f"{s['parameters']:,}",
            _ci(s["seconds_per_epoch"], 2),
        ]
        for preset, s in summary.items()
    ]
    return markdown_table([*header, "parameters", "s / epoch"], rows)


def _awgn_table(summary: dict[str, Any]) -> list[str]:
    header = ["preset", "clean", *(f"sigma {s:g}: bits/dim | relative" for s in SIGMAS)]
    rows = []
    for preset, s in summary.items():
        cells = [f"{_ci(s['awgn_bpd'][f'{g:g}'], 3)} | {_ci(s['awgn_relative'][f'{g:g}'], 4)}" for g in SIGMAS]
        rows.append([f"`{preset}`", _ci(s["heldout_bpd"], 3), *cells])
    table = markdown_table(header, rows)
    table[1] = "|---|---|" + "---|---|" * len(SIGMAS)  # two columns per sigma
    return table


def _samples_table(summary: dict[str, Any], results: list[dict]) -> list[str]:
    header = ["preset", "confident fraction", "class entropy (bits)", "mean top probability"]
    header += ["non-finite samples", "largest fixed-point residual"]
    rows = []
    for preset, s in summary.items():
        top = t_interval([r["samples"]["mean_top_probability"] for r in results if r["preset"] == preset])
        rows.append(
            [
                f"`{preset}`",
                _ci(s["confident_fraction"], 3),
                _ci(s["class_entropy_bits"], 3),
                _ci(top, 3),
                s["non_finite_samples"],
                f"{s['max_fixed_point_residual']:.2e}",
            ]
        )
    return markdown_table(header, rows)


def _comparisons_table(comparisons: list[dict[str, Any]]) -> list[str]:
    header = ["variant vs host", "bits/dim", "epochs to reach", "seconds to reach", "confident fraction"]
    header += ["class entropy", *(f"AWGN rel. sigma {s:g}" for s in SIGMAS)]
    rows = []
    for c in comparisons:
        o = c["outcome"]

        def cell(key: str, digits: int, c=c, o=o) -> str:
            return f"{_ci(c[key], digits, True)} ({o[key]})"

        awgn = [f"{_ci(c['awgn_relative'][f'{s:g}'], 4, True)} ({o['awgn_relative'][f'{s:g}']})" for s in SIGMAS]
        rows.append(
            [
                f"`{c['variant']}` vs `{c['host']}`",
                cell("heldout_bpd", 4),
                cell("epochs_to_reach", 2),
                cell("seconds_to_reach", 1),
                cell("confident_fraction", 3),
                cell("class_entropy_bits", 3),
                *awgn,
            ]
        )
    return markdown_table(header, rows)


def _blocks_table(summary: dict[str, Any], results: list[dict]) -> list[str]:
    header = ["preset", "block", "kind", "guarantee", "certified L", "L bound", "measured L (max over seeds)"]
    rows: list[list[Any]] = []
    for preset in summary:
        failed = [r for r in results if r["preset"] == preset and any("error" in b for b in r["blocks"])]
        for r in failed:
            rows.append(
                [f"`{preset}`", f"seed {r['seed']}", f"measurement failed: {r['blocks'][0]['error']}"] + ["-"] * 8
            )
        runs = [r for r in results if r["preset"] == preset and r not in failed]
        if not runs:
            continue
        if not runs[0]["blocks"]:
            rows.append([f"`{preset}`", "-", "no residual blocks"] + ["-"] * 8)
            continue
        for i, row in enumerate(runs[0]["blocks"]):
            per_seed = [r["blocks"][i] for r in runs]

            def mean(key: str, per_seed=per_seed) -> str:
                values = [r.get(key) for r in per_seed]
                return "-" if any(v is None for v in values) else f"{np.mean(values):.4g}"

            measured = max(r["lipschitz_measured"] for r in per_seed)
            shares = [r.get("attention_share") for r in per_seed]
            least = "-" if any(v is None for v in shares) else f"{min(shares):.4g}"
            rows.append(
                [f"`{preset}`", row["block"], row["kind"], row["guarantee"], mean("lipschitz_certified")]
                + [mean("lipschitz_bound"), f"{measured:.4g}", mean("gate"), mean("attention_gain")]
                + [mean("attention_share"), least]
            )
    extra = ["gate b", "gain/bound of F/B", "attention share", "least share (over seeds)"]
    return markdown_table([*header, *extra], rows)
