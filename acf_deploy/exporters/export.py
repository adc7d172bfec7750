"""``export``: a checkpoint becomes a verified artifact directory (DESIGN 3).

Everything is written into a temporary directory that replaces the target only after the
graphs loaded in ONNX Runtime, have the declared inputs and outputs, and matched PyTorch on the
golden batch. On any failure nothing is left behind.
"""

from __future__ import annotations

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
from ..data import heldout_data
from ..errors import BadInput, CheckFailed
from ..fileio import atomic_dir, check_output_dir, sha256_file
from ..flows.blocks import series_truncation_bound
from ..flows.cost import sweep_macs_per_sample, widest_per_sample
from ..flows.flow import Flow
from ..manifest import write_manifest
from ..report import block_report, bound_failures, measurement_batch, model_samples, verification_failures
from ..train import to_model_space
from .calibrate import Calibration, calibrate, roundtrip_errors
from .graphs import BATCH, density_io, export_density, export_sample_loop, export_sample_unrolled
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
    if opts.iters not in ("calibrated", "certified") and not str(opts.iters).isdigit():
        raise BadInput(f"--iters must be calibrated, certified or a positive integer, not {opts.iters!r}")
    if opts.precision not in PRECISIONS:
        raise BadInput(f"--precision must be one of {', '.join(PRECISIONS)}, not {opts.precision!r}")
    if not 15 <= opts.opset <= 21:
        raise BadInput(f"--opset {opts.opset} is out of range; use 15..21")
    if opts.terms < 1 or opts.probes < 1 or opts.tol <= 0:
        raise BadInput("--terms and --probes must be positive and --tol > 0")


