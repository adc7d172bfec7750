"""ONNX Runtime backend: CPU by default; CUDA and TensorRT execution providers where the build has them.

On the CPU, ``threads`` are spent on batch shards, not inside operators: every node of these graphs is
small (16 x 16 attention tiles, 64-wide GEMMs), so ONNX Runtime's intra-op thread pool costs more in
hand-offs than it wins (on 2 cores, 2 intra-op threads make sampling 1.4x slower at batch 256), while
running the halves of a batch concurrently on single-threaded runs of the same session scales
(sampling 1.7x, density 1.9x faster at batch 256). A sample's outputs do not depend on its shard.
"""

from __future__ import annotations

import os

import numpy as np

from ..artifact import Artifact
from ..errors import BackendUnavailable, BadInput
from .base import Arrays, Backend, shard_pool

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable(
            "onnxruntime is not installed; install acf-deploy[cpu] (or [gpu] for onnxruntime-gpu)"
        ) from None
    return onnxruntime


#: Fewest batch rows worth a shard of their own (below it the hand-off costs more than it saves).
MIN_SHARD_ROWS = 8


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def session_options(threads: int | None = None):
    """Full graph optimisation; intra-op threads default to the cores this process may use."""
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class OrtBackend(Backend):
    """Runs ``sample.onnx`` and ``density.onnx`` with one ONNX Runtime session each.

    On the CPU, ``threads`` (default: every core) single-threaded runs share a batch (module docstring).
    """

    name = "ort"

    def __init__(
        self,
        artifact: Artifact,
        device: str = "cpu",
        threads: int | None = None,
        graphs=("sample", "density"),
        emulate: bool | None = None,
    ):
        """``emulate``: run fp16/bf16 graphs as fp32 graphs with per-op rounding (runtime/emulate.py).

        ``None`` (the default) emulates on the CPU execution provider, which otherwise computes half
        nodes in fp32 (fp16) or has no kernels for them (bf16); the half graph itself is still loaded
        once to find out whether this runtime can run it at all.
        """
        super().__init__(artifact)
        ort = _ort()
        wanted = PROVIDERS.get(device)
        if wanted is None:
            raise BadInput(f"unknown ONNX Runtime device {device!r}; use cpu, cuda or tensorrt")
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise BackendUnavailable(
                f"this onnxruntime build lacks {wanted[0]} (it has {', '.join(available)}); install acf-deploy[gpu]"
            )
        providers = [p for p in wanted if p in available]
        on_cpu = device == "cpu"
        self.workers = (threads or available_cores()) if on_cpu else 1
        self._pool = shard_pool(self.workers)
        options = session_options(1 if on_cpu else threads)
        precision = artifact.manifest.get("precision", "fp32")
        half = precision in ("fp16", "bf16")
        self.emulated = bool(half and (device == "cpu" if emulate is None else emulate))
        self.sessions = {}
        for graph in graphs:
            path = artifact.verify_graph(graph)  # inside the artifact, external data included, hashes checked
            if self.emulated:
                native = _native_failure(ort, path, options, providers)
                if native and not self.unverified_reason:
                    self.unverified_reason = (
                        f"ONNX Runtime {ort.__version__} ({providers[0]}) cannot run the {precision} graph: {native}"
                    )
            try:
                source = _emulated_bytes(path) if self.emulated else str(path)
                self.sessions[graph] = ort.InferenceSession(source, options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                raise BadInput(f"{path} cannot be loaded by ONNX Runtime: {str(exc).splitlines()[0][:160]}") from None
        if self.emulated:
            self.precision_note = (
                f"{precision} rounding after every op emulated in fp32 (the {providers[0]} computes half nodes in "
                "fp32, which would overstate their accuracy)"
            )

    def sample(self, z: np.ndarray, temperature: float = 1.0) -> Arrays:
        batched = {"z": np.ascontiguousarray(z, dtype=np.float32)}
        shared = {"temperature": np.array([temperature], np.float32)}
        return self._run(self.sessions["sample"], ["x", "residual"], batched, shared)

    def density(self, x: np.ndarray, probes: np.ndarray | None = None) -> Arrays:
        feeds = {"x": np.ascontiguousarray(x, dtype=np.float32)}
        if self.artifact.logdet_mode == "series":
            if probes is None:
                raise BadInput("this artifact uses series log-det: pass probes (B, P, D)")
            feeds["probes"] = np.ascontiguousarray(probes, dtype=np.float32)
        session = self.sessions["density"]
        return self._run(session, [o.name for o in session.get_outputs()], feeds, {})

    def _run(self, session, names: list[str], batched: dict[str, np.ndarray], shared: dict[str, np.ndarray]) -> Arrays:
        """``session.run``, split along the batch axis over the worker threads when the batch is large enough."""
        n = len(next(iter(batched.values())))
        shards = min(self.workers, n // MIN_SHARD_ROWS)
        if shards < 2 or self._pool is None:
            return dict(zip(names, session.run(names, {**batched, **shared}), strict=True))
        bounds = np.linspace(0, n, shards + 1).astype(int)

        def run(i: int) -> list[np.ndarray]:
            part = {k: v[bounds[i] : bounds[i + 1]] for k, v in batched.items()}
            return session.run(names, {**part, **shared})

        parts = list(self._pool.map(run, range(shards)))
        return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(names)}

    def close(self) -> None:
        self.sessions.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _emulated_bytes(path) -> bytes:
    import onnx

    from .emulate import emulate_rounding

    return emulate_rounding(onnx.load(str(path))).SerializeToString()


def _native_failure(ort, path, options, providers) -> str | None:
    """``None`` if ONNX Runtime can create a session for the graph as exported, else its first error line."""
    try:
        ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot run it"
        return str(exc).splitlines()[0][:200]
    return None
