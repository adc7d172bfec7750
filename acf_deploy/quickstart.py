"""The whole path on the shipped ``digits-acf-l2``: export, check on ONNX Runtime, sample, score."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .artifact import is_artifact_dir, open_artifact
from .fileio import check_output_dir, is_temporary
from .pipeline import export_artifact
from .progress import TextReporter
from .runtime import open_backend
from .runtime.jobs import load_score_data, sample_to_file, score
from .runtime.parity import compare_backends

SHIPPED = Path(__file__).parent / "models"
GRID = "samples.png"


def shipped_model(name: str = "digits-acf-l2") -> Path:
    return SHIPPED / name


def _is_quickstart_dir(path: Path) -> bool:
    """What a previous quickstart wrote: the artifact and the sample grid, nothing else."""
    names = {p.name for p in path.iterdir() if not is_temporary(p.name)}
    return names <= {"artifact", GRID} and (not (path / "artifact").exists() or is_artifact_dir(path / "artifact"))


def run_quickstart(
    out_dir: str | Path, backend: str = "ort", n: int = 512, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    say = log or (lambda _m: None)
    out_dir = check_output_dir(out_dir, _is_quickstart_dir, "a quickstart output")
    rows: list[tuple[str, str]] = []
    started = time.perf_counter()

    say("exporting the shipped digits-acf-l2")
    artifact = export_artifact(shipped_model(), out_dir / "artifact", progress=TextReporter(say))
    m = artifact.manifest
    rows.append(
        (
            "export",
            f"{out_dir / 'artifact'}: {m['graphs']['sample']['nodes']} + {m['graphs']['density']['nodes']} nodes, "
            f"{m['iterations']['exported_total']} iterations ({m['export_timings']['total_s']:.1f} s)",
        )
    )
    artifact = open_artifact(out_dir / "artifact")
    if backend == "trt":
        from .exporters.tensorrt import build_engines

        say("building TensorRT engines")
        build_engines(artifact.root)
        artifact = open_artifact(artifact.root)

    say(f"checking {backend} against PyTorch on {n} inputs")
    with open_backend(backend, artifact) as runner, open_backend("torch", artifact) as reference:
        result = compare_backends(artifact, runner, reference, n)
        mt = result.metrics
        rows.append(
            (
                "check",
                f"{'passed' if result.passed else 'FAILED'}: bits/dim delta {mt['bits_per_dim_delta']:.1e}, "
                f"sample max|dx| {mt['sample_max_abs']:.1e}, max|dlog p| {mt['log_prob_max_abs']:.1e}, "
                f"round trip {mt['roundtrip_max_abs']:.1e}",
            )
        )
        say("sampling a grid")
        grid = out_dir / GRID
        sample_to_file(runner, artifact, 64, grid)
        rows.append(("sample", f"64 samples -> {grid}"))
        say("scoring the digits test split")
        data = load_score_data(artifact, "digits-test")
        _, bpd = score(runner, artifact, data)
        rows.append(("score", f"digits test split ({len(data)} images): {bpd:.4f} bits/dim (uniform: 4.087)"))
    rows.append(("total", f"{time.perf_counter() - started:.1f} s"))
    return {"passed": result.passed, "rows": rows, "check": result.to_json(), "bits_per_dim": bpd}
