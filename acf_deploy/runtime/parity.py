"""The comparator: judges a backend's outputs against the PyTorch reference or ``golden.npz`` (docs/guarantees.md §5).

Same seeded latents, data and probes go through both sides. Per output it reports max / mean /
p99 absolute and relative error and the absolute tolerance each would need at the given rtol;
then the density metrics, round trips, fixed-point residuals and non-finite counts. Pass/fail uses
the limits of docs/guarantees.md §5; on failure the first residual block whose output diverges is named.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..artifact import Artifact
from ..errors import BadInput
from .base import Arrays, Backend

#: The fp32 parity limits against the fp32 reference (docs/guarantees.md §5).
LIMITS = {
    "bits_per_dim_delta": 1e-5,
    "sample_max_abs": 1e-4,
    "log_prob_max_abs": 1e-3,
    "roundtrip_max_abs": 1e-4,
}

#: Binding limits per exported precision, always against the fp32 PyTorch reference. Reduced
#: precision is bounded by the aggregate bits/dim only; per-sample errors are reported, not judged.
#: bf16 uses the fp16 bound scaled by the ratio of unit roundoffs (2^-8 / 2^-11).
LIMITS_BY_PRECISION = {
    "fp32": LIMITS,
    "fp16": {"bits_per_dim_delta": 1e-3},
    "bf16": {"bits_per_dim_delta": 8e-3},
}


def limits_for(precision: str) -> dict[str, float]:
    """The binding parity limits for an artifact exported at ``precision``."""
    if precision not in LIMITS_BY_PRECISION:
        raise BadInput(f"unknown precision {precision!r}; expected one of {', '.join(LIMITS_BY_PRECISION)}")
    return LIMITS_BY_PRECISION[precision]


def unverified_reason(artifact: Artifact, backend: Backend) -> str | None:
    """Why ``backend``'s outputs cannot verify the artifact's precision (``None`` when they can).

    A backend reports it through an ``unverified_reason`` attribute (the ONNX Runtime CPU backend
    for bf16); the torch backend always runs the fp32 reference model, never the half graph.
    """
    precision = artifact.manifest.get("precision", "fp32")
    if precision == "fp32":
        return None
    if backend.name == "torch":
        return f"the torch backend runs the fp32 reference, not the {precision} graph"
    return backend.unverified_reason


@dataclass
class OutputStats:
    name: str
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    p99_rel: float
    atol_needed: float  # smallest atol with which |a - b| <= atol + rtol |b| holds everywhere
    passed: bool


@dataclass
class ParityResult:
    passed: bool
    against: str
    backend: str
    n: int
    metrics: dict[str, float]
    outputs: list[OutputStats]
    failures: list[str] = field(default_factory=list)
    first_divergent_block: str | None = None
    precision: str = "fp32"
    limits: dict[str, float] = field(default_factory=lambda: dict(LIMITS))
    #: "passed", "failed", or "unverified" (the backend cannot run this precision: never passed).
    status: str = ""
    #: How the backend produced its numbers when that matters (e.g. half rounding emulated).
    note: str | None = None

    def __post_init__(self) -> None:
        if not self.status:
            self.status = "passed" if self.passed else "failed"

    def summary(self) -> str:
        if self.status == "unverified":
            return "unverified: " + "; ".join(self.failures)
        if self.passed:
            return "passed"
        where = f"; first divergent block: {self.first_divergent_block}" if self.first_divergent_block else ""
        return "; ".join(self.failures) + where

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def output_stats(name: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> OutputStats:
    got64, ref64 = np.asarray(got, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    if got64.shape != ref64.shape:
        raise BadInput(f"output {name}: backend shape {np.shape(got)} differs from reference {np.shape(ref)}")
    diff = np.abs(got64 - ref64)
    finite = np.isfinite(diff)
    diff = np.where(finite, diff, np.inf)
    rel = diff / np.maximum(np.abs(ref64), 1e-12)
    needed = float(np.max(diff - rtol * np.abs(ref64), initial=0.0))
    return OutputStats(
        name=name,
        max_abs=float(diff.max(initial=0.0)),
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        p99_abs=float(np.percentile(diff, 99)) if diff.size else 0.0,
        max_rel=float(rel.max(initial=0.0)),
        mean_rel=float(rel.mean()) if rel.size else 0.0,
        p99_rel=float(np.percentile(rel, 99)) if rel.size else 0.0,
        atol_needed=max(needed, 0.0),
        passed=bool(np.all(finite) and needed <= atol),
    )


def _judge(
    against: str,
    backend: str,
    sample: tuple[Arrays, Arrays],
    density: tuple[Arrays, Arrays],
    atol: float,
    rtol: float,
    extra: dict[str, float] | None = None,
    precision: str = "fp32",
    unverified: str | None = None,
    note: str | None = None,
) -> ParityResult:
    (s_got, s_ref), (d_got, d_ref) = sample, density
    outputs = [output_stats(f"sample.{k}", s_got[k], s_ref[k], atol, rtol) for k in ("x",)]
    outputs += [output_stats(f"density.{k}", d_got[k], d_ref[k], max(atol, 1e-3), rtol) for k in ("z", "log_prob")]
    bpd_delta = abs(
        float(np.mean(d_got["bits_per_dim"], dtype=np.float64) - np.mean(d_ref["bits_per_dim"], dtype=np.float64))
    )
    metrics = {
        "sample_max_abs": next(o.max_abs for o in outputs if o.name == "sample.x"),
        "log_prob_max_abs": next(o.max_abs for o in outputs if o.name == "density.log_prob"),
        "bits_per_dim_delta": bpd_delta,
        "bits_per_dim_backend": float(np.mean(d_got["bits_per_dim"], dtype=np.float64)),
        "bits_per_dim_reference": float(np.mean(d_ref["bits_per_dim"], dtype=np.float64)),
        "residual_max": float(np.max(s_got["residual"], initial=0.0)),
        "nonfinite": int(
            sum(np.size(v) - np.count_nonzero(np.isfinite(v)) for v in (*s_got.values(), *d_got.values()))
        ),
    }
    if "min_pivot" in d_got:
        metrics["min_pivot"] = float(np.min(d_got["min_pivot"]))
    metrics.update(extra or {})
    limits = limits_for(precision)
    failures = [
        f"{k} = {metrics[k]:.3g} > {limit:g}" for k, limit in limits.items() if k in metrics and metrics[k] > limit
    ]
    if precision == "fp32":  # per-output tolerances bind at fp32 only (docs/guarantees.md §5)
        failures += [f"{o.name} needs atol {o.atol_needed:.3g}" for o in outputs if not o.passed]
    if metrics["nonfinite"]:
        failures.append(f"{metrics['nonfinite']} non-finite outputs")
    status = "unverified" if unverified is not None else ("failed" if failures else "passed")
    if unverified is not None:
        failures.insert(0, unverified)
    return ParityResult(
        passed=status == "passed",
        against=against,
        backend=backend,
        n=int(np.shape(s_got["x"])[0]),
        metrics=metrics,
        outputs=outputs,
        failures=failures,
        precision=precision,
        limits=limits,
        status=status,
        note=note,
    )


def load_golden(artifact: Artifact) -> dict[str, np.ndarray]:
    path = artifact.verify_file("golden.npz")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except (ValueError, OSError) as exc:
        raise BadInput(f"{path} cannot be read ({exc.__class__.__name__}); re-export") from None


def compare_golden(artifact: Artifact, backend: Backend, atol: float = 1e-4, rtol: float = 1e-4) -> ParityResult:
    """Backend vs the PyTorch outputs stored at export time (no PyTorch needed)."""
    golden = load_golden(artifact)
    probes = golden.get("in_probes")
    temperature = float(golden["in_temperature"][0])
    s_got = backend.sample(golden["in_z"], temperature)
    chunk = safe_chunk(artifact)
    d_got = run_chunked(backend.density, {"x": golden["in_x"], "probes": probes}, chunk)
    s_ref = {k[len("sample_") :]: v for k, v in golden.items() if k.startswith("sample_")}
    d_ref = {k[len("density_") :]: v for k, v in golden.items() if k.startswith("density_")}
    z = golden["in_z"] * np.float32(temperature)  # the latents the samples came from
    extra = roundtrips(backend, golden["in_x"], z, d_got["z"], s_got["x"], probes, chunk)
    return _judge(
        "golden", backend.name, (s_got, s_ref), (d_got, d_ref), atol, rtol, extra, *_precision_args(artifact, backend)
    )


def roundtrips(
    backend: Backend,
    x: np.ndarray,
    z: np.ndarray,
    z_of_x: np.ndarray,
    x_of_z: np.ndarray,
    probes: np.ndarray | None,
    chunk: int,
) -> dict[str, float]:
    """Round trips through one backend: data -> z -> data (max-abs, data space) and z -> x -> z (relative to ||z||)."""
    back = run_chunked(backend.sample, {"z": z_of_x}, chunk)["x"]
    z_back = run_chunked(backend.density, {"x": x_of_z, "probes": probes}, chunk)["z"]
    rel = np.linalg.norm(z_back - z, axis=1) / np.linalg.norm(z, axis=1)
    return {
        "roundtrip_max_abs": float(np.abs(back.astype(np.float64) - x).max()),
        "roundtrip_latent_max_rel": float(rel.max()),
    }


def _precision_args(artifact: Artifact, backend: Backend) -> tuple[str, str | None, str | None]:
    """``(precision, unverified reason, note)`` for :func:`_judge`."""
    precision = artifact.manifest.get("precision", "fp32")
    return precision, unverified_reason(artifact, backend), backend.precision_note


def check_inputs(artifact: Artifact, n: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded latents, data (golden x tiled with fresh dequantisation when n is larger) and probes."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, artifact.dim)).astype(np.float32)
    x = data_batch(artifact, n, seed)
    inputs = {"z": z, "x": x}
    if artifact.logdet_mode == "series":
        inputs["probes"] = (rng.integers(0, 2, (n, artifact.n_probes, artifact.dim)) * 2 - 1).astype(np.float32)
    return inputs


def data_batch(artifact: Artifact, n: int, seed: int) -> np.ndarray:
    """``n`` held-out data points in model space: the preset's test split (digits, toy density), or the
    held-out levels the export stored in ``golden.npz`` when it had no dataset (an imported model's samples)."""
    import torch

    from ..data import to_model_space, training_data

    config = artifact.manifest["config"]
    if artifact.manifest.get("heldout", {}).get("source") in ("model samples", "file"):
        test = load_golden(artifact)["heldout_levels"]
    else:
        _, test = training_data(config, seed=0)
    index = np.arange(n) % len(test)
    generator = torch.Generator().manual_seed(seed)
    return to_model_space(test[index], config, generator).numpy().astype(np.float32)


#: Rows per density call in checks. Both backends score more samples per second at 64 rows than at 256 on
#: the shipped digits model (the tangents' working set stays in cache), and a check holding the PyTorch
#: reference and ONNX Runtime in one process stays under 1 GB at 1024 inputs.
CHECK_CHUNK = 64


def safe_chunk(artifact: Artifact) -> int:
    """Rows per density call: the artifact's largest safe batch, at most :data:`CHECK_CHUNK`."""
    return max(1, min(CHECK_CHUNK, int(artifact.manifest.get("max_safe_batch", CHECK_CHUNK))))


def run_chunked(fn, arrays: dict[str, np.ndarray | None], chunk: int) -> Arrays:
    """Apply ``fn(**batch)`` in chunks along the batch axis and concatenate."""
    n = len(next(v for v in arrays.values() if v is not None))
    parts: list[Arrays] = []
    for start in range(0, n, chunk):
        parts.append(fn(**{k: (None if v is None else v[start : start + chunk]) for k, v in arrays.items()}))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def compare_backends(
    artifact: Artifact,
    backend: Backend,
    reference: Backend,
    n: int,
    seed: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> ParityResult:
    """Backend vs reference on ``n`` seeded inputs, with round trips through the backend."""
    inputs = check_inputs(artifact, n, seed)
    chunk = safe_chunk(artifact)
    results = {}
    for side, runner in (("got", backend), ("ref", reference)):
        s = run_chunked(runner.sample, {"z": inputs["z"]}, chunk)
        d = run_chunked(runner.density, {"x": inputs["x"], "probes": inputs.get("probes")}, chunk)
        results[side] = (s, d)
    (s_got, d_got), (s_ref, d_ref) = results["got"], results["ref"]
    extra = roundtrips(backend, inputs["x"], inputs["z"], d_got["z"], s_got["x"], inputs.get("probes"), chunk)
    sides = (s_got, s_ref), (d_got, d_ref)
    result = _judge(reference.name, backend.name, *sides, atol, rtol, extra, *_precision_args(artifact, backend))
    if result.status == "failed" and hasattr(reference, "density_trace"):
        result.first_divergent_block = first_divergent_block(artifact, reference, inputs)
    return result


#: Relative deviation of a block's output from the reference that counts as divergence, per precision
#: (about 50 unit roundoffs for the half types).
_TRACE_TOLERANCE = {"fp32": 1e-4, "fp16": 2.5e-2, "bf16": 2e-1}


def first_divergent_block(artifact: Artifact, reference: Backend, inputs: dict[str, np.ndarray]) -> str | None:
    """Expose each block's output of ``density.onnx`` and return the first that leaves the reference."""
    import onnx

    from .emulate import emulate_rounding
    from .ort_backend import _ort, session_options

    model = emulate_rounding(onnx.load(str(artifact.graph_path("density"))))  # a copy; fp32 graphs unchanged
    tolerance = _TRACE_TOLERANCE[artifact.manifest.get("precision", "fp32")]
    names = [b["block"] for b in artifact.manifest["blocks"]]
    traced = [f"trace_{i}" for i in range(len(names))]
    for name in traced:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = _ort().InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    n = min(64, len(inputs["x"]))
    feeds = {"x": inputs["x"][:n]}
    if "probes" in inputs:
        feeds["probes"] = inputs["probes"][:n]
    got = session.run(traced, feeds)
    ref = reference.density_trace(
        inputs["x"][:n], inputs.get("probes", None) if "probes" not in inputs else inputs["probes"][:n]
    )
    for name, trace_name, value in zip(names, traced, got, strict=True):
        scale = max(1.0, float(np.abs(ref[trace_name]).max()))
        if not np.all(np.isfinite(value)) or float(np.abs(value - ref[trace_name]).max()) > tolerance * scale:
            return name
    return None
