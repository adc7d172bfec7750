"""OpenVINO backend: the artifact's own ONNX graphs compiled by OpenVINO for the CPU.

OpenVINO reads ONNX directly, so it runs exactly the graphs the ONNX Runtime backend runs, after the same
artifact checks (every file inside the artifact, its sha256 and that of its external data matching the
manifest). Two ways to compile them:

* dynamic (``openvino``): the graph as exported, batch axis left dynamic, compiled once per graph;
* static (``openvino-static``): the graph reshaped to the batch it is called with and compiled for that
  shape on first use (a few per backend are kept), which lets OpenVINO plan memory and kernels for it.

Settings, and why: ``INFERENCE_PRECISION_HINT=f32`` because on CPUs with bf16 or AMX units OpenVINO would
otherwise run an fp32 graph in bf16 without saying so. ``threads`` become as many single-threaded OpenVINO
streams, each running one shard of a large batch, for the reason the ONNX Runtime backend shards (its
module docstring): these graphs' operators are too small for intra-op threads to pay, so the peer gets the
same cores used the same way. Below ``MIN_SHARD_ROWS`` rows per shard a batch runs on one stream.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import numpy as np

from ..artifact import Artifact
from ..errors import BackendUnavailable, BadInput
from .base import Arrays, Backend, shard_pool
from .ort_backend import MIN_SHARD_ROWS, available_cores

#: Statically shaped compilations kept per graph (a job uses one batch size and its remainder).
STATIC_CACHE = 4


def _ov() -> Any:
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable("openvino is not installed; install acf-deploy[openvino]") from None
    return openvino


def openvino_version() -> str | None:
    """The installed OpenVINO version, or None."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


class OpenVinoBackend(Backend):
    """Runs ``sample.onnx`` and ``density.onnx`` with OpenVINO on the CPU (module docstring)."""

    name = "openvino"

    def __init__(
        self,
        artifact: Artifact,
        threads: int | None = None,
        static: bool = False,
        graphs: tuple[str, ...] = ("sample", "density"),
    ):
        super().__init__(artifact)
        ov = _ov()
        self.static = static
        if static:
            self.name = "openvino-static"
        self.workers = threads or available_cores()
        self._pool = shard_pool(self.workers)
        self.core = ov.Core()
        self.config = {
            "INFERENCE_PRECISION_HINT": "f32",
            "NUM_STREAMS": self.workers,
            "INFERENCE_NUM_THREADS": self.workers,  # in all: one per stream
        }
        precision = artifact.manifest.get("precision", "fp32")
        if precision != "fp32":
            self.unverified_reason = (
                f"OpenVINO {ov.get_version()} on the CPU chooses its own precision for {precision} nodes, "
                "so its numbers cannot verify this artifact's"
            )
        self.models: dict[str, Any] = {}
        self.outputs: dict[str, list[str]] = {}
        for graph in graphs:
            path = artifact.verify_graph(graph)  # inside the artifact, external data included, hashes checked
            try:
                self.models[graph] = self.core.read_model(str(path))
            except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own RuntimeError subclasses
                raise BadInput(f"{path} cannot be read by OpenVINO: {_first_line(exc)}") from None
            self.outputs[graph] = [o["name"] for o in artifact.graph_io(graph)["outputs"]]
        self._compiled: dict[str, OrderedDict[int | None, tuple[Any, list[Any]]]] = {g: OrderedDict() for g in graphs}
        if not static:
            for graph in graphs:
                self._compile(graph, None)

    # ------------------------------------------------------------------ compilation
    def _compile(self, graph: str, batch: int | None) -> tuple[Any, list[Any]]:
        """The compiled model for ``batch`` rows (None: the dynamic graph) and an infer request per stream."""
        cache = self._compiled[graph]
        if batch in cache:
            cache.move_to_end(batch)
            return cache[batch]
        model = self.models[graph]
        if batch is not None:
            model = model.clone()
            model.reshape({port.get_any_name(): _with_batch(port.get_partial_shape(), batch) for port in model.inputs})
        try:
            compiled = self.core.compile_model(model, "CPU", self.config)
        except Exception as exc:  # noqa: BLE001 - an op OpenVINO cannot run, or a shape it cannot plan
            raise BackendUnavailable(f"OpenVINO cannot compile the {graph} graph: {_first_line(exc)}") from None
        entry = (compiled, [compiled.create_infer_request() for _ in range(self.workers)])
        cache[batch] = entry
        while len(cache) > STATIC_CACHE:
            cache.popitem(last=False)
        return entry

    def prepare(self, graph: str, batch: int) -> float | None:
        if not self.static:
            return None
        started = time.perf_counter()
        for size in set(np.diff(self._bounds(batch)).tolist()):
            self._compile(graph, size)
        return time.perf_counter() - started

    # ------------------------------------------------------------------ runs
    def sample(self, z: np.ndarray, temperature: float = 1.0) -> Arrays:
        batched = {"z": np.ascontiguousarray(z, dtype=np.float32)}
        return self._run("sample", batched, {"temperature": np.array([temperature], np.float32)})

    def density(self, x: np.ndarray, probes: np.ndarray | None = None) -> Arrays:
        feeds = {"x": np.ascontiguousarray(x, dtype=np.float32)}
        if self.artifact.logdet_mode == "series":
            if probes is None:
                raise BadInput("this artifact uses series log-det: pass probes (B, P, D)")
            feeds["probes"] = np.ascontiguousarray(probes, dtype=np.float32)
        return self._run("density", feeds, {})

    def _bounds(self, n: int) -> np.ndarray:
        """Row bounds of the shards of an ``n``-row batch (one shard below ``MIN_SHARD_ROWS`` rows each)."""
        shards = max(1, min(self.workers, n // MIN_SHARD_ROWS))
        return np.linspace(0, n, shards + 1).astype(int)

    def _run(self, graph: str, batched: dict[str, np.ndarray], shared: dict[str, np.ndarray]) -> Arrays:
        if graph not in self.models:
            raise BadInput(f"this backend was opened without the {graph} graph")
        bounds = self._bounds(len(next(iter(batched.values()))))
        names = self.outputs[graph]

        def run(i: int) -> list[np.ndarray]:
            part = {k: v[bounds[i] : bounds[i + 1]] for k, v in batched.items()}
            compiled, requests = self._compile(graph, int(bounds[i + 1] - bounds[i]) if self.static else None)
            results = requests[i].infer({**part, **shared})  # outputs are copies, safe from the next call
            return [np.asarray(results[compiled.output(name)]) for name in names]

        if len(bounds) == 2 or self._pool is None:
            return dict(zip(names, run(0), strict=True))
        if self.static:  # compile every shard size here, not concurrently in the shards
            for size in set(np.diff(bounds).tolist()):
                self._compile(graph, size)
        parts = list(self._pool.map(run, range(len(bounds) - 1)))
        return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(names)}

    def close(self) -> None:
        for cache in self._compiled.values():
            cache.clear()
        self.models.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _with_batch(shape: Any, batch: int) -> list[int]:
    """``shape`` with its dynamic (batch) dimensions set to ``batch``."""
    return [batch if dim.is_dynamic else dim.get_length() for dim in shape]


def _first_line(exc: BaseException) -> str:
    """The message's first line that says something (OpenVINO's start with the source file that threw)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return ((telling or lines or [type(exc).__name__])[0])[:200]
