r"""Side-by-side benchmarks of the exported graphs against eager PyTorch.

Every (graph, batch) cell feeds the *same* seeded inputs to every backend and times them
round-robin (one call of each backend per round), so that load from other processes hits all
of them alike. Per cell and backend it reports median and p90 wall-clock latency, the median
process CPU time, samples/s, the speed-up over eager PyTorch measured in the same rounds, and the
graph's achieved FLOP/s as a fraction of this machine's fp32 matmul peak.

* **FLOPs** are counted from the ONNX graph itself (:func:`graph_flops`): ``2 m n k`` per MatMul /
  Gemm, ``2 * outputs * (C_in / groups) * kernel`` per Conv, one per output element of element-wise
  ops and per input element of reductions, a few per element of Softmax; ``Loop`` bodies count
  ``trip_count`` times. Shapes come from ONNX shape inference at the benchmarked batch.
* **Peak** (:func:`matmul_peak`): the best of repeated 1024^3 fp32 matmuls in PyTorch (and numpy when
  its BLAS threads can be limited) on the same number of threads.
* **Baselines**: ``torch`` is :class:`~acf_deploy.runtime.torch_backend.TorchBackend` (the same baked
  module, same iteration counts, ``inference_mode``, same threads). ``resflow`` is the Residual-Flows
  way (:class:`ResFlowBaseline`): eager PyTorch iterating every block until a tolerance is met.
* **Peers** (:data:`PEERS`), what a user might run instead: ``torch-compile`` (the same baked module under
  ``torch.compile``) and OpenVINO on the same ONNX graphs (``openvino``: dynamic batch as exported;
  ``openvino-static``: reshaped to each benched batch). Compilation happens in :meth:`Backend.prepare` before
  a cell's rounds and is reported as ``compile_s``, never inside the medians. A peer that cannot run here
  is listed under ``unavailable`` with its one-line reason and the rest of the benchmark goes on.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import GraphProto, numpy_helper

from ..artifact import Artifact
from ..errors import BackendUnavailable, BadInput
from ..onnx_util import BATCH, dims, infer_shapes, loop_body, value_types
from .base import Arrays, Backend
from .ort_backend import available_cores

__all__ = [
    "PEERS",
    "BenchOptions",
    "ResFlowBaseline",
    "graph_flops",
    "machine_info",
    "matmul_peak",
    "resflow_tolerance",
    "run_bench",
    "summarize",
    "time_round_robin",
]

WHAT = ("sample", "density")
RESFLOW = "resflow"
#: Optional peers: skipped with a reason, not an error, where they cannot run.
PEERS = ("torch-compile", "openvino", "openvino-static")
RESFLOW_TOLS = tuple(10.0 ** (-k / 2) for k in range(4, 17))  # 1e-2 .. 1e-8 in half decades
RESFLOW_SLACK = 1.5  # "same round-trip error": at most this factor above ours


@dataclass
class BenchOptions:
    backends: Sequence[str] = ("torch", "ort")
    batches: Sequence[int] = (1, 64, 256)
    what: Sequence[str] = WHAT
    repeats: int = 20
    warmup: int = 3
    threads: int | None = None  # None: every core this process may use
    seed: int = 0
    max_seconds: float = 20.0  # per cell: stop repeating after this long (at least min_repeats rounds)
    min_repeats: int = 3
    resflow_tol: float | None = None  # None: the loosest tolerance matching our round trip
    flops: bool = True


# --------------------------------------------------------------------------- machine
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_peak(threads: int, n: int = 1024, repeats: int = 10) -> dict[str, float]:
    """Measured fp32 matmul peak in GFLOP/s on ``threads`` threads: the best of ``repeats`` ``n^3`` products."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        for _ in range(3):
            torch.mm(a, b, out=out)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
        result = {"torch_gflops": 2 * n**3 / best / 1e9}
    finally:
        torch.set_num_threads(previous)
    result.update(_numpy_peak(threads, n, repeats))
    result["gflops"] = max(result.values())
    return result


def _numpy_peak(threads: int, n: int, repeats: int) -> dict[str, float]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return {}
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    with threadpool_limits(limits=threads):
        for _ in range(2):
            a @ b
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    return {"numpy_gflops": 2 * n**3 / best / 1e9}


