"""A fake ``tensorrt`` module, to test the TensorRT code paths without a GPU.

The fake mirrors only the API surface acf-deploy uses (``tests/test_trt_api_surface.py`` checks those
names against NVIDIA's real surface, so the fake cannot invent any). Its parser reads the ONNX with
``onnx``, rejects ops TensorRT lacks node by node, and its engines run the graph with ONNX Runtime,
reading inputs from and writing outputs to the bound addresses, so binding by address is exercised
with CPU torch tensors. The graphs it is tested on come from ``toy_artifact.py``.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from acf_deploy.exporters.trt_lint import UNSUPPORTED_OPS

_FAKE_MAGIC = b"FAKE-TRT-PLAN\n"


# -- the fake tensorrt module -------------------------------------------------------------------


class _Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = _Severity
    INTERNAL_ERROR = _Severity.INTERNAL_ERROR
    ERROR = _Severity.ERROR
    WARNING = _Severity.WARNING
    INFO = _Severity.INFO
    VERBOSE = _Severity.VERBOSE

    def __init__(self) -> None:
        pass

    def log(self, severity: _Severity, msg: str) -> None:
        raise NotImplementedError


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    BF16 = 7
    INT64 = 8


_ONNX_TO_TRT = {
    TensorProto.FLOAT: DataType.FLOAT,
    TensorProto.FLOAT16: DataType.HALF,
    TensorProto.BFLOAT16: DataType.BF16,
    TensorProto.INT32: DataType.INT32,
    TensorProto.INT64: DataType.INT64,
    TensorProto.BOOL: DataType.BOOL,
}
_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32, DataType.INT64: np.int64}


class _Tensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType):
        self.name, self.shape, self.dtype = name, shape, dtype


class _Layer:
    def __init__(self, outputs: list[_Tensor]):
        self._outputs = outputs
        self.num_outputs = len(outputs)

    def get_output(self, index: int) -> _Tensor:
        return self._outputs[index]


class _Network:
    def __init__(self, flags: int):
        self.flags = flags
        self.inputs: list[_Tensor] = []
        self.layers: list[_Layer] = []
        self.model: onnx.ModelProto | None = None

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> _Tensor:
        return self.inputs[index]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, index: int) -> _Layer:
        return self.layers[index]


class _ParserError:
    def __init__(self, node: int, name: str, op: str, desc: str):
        self._node, self._name, self._op, self._desc = node, name, op, desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._op

    def desc(self) -> str:
        return self._desc


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes += _all_nodes(attr.g)
    return nodes


class OnnxParser:
    def __init__(self, network: _Network, logger: ILogger):
        self.network, self.logger = network, logger
        self.errors: list[_ParserError] = []

    def parse_from_file(self, model: str) -> bool:
        proto = onnx.load(model)  # resolves external data relative to the file, as TensorRT does
        for index, node in enumerate(proto.graph.node):
            if node.op_type in UNSUPPORTED_OPS:
                desc = f"No importer registered for op: {node.op_type}"
                self.errors.append(_ParserError(index, node.name, node.op_type, desc))
        if self.errors:
            return False
        inferred = onnx.shape_inference.infer_shapes(proto)
        types = {
            v.name: v.type.tensor_type.elem_type
            for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
        }
        for node in _all_nodes(inferred.graph):
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    types.update((v.name, v.type.tensor_type.elem_type) for v in attr.g.value_info)
        for value in proto.graph.input:
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
            self.network.inputs.append(_Tensor(value.name, dims, _ONNX_TO_TRT[value.type.tensor_type.elem_type]))
        for node in _all_nodes(inferred.graph):
            dtype = DataType.FLOAT
            if node.op_type == "Cast":
                dtype = _ONNX_TO_TRT.get(helper.get_attribute_value(node.attribute[0]), DataType.FLOAT)
            elif node.output and node.output[0] in types:
                dtype = _ONNX_TO_TRT.get(types[node.output[0]], DataType.FLOAT)
            self.network.layers.append(_Layer([_Tensor(node.output[0], (), dtype)]))
        self.network.model = proto
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> _ParserError:
        return self.errors[index]


class _HostMemory(bytes):
    @property
    def nbytes(self) -> int:
        return len(self)


class _TimingCache:
    def __init__(self, entries: int):
        self.entries = entries

    def serialize(self) -> _HostMemory:
        return _HostMemory(json.dumps({"entries": self.entries}).encode())


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's names
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))


class _Config:
    def __init__(self) -> None:
        self.pools: dict[MemoryPoolType, int] = {}
        self.profiles: list[_Profile] = []
        self.cache: _TimingCache | None = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self.pools[pool] = pool_size

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> _TimingCache:
        data = bytes(serialized_timing_cache)
        return _TimingCache(json.loads(data)["entries"] if data else 0)

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache:
        assert self.cache is not None
        return self.cache


class _Context:
    def __init__(self, engine: _Engine):
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        static = self.engine.shapes[name]
        low, _, high = self.engine.profile.get(name, (static, static, static))
        if len(shape) != len(low) or not all(a <= s <= b for a, s, b in zip(low, shape, high, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        batch = next(iter(s[0] for n, s in self.shapes.items() if self.engine.shapes[n][0] < 0), -1)
        return tuple(batch if d < 0 else d for d in self.engine.shapes[name])

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        """Read inputs from their addresses, run ONNX Runtime, write outputs to their addresses."""
        state = self.engine.state
        state.executions.append({"stream": stream_handle, "shapes": dict(self.shapes)})
        feeds = {}
        for name in self.engine.input_names:
            array = np.empty(self.shapes[name], _NP[self.engine.dtypes[name]])
            ctypes.memmove(array.ctypes.data, self.addresses[name], array.nbytes)
            feeds[name] = array
        results = self.engine.session().run(self.engine.output_names, feeds)
        for name, result in zip(self.engine.output_names, results, strict=True):
            result = np.ascontiguousarray(result, _NP[self.engine.dtypes[name]])
            assert result.shape == self.get_tensor_shape(name), (name, result.shape)
            ctypes.memmove(self.addresses[name], result.ctypes.data, result.nbytes)
        return True


class _Engine:
    def __init__(self, header: dict[str, Any], onnx_bytes: bytes, state: FakeState):
        self.state = state
        self.input_names: list[str] = header["inputs"]
        self.output_names: list[str] = header["outputs"]
        self.shapes = {n: tuple(s) for n, s in header["shapes"].items()}
        self.dtypes = {n: DataType[d] for n, d in header["dtypes"].items()}
        self.profile = {n: tuple(tuple(s) for s in p) for n, p in header["profile"].items()}
        self._onnx = onnx_bytes
        self._session = None

    def session(self) -> Any:
        import onnxruntime

        if self._session is None:
            self._session = onnxruntime.InferenceSession(self._onnx, providers=["CPUExecutionProvider"])
        return self._session

    @property
    def num_io_tensors(self) -> int:
        return len(self.input_names) + len(self.output_names)

    def get_tensor_name(self, index: int) -> str:
        return [*self.input_names, *self.output_names][index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in self.input_names else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.dtypes[name]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        assert profile_index == 0
        return list(self.profile[name])

    def create_execution_context(self) -> _Context:
        return _Context(self)


class FakeState:
    """What the fake saw: builds (network flags, profile, workspace, cache), executions."""

    def __init__(self, builder_error: str | None):
        self.builder_error = builder_error
        self.builds: list[dict[str, Any]] = []
        self.executions: list[dict[str, Any]] = []
        self.deserialized = 0


def _shape_of(value: onnx.ValueInfoProto) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)


def make_fake_tensorrt(version: str = "10.13.0.35", builder_error: str | None = None) -> types.ModuleType:
    """A fresh fake ``tensorrt`` module; ``builder_error`` makes ``Builder()`` fail like a GPU-less host."""
    state = FakeState(builder_error)
    module = types.ModuleType("tensorrt")

    class Builder:
        def __init__(self, logger: ILogger):
            if state.builder_error:
                logger.log(ILogger.ERROR, state.builder_error)
                raise TypeError("pybind11::init(): factory function returned nullptr")
            self.logger = logger

        def create_network(self, flags: int = 0) -> _Network:
            return _Network(flags)

        def create_builder_config(self) -> _Config:
            return _Config()

        def create_optimization_profile(self) -> _Profile:
            return _Profile()

        def build_serialized_network(self, network: _Network, config: _Config) -> _HostMemory | None:
            assert network.model is not None
            profile = config.profiles[0].shapes if config.profiles else {}
            for tensor in network.inputs:
                if tensor.name not in profile and -1 in tensor.shape:
                    self.logger.log(ILogger.ERROR, f"no optimization profile for dynamic input {tensor.name}")
                    return None
            cache = config.get_timing_cache()
            state.builds.append(
                {
                    "flags": network.flags,
                    "profile": profile,
                    "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
                    "cache_entries_in": cache.entries,
                    "graph": network.model.graph.name,
                }
            )
            cache.entries += 1
            graph = network.model.graph
            header = {
                "inputs": [v.name for v in graph.input],
                "outputs": [v.name for v in graph.output],
                "shapes": {v.name: _shape_of(v) for v in [*graph.input, *graph.output]},
                "dtypes": {
                    v.name: _ONNX_TO_TRT[v.type.tensor_type.elem_type].name for v in [*graph.input, *graph.output]
                },
                "profile": profile,
            }
            return _HostMemory(_FAKE_MAGIC + json.dumps(header).encode() + b"\n" + network.model.SerializeToString())

    class Runtime:
        def __init__(self, logger: ILogger):
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> _Engine | None:
            data = bytes(serialized_engine)
            if not data.startswith(_FAKE_MAGIC):
                self.logger.log(ILogger.ERROR, "Serialization assertion failed: magic tag mismatch")
                return None
            header, onnx_bytes = data[len(_FAKE_MAGIC) :].split(b"\n", 1)
            state.deserialized += 1
            return _Engine(json.loads(header), onnx_bytes, state)

    module.__version__ = version
    module.ILogger = ILogger
    module.Builder = Builder
    module.Runtime = Runtime
    module.OnnxParser = OnnxParser
    module.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    module.MemoryPoolType = MemoryPoolType
    module.TensorIOMode = TensorIOMode
    module.DataType = DataType
    module.state = state
    return module
