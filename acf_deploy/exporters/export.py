"""``export``: a checkpoint becomes a verified artifact directory (docs/guarantees.md §5, §6).

Everything is written into a temporary directory that replaces the target only after the
graphs loaded in ONNX Runtime, have the declared inputs and outputs, and matched PyTorch on the
golden batch. On any failure nothing is left behind.
"""

from __future__ import annotations

import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .. import __version__
from ..artifact import FORMAT_VERSION, MANIFEST, Artifact, is_artifact_dir
from ..checkpoint import META, WEIGHTS, load_checkpoint
from ..computations import reference_density, reference_sample
from ..data import heldout_data, to_model_space
from ..errors import BadInput, CheckFailed
from ..fileio import atomic_dir, check_output_dir, sha256_file
from ..flows.blocks import SCHEDULES, series_truncation_bound
from ..flows.cost import sweep_macs_per_sample, widest_per_sample
from ..flows.flow import Flow
from ..manifest import write_manifest
from ..onnx_util import BATCH, count_nodes, io_entries
from ..progress import Reporter
from ..report import block_report, bound_failures, measurement_batch, model_samples, verification_failures
from .calibrate import Calibration, calibrate, roundtrip_errors
from .graphs import export_density, export_sample_loop, export_sample_unrolled
from .optimize import optimize_graph
from .precision import (
    HALF_PRECISIONS,
    PRECISIONS,
    finalize_graph,
    float_tensor_types,
    graph_opset,
    half_fraction,
    mixed_precision_flow,
)

GOLDEN = "golden.npz"
ARTIFACT = "an acf-deploy artifact"
CHECKPOINT_DIR = "checkpoint"
UNROLL_NODE_BUDGET = 50_000
MEMORY_BUDGET_BYTES = 1 << 30
N_GOLDEN = 16
N_CALIBRATION = 128
N_TAIL = 32
#: Multiply-accumulates that calibration may spend per fixed-point sweep over its samples: 128 data points
#: for a digits model, down to :data:`MIN_CALIBRATION` for a 16-million-parameter MNIST model.
CALIBRATION_MACS = 1 << 30
MIN_CALIBRATION = 8
TAIL_QUANTILE = 1e-4


@dataclass
class ExportOptions:
    logdet: str | None = None  # exact | series; None: exact when D <= 256
    terms: int = 10
    probes: int = 4
    inverse: str = "loop"  # loop | unroll
    schedule: str = "plain"  # plain | anderson: how each block's fixed point is iterated
    iters: str = "calibrated"  # calibrated | certified | an integer
    tol: float = 1e-5
    precision: str = "fp32"
    opset: int = 17
    seed: int = 0
    data: str | None = None  # held-out data file (levels); default: the preset's test split, else model samples