def machine_info(threads: int) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cores_available": available_cores(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
        "onnx": onnx.__version__,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    from .openvino_backend import openvino_version

    info["openvino"] = openvino_version()
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------- FLOPs
_ELEMENTWISE = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Sqrt",
    "Exp",
    "Log",
    "Sigmoid",
    "Tanh",
    "Relu",
    "Neg",
    "Abs",
    "Max",
    "Min",
    "Where",
    "Reciprocal",
    "Erf",
    "Softplus",
    "Clip",
    "Equal",
    "Greater",
    "Less",
}
_REDUCTIONS = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"}
_SOFTMAX = {"Softmax": 5, "LogSoftmax": 5}


def _shape(types: dict[str, onnx.TypeProto], name: str, batch: int) -> list[int] | None:
    """The concrete shape of ``name`` at ``batch``, or None when a dimension is unknown."""
    shape = dims(types.get(name))
    if shape is None or not all(isinstance(d, int) or d == BATCH for d in shape):
        return None
    return [batch if d == BATCH else d for d in shape]


def _constant_int(graph: GraphProto, name: str) -> int | None:
    for init in graph.initializer:
        if init.name == name:
            return int(numpy_helper.to_array(init).reshape(-1)[0])
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return int(numpy_helper.to_array(attr.t).reshape(-1)[0])
    return None


def _node_flops(node: onnx.NodeProto, types: dict[str, onnx.TypeProto], batch: int) -> float | None:
    op = node.op_type
    out = _shape(types, node.output[0], batch) if node.output else None
    if op in ("MatMul", "FusedMatMul"):
        a = _shape(types, node.input[0], batch)
        if out is None or a is None:
            return None
        return 2.0 * math.prod(out) * a[-1]
    if op == "Gemm":
        a = _shape(types, node.input[0], batch)
        if out is None or a is None:
            return None
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        k = a[0] if trans_a else a[-1]
        return 2.0 * math.prod(out) * k + (math.prod(out) if len(node.input) > 2 else 0)
    if op in ("Conv", "ConvTranspose"):
        w = _shape(types, node.input[1], batch)
        if out is None or w is None:
            return None
        per_output = math.prod(w[1:])  # (C_in / groups) * kernel
        return 2.0 * math.prod(out) * per_output + (math.prod(out) if len(node.input) > 2 else 0)
    if op in _ELEMENTWISE:
        return None if out is None else float(math.prod(out))
    if op in _REDUCTIONS:
        x = _shape(types, node.input[0], batch)
        return None if x is None else float(math.prod(x)) * (2 if op in ("ReduceL2", "ReduceSumSquare") else 1)
    if op in _SOFTMAX:
        return None if out is None else float(_SOFTMAX[op] * math.prod(out))
    return 0.0  # data movement (Reshape, Transpose, Gather, Concat, ...) and shape ops


def _graph_flops(
    graph: GraphProto,
    types_outer: dict[str, onnx.TypeProto],
    batch: int,
    by_op: dict[str, float],
    unknown: list[str],
    scale: float,
) -> float:
    types = value_types(graph, types_outer)
    total = 0.0
    for node in graph.node:
        if node.op_type == "Loop":
            trips = _constant_int(graph, node.input[0]) if node.input[0] else None
            if trips is None:
                unknown.append(f"{node.name} (Loop without a constant trip count)")
                trips = 1
            total += _graph_flops(loop_body(node), types, batch, by_op, unknown, scale * trips)
            continue
        flops = _node_flops(node, types, batch)
        if flops is None:
            unknown.append(f"{node.name or node.output[0]} ({node.op_type})")
            continue
        if flops:
            by_op[node.op_type] = by_op.get(node.op_type, 0.0) + flops * scale
            total += flops * scale
    return total


def graph_flops(model: onnx.ModelProto | str, batch: int) -> dict[str, Any]:
    """FLOPs of one run of an ONNX graph at ``batch``: total, per op type, and nodes whose shape is unknown.

    Shapes come from the Loop-aware inference of :mod:`acf_deploy.onnx_util`; the exporter has already
    made every Reshape target a constant (``exporters/optimize.py``), so the shapes are known.
    """
    return _count_flops(model if isinstance(model, onnx.ModelProto) else onnx.load(str(model)), batch)


