"""A fake ``tensorrt`` module and a toy artifact, to test the TensorRT code paths without a GPU.

The fake mirrors only the API surface acf-deploy uses (``tests/test_trt_api_surface.py`` checks those
names against NVIDIA's real surface, so the fake cannot invent any). Its parser reads the ONNX with
``onnx``, rejects ops TensorRT lacks node by node, and its engines run the graph with ONNX Runtime,
reading inputs from and writing outputs to the bound addresses, so binding by address is exercised
with CPU torch tensors.

The toy artifact is a tiny residual flow in data space (1, 2, 2): sampling inverts
``y = x + 0.5 tanh(x)`` with a constant-trip-count ``Loop``; density evaluates it with a one-term
Hutchinson log-det whose probes are graph inputs. ``toy_sample_reference``/``toy_density_reference``
give the same numbers in numpy.
"""

from __future__ import annotations

import ctypes
import enum
import json
import math
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from acf_deploy.exporters.trt_lint import UNSUPPORTED_OPS
from acf_deploy.fileio import sha256_file
from acf_deploy.manifest import FORMAT_VERSION, write_manifest

DIM = 4
DATA_SHAPE = (1, 2, 2)
PROBES = 2
N_ITER = 30
LEVELS = 17
OPSET = 18
_FAKE_MAGIC = b"FAKE-TRT-PLAN\n"


# -- the toy artifact ---------------------------------------------------------------------------


def _const(name: str, value: Any, dtype: Any = np.float32) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _tanh(src: list[str], dst: str, precision: str) -> list[onnx.NodeProto]:
    """tanh in the export precision between fp32 tensors: the explicitly cast graph of docs/guarantees.md §5."""
    if precision == "fp32":
        return [helper.make_node("Tanh", src, [dst], name=f"tanh_{dst}")]
    low = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    return [
        helper.make_node("Cast", src, [f"{dst}_in_low"], to=low, name=f"to_low_{dst}"),
        helper.make_node("Tanh", [f"{dst}_in_low"], [f"{dst}_low"], name=f"tanh_{dst}"),
        helper.make_node("Cast", [f"{dst}_low"], [dst], to=TensorProto.FLOAT, name=f"to_fp32_{dst}"),
    ]


