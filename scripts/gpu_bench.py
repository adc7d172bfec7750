#!/usr/bin/env python3
"""GPU sampling and density benchmarks for one artifact, each backend that can run here.

Backends: torch eager fp32 and bf16 (autocast) on CUDA, ``torch.compile``, ONNX Runtime (CUDA
provider when the build has it, else CPU), TensorRT fp32 (and fp16 with ``--fp16-artifact``).
Writes ``gpu_bench.json`` and ``gpu_bench.md`` (with the skipped backends and why) into ``--out``.
Medians over repeated runs after a warm-up; CUDA work is synchronised before each clock read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from acf_deploy.artifact import open_artifact
from acf_deploy.checkpoint import load_checkpoint
from acf_deploy.computations import DensityGraph, SampleGraph
from acf_deploy.errors import AcfError
from acf_deploy.runtime import open_backend


def timed(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def torch_runners(artifact, compile_: bool) -> dict[str, dict[str, Callable]]:
    """``{name: {"sample": make(batch) -> fn, "density": ...}}`` for torch variants on CUDA."""
    flow, _ = load_checkpoint(artifact.root / "checkpoint")
    flow = flow.bake().cuda()
    counts = [b["n_iter"] for b in artifact.manifest["blocks"]]
    mode, terms = artifact.logdet_mode, int(artifact.manifest["logdet"].get("terms", 0))
    sample_mod, density_mod = SampleGraph(flow, counts), DensityGraph(flow, mode, terms)
    variants = {"torch-fp32": (sample_mod, density_mod, None), "torch-bf16": (sample_mod, density_mod, torch.bfloat16)}
    if compile_:
        variants["torch-compile"] = (torch.compile(sample_mod), torch.compile(density_mod), None)
    runners = {}
    for name, (s_mod, d_mod, dtype) in variants.items():

        def make(kind: str, batch: int, s_mod=s_mod, d_mod=d_mod, dtype=dtype) -> Callable[[], object]:
            gen = torch.Generator(device="cuda").manual_seed(0)
            z = torch.randn(batch, artifact.dim, device="cuda", generator=gen)
            x = torch.rand(batch, *artifact.data_shape, device="cuda", generator=gen)
            probes = None
            if mode == "series":
                probes = torch.randint(0, 2, (batch, artifact.n_probes, artifact.dim), device="cuda").float() * 2 - 1
            one = torch.ones(1, device="cuda")

            def run() -> object:
                with (
                    torch.inference_mode(),
                    torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None),
                ):
                    return s_mod(z, one) if kind == "sample" else d_mod(x, probes)

            return run

        runners[name] = make
    return runners


def backend_runner(name: str, artifact) -> Callable:
    backend = open_backend(name, artifact)
    rng = np.random.default_rng(0)

    def make(kind: str, batch: int) -> Callable[[], object]:
        z = rng.standard_normal((batch, artifact.dim)).astype(np.float32)
        x = rng.random((batch, *artifact.data_shape)).astype(np.float32)
        probes = None
        if artifact.logdet_mode == "series":
            probes = (rng.integers(0, 2, (batch, artifact.n_probes, artifact.dim)) * 2 - 1).astype(np.float32)
        return (lambda: backend.sample(z, 1.0)) if kind == "sample" else (lambda: backend.density(x, probes))

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifact")
    parser.add_argument("--fp16-artifact", default=None)
    parser.add_argument("--out", default="gpu-results")
    parser.add_argument("--batch", default="1,64,1024")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batch.split(",")]
    skipped: dict[str, str] = {}
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch: nothing to benchmark")
    artifact = open_artifact(args.artifact)
    makers: dict[str, Callable] = dict(torch_runners(artifact, compile_=True))
    for name in ("ort-cuda", "ort", "trt"):
        try:
            if name == "trt":
                from acf_deploy.exporters.tensorrt import build_engines

                build_engines(artifact.root, "fp32", (1, 64, max(batches)))
                artifact = open_artifact(artifact.root)
            makers[name] = backend_runner(name, artifact)
        except AcfError as exc:
            skipped[name] = str(exc)
    if args.fp16_artifact:
        try:
            from acf_deploy.exporters.tensorrt import build_engines

            build_engines(args.fp16_artifact, "fp16", (1, 64, max(batches)))
            makers["trt-fp16"] = backend_runner("trt", open_artifact(args.fp16_artifact))
        except AcfError as exc:
            skipped["trt-fp16"] = str(exc)
    else:
        skipped["trt-fp16"] = "no --fp16-artifact given"
    if "ort-cuda" in makers:
        skipped["ort (CPU)"] = "the CUDA provider ran instead"
        makers.pop("ort", None)

    rows = []
    for name, make in makers.items():
        for kind in ("sample", "density"):
            for batch in batches:
                try:
                    times = timed(make(kind, batch), args.warmup, args.repeats)
                except Exception as exc:  # a backend failing at one size must not stop the others
                    skipped[f"{name} {kind} b{batch}"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                    continue
                median = statistics.median(times)
                rows.append(
                    {
                        "backend": name,
                        "what": kind,
                        "batch": batch,
                        "median_ms": median * 1e3,
                        "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))] * 1e3,
                        "samples_per_s": batch / median,
                    }
                )
    base = {(r["what"], r["batch"]): r["samples_per_s"] for r in rows if r["backend"] == "torch-fp32"}
    for r in rows:
        r["speedup_vs_torch_fp32"] = (
            r["samples_per_s"] / base[(r["what"], r["batch"])] if (r["what"], r["batch"]) in base else None
        )
    device = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda}
    (out / "gpu_bench.json").write_text(json.dumps({"device": device, "results": rows, "skipped": skipped}, indent=2))
    lines = [
        f"GPU benchmark on {device['gpu']} (torch {device['torch']}, CUDA {device['cuda']}), "
        f"artifact {artifact.manifest['preset']} ({artifact.logdet_mode} log-det, {artifact.manifest['iterations']['exported_total']} iterations)",
        "",
        "| backend | what | batch | median ms | p90 ms | samples/s | x torch fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = "-" if r["speedup_vs_torch_fp32"] is None else f"{r['speedup_vs_torch_fp32']:.2f}"
        lines.append(
            f"| {r['backend']} | {r['what']} | {r['batch']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['samples_per_s']:.0f} | {speed} |"
        )
    lines += ["", "Skipped:"] + [f"- {k}: {v}" for k, v in skipped.items()]
    (out / "gpu_bench.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