def _count_flops(model: onnx.ModelProto, batch: int) -> dict[str, Any]:
    inferred = infer_shapes(model, batch=batch)
    by_op: dict[str, float] = {}
    unknown: list[str] = []
    total = _graph_flops(inferred.graph, {}, batch, by_op, unknown, 1.0)
    return {
        "flops": total,
        "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "unknown_nodes": len(unknown),
        "unknown_examples": unknown[:5],
    }


# --------------------------------------------------------------------------- Residual-Flows baseline
class ResFlowBaseline(Backend):
    """The Residual-Flows way of sampling, :meth:`Flow.adaptive_inverse <acf_deploy.flows.flow.Flow.adaptive_inverse>`:
    eager PyTorch iterating each block until an element-wise tolerance is met.

    ``tol`` defaults to the loosest value whose round trip is as accurate as the exported sampler's
    (:func:`resflow_tolerance`).
    """

    name = RESFLOW

    def __init__(self, artifact: Artifact, threads: int | None = None, tol: float | None = None):
        super().__init__(artifact)
        from .torch_backend import TorchBackend

        self.reference = TorchBackend(artifact, threads=threads)
        self.flow = self.reference.flow
        self.search: dict[str, Any] | None = None
        if tol is None:
            self.search = resflow_tolerance(self.flow, self.reference.counts)
            tol = self.search["tol"]
        self.tol = float(tol)
        self.last_iterations: list[int] = []

    def sample(self, z: np.ndarray, temperature: float = 1.0) -> Arrays:
        import torch

        with torch.inference_mode():
            h = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)) * temperature
            x, iterations = self.flow.adaptive_inverse(h, self.tol)
        self.last_iterations = iterations
        return {"x": x.numpy(), "residual": np.zeros(len(z), dtype=np.float32)}

    def density(self, x: np.ndarray, probes: np.ndarray | None = None) -> Arrays:
        raise BadInput("the resflow baseline only samples; density is the same forward pass as torch")

    def close(self) -> None:
        self.reference.close()


def resflow_tolerance(
    flow, counts: Sequence[int], n: int = 256, seed: int = 0, slack: float = RESFLOW_SLACK
) -> dict[str, Any]:
    """The loosest tolerance (half-decade grid) whose data-space round trip is at most ``slack`` times
    the exported sampler's (the one with ``counts``).

    The round trip is the one ``check`` judges (docs/guarantees.md §5), taken on what the sampler produces rather than on a dataset (so no
    data is needed): reference samples ``x = f^-1(z)`` from a long fixed-point schedule, then
    ``max |f^-1(f(x)) - x|`` with each inverse. A latent-space round trip would not do: on digits it is
    dominated by the logit preprocessing (about 1e-4 relative) and hardly sees the inverse's accuracy.
    """
    import torch

    from ..flows.blocks import LogdetSpec

    generator = torch.Generator().manual_seed(seed + 104729)
    z = torch.randn(n, flow.dim, generator=generator)
    with torch.inference_mode():
        x_ref, _ = flow.inverse(z, [2 * c + 10 for c in counts])
        z_ref = flow(x_ref, LogdetSpec(mode="none")).z

        def roundtrip(x: torch.Tensor) -> float:
            return float((x - x_ref).abs().max())

        ours = roundtrip(flow.inverse(z_ref, list(counts))[0])
        tried = []
        chosen = None
        for tol in RESFLOW_TOLS:
            x, evaluations = flow.adaptive_inverse(z_ref, tol)
            error = roundtrip(x)
            tried.append({"tol": tol, "roundtrip": error, "iterations": int(sum(evaluations))})
            if error <= slack * ours:
                chosen = tried[-1]
                break
    if chosen is None:
        chosen = min(tried, key=lambda t: t["roundtrip"])
    return {
        "tol": chosen["tol"],
        "roundtrip": chosen["roundtrip"],
        "roundtrip_kind": "data space, max abs, on model samples",
        "iterations_total": chosen["iterations"],
        "ours_roundtrip": ours,
        "ours_iterations_total": int(sum(counts)),
        "matched": chosen["roundtrip"] <= slack * ours,
        "slack": slack,
        "tried": tried,
    }