def toy_sample_graph(precision: str = "fp32") -> onnx.ModelProto:
    """z (batch, 4), temperature [1] -> x (batch, 1, 2, 2), residual (batch,)."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            *_tanh(["x_in"], "t", precision),
            helper.make_node("Mul", ["t", "half"], ["g"], name="g"),
            helper.make_node("Sub", ["y", "g"], ["x_out"], name="update"),
        ],
        "fixed_point",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["z", "temperature"], ["y"], name="scale"),
            helper.make_node("Loop", ["n_iter", "", "y"], ["x_flat"], body=body, name="inverse"),
            helper.make_node("Tanh", ["x_flat"], ["t_last"], name="tanh_last"),
            helper.make_node("Mul", ["t_last", "half"], ["g_last"], name="g_last"),
            helper.make_node("Add", ["x_flat", "g_last"], ["y_back"], name="forward"),
            helper.make_node("Sub", ["y_back", "y"], ["diff"], name="diff"),
            helper.make_node("Abs", ["diff"], ["abs_diff"], name="abs"),
            helper.make_node("ReduceMax", ["abs_diff", "axis1"], ["residual"], keepdims=0, name="residual"),
            helper.make_node("Reshape", ["x_flat", "image_shape"], ["x"], name="to_image"),
        ],
        "sample",
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", DIM]),
            helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *DATA_SHAPE]),
            helper.make_tensor_value_info("residual", TensorProto.FLOAT, ["batch"]),
        ],
        initializer=[
            _const("n_iter", N_ITER, np.int64),
            _const("half", 0.5),
            _const("axis1", [1], np.int64),
            _const("image_shape", [-1, *DATA_SHAPE], np.int64),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def toy_density_graph(precision: str = "fp32") -> onnx.ModelProto:
    """x (batch, 1, 2, 2), probes (batch, P, 4) -> z, log_prob, bits_per_dim."""
    log_norm = -0.5 * DIM * math.log(2 * math.pi)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "flat_shape"], ["f"], name="flatten"),
            *_tanh(["f"], "t", precision),
            helper.make_node("Mul", ["t", "half"], ["g"], name="g"),
            helper.make_node("Add", ["f", "g"], ["z"], name="forward"),
            helper.make_node("Mul", ["t", "t"], ["t2"], name="t2"),
            helper.make_node("Sub", ["one", "t2"], ["sech2"], name="sech2"),
            helper.make_node("Mul", ["sech2", "half"], ["jac_diag"], name="jac_diag"),
            helper.make_node("Unsqueeze", ["jac_diag", "axis1"], ["jac_b"], name="jac_b"),
            helper.make_node("Mul", ["probes", "jac_b"], ["jv"], name="jvp"),
            helper.make_node("Mul", ["jv", "probes"], ["vjv"], name="vjv"),
            helper.make_node("ReduceSum", ["vjv", "axis2"], ["per_probe"], keepdims=0, name="trace_terms"),
            helper.make_node("ReduceMean", ["per_probe", "axis1"], ["logdet"], keepdims=0, name="logdet"),
            helper.make_node("Mul", ["z", "z"], ["z2"], name="z2"),
            helper.make_node("ReduceSum", ["z2", "axis1"], ["sq"], keepdims=0, name="sq"),
            helper.make_node("Mul", ["sq", "minus_half"], ["log_gauss"], name="log_gauss"),
            helper.make_node("Add", ["log_gauss", "log_norm"], ["log_pz"], name="log_pz"),
            helper.make_node("Add", ["log_pz", "logdet"], ["log_prob"], name="log_prob"),
            helper.make_node("Sub", ["d_log_k", "log_prob"], ["nats"], name="nats"),
            helper.make_node("Div", ["nats", "d_log_2"], ["bits_per_dim"], name="bpd"),
        ],
        "density",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *DATA_SHAPE]),
            helper.make_tensor_value_info("probes", TensorProto.FLOAT, ["batch", PROBES, DIM]),
        ],
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", DIM]),
            helper.make_tensor_value_info("log_prob", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("bits_per_dim", TensorProto.FLOAT, ["batch"]),
        ],
        initializer=[
            _const("flat_shape", [-1, DIM], np.int64),
            _const("half", 0.5),
            _const("one", 1.0),
            _const("minus_half", -0.5),
            _const("axis1", [1], np.int64),
            _const("axis2", [2], np.int64),
            _const("log_norm", log_norm),
            _const("d_log_k", DIM * math.log(LEVELS)),
            _const("d_log_2", DIM * math.log(2)),
            # Large enough to be written as external data when the artifact asks for it.
            _const("unused_weight", np.zeros((64, 64))),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def toy_sample_reference(z: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    y = z.astype(np.float64) * temperature
    x = y.copy()
    for _ in range(N_ITER):
        x = y - 0.5 * np.tanh(x)
    residual = np.abs(x + 0.5 * np.tanh(x) - y).max(axis=1)
    return {"x": x.reshape(-1, *DATA_SHAPE), "residual": residual}


def toy_density_reference(x: np.ndarray, probes: np.ndarray) -> dict[str, np.ndarray]:
    f = x.reshape(len(x), DIM).astype(np.float64)
    z = f + 0.5 * np.tanh(f)
    jac = 0.5 * (1 - np.tanh(f) ** 2)
    logdet = (probes * jac[:, None, :] * probes).sum(axis=2).mean(axis=1)
    log_prob = -0.5 * (z**2).sum(axis=1) - 0.5 * DIM * math.log(2 * math.pi) + logdet
    bpd = (DIM * math.log(LEVELS) - log_prob) / (DIM * math.log(2))
    return {"z": z, "log_prob": log_prob, "bits_per_dim": bpd}


def _io(graph: onnx.GraphProto) -> dict[str, list[dict[str, Any]]]:
    def spec(values: Any) -> list[dict[str, Any]]:
        return [
            {"name": v.name, "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
            for v in values
        ]

    return {"inputs": spec(graph.input), "outputs": spec(graph.output)}


def write_artifact(
    root: Path,
    sample: onnx.ModelProto | None = None,
    density: onnx.ModelProto | None = None,
    precision: str = "fp32",
    external_data: bool = False,
) -> Path:
    """Write an artifact directory with a manifest hashing every file."""
    root.mkdir(parents=True, exist_ok=True)
    graphs = {
        "sample": sample or toy_sample_graph(precision),
        "density": density or toy_density_graph(precision),
    }
    files = []
    for name, model in graphs.items():
        if external_data and name == "density":
            onnx.save_model(
                model,
                root / f"{name}.onnx",
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=f"{name}.onnx.data",
                size_threshold=1024,
            )
            files.append(f"{name}.onnx.data")
        else:
            onnx.save_model(model, root / f"{name}.onnx")
        files.append(f"{name}.onnx")
    manifest = {
        "format_version": FORMAT_VERSION,
        "graphs": {name: {"file": f"{name}.onnx", **_io(model.graph)} for name, model in graphs.items()},
        "files": {name: sha256_file(root / name) for name in files},
        "data_shape": list(DATA_SHAPE),
        "dim": DIM,
        "logdet": {"mode": "series", "probes": PROBES}
        if any(v.name == "probes" for v in graphs["density"].graph.input)
        else {"mode": "exact"},
        "batch_axis": "batch",
        "precision": precision,
        "preset": "toy-resflow",
        "config": {"preset": "toy-resflow", "data": "moons"},
        "blocks": [],
        "inverse": {"mode": "loop"},
        "iterations": {"exported_total": 0},
    }
    write_manifest(root / "manifest.json", manifest)
    return root


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