def export_artifact(
    checkpoint: str | Path,
    out_dir: str | Path,
    opts: ExportOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> Artifact:
    """Export, verify and atomically write an artifact; returns it opened and hash-checked."""
    opts = opts or ExportOptions()
    _check_options(opts)
    check_output_dir(out_dir, is_artifact_dir, ARTIFACT)
    say = log or (lambda _msg: None)
    started = time.perf_counter()
    flow, meta = load_checkpoint(checkpoint)
    config = meta["config"]
    flow.bake()
    mode = opts.logdet or default_logdet(flow.dim)
    generator = torch.Generator().manual_seed(opts.seed)
    n_calibration = calibration_size(flow)
    test, heldout = _heldout(flow, config, opts, generator, n_calibration)
    data_x = to_model_space(test[:n_calibration], config, generator)
    prior_z = calibration_latents(flow.dim, generator, n_calibration)

    say("verifying Lipschitz constants")
    blocks = _verified_blocks(flow, data_x, prior_z, say)
    say("calibrating fixed-point iterations")
    cal = calibrate(flow, data_x, prior_z, opts.tol)
    counts = _chosen_counts(opts.iters, cal)
    timings = {"calibrate_s": time.perf_counter() - started}

    say("tracing graphs")
    t0 = time.perf_counter()
    example_x, example_z = data_x[:2], prior_z[:2]
    graph_flow = mixed_precision_flow(flow, opts.precision)  # the flow itself at fp32
    density = export_density(graph_flow, mode, opts.terms, opts.probes, example_x, opts.opset)
    exporter = export_sample_loop if opts.inverse == "loop" else export_sample_unrolled
    sample = exporter(graph_flow, counts, example_z, opts.opset)
    density, sample = (optimize_graph(model) for model in (density, sample))  # fold static shapes, dead code
    density, sample = (finalize_graph(model, opts.precision) for model in (density, sample))  # type-check last
    if opts.inverse == "unroll" and len(sample.graph.node) > UNROLL_NODE_BUDGET:
        raise BadInput(
            f"the unrolled sampler has {len(sample.graph.node)} nodes, above the budget of {UNROLL_NODE_BUDGET}; use --inverse loop"
        )
    timings["trace_s"] = time.perf_counter() - t0

    golden = _golden(flow, mode, opts, counts, config, test, generator)
    if heldout["source"] != "dataset":  # later checks need these data again, and may not have the file
        golden["heldout_levels"] = test[:n_calibration]
    with atomic_dir(out_dir, is_artifact_dir, ARTIFACT) as tmp:
        onnx.save(sample, tmp / "sample.onnx")
        onnx.save(density, tmp / "density.onnx")
        np.savez(tmp / GOLDEN, **golden)
        (tmp / CHECKPOINT_DIR).mkdir()
        source = Path(checkpoint)
        source = source.parent if source.suffix in (".json", ".safetensors") else source
        for name in (WEIGHTS, META):
            shutil.copyfile(source / name, tmp / CHECKPOINT_DIR / name)
        manifest = _manifest(flow, config, meta, mode, opts, cal, counts, blocks, sample, density)
        manifest["heldout"] = {**heldout, "calibration_data": len(data_x), "calibration_prior": len(prior_z)}
        calibrated_rt = roundtrip_errors(flow, cal.calibrated, data_x, prior_z)
        manifest["roundtrip"] = {
            "calibrated": calibrated_rt,
            # the certified schedule is up to ~20x longer and only informative: its first 32 of each
            "certified": roundtrip_errors(flow, cal.certified, data_x[:32], prior_z[:32]),
            "exported": calibrated_rt if counts == cal.calibrated else roundtrip_errors(flow, counts, data_x, prior_z),
        }
        if cal.oracle is not None and cal.oracle.counts.shape[1]:
            manifest["roundtrip"]["oracle"] = roundtrip_errors(flow, cal.oracle, data_x, prior_z)
        manifest["files"] = {
            p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        timings["total_s"] = time.perf_counter() - started
        manifest["export_timings"] = timings
        write_manifest(tmp / MANIFEST, manifest)
        say("verifying the export on ONNX Runtime")
        artifact = Artifact(root=tmp, manifest=manifest)
        verification = verify_export(artifact)
        manifest["verified"] = verification["status"] == "verified"
        manifest["verification"] = verification
        write_manifest(tmp / MANIFEST, manifest)  # hashes the other files; its digest covers itself
        if not manifest["verified"]:
            say(f"unverified: {verification['reason']}")
    return Artifact(root=Path(out_dir), manifest=manifest)


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
    flow: Flow, data_x: torch.Tensor, prior_z: torch.Tensor, log: Callable[[str], None]
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
    rows = block_report(flow, data_x[:n], samples, n_iter=20, steps=20, log=log)
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


def _golden(flow, mode, opts, counts, config, test, generator) -> dict[str, np.ndarray]:
    """Seeded inputs and the PyTorch reference outputs, so parity can be checked without PyTorch."""
    from ..runtime.torch_backend import reference_density, reference_sample

    x = to_model_space(test[np.arange(N_GOLDEN) % len(test)], config, generator).numpy()  # tiled if fewer
    z = torch.randn(N_GOLDEN, flow.dim, generator=generator).numpy()
    temperature = np.array([1.0], dtype=np.float32)
    probes = rademacher(N_GOLDEN, opts.probes, flow.dim, opts.seed) if mode == "series" else None
    golden = {"in_z": z, "in_temperature": temperature, "in_x": x}
    if probes is not None:
        golden["in_probes"] = probes
    for key, value in reference_sample(flow, counts, z, temperature).items():
        golden[f"sample_{key}"] = value
    for key, value in reference_density(flow, mode, opts.terms, x, probes).items():
        golden[f"density_{key}"] = value
    return golden


def rademacher(batch: int, probes: int, dim: int, seed: int) -> np.ndarray:
    """Seeded ``±1`` probes ``(batch, P, D)``; ``||v||^2 = D`` exactly."""
    rng = np.random.default_rng(seed + 7919)
    return (rng.integers(0, 2, size=(batch, probes, dim)) * 2 - 1).astype(np.float32)


def _io_spec(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    def entries(values) -> list[dict[str, Any]]:
        return [
            {
                "name": v.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    return {"inputs": entries(model.graph.input), "outputs": entries(model.graph.output)}


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


def _manifest(flow, config, meta, mode, opts, cal, counts, blocks, sample, density) -> dict[str, Any]:
    lips = [b.contraction() for b in flow.residual_blocks()]
    lmax = max(lips) if lips else 0.0
    logdet = {"mode": mode}
    if mode == "series":
        logdet.update(
            terms=opts.terms,
            probes=opts.probes,
            truncation_bound_per_probe=[series_truncation_bound(flow.dim, lip, opts.terms) for lip in lips],
        )
    block_rows = []
    for i, row in enumerate(blocks):
        block_rows.append(
            {
                **row,
                "index": i,
                "n_iter": counts[i],
                "n_iter_certified": cal.certified[i],
                "n_iter_calibrated": cal.calibrated[i],
                "radius": cal.radius[i],
                "radius_kind": cal.bound_kind[i],
                "calibration_max_abs_error": cal.calibration_error[i],
                "fp32_floor": cal.fp32_floor[i],
            }
        )
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
        "logdet": logdet,
        "inverse": {"mode": opts.inverse, "iters": str(opts.iters), "tol": opts.tol, "max_lipschitz": lmax},
        "iterations": {
            "certified_total": sum(cal.certified),
            "calibrated_total": sum(cal.calibrated),
            "exported_total": sum(counts),
            **(cal.oracle.summary() if cal.oracle is not None else {}),
        },
        "graphs": {
            "sample": {"file": "sample.onnx", **_io_spec(sample), "nodes": _count_nodes(sample.graph)},
            "density": {"file": "density.onnx", **_io_spec(density), "nodes": _count_nodes(density.graph)},
        },
        "blocks": block_rows,
        "preprocessing": meta.get("preprocessing", {}),
        "training_metrics": {k: v for k, v in meta.get("metrics", {}).items() if k not in ("blocks", "history")},
        "max_safe_batch": max_safe_batch(flow, mode, opts.probes, opts.terms),
        "export_options": asdict(opts),
        "tools": {
            "acf_deploy": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "python": platform.python_version(),
        },
    }


def _count_nodes(graph: onnx.GraphProto) -> int:
    """Nodes including those inside Loop bodies."""
    total = 0
    for node in graph.node:
        total += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += _count_nodes(attr.g)
    return total


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
    """Which tensors are half, for the manifest (DESIGN 5: never silently fp32)."""
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


def verify_export(artifact: Artifact) -> dict[str, Any]:
    """Loads in ONNX Runtime, is not empty, has the declared IO, and matches the golden outputs.

    Returns the manifest's ``verification`` record. Raises :class:`CheckFailed` when the export is
    wrong; a precision ONNX Runtime (CPU) cannot run comes back ``"unverified"`` with the reason, and
    its numbers from per-op rounding emulation, which must still be within the precision's limit.
    """
    import onnxruntime

    from ..runtime.ort_backend import OrtBackend
    from ..runtime.parity import compare_golden

    for graph in ("sample", "density"):
        model = onnx.load(str(artifact.graph_path(graph)))
        if not model.graph.node:
            raise CheckFailed(f"{graph}.onnx is empty")
        expected = density_io(artifact.logdet_mode)[0] if graph == "density" else ["z", "temperature"]
        found = [i.name for i in model.graph.input]
        if found != expected:
            raise CheckFailed(f"{graph}.onnx has inputs {found}, expected {expected}")
    precision = artifact.manifest.get("precision", "fp32")
    runtime = f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"
    record: dict[str, Any] = {"runtime": runtime, "against": "golden (fp32 PyTorch)", "precision": precision}
    with OrtBackend(artifact) as backend:  # half graphs: per-op rounding emulated on the CPU provider
        result = compare_golden(artifact, backend)
        runs_natively = backend.unverified_reason is None
    record.update(metrics=result.metrics, limits=result.limits, method=result.note or "graph run as exported")
    if result.status == "failed":
        raise CheckFailed(f"export does not match PyTorch on the golden batch: {result.summary()}")
    if precision in HALF_PRECISIONS and runs_natively:
        # The half graph as exported: on the CPU provider this proves it loads and runs, not its accuracy.
        with OrtBackend(artifact, emulate=False) as native:
            unemulated = compare_golden(artifact, native)
        if unemulated.metrics["nonfinite"]:
            raise CheckFailed(f"the {precision} graph gives non-finite outputs on ONNX Runtime")
        record["native_metrics"] = unemulated.metrics
    record["status"] = "verified" if result.status == "passed" else "unverified"
    record["reason"] = None if result.status == "passed" else result.failures[0]
    return record


def iterations_note(manifest: dict[str, Any]) -> str:
    it = manifest["iterations"]
    ratio = it["calibrated_total"] / max(1, it["certified_total"])
    return f"{it['calibrated_total']} calibrated vs {it['certified_total']} certified iterations ({ratio:.0%})"


__all__ = [
    "ExportOptions",
    "export_artifact",
    "iterations_note",
    "max_safe_batch",
    "rademacher",
    "verify_export",
]