# --------------------------------------------------------------------------- the benchmark
def _open(name: str, artifact: Artifact, threads: int, opts: BenchOptions) -> Backend:
    if name == RESFLOW:
        return ResFlowBaseline(artifact, threads=threads, tol=opts.resflow_tol)
    from . import open_backend

    return open_backend(name, artifact, threads=threads)


def _inputs(artifact: Artifact, what: str, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, batch, WHAT.index(what)])
    if what == "sample":
        return {"z": rng.standard_normal((batch, artifact.dim)).astype(np.float32)}
    n_levels = artifact.manifest.get("n_levels")
    shape = (batch, *artifact.data_shape)
    if n_levels:
        x = ((rng.integers(0, n_levels, shape) + rng.random(shape)) / n_levels).astype(np.float32)
    else:
        x = rng.standard_normal(shape).astype(np.float32)
    inputs = {"x": x}
    if artifact.logdet_mode == "series":
        inputs["probes"] = (rng.integers(0, 2, (batch, artifact.n_probes, artifact.dim)) * 2 - 1).astype(np.float32)
    return inputs


def _call(backend: Backend, what: str, inputs: dict[str, np.ndarray], chunk: int) -> Arrays:
    if what == "sample":
        return backend.sample(inputs["z"])
    x, probes = inputs["x"], inputs.get("probes")
    if len(x) <= chunk:
        return backend.density(x, probes)
    parts = [
        backend.density(x[i : i + chunk], None if probes is None else probes[i : i + chunk])
        for i in range(0, len(x), chunk)
    ]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


@dataclass
class _Cell:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    output: np.ndarray | None = None
    iterations: float | None = None


