"""``experiment paper``: the small budget end to end through the CLI, the statistics, resuming, AWGN scoring.

The small budget is a smoke test of the real code path (training, per-epoch curves, baking, AWGN,
sampling, classifier, per-block report, figures, REPORT.md); its numbers mean nothing.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from acf_deploy.cli import app
from acf_deploy.data import digits_split, to_model_space
from acf_deploy.experiment import (
    ABLATIONS,
    BUDGETS,
    CLAIMS,
    PRESETS,
    SIGMAS,
    VERDICTS,
    aggregate,
    noisy_bpd,
    outcome,
    paired_interval,
    protocol_text,
    quantise,
    t_interval,
)
from acf_deploy.flows.presets import build_flow, preset_config
from acf_deploy.train import evaluate_bpd

runner = CliRunner()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("experiment") / "paper"
    # two worker processes; the reruns below go through the sequential path
    args = ["experiment", "paper", "--budget", "small", "--out", str(out), "--threads", "1", "--jobs", "2"]
    result = runner.invoke(app, args)
    return out, result


@pytest.mark.slow  # the small budget end to end: 14 training runs, scoring, figures
@pytest.mark.timeout(240)
def test_small_budget_writes_a_preregistered_report(small_run):
    out, result = small_run
    assert result.exit_code == 0, result.output
    report = (out / "REPORT.md").read_text()
    protocol = (out / "PROTOCOL.md").read_text()
    # the protocol is a pure function of the budget and seeds, written before any run, copied verbatim
    assert protocol == protocol_text(BUDGETS["small"], [0, 1])
    assert protocol.rstrip() in report
    sections = [
        report.index(h) for h in ("## 1. Pre-registered protocol", "## 2. Claims and verdicts", "## 3. Results")
    ]
    assert sections == sorted(sections)
    assert report.index(protocol.rstrip()) < sections[1]
    # no result precedes the protocol: the header above it holds provenance only
    head = report[: sections[0]]
    assert "bits/dim" not in head and "command" in head.lower() and "commit" in head.lower()
    assert re.search(r"Commit at report time: `([0-9a-f]{40}|unknown)`", head)

    # every claim has exactly one verdict row, each verdict one of the three
    verdict_rows = [line for line in report[sections[1] : sections[2]].splitlines() if re.match(r"^\| \d \|", line)]
    assert len(verdict_rows) == len(CLAIMS)
    for (_, claim), row in zip(CLAIMS, verdict_rows, strict=True):
        assert claim in row
        verdict = re.search(r"\*\*(.+?)\*\*", row).group(1)
        assert verdict in VERDICTS, row
    for key in ("bits/dim vs epoch", "bits/dim vs wall-clock", "AWGN", "samples"):
        assert f"![{key}]" in report
    for name in ("bpd_vs_epoch.png", "bpd_vs_seconds.png", "awgn.png", "samples.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    aggregates = json.loads((out / "results.json").read_text())
    assert set(aggregates["verdicts"]) == {key for key, _ in CLAIMS}
    assert set(aggregates["summary"]) == set(PRESETS)
    for preset in PRESETS:
        for seed in (0, 1):
            run = json.loads((out / "runs" / preset / f"seed{seed}" / "result.json").read_text())
            assert len(run["curve"]) == BUDGETS["small"].epochs
            assert [p["epoch"] for p in run["curve"]] == [1, 2]
            assert 0 < run["heldout_bpd"] < math.log2(17) + 1
            assert set(run["awgn_bpd"]) == {f"{s:g}" for s in SIGMAS}
            assert 0.0 <= run["samples"]["confident_fraction"] <= 1.0
            assert 0.0 <= run["samples"]["class_entropy_bits"] <= math.log2(10) + 1e-9
            # identical budget for every preset
            assert run["config"]["train"] == BUDGETS["small"].overrides()["train"]
            assert run["config"]["hidden"] == BUDGETS["small"].hidden
            assert run["config"]["scales"] == list(BUDGETS["small"].scales)
    blocks = json.loads((out / "runs" / "digits-acf-l2" / "seed0" / "result.json").read_text())["blocks"]
    assert blocks and all("gate" in b and "attention_share" in b and b["lipschitz_measured"] > 0 for b in blocks)
    assert all(0 < b["attention_gain"] <= 1 + 1e-6 for b in blocks)  # F/B's measured gain over its bound of 1
    # the gate ablations are paired comparisons of their own, never evidence for a claim
    compared = {(c["variant"], c["host"]) for c in aggregates["comparisons"]}
    assert set(ABLATIONS) <= compared
    verdict_lines = report[sections[1] : sections[2]]
    assert "abs-gate" not in verdict_lines and "open-gate" not in verdict_lines
    assert "`digits-acf-l2` vs `digits-acf-l2-abs-gate`" in report[sections[2] :]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_rerun_resumes_and_refuses_another_protocol(small_run):
    out, first = small_run
    assert first.exit_code == 0, first.output
    before = (out / "runs" / "digits-resflow" / "seed0" / "result.json").stat().st_mtime_ns
    again = runner.invoke(app, ["experiment", "paper", "--budget", "small", "--out", str(out), "--json"])
    assert again.exit_code == 0, again.output
    assert (out / "runs" / "digits-resflow" / "seed0" / "result.json").stat().st_mtime_ns == before
    assert "14 reused" in (out / "REPORT.md").read_text()
    payload = json.loads(again.stdout)
    assert set(payload["verdicts"].values()) <= set(VERDICTS)

    # a run stopped after its last checkpoint but before its curve point and result: rescored, not retrained
    run_dir = out / "runs" / "digits-glow" / "seed1"
    old = json.loads((run_dir / "result.json").read_text())
    curve = json.loads((run_dir / "curve.json").read_text())
    (run_dir / "curve.json").write_text(json.dumps({"curve": curve["curve"][:1]}))
    (run_dir / "result.json").unlink()
    again = runner.invoke(app, ["experiment", "paper", "--budget", "small", "--out", str(out)])
    assert again.exit_code == 0, again.output
    new = json.loads((run_dir / "result.json").read_text())
    assert new["train_seconds"] == old["train_seconds"]  # no epoch was trained again
    assert [p["bpd"] for p in new["curve"]] == pytest.approx([p["bpd"] for p in old["curve"]], abs=1e-9)
    assert new["heldout_bpd"] == pytest.approx(old["heldout_bpd"], abs=1e-9)
    assert "13 reused" in (out / "REPORT.md").read_text()

    other = runner.invoke(app, ["experiment", "paper", "--budget", "small", "--out", str(out), "--seeds", "3"])
    assert other.exit_code == 2
    assert "different protocol" in other.output


def test_unknown_budget_is_bad_usage(tmp_path):
    result = runner.invoke(app, ["experiment", "paper", "--budget", "huge", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "unknown budget" in result.output


def test_t_interval_and_verdict_rules():
    ci = t_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, t_{0.975, 2} = 4.302653
    assert ci["mean"] == pytest.approx(2.0)
    assert ci["hi"] - ci["mean"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert t_interval([1.0])["lo"] is None
    diff = paired_interval({0: 1.0, 1: 1.1, 2: 0.9}, {0: 2.0, 1: 2.05, 2: 2.1})
    assert diff["hi"] < 0
    assert outcome(diff, "lower") == "better" and outcome(diff, "higher") == "worse"
    assert outcome({"lo": -0.1, "hi": 0.2}, "lower") == "inconclusive"
    assert outcome({"lo": None, "hi": None}, "lower") == "inconclusive"
    assert aggregate(["better", "better"]) == "supported"
    assert aggregate(["better", "inconclusive"]) == "inconclusive"
    assert aggregate(["better", "worse"]) == "not supported"


def test_awgn_scoring_at_zero_noise_is_evaluate_bpd_and_noise_hurts():
    config = preset_config("digits-resflow", hidden=8, scales=[1, 1])
    flow = build_flow(config)
    _, test = digits_split()
    flow.initialize(to_model_space(test[:64], config, torch.Generator().manual_seed(0)))
    flow.eval()
    data = test[:24]
    clean = noisy_bpd(flow, data, config, 0.0, noise_seed=1)
    assert clean == pytest.approx(evaluate_bpd(flow, data, config, seed=0), abs=1e-9)
    assert noisy_bpd(flow, data, config, 0.1, noise_seed=1) != pytest.approx(clean, abs=1e-6)


def test_quantise_matches_the_dequantisation_levels():
    levels = torch.arange(17).reshape(1, 1, 1, 17).numpy()
    x = to_model_space(levels, {"n_levels": 17}, torch.Generator().manual_seed(0)).numpy()
    assert (quantise(x) * 16).round().astype(int).ravel().tolist() == list(range(17))
