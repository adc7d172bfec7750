"""What exporting costs a user: wall time and peak memory of ``acf-deploy export`` for every shipped model,
of the quickstart end to end, and of a freshly trained model's train -> export -> check path.

Each step runs as its own ``acf-deploy`` process under GNU time (peak RSS); the per-stage split comes from
the artifact's ``export_timings``. The full-size MNIST configuration is measured by ``import_mnist.py``.

    python benchmarks/export_cost.py --threads 2        # writes benchmarks/export_cost.json
    python benchmarks/export_cost.py --render-only      # prints the markdown table from the json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from import_mnist import run as run_step  # the sibling script: one way to time a command

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "export_cost.json"
MODELS = ROOT / "acf_deploy" / "models"


def run(args: list[str], threads: int) -> dict:
    """One ``acf-deploy`` command, its wall seconds and peak RSS (MB)."""
    row = run_step(" ".join(args[:2]), args, threads)
    return {"seconds": row["seconds"], "peak_rss_mb": row["peak_rss_mb"]}


def _export(model: Path, out: Path, threads: int) -> dict:
    row = run(["export", str(model), "--out", str(out)], threads)
    timings = json.loads((out / "manifest.json").read_text())["export_timings"]
    return {**row, "stages": timings}


def measure(threads: int, work: Path) -> dict:
    report: dict = {"threads": threads, "load": os.getloadavg(), "exports": {}}
    for model in sorted(p for p in MODELS.iterdir() if (p / "model.json").is_file()):
        report["exports"][model.name] = _export(model, work / model.name, threads)
    report["quickstart"] = run(["quickstart", "--out", str(work / "quickstart")], threads)
    fresh = work / "fresh"
    report["fresh"] = {
        "train": run(["train", "digits-acf-l2", "--epochs", "1", "--out", str(fresh)], threads),
        "export": _export(fresh, work / "fresh-artifact", threads),
        "check": run(["check", str(work / "fresh-artifact"), "--n", "1024"], threads),
    }
    return report


def render(report: dict) -> str:
    lines = [
        "| what | wall time | peak RSS | of which: calibrate (measure blocks, calibrate) | trace, optimise |",
        "|---|---:|---:|---:|---:|",
    ]

    def export_row(label: str, row: dict) -> str:
        stages = row["stages"]
        return (
            f"| {label} | {row['seconds']:.1f} s | {row['peak_rss_mb']:.0f} MB | {stages['calibrate_s']:.1f} s | "
            f"{stages['trace_s']:.1f} s |"
        )

    for name, row in report["exports"].items():
        lines.append(export_row(f"export {name}", row))
    quick = report["quickstart"]
    lines.append(f"| quickstart end to end | {quick['seconds']:.1f} s | {quick['peak_rss_mb']:.0f} MB | | |")
    fresh = report["fresh"]
    lines.append(
        f"| train digits-acf-l2 --epochs 1 (with its final report) | {fresh['train']['seconds']:.1f} s | "
        f"{fresh['train']['peak_rss_mb']:.0f} MB | | |"
    )
    lines.append(export_row("export of that fresh checkpoint", fresh["export"]))
    lines.append(
        f"| check --n 1024 of that export | {fresh['check']['seconds']:.1f} s | {fresh['check']['peak_rss_mb']:.0f} MB | | |"
    )
    lines.append(
        f"\n{report['threads']} thread(s); every step its own process; load average at start "
        f"{', '.join(f'{v:.1f}' for v in report['load'])}."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if not args.render_only:
        with tempfile.TemporaryDirectory() as work:
            RESULT.write_text(json.dumps(measure(args.threads, Path(work)), indent=2) + "\n")
    print(render(json.loads(RESULT.read_text())))


if __name__ == "__main__":
    main()