def calibration_size(flow: Flow) -> int:
    """Data points (and prior samples) to calibrate on: :data:`N_CALIBRATION`, fewer for costly flows."""
    sweep = sweep_macs_per_sample(block.g for block in flow.residual_blocks())
    return int(min(N_CALIBRATION, max(MIN_CALIBRATION, CALIBRATION_MACS // max(1, sweep))))


def calibration_latents(dim: int, generator: torch.Generator, n: int = N_CALIBRATION) -> torch.Tensor:
    """``n`` prior samples plus ``n / 4`` random directions at the ``1 - TAIL_QUANTILE`` chi quantile of ``||z||``.

    The tail samples are the slowest to invert that a sampler meets in practice; without them the
    calibrated counts fit the bulk of 128 samples and the worst of 1,024 misses the tolerance.
    """
    from scipy.stats import chi

    bulk = torch.randn(n, dim, generator=generator)
    tail = torch.randn(max(2, n * N_TAIL // N_CALIBRATION), dim, generator=generator)
    tail = tail / tail.norm(dim=1, keepdim=True) * float(chi.ppf(1 - TAIL_QUANTILE, dim))
    return torch.cat([bulk, tail])


def default_logdet(dim: int) -> str:
    return "exact" if dim <= 256 else "series"


def _check_options(opts: ExportOptions) -> None:
    if opts.logdet not in (None, "exact", "series"):
        raise BadInput(f"--logdet must be exact or series, not {opts.logdet!r}")
    if opts.inverse not in ("loop", "unroll"):
        raise BadInput(f"--inverse must be loop or unroll, not {opts.inverse!r}")
    if opts.schedule not in SCHEDULES:
        raise BadInput(f"--schedule must be {' or '.join(SCHEDULES)}, not {opts.schedule!r}")
    if opts.schedule != "plain" and opts.iters == "certified":
        raise BadInput("--iters certified counts plain iterations; use --schedule plain with it")
    if opts.iters not in ("calibrated", "certified") and not str(opts.iters).isdigit():
        raise BadInput(f"--iters must be calibrated, certified or a positive integer, not {opts.iters!r}")
    if opts.precision not in PRECISIONS:
        raise BadInput(f"--precision must be one of {', '.join(PRECISIONS)}, not {opts.precision!r}")
    if not 15 <= opts.opset <= 21:
        raise BadInput(f"--opset {opts.opset} is out of range; use 15..21")
    if opts.terms < 1 or opts.probes < 1 or opts.tol <= 0:
        raise BadInput("--terms and --probes must be positive and --tol > 0")


#: Checks an artifact written into the temporary directory, before it replaces the target: returns the
#: manifest's ``verification`` record, or raises :class:`CheckFailed`. Exporters never import the runtime:
#: :func:`acf_deploy.pipeline.export_artifact` hands :func:`acf_deploy.runtime.verify.verify_export` in.
Verifier = Callable[[Artifact], dict[str, Any]]


@dataclass
class _Prepared:
    """A baked flow with its held-out data, judged blocks and iteration counts: what tracing and the
    manifest are made from. ``generator`` is the export's one random stream, used in a fixed order."""

    flow: Flow
    meta: dict[str, Any]
    mode: str
    generator: torch.Generator
    test: np.ndarray
    heldout: dict[str, Any]
    data_x: torch.Tensor
    prior_z: torch.Tensor
    blocks: list[dict[str, Any]]
    cal: Calibration
    counts: list[int]

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["config"]


def write_artifact(
    checkpoint: str | Path,
    out_dir: str | Path,
    opts: ExportOptions | None = None,
    *,
    verify: Verifier,
    progress: Reporter | None = None,
) -> Artifact:
    """Export a checkpoint, have ``verify`` check the written artifact, then atomically put it in place.

    Returns the artifact. Most callers want :func:`acf_deploy.pipeline.export_artifact`, which verifies on
    ONNX Runtime.
    """
    opts = opts or ExportOptions()
    _check_options(opts)
    check_output_dir(out_dir, is_artifact_dir, ARTIFACT)
    progress = progress or Reporter()
    started = time.perf_counter()
    prepared = _prepare(checkpoint, opts, progress)
    timings = {"calibrate_s": time.perf_counter() - started}
    sample, density = _trace(prepared, opts, progress)
    timings["trace_s"] = time.perf_counter() - started - timings["calibrate_s"]
    golden = _golden(prepared, opts, progress)
    with atomic_dir(out_dir, is_artifact_dir, ARTIFACT) as tmp:
        _write_files(tmp, checkpoint, sample, density, golden)
        manifest = _manifest(prepared, opts, sample, density)
        manifest["files"] = {
            p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        timings["total_s"] = time.perf_counter() - started
        manifest["export_timings"] = timings
        write_manifest(tmp / MANIFEST, manifest)
        progress.stage("verify on ONNX Runtime", 1)
        verification = verify(Artifact(root=tmp, manifest=manifest))
        progress.advance(verification["status"])
        manifest["verified"] = verification["status"] == "verified"
        manifest["verification"] = verification
        write_manifest(tmp / MANIFEST, manifest)  # hashes the other files; its digest covers itself
    return Artifact(root=Path(out_dir), manifest=manifest)


def _prepare(checkpoint: str | Path, opts: ExportOptions, progress: Reporter) -> _Prepared:
    """Load and bake the flow, draw its held-out data and prior samples, judge its blocks, calibrate."""
    flow, meta = load_checkpoint(checkpoint)
    flow.bake()
    generator = torch.Generator().manual_seed(opts.seed)
    n_calibration = calibration_size(flow)
    test, heldout = _heldout(flow, meta["config"], opts, generator, n_calibration)
    data_x = to_model_space(test[:n_calibration], meta["config"], generator)
    prior_z = calibration_latents(flow.dim, generator, n_calibration)
    blocks = _verified_blocks(flow, data_x, prior_z, progress)
    cal = calibrate(flow, data_x, prior_z, opts.tol, schedule=opts.schedule, progress=progress)
    mode = opts.logdet or default_logdet(flow.dim)
    counts = _chosen_counts(opts.iters, cal)
    return _Prepared(flow, meta, mode, generator, test, heldout, data_x, prior_z, blocks, cal, counts)


def _trace(prepared: _Prepared, opts: ExportOptions, progress: Reporter) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """``(sample, density)`` ONNX graphs, optimised and finalised at the export's precision."""
    flow = mixed_precision_flow(prepared.flow, opts.precision)  # the flow itself at fp32
    example_x, example_z = prepared.data_x[:2], prepared.prior_z[:2]
    progress.stage("trace", 2)
    density = export_density(flow, prepared.mode, opts.terms, opts.probes, example_x, opts.opset)
    progress.advance("density")
    exporter = export_sample_loop if opts.inverse == "loop" else export_sample_unrolled
    sample = exporter(flow, prepared.counts, example_z, opts.opset, opts.schedule)
    progress.advance("sample")
    progress.stage("optimise", 2)
    graphs = []
    for name, model in (("density", density), ("sample", sample)):
        graphs.append(finalize_graph(optimize_graph(model), opts.precision))  # fold shapes, dead code; type-check last
        progress.advance(name)
    density, sample = graphs
    if opts.inverse == "unroll" and len(sample.graph.node) > UNROLL_NODE_BUDGET:
        raise BadInput(
            f"the unrolled sampler has {len(sample.graph.node)} nodes, above the budget of {UNROLL_NODE_BUDGET}; use --inverse loop"
        )
    return sample, density


def _write_files(
    tmp: Path, checkpoint: str | Path, sample: onnx.ModelProto, density: onnx.ModelProto, golden: dict[str, np.ndarray]
) -> None:
    """The graphs, the golden batch and a copy of the checkpoint, into the temporary artifact directory."""
    onnx.save(sample, tmp / "sample.onnx")
    onnx.save(density, tmp / "density.onnx")
    np.savez(tmp / GOLDEN, **golden)
    (tmp / CHECKPOINT_DIR).mkdir()
    source = Path(checkpoint)
    source = source.parent if source.suffix in (".json", ".safetensors") else source
    for name in (WEIGHTS, META):
        shutil.copyfile(source / name, tmp / CHECKPOINT_DIR / name)


def _heldout(
    flow: Flow, config: dict[str, Any], opts: ExportOptions, generator: torch.Generator, n: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Held-out levels for calibration and the golden batch, and where they came from.

    A model whose data are not available offline (an imported one, exported without ``--data``) is
    calibrated on its own samples, quantised to its levels: inputs of the kind it will be asked to score.
    """
    levels = heldout_data(config, opts.data, seed=opts.seed)
    if levels is not None:
        return levels, {"source": "file" if opts.data else "dataset", "n": len(levels)}
    x = model_samples(flow, torch.randn(n, flow.dim, generator=generator))
    n = int(config["n_levels"])
    levels = torch.clamp(torch.floor(torch.nan_to_num(x) * n), 0, n - 1).to(torch.uint8 if n <= 256 else torch.int64)
    return levels.numpy(), {"source": "model samples", "n": len(levels)}


def _verified_blocks(
    flow: Flow, data_x: torch.Tensor, prior_z: torch.Tensor, progress: Reporter
) -> list[dict[str, Any]]:
    """Per-block L judged on this flow alone: bounds from the baked weights, constants measured now.

    Nothing is taken from the checkpoint's metrics, which anyone can edit. A certified bound not below 1 is
    refused before sampling (the inverse would not converge), then every measured constant is judged.
    Verified blocks are measured on data and on model samples; certified ones, whose measurement only
    confirms their bound, on data.
    """
    failures = bound_failures(flow)
    if failures:
        raise CheckFailed("not exported: " + "; ".join(failures))
    n = measurement_batch(flow)
    samples = None
    if any(block.guarantee == "verified" for block in flow.residual_blocks()):
        samples = model_samples(flow, prior_z[:n])
    rows = block_report(flow, data_x[:n], samples, n_iter=20, steps=20, progress=progress)
    failures = verification_failures(rows)
    if failures:
        raise CheckFailed("not exported: " + "; ".join(failures))
    return rows


def _chosen_counts(iters: str, cal: Calibration) -> list[int]:
    if iters == "calibrated":
        return list(cal.calibrated)
    if iters == "certified":
        return list(cal.certified)
    return [int(iters)] * len(cal.certified)


def _golden(prepared: _Prepared, opts: ExportOptions, progress: Reporter) -> dict[str, np.ndarray]:
    """Seeded inputs and the PyTorch reference outputs, so parity can be checked without PyTorch."""
    flow, mode, test, generator = prepared.flow, prepared.mode, prepared.test, prepared.generator
    x = to_model_space(test[np.arange(N_GOLDEN) % len(test)], prepared.config, generator).numpy()  # tiled if fewer
    z = torch.randn(N_GOLDEN, flow.dim, generator=generator).numpy()
    temperature = np.array([1.0], dtype=np.float32)
    probes = rademacher(N_GOLDEN, opts.probes, flow.dim, opts.seed) if mode == "series" else None
    golden = {"in_z": z, "in_temperature": temperature, "in_x": x}
    if probes is not None:
        golden["in_probes"] = probes
    progress.stage("reference outputs", 2)
    for key, value in reference_sample(flow, prepared.counts, z, temperature, opts.schedule).items():
        golden[f"sample_{key}"] = value
    progress.advance("sample")
    for key, value in reference_density(flow, mode, opts.terms, x, probes).items():
        golden[f"density_{key}"] = value
    progress.advance("density")
    if prepared.heldout["source"] != "dataset":  # later checks need these data again, and may not have the file
        golden["heldout_levels"] = test[: len(prepared.data_x)]
    return golden


def rademacher(batch: int, probes: int, dim: int, seed: int) -> np.ndarray:
    """Seeded ``±1`` probes ``(batch, P, D)``; ``||v||^2 = D`` exactly."""
    rng = np.random.default_rng(seed + 7919)
    return (rng.integers(0, 2, size=(batch, probes, dim)) * 2 - 1).astype(np.float32)


def _io_spec(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    return {"inputs": io_entries(model.graph.input), "outputs": io_entries(model.graph.output)}


def max_safe_batch(flow: Flow, mode: str, probes: int, terms: int) -> int:
    """Largest batch whose exact/series log-det intermediates fit in the memory budget (estimate).

    Per sample, each of ``D`` (exact) or ``probes`` (series) tangents carries the widest intermediate of a
    branch, about ``2 x parts`` times (primal and tangent of every layer, at least 16), and in series mode once
    per term: ONNX Runtime keeps each term's tensors (the 16.6M-parameter MNIST flow needs 0.5 GB a sample).
    """
    fan_out = flow.dim if mode == "exact" else probes
    widest = max((widest_per_sample(block.g, flow.dim) for block in flow.residual_blocks()), default=flow.dim)
    parts = max((len(list(block.g.modules())) for block in flow.residual_blocks()), default=1)
    live = max(16, 2 * parts) * (terms if mode == "series" else 1)
    per_sample = fan_out * widest * 4 * live  # fp32
    return max(1, int(MEMORY_BUDGET_BYTES // per_sample))


def _manifest(prepared: _Prepared, opts: ExportOptions, sample: onnx.ModelProto, density: onnx.ModelProto) -> dict:
    """The manifest without ``files``, ``export_timings`` and ``verification`` (added as they become known)."""
    flow, cal, config, meta = prepared.flow, prepared.cal, prepared.config, prepared.meta
    lips = [b.contraction() for b in flow.residual_blocks()]
    return {
        "format_version": FORMAT_VERSION,
        "preset": config["preset"],
        "config": config,
        "data_shape": list(flow.data_shape),
        "dim": flow.dim,
        "n_levels": flow.n_levels,
        "batch_axis": BATCH,
        "precision": opts.precision,
        "precision_detail": _precision_detail(opts.precision, sample, density),
        "opset": graph_opset(density),  # bf16 raises it to 22 (bfloat16 Conv)
        "logdet": _logdet_record(prepared.mode, opts, flow.dim, lips),
        "inverse": {
            "mode": opts.inverse,
            "schedule": opts.schedule,
            "iters": str(opts.iters),
            "tol": opts.tol,
            "max_lipschitz": max(lips, default=0.0),
        },
        "iterations": {
            "certified_total": sum(cal.certified),
            "calibrated_total": sum(cal.calibrated),
            "exported_total": sum(prepared.counts),
            **(cal.oracle.summary() if cal.oracle is not None else {}),
        },
        "graphs": {
            "sample": {"file": "sample.onnx", **_io_spec(sample), "nodes": count_nodes(sample.graph)},
            "density": {"file": "density.onnx", **_io_spec(density), "nodes": count_nodes(density.graph)},
        },
        "blocks": _block_rows(prepared),
        "preprocessing": meta.get("preprocessing", {}),
        "training_metrics": {k: v for k, v in meta.get("metrics", {}).items() if k not in ("blocks", "history")},
        "max_safe_batch": max_safe_batch(flow, prepared.mode, opts.probes, opts.terms),
        "export_options": asdict(opts),
        "tools": {
            "acf_deploy": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "python": platform.python_version(),
        },
        "heldout": {
            **prepared.heldout,
            "calibration_data": len(prepared.data_x),
            "calibration_prior": len(prepared.prior_z),
        },
        "roundtrip": _roundtrips(prepared),
    }


def _logdet_record(mode: str, opts: ExportOptions, dim: int, lips: list[float]) -> dict[str, Any]:
    record: dict[str, Any] = {"mode": mode}
    if mode == "series":
        record.update(
            terms=opts.terms,
            probes=opts.probes,
            truncation_bound_per_probe=[series_truncation_bound(dim, lip, opts.terms) for lip in lips],
        )
    return record


def _block_rows(prepared: _Prepared) -> list[dict[str, Any]]:
    """The judged block rows with each block's iteration counts and calibration facts."""
    cal = prepared.cal
    return [
        {
            **row,
            "index": i,
            "n_iter": prepared.counts[i],
            "n_iter_certified": cal.certified[i],
            "n_iter_calibrated": cal.calibrated[i],
            "radius": cal.radius[i],
            "radius_kind": cal.bound_kind[i],
            "calibration_max_abs_error": cal.calibration_error[i],
            "fp32_floor": cal.fp32_floor[i],
        }
        for i, row in enumerate(prepared.blocks)
    ]


def _roundtrips(prepared: _Prepared) -> dict[str, dict[str, float]]:
    """fp32 round trips with the calibrated, certified, exported (and oracle) iteration counts."""
    flow, cal, data_x, prior_z = prepared.flow, prepared.cal, prepared.data_x, prepared.prior_z
    calibrated = roundtrip_errors(flow, cal.calibrated, data_x, prior_z, cal.schedule)
    exported = prepared.counts
    # the certified schedule is longer (5x on digits, 56x on the full-size MNIST flow) and only informative:
    # its round trip may cost what the calibrated one did, on at most 32 samples of each kind
    n_cert = max(1, min(32, math.ceil(1.25 * len(data_x) * sum(cal.calibrated) / max(1, sum(cal.certified)))))
    record = {
        "calibrated": calibrated,
        "certified": roundtrip_errors(flow, cal.certified, data_x[:n_cert], prior_z[:n_cert]),
        "exported": calibrated
        if exported == cal.calibrated
        else roundtrip_errors(flow, exported, data_x, prior_z, cal.schedule),
    }
    if cal.oracle is not None and cal.oracle.counts.shape[1]:
        record["oracle"] = roundtrip_errors(flow, cal.oracle, data_x, prior_z, cal.schedule)
    return record


HALF_PARTS = (
    "residual branches g and their JVPs",
    "fixed-point iterations (the loop-carried x and y)",
    "coupling networks",
)
FP32_ISLANDS = (
    "graph inputs and outputs",
    "the highway between layers (y = x + g(x) adds the half g(x) cast to fp32)",
    "LU of I + J, log-det terms and their accumulation",
    "series products v^T J^k v",
    "logit transform and its log-det",
    "ActNorm, Squeeze, invertible 1x1 convolutions",
    "prior log-density, bits/dim, fixed-point step norms and the residual output",
)


def _precision_detail(precision: str, sample: onnx.ModelProto, density: onnx.ModelProto) -> dict[str, Any]:
    """Which tensors are half, for the manifest (docs/guarantees.md §5: never silently fp32)."""
    graphs = {"sample": sample, "density": density}
    detail: dict[str, Any] = {
        "io_dtype": "float32",
        "float_tensors": {name: float_tensor_types(model) for name, model in graphs.items()},
    }
    if precision in HALF_PRECISIONS:
        fractions = {name: half_fraction(model) for name, model in graphs.items()}
        empty = [name for name, value in fractions.items() if value == 0.0]
        if empty:
            raise CheckFailed(f"{' and '.join(empty)} has no {precision} tensors: the export would be silently fp32")
        detail.update(
            compute_dtype={"fp16": "float16", "bf16": "bfloat16"}[precision],
            half_tensor_fraction=fractions,
            half_parts=list(HALF_PARTS),
            fp32_islands=list(FP32_ISLANDS),
            certificates="per-block Lipschitz certificates refer to the fp32 weights, rounded to half at export",
        )
    return detail


__all__ = [
    "ExportOptions",
    "Verifier",
    "write_artifact",
    "max_safe_batch",
    "rademacher",
]