def run_bench(
    artifact: Artifact, opts: BenchOptions | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Benchmark ``artifact`` on every requested backend; returns the report (see module docstring)."""
    opts = opts or BenchOptions()
    say = log or (lambda _m: None)
    _check(opts)
    threads = opts.threads or available_cores()
    names = list(dict.fromkeys(["torch", *opts.backends]))  # eager PyTorch is always the baseline
    counts = [int(b["n_iter"]) for b in artifact.manifest.get("blocks", [])]

    say(f"measuring the fp32 matmul peak on {threads} thread(s)")
    peak = matmul_peak(threads)
    backends: dict[str, Backend] = {}
    unavailable: dict[str, str] = {}
    opened: dict[str, dict[str, Any]] = {}
    try:
        for name in names:
            say(f"opening {name}")
            started = time.perf_counter()
            try:
                backends[name] = _open(name, artifact, threads, opts)
            except BackendUnavailable as exc:
                _skip_peer(name, exc, unavailable, say)
                continue
            opened[name] = {"open_s": time.perf_counter() - started, "compile_s": {}}
        if "torch" in backends:
            from .torch_backend import set_torch_threads

            set_torch_threads(threads)  # other backends may have changed torch's setting
        flops = _flops(artifact, opts) if opts.flops else {}
        results = []
        for what in opts.what:
            for batch in opts.batches:
                runners = {n: b for n, b in backends.items() if what == "sample" or n != RESFLOW}
                say(f"{what} batch {batch}")
                compiled = _prepare(artifact, runners, what, batch, unavailable, say)
                for name in list(runners):
                    if name in unavailable:
                        backends.pop(name).close()
                        del runners[name]
                for name, seconds in compiled.items():
                    opened[name]["compile_s"].setdefault(what, {})[str(batch)] = seconds
                cells = _time_cell(artifact, runners, what, batch, opts)
                results += _rows(cells, what, batch, flops.get(what, {}).get(batch), peak["gflops"], compiled)
        for name, backend in backends.items():
            if getattr(backend, "compile_cache", None):
                opened[name]["compile_cache"] = dict(backend.compile_cache)
    finally:
        for backend in backends.values():
            backend.close()

    report: dict[str, Any] = {
        "machine": {**machine_info(threads), "matmul_peak": peak},
        "artifact": _artifact_summary(artifact, counts),
        "options": {**asdict(opts), "threads": threads, "backends": names},
        "graphs": {
            what: {
                "flops_per_sample": {str(b): v["flops"] / b for b, v in per_batch.items()},
                "flops_by_op": next(iter(per_batch.values()))["by_op"] if per_batch else {},
                "unknown_nodes": max((v["unknown_nodes"] for v in per_batch.values()), default=0),
            }
            for what, per_batch in flops.items()
        },
        "results": results,
        "backends": opened,  # a peer that failed in a later cell keeps its earlier rows and compile times
        "unavailable": unavailable,
    }
    if RESFLOW in backends:
        baseline = backends[RESFLOW]
        assert isinstance(baseline, ResFlowBaseline)
        report["resflow"] = {"tol": baseline.tol, "search": baseline.search}
    return report


def _check(opts: BenchOptions) -> None:
    if not opts.backends:
        raise BadInput("--backends needs at least one backend")
    bad = [w for w in opts.what if w not in WHAT]
    if bad or not opts.what:
        raise BadInput(f"--what takes sample and/or density, not {','.join(bad) or '(nothing)'}")
    if not opts.batches or any(b < 1 for b in opts.batches):
        raise BadInput("--batch needs positive batch sizes, e.g. 1,64,256")
    if opts.repeats < 1 or opts.warmup < 0 or opts.min_repeats < 1:
        raise BadInput("--repeats must be at least 1 and --warmup at least 0")
    if opts.threads is not None and opts.threads < 1:
        raise BadInput("--threads must be at least 1")


def _flops(artifact: Artifact, opts: BenchOptions) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for what in opts.what:
        model = onnx.load(str(artifact.graph_path(what)))
        out[what] = {batch: _count_flops(model, batch) for batch in opts.batches}
    return out


def _skip_peer(name: str, exc: BackendUnavailable, unavailable: dict[str, str], say: Callable[[str], None]) -> None:
    """A peer that cannot run here is recorded in ``unavailable`` and skipped; our own backends fail the bench."""
    if name not in PEERS:
        raise exc
    unavailable[name] = str(exc)
    say(f"{name} unavailable: {exc}")


def _call_sizes(artifact: Artifact, what: str, batch: int) -> list[int]:
    """The batch sizes one call of a cell runs: density goes in chunks of the artifact's largest safe batch."""
    chunk = int(artifact.manifest.get("max_safe_batch", batch)) if what == "density" else batch
    if batch <= chunk:
        return [batch]
    return sorted({chunk} | ({batch % chunk} - {0}), reverse=True)


def _prepare(
    artifact: Artifact,
    runners: dict[str, Backend],
    what: str,
    batch: int,
    unavailable: dict[str, str],
    say: Callable[[str], None],
) -> dict[str, float]:
    """Let every backend compile for this cell's shapes; returns the seconds of those that compiled.

    A peer whose compilation fails here is recorded in ``unavailable`` (and then dropped by the caller).
    """
    seconds: dict[str, float] = {}
    for name, backend in runners.items():
        try:
            spent = [backend.prepare(what, size) for size in _call_sizes(artifact, what, batch)]
        except BackendUnavailable as exc:
            _skip_peer(name, exc, unavailable, say)
            continue
        if any(s is not None for s in spent):
            seconds[name] = float(sum(s for s in spent if s is not None))
            say(f"{name}: {what} batch {batch} compiled in {seconds[name]:.1f} s")
    return seconds


def time_round_robin(
    calls: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    max_seconds: float = math.inf,
    min_repeats: int = 3,
    on_first: Callable[[str, Any], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Time every callable once per round, round after round, after ``warmup`` untimed calls each.

    Returns per name the wall-clock and process CPU seconds of every timed call. Rounds stop after
    ``repeats``, or earlier once ``max_seconds`` have passed and ``min_repeats`` rounds are done.
    ``on_first(name, result)`` sees each callable's result from the first timed round.
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in calls}
    started = time.perf_counter()
    for round_ in range(repeats):
        for name, call in calls.items():
            cpu0, wall0 = time.process_time(), time.perf_counter()
            result = call()
            times[name]["wall"].append(time.perf_counter() - wall0)
            times[name]["cpu"].append(time.process_time() - cpu0)
            if round_ == 0 and on_first is not None:
                on_first(name, result)
        if round_ + 1 >= min_repeats and time.perf_counter() - started > max_seconds:
            break
    return times


def summarize(times: dict[str, list[float]], batch: int) -> dict[str, float]:
    """Median / p90 / min / mean latency (ms), median CPU time (ms) and samples/s of one timing series."""
    wall = np.asarray(times["wall"])
    median = float(np.median(wall))
    return {
        "repeats": int(wall.size),
        "median_ms": 1e3 * median,
        "p90_ms": 1e3 * float(np.percentile(wall, 90)),
        "min_ms": 1e3 * float(wall.min()),
        "mean_ms": 1e3 * float(wall.mean()),
        "cpu_ms": 1e3 * float(np.median(times["cpu"])),
        "samples_per_s": batch / median,
    }


def _time_cell(
    artifact: Artifact, runners: dict[str, Backend], what: str, batch: int, opts: BenchOptions
) -> dict[str, _Cell]:
    inputs = _inputs(artifact, what, batch, opts.seed)
    chunk = int(artifact.manifest.get("max_safe_batch", batch)) if what == "density" else batch
    cells = {name: _Cell() for name in runners}
    key = "x" if what == "sample" else "log_prob"

    def first(name: str, out: Arrays) -> None:
        cells[name].output = np.asarray(out[key], dtype=np.float64)
        backend = runners[name]
        if isinstance(backend, ResFlowBaseline):
            cells[name].iterations = float(sum(backend.last_iterations))
        elif what == "sample":
            cells[name].iterations = float(sum(int(b["n_iter"]) for b in artifact.manifest["blocks"]))

    calls = {name: (lambda b=backend: _call(b, what, inputs, chunk)) for name, backend in runners.items()}
    times = time_round_robin(calls, opts.repeats, opts.warmup, opts.max_seconds, opts.min_repeats, first)
    for name, series in times.items():
        cells[name].wall, cells[name].cpu = series["wall"], series["cpu"]
    return cells


def _rows(
    cells: dict[str, _Cell],
    what: str,
    batch: int,
    flops: dict[str, Any] | None,
    peak_gflops: float,
    compiled: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    torch_cell = cells.get("torch")
    torch_median = float(np.median(torch_cell.wall)) if torch_cell else None
    torch_cpu = float(np.median(torch_cell.cpu)) if torch_cell else None
    rows = []
    for name, cell in cells.items():
        stats = summarize({"wall": cell.wall, "cpu": cell.cpu}, batch)
        median = stats["median_ms"] / 1e3
        row: dict[str, Any] = {
            "backend": name,
            "what": what,
            "batch": batch,
            **stats,
            "speedup_vs_torch": (torch_median / median) if torch_median else None,
            # the same ratio in process CPU time: less sensitive to other load on a shared machine
            "cpu_speedup_vs_torch": (torch_cpu / (stats["cpu_ms"] / 1e3)) if torch_cpu and stats["cpu_ms"] else None,
            "iterations": cell.iterations,
            "gflops_per_s": None,
            "peak_fraction": None,
            "max_abs_diff_vs_torch": None,
            # seconds this backend spent compiling for the cell's shapes before its timed rounds (None: no compiling)
            "compile_s": (compiled or {}).get(name),
        }
        if flops and name != RESFLOW:
            rate = flops["flops"] / median / 1e9
            row["gflops_per_s"] = rate
            row["peak_fraction"] = rate / peak_gflops
        if torch_cell is not None and cell.output is not None and torch_cell.output is not None:
            row["max_abs_diff_vs_torch"] = float(np.nanmax(np.abs(cell.output - torch_cell.output)))
        rows.append(row)
    return rows


def _artifact_summary(artifact: Artifact, counts: list[int]) -> dict[str, Any]:
    m = artifact.manifest
    config = m.get("config", {})
    return {
        "path": str(artifact.root),
        "preset": m.get("preset"),
        "dim": m.get("dim"),
        "precision": m.get("precision", "fp32"),
        "logdet": m.get("logdet", {}),
        "inverse": m.get("inverse", {}),
        "coeff": config.get("coeff"),
        "iterations": {**m.get("iterations", {}), "per_block": counts},
        "nodes": {g: m.get("graphs", {}).get(g, {}).get("nodes") for g in WHAT},
        "max_safe_batch": m.get("max_safe_batch"),
    }
