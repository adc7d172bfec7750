"""What attention costs in training: median time of one training step (roulette log-det, Neumann
gradient, Adam) of each digits ResFlow-host preset against the host, interleaved in one process so that
every preset sees the same machine.

A step is what an epoch repeats (23 steps of 64 images on digits); the rest of an epoch (EMA update,
checkpoint) is the same for every preset, so the step ratio is the epoch ratio.

    python benchmarks/train_cost.py --threads 1      # writes benchmarks/train_cost.json
    python benchmarks/train_cost.py --render-only    # prints the markdown table from the json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from acf_deploy.data import digits_split, to_model_space
from acf_deploy.flows.blocks import LogdetSpec
from acf_deploy.flows.presets import build_flow, preset_config

RESULT = Path(__file__).resolve().parent / "train_cost.json"
#: (label, preset, config overrides); the first is the host every ratio divides by.
VARIANTS = (
    ("digits-resflow", "digits-resflow", {}),
    ("digits-acf-l2", "digits-acf-l2", {}),
    ("digits-acf-dp", "digits-acf-dp", {}),
    (
        "digits-acf-l2, whole-map attention, abs gate (the previous preset)",
        "digits-acf-l2",
        {"window": None, "gate": "abs"},
    ),
)


def measure(threads: int, rounds: int, warmup: int) -> dict:
    torch.set_num_threads(threads)
    train_data, _ = digits_split()
    batch = to_model_space(train_data[:64], preset_config("digits-resflow"), torch.Generator().manual_seed(0))
    runs = []
    for label, preset, overrides in VARIANTS:
        torch.manual_seed(0)
        flow = build_flow(preset_config(preset, **overrides))
        flow.initialize(batch)
        runs.append((label, flow, torch.optim.Adam(flow.parameters(), lr=2e-3), []))
    for step in range(warmup + rounds):
        for _, flow, opt, times in runs:
            torch.manual_seed(step)  # the same roulette draws for every preset
            started = time.perf_counter()
            loss = -flow.log_prob(batch, LogdetSpec(mode="roulette")).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step >= warmup:
                times.append(time.perf_counter() - started)
    host = statistics.median(runs[0][3])
    rows = [
        {"variant": label, "step_ms": 1e3 * statistics.median(times), "ratio": statistics.median(times) / host}
        for label, _, _, times in runs
    ]
    return {"threads": threads, "rounds": rounds, "load": os.getloadavg(), "torch": torch.__version__, "rows": rows}


def render(report: dict) -> str:
    lines = ["| preset | median step | vs digits-resflow |", "|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['step_ms']:.1f} ms | {r['ratio']:.2f}x |" for r in report["rows"]]
    lines.append("")
    lines.append(f"{report['rounds']} interleaved steps per preset, {report['threads']} torch thread(s).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if not args.render_only:
        RESULT.write_text(json.dumps(measure(args.threads, args.rounds, args.warmup), indent=2) + "\n")
    print(render(json.loads(RESULT.read_text())))


if __name__ == "__main__":
    main()
