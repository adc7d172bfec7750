"""Two exports of one model on ONNX Runtime, side by side in one run: what a change to the exported graphs bought.

Both artifacts get the same inputs, every call alternates between them (round robin), and the outputs are
compared, so a speed-up is only reported together with the parity it kept.

    python benchmarks/compare_artifacts.py BEFORE AFTER --what density --batch 16,256 \\
        --out benchmarks/density_linearize.json       # then --render-only prints the table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from acf_deploy.artifact import open_artifact  # noqa: E402
from acf_deploy.runtime import open_backend  # noqa: E402
from acf_deploy.runtime.bench import _call, _inputs, summarize, time_round_robin  # noqa: E402

KEYS = {"sample": ("x",), "density": ("log_prob", "z")}


def compare(
    before: Path, after: Path, what: str, batches: list[int], repeats: int, threads: int, labels: list[str]
) -> dict:
    artifacts = {"before": open_artifact(before), "after": open_artifact(after)}
    nodes = {k: a.manifest["graphs"][what]["nodes"] for k, a in artifacts.items()}
    backends = {k: open_backend("ort", a, threads=threads) for k, a in artifacts.items()}
    report: dict = {"what": what, "threads": threads, "nodes": nodes, "load": os.getloadavg(), "rows": []}
    report["labels"] = {"before": labels[0], "after": labels[1]}
    try:
        for batch in batches:
            inputs = _inputs(artifacts["after"], what, batch, seed=0)
            outputs: dict = {}
            calls = {k: (lambda b=b, x=inputs, n=batch: _call(b, what, x, n)) for k, b in backends.items()}
            times = time_round_robin(calls, repeats, warmup=1, on_first=outputs.setdefault)
            row = {"batch": batch, **{k: summarize(t, batch) for k, t in times.items()}}
            row["speedup"] = row["before"]["median_ms"] / row["after"]["median_ms"]
            row["max_abs_diff"] = {
                key: float(np.abs(outputs["before"][key].astype(np.float64) - outputs["after"][key]).max())
                for key in KEYS[what]
            }
            print(
                f"batch {batch}: {row['before']['median_ms']:.1f} -> {row['after']['median_ms']:.1f} ms "
                f"({row['speedup']:.2f}x), max |diff| {row['max_abs_diff']}",
                flush=True,
            )
            report["rows"].append(row)
    finally:
        for backend in backends.values():
            backend.close()
    return report


def render(report: dict) -> str:
    keys = KEYS[report["what"]]
    names = report.get("labels", {"before": "before", "after": "after"})
    lines = [
        f"| batch | {names['before']} median ms | {names['after']} median ms | speed-up | "
        f"{' | '.join(f'max abs diff {k}' for k in keys)} |",
        "|---:|---:|---:|---:|" + "---:|" * len(keys),
    ]
    for row in report["rows"]:
        diffs = " | ".join(f"{row['max_abs_diff'][k]:.2g}" for k in keys)
        lines.append(
            f"| {row['batch']} | {row['before']['median_ms']:.1f} | {row['after']['median_ms']:.1f} | "
            f"{row['speedup']:.2f}x | {diffs} |"
        )
    nodes = report["nodes"]
    lines.append(
        f"\n{report['what']} graph nodes {nodes['before']} ({names['before']}), {nodes['after']} ({names['after']}); "
        "ONNX Runtime with "
        f"{report['threads']} thread(s), round robin, {report['rows'][0]['after']['repeats']} timed rounds; "
        f"load average at start {', '.join(f'{v:.1f}' for v in report['load'])}."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, nargs="?")
    parser.add_argument("after", type=Path, nargs="?")
    parser.add_argument("--what", choices=sorted(KEYS), default="density")
    parser.add_argument("--batch", default="16,256")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "density_linearize.json")
    parser.add_argument("--labels", default="before,after", help="names of the two artifacts in the table")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if args.render_only:
        print(render(json.loads(args.out.read_text())))
        return
    if args.before is None or args.after is None:
        parser.error("BEFORE and AFTER artifacts are needed unless --render-only")
    started = time.perf_counter()
    batches = [int(b) for b in args.batch.split(",")]
    labels = args.labels.split(",")
    report = compare(args.before, args.after, args.what, batches, args.repeats, args.threads, labels)
    report["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(render(report))


if __name__ == "__main__":
    main()
