"""The ``trt`` backend: engines from ``acf-deploy build`` run on torch CUDA tensors.

Engines contain executable code, so only a plan whose sha256 matches the manifest is deserialized.
Buffers are torch CUDA tensors bound by address (no pycuda); ``execute_async_v3`` runs on a torch
stream, and with ``use_cuda_graph`` a repeated input shape replays a captured CUDA graph instead of
re-enqueuing. Batches larger than the profile's maximum are chunked; smaller than its minimum, padded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import trt_util
from ..artifact import Artifact
from ..errors import BackendUnavailable, BadInput, CheckFailed
from ..trt_util import DeviceInfo, TrtLogger
from .base import Arrays, Backend

if TYPE_CHECKING:
    import tensorrt
    import torch

__all__ = ["TrtBackend"]


class _CudaStream:
    """A torch CUDA stream: the raw handle TensorRT enqueues on, and CUDA-graph capture on it."""

    def __init__(self, device: str):
        import torch

        self._torch = torch
        self.stream = torch.cuda.Stream(device)

    @property
    def handle(self) -> int:
        return self.stream.cuda_stream

    @contextmanager
    def active(self) -> Iterator[None]:
        """Make this the current stream, so copies and allocations are ordered with TensorRT's work."""
        with self._torch.cuda.stream(self.stream):
            yield

    def capture(self, launch: Callable[[], None]) -> Callable[[], None]:
        """Capture ``launch`` (already run once, as TensorRT requires) and return the replay."""
        graph = self._torch.cuda.CUDAGraph()
        with self._torch.cuda.graph(graph, stream=self.stream):
            launch()
        return graph.replay


