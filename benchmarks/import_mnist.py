"""The reference's full-size MNIST Residual Flow through acf-deploy: import, export, run.

No trained weights of that configuration exist offline, so a checkpoint in ``train_img.py``'s own format is
written with random weights (the test suite's writer): ``--nblocks 16-16-16 --idim 512 --fc-end True
--fc-idim 128``, 16.6M parameters. Each step runs as its own ``acf-deploy`` process, timed, with its peak
RSS; the bench compares the exported graphs on ONNX Runtime with eager PyTorch.

    python benchmarks/import_mnist.py --threads 2            # writes benchmarks/import_mnist.json
    python benchmarks/import_mnist.py --render-only          # prints the markdown table from the json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "import_mnist.json"


def run(step: str, args: list[str], threads: int) -> dict:
    """One ``acf-deploy`` command: wall time, peak RSS (GNU time), and its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "acf_deploy", *args]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{step} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    print(f"{step}: {seconds:.1f} s, peak RSS {peak_kib / 1024:.0f} MB", flush=True)
    return {"seconds": seconds, "peak_rss_mb": peak_kib / 1024, "stdout": done.stdout}


def measure(threads: int, work: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.reference_writer import MNIST_ARGS, random_reference_checkpoint, save_reference_checkpoint

    started = time.perf_counter()
    source = save_reference_checkpoint(random_reference_checkpoint(MNIST_ARGS), work / "checkpt.pth")
    print(f"wrote {source.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - started:.0f} s", flush=True)
    checkpoint, artifact = work / "imported", work / "artifact"
    report: dict = {"threads": threads, "source_mb": source.stat().st_size / 1e6, "args": MNIST_ARGS}
    imported = run("import", ["import", str(source), "--out", str(checkpoint), "--json"], threads)
    report["import"] = {k: v for k, v in imported.items() if k != "stdout"}
    report["blocks"] = json.loads(imported["stdout"])["blocks"]
    exported = run("export", ["export", str(checkpoint), "--out", str(artifact), "--json"], threads)
    report["export"] = {k: v for k, v in exported.items() if k != "stdout"}
    report["export_summary"] = json.loads(exported["stdout"])
    manifest = json.loads((artifact / "manifest.json").read_text())
    report["graphs"] = {
        g: {"nodes": manifest["graphs"][g]["nodes"], "mb": (artifact / f"{g}.onnx").stat().st_size / 1e6}
        for g in ("sample", "density")
    }
    report["heldout"] = manifest["heldout"]
    report["max_safe_batch"] = manifest["max_safe_batch"]
    report["bench"] = []
    # Density runs in chunks of max_safe_batch rows (1 here: 0.5 GB a sample on ONNX Runtime), so batch 64 is
    # 64 calls of batch 1 and has batch 1's samples/s; it is measured at batch 1 only (64 would take hours).
    for what, batches in (("sample", "1,64"), ("density", "1")):
        args = ["bench", str(artifact), "--backends", "torch,ort", "--what", what, "--batch", batches]
        args += ["--repeats", "3", "--warmup", "1", "--max-seconds", "60", "--threads", str(threads), "--json"]
        report["bench"] += json.loads(run(f"bench {what}", args, threads)["stdout"])["results"]
    return report


def render(report: dict) -> str:
    params = "16.6M"
    rows = [
        "| step | time | peak RSS |",
        "|---|---:|---:|",
        f"| import (load, rebuild, certify {len(report['blocks'])} blocks) | {report['import']['seconds']:.0f} s | "
        f"{report['import']['peak_rss_mb']:.0f} MB |",
        f"| export (series log-det, calibrate, trace, verify on ORT) | {report['export']['seconds']:.0f} s | "
        f"{report['export']['peak_rss_mb']:.0f} MB |",
    ]
    graphs = ", ".join(f"{g}.onnx {v['mb']:.0f} MB / {v['nodes']} nodes" for g, v in report["graphs"].items())
    lines = [
        f"Reference MNIST configuration ({params} parameters, random weights), {report['threads']} threads; "
        f"density in chunks of max_safe_batch = {report['max_safe_batch']} row(s), so batch 64 has batch 1's "
        "samples/s; "
        f"source checkpoint {report['source_mb']:.0f} MB; {graphs}; calibrated on "
        f"{report['heldout']['calibration_data']} model samples and {report['heldout']['calibration_prior']} prior samples.",
        "",
        *rows,
        "",
        "| graph | batch | eager PyTorch samples/s | ONNX Runtime samples/s | ORT / torch |",
        "|---|---:|---:|---:|---:|",
    ]
    cells: dict[tuple, dict] = {}
    for row in report["bench"]:
        cells.setdefault((row["what"], row["batch"]), {})[row["backend"]] = row
    for (what, batch), by in sorted(cells.items()):
        torch_s, ort_s = by["torch"]["samples_per_s"], by["ort"]["samples_per_s"]
        lines.append(f"| {what} | {batch} | {torch_s:.2f} | {ort_s:.2f} | {ort_s / torch_s:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="Keep the checkpoint and artifact here.")
    args = parser.parse_args()
    if not args.render_only:
        with tempfile.TemporaryDirectory() as scratch:
            work = args.work or Path(scratch)
            work.mkdir(parents=True, exist_ok=True)
            RESULT.write_text(json.dumps(measure(args.threads, work), indent=2) + "\n")
    print(render(json.loads(RESULT.read_text())))


if __name__ == "__main__":
    main()