class _Engine:
    """One engine with its execution context, I/O names and dtypes, and batch limits."""

    engine: tensorrt.ICudaEngine
    context: tensorrt.IExecutionContext

    def __init__(
        self,
        trt: ModuleType,
        engine: tensorrt.ICudaEngine,
        stream: _CudaStream,
        device: str,
        logger: TrtLogger,
        max_safe_batch: int | None,
        use_cuda_graph: bool,
    ):
        import torch

        self._torch = torch
        self.logger = logger
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = stream
        self.device = device
        self.use_cuda_graph = use_cuda_graph
        self._graph: tuple[Any, Callable[[], None], dict, dict] | None = None
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        dtypes = _torch_dtypes(trt, torch)
        self.dtypes = {n: dtypes[engine.get_tensor_dtype(n)] for n in names}
        shapes = {n: tuple(engine.get_tensor_shape(n)) for n in self.inputs}
        self.batched = {n for n, shape in shapes.items() if shape and shape[0] < 0}
        profiles = [engine.get_tensor_profile_shape(n, 0) for n in self.batched]
        self.min_batch = max((p[0][0] for p in profiles), default=1)
        self.max_batch = min((p[2][0] for p in profiles), default=1 << 30)
        if max_safe_batch:
            self.max_batch = max(self.min_batch, min(self.max_batch, int(max_safe_batch)))

    def run(self, feeds: Arrays) -> Arrays:
        """Run any batch size: chunks of at most the profile's max batch, concatenated."""
        total = next(len(feeds[n]) for n in self.inputs if n in self.batched)
        parts = []
        for start in range(0, total, self.max_batch):
            stop = min(start + self.max_batch, total)
            chunk = {n: a[start:stop] if n in self.batched else a for n, a in feeds.items()}
            parts.append(self._run_chunk(chunk, stop - start))
        return {n: np.concatenate([p[n] for p in parts]) for n in self.outputs}

    def _run_chunk(self, feeds: Arrays, size: int) -> Arrays:
        if size < self.min_batch:
            pad = self.min_batch - size
            feeds = {
                n: np.concatenate([a, np.repeat(a[:1], pad, axis=0)]) if n in self.batched else a
                for n, a in feeds.items()
            }
        torch = self._torch
        signature = tuple((n, a.shape) for n, a in sorted(feeds.items()))
        with self.stream.active():
            if self._graph is not None and self._graph[0] == signature:
                _, replay, inputs, outputs = self._graph
                for name, array in feeds.items():
                    inputs[name].copy_(torch.from_numpy(np.ascontiguousarray(array)))
                replay()
            else:
                inputs, outputs = self._bind(feeds)
                self._execute()
                if self.use_cuda_graph:
                    self._capture(signature, inputs, outputs)
            host = {n: outputs[n][:size].to("cpu", torch.float32).numpy() for n in self.outputs}
        return host

    def _bind(self, feeds: Arrays) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Copy inputs to the device, set their shapes, allocate outputs, and bind every address."""
        torch = self._torch
        inputs = {
            n: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self.dtypes[n]) for n, a in feeds.items()
        }
        for name, tensor in inputs.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise BadInput(f"shape {tuple(tensor.shape)} of {name!r} is outside the engine's profile")
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise CheckFailed(f"TensorRT could not infer the shape of output {name!r} ({shape})")
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
        for name, tensor in {**inputs, **outputs}.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        return inputs, outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.handle):
            raise CheckFailed(f"TensorRT execute_async_v3 failed: {self.logger.errors() or 'no reason logged'}")

    def _capture(self, signature: Any, inputs: dict, outputs: dict) -> None:
        """Keep one CUDA graph for the latest shapes; engines that cannot be captured (TensorRT refuses
        some, e.g. with host synchronisation) keep running uncaptured."""
        try:
            replay = self.stream.capture(self._execute)
        except (RuntimeError, CheckFailed):
            self.use_cuda_graph = False
            self._graph = None
        else:
            self._graph = (signature, replay, inputs, outputs)


def _torch_dtypes(trt: ModuleType, torch: ModuleType) -> dict[Any, Any]:
    return {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.BOOL: torch.bool,
    }


class TrtBackend(Backend):
    """TensorRT engines for an artifact's ``sample`` and ``density`` graphs on one GPU."""

    name = "trt"
    runtime: tensorrt.Runtime

    def __init__(self, artifact: Artifact, use_cuda_graph: bool = False):
        super().__init__(artifact)
        trt = trt_util.import_tensorrt()
        self.device: DeviceInfo = trt_util.cuda_device()
        self._logger: TrtLogger = trt_util.make_logger(trt)
        self.runtime = trt.Runtime(self._logger)
        self._stream = _CudaStream(self.device.torch_device)
        max_safe = artifact.manifest.get("max_safe_batch")
        self._engines = {
            graph: _Engine(
                trt,
                self._deserialize(trt, graph),
                self._stream,
                self.device.torch_device,
                self._logger,
                max_safe,
                use_cuda_graph,
            )
            for graph in ("sample", "density")
        }

    def _deserialize(self, trt: ModuleType, graph: str) -> tensorrt.ICudaEngine:
        """Deserialize the newest engine for this graph, TensorRT and GPU, after checking its sha256."""
        root = self.artifact.root
        candidates = [
            entry
            for entry in self.artifact.manifest.get("engines", {}).values()
            if entry.get("graph") == graph
            and entry.get("tensorrt") == trt.__version__
            and entry.get("gpu") == self.device.name
            and entry.get("compute_capability") == self.device.compute_capability
        ]
        if not candidates:
            raise BackendUnavailable(
                f"{root} has no {graph} engine for TensorRT {trt.__version__} on {self.device.name}; "
                f"run `acf-deploy build {root}` first"
            )
        entry = candidates[-1]
        path = self.artifact.path(entry["file"])
        if not path.is_file():
            raise BadInput(f"{path} is missing; rebuild it with `acf-deploy build {root}`")
        plan = path.read_bytes()
        expected = self.artifact.manifest["files"].get(entry["file"])
        if expected is None or expected != entry.get("sha256") or hashlib.sha256(plan).hexdigest() != expected:
            raise BadInput(
                f"{path} does not match the sha256 in its manifest; refusing to deserialize it "
                "(engines contain executable code): rebuild with `acf-deploy build`"
            )
        engine = self.runtime.deserialize_cuda_engine(plan)
        if engine is None:
            reason = self._logger.errors() or "no reason logged"
            raise BackendUnavailable(f"TensorRT could not deserialize {path} ({reason}); rebuild it")
        return engine

    def sample(self, z: np.ndarray, temperature: float = 1.0) -> Arrays:
        z = _batch(z, (self.artifact.dim,), "z")
        return self._engines["sample"].run({"z": z, "temperature": np.array([temperature], np.float32)})

    def density(self, x: np.ndarray, probes: np.ndarray | None = None) -> Arrays:
        x = _batch(x, self.artifact.data_shape, "x")
        feeds = {"x": x}
        engine = self._engines["density"]
        if "probes" in engine.inputs:
            if probes is None:
                raise BadInput("this artifact's density uses the series log-det: pass probes (B, P, D)")
            feeds["probes"] = _batch(probes, (self.artifact.n_probes, self.artifact.dim), "probes")
            if len(feeds["probes"]) != len(x):
                raise BadInput(f"probes has batch {len(feeds['probes'])}, x has {len(x)}")
        elif probes is not None:
            raise BadInput("this artifact's density uses the exact log-det and takes no probes")
        return engine.run(feeds)

    def close(self) -> None:
        self._engines = {}


def _batch(array: np.ndarray, tail: tuple[int, ...], name: str) -> np.ndarray:
    """A finite float32 array of shape (B, *tail), B >= 1, or BadInput naming what is wrong."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != 1 + len(tail) or tuple(array.shape[1:]) != tuple(tail) or len(array) == 0:
        raise BadInput(f"{name} must have shape (B, {', '.join(map(str, tail))}) with B >= 1, got {array.shape}")
    if not np.isfinite(array).all():
        raise BadInput(f"{name} contains NaN or infinite values")
    return array
