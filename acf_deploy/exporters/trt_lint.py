"""CPU-only lint of ONNX graphs against what TensorRT's ONNX parser accepts.

Engines can only be built where a GPU and TensorRT exist, so CI checks every exported graph here
instead: each node (inside ``Loop``/``If``/``Scan`` bodies too) against the onnx-tensorrt operator
matrix (``docs/operators.md``, TensorRT 10.15: opset 9 to 24), plus the rules docs/guarantees.md §6 sets for our
graphs: no ``Det``, no random ops, ``Loop`` only with a constant trip count and shape-preserving
loop-carried values, no float64 anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, helper, numpy_helper

from ..artifact import open_artifact
from ..errors import CheckFailed
from ..onnx_util import constant_tensor, constants, dims, infer_loop_body, infer_shapes, loop_body, same_shape

__all__ = [
    "OPSET_RANGE",
    "SUPPORTED_OPS",
    "UNSUPPORTED_OPS",
    "LintIssue",
    "lint_model",
    "lint_file",
    "lint_artifact",
    "errors",
    "require_clean",
]

# onnx/onnx-tensorrt docs/operators.md for TensorRT 10.15: "supports operators in the inclusive range
# of opset 9 to opset 24".
OPSET_RANGE = (9, 24)

# Operators marked "Y" in that matrix.
SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
    Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
    Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
    Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
    ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
    RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
    Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
    TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

# Operators marked "N": the parser rejects them outright.
UNSUPPORTED_OPS = frozenset(
    """
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor CenterCropPad Col2Im Compress
    ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool
    MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement
    OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty
    SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence
    StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
    """.split()
)

# TensorRT supports them, but randomness must be a graph input (docs/guarantees.md §6), and TensorRT ignores `seed`.
RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)

# Element types TensorRT has no tensors for (DOUBLE is reported separately: it is silently narrowed).
_NO_TRT_TYPE = {
    getattr(TensorProto, name): name
    for name in ("STRING", "COMPLEX64", "COMPLEX128", "UINT16", "UINT32", "UINT64", "INT16")
}

_REDUCE_OPS = frozenset(op for op in SUPPORTED_OPS if op.startswith("Reduce"))
# (input index, what it is, severity) for inputs the parser needs as build-time constants.
_CONSTANT_INPUTS: dict[str, tuple[int, str, str]] = {
    **{op: (1, "axes", "error") for op in _REDUCE_OPS},
    "CumSum": (1, "axis", "error"),
    "OneHot": (1, "depth", "error"),
    "TopK": (1, "K", "error"),
    "Squeeze": (1, "axes", "warning"),
    "Unsqueeze": (1, "axes", "warning"),
}
_TOPK_MAX = 3840
_STANDARD_DOMAINS = ("", "ai.onnx")
_ERROR, _WARNING = "error", "warning"


@dataclass(frozen=True)
class LintIssue:
    """One finding. ``node`` is the node name (or the tensor name for graph-level findings, whose
    ``op_type`` then says which kind: ``input``, ``output``, ``initializer``, ``model``)."""

    node: str
    op_type: str
    graph: str
    severity: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.graph}: {self.op_type} '{self.node}': {self.message}"


class _Scope:
    """Types and constant tensors visible in one graph, chained to its enclosing graphs."""

    def __init__(self, parent: _Scope | None = None):
        self.parent = parent
        self.types: dict[str, TypeProto] = {}
        self.consts: dict[str, TensorProto | None] = {}

    def type_of(self, name: str) -> TypeProto | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.types:
                return scope.types[name]
            scope = scope.parent
        return None

    def is_const(self, name: str) -> bool:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.consts:
                return True
            scope = scope.parent
        return False

    def const_value(self, name: str) -> np.ndarray | None:
        """The constant's value, or None when it is not constant or its data is not loaded."""
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.consts:
                tensor = scope.consts[name]
                if tensor is None or tensor.data_location == TensorProto.EXTERNAL:
                    return None
                return numpy_helper.to_array(tensor)
            scope = scope.parent
        return None

    def all_consts(self) -> dict[str, TensorProto | None]:
        merged = self.parent.all_consts() if self.parent else {}
        merged.update(self.consts)
        return merged

    def all_types(self) -> dict[str, TypeProto]:
        merged = self.parent.all_types() if self.parent else {}
        merged.update(self.types)
        return merged


class _Linter:
    def __init__(self, model: ModelProto):
        self.model = model
        self.issues: list[LintIssue] = []

    def add(self, node: str, op_type: str, graph: str, severity: str, message: str) -> None:
        self.issues.append(LintIssue(node, op_type, graph, severity, message))

    def run(self) -> list[LintIssue]:
        self._check_opsets()
        model = self.model
        if model.functions:
            # onnx-tensorrt expands local functions, so lint what it will see.
            model = onnx.inliner.inline_local_functions(model)
        try:
            model = infer_shapes(model)
        except Exception as exc:  # inference is best effort; the lint still runs
            self.add("", "model", model.graph.name or "main", _WARNING, f"shape inference failed: {exc}")
        self._lint_graph(model.graph, model.graph.name or "main", None)
        return self.issues

    def _check_opsets(self) -> None:
        low, high = OPSET_RANGE
        graph = self.model.graph.name or "main"
        for opset in self.model.opset_import:
            if opset.domain in _STANDARD_DOMAINS and not low <= opset.version <= high:
                self.add(
                    "opset_import",
                    "model",
                    graph,
                    _ERROR,
                    f"ai.onnx opset {opset.version} is outside TensorRT's supported opsets {low}..{high}",
                )

    # -- graphs -------------------------------------------------------------------------------

    def _lint_graph(self, graph: GraphProto, path: str, parent: _Scope | None) -> None:
        scope = _graph_scope(graph, parent)
        for sparse in graph.sparse_initializer:
            self._check_elem_type(sparse.values.name, "initializer", path, sparse.values.data_type)
        for value in graph.input:
            self._check_value_type(value.name, "input", path, value.type)
        for value in graph.output:
            self._check_value_type(value.name, "output", path, value.type)
        for init in graph.initializer:
            self._check_elem_type(init.name, "initializer", path, init.data_type)

        for index, node in enumerate(graph.node):
            self._lint_node(node, node.name or f"<{node.op_type} #{index}>", path, scope)

    def _check_value_type(self, name: str, kind: str, path: str, type_proto: TypeProto) -> None:
        if type_proto.HasField("tensor_type"):
            self._check_elem_type(name, kind, path, type_proto.tensor_type.elem_type)

    def _check_elem_type(self, name: str, kind: str, path: str, elem_type: int) -> None:
        if elem_type == TensorProto.DOUBLE:
            self.add(name, kind, path, _ERROR, "is float64; TensorRT narrows DOUBLE to FLOAT, export float32")
        elif elem_type in _NO_TRT_TYPE:
            self.add(name, kind, path, _ERROR, f"has type {_NO_TRT_TYPE[elem_type]}, which TensorRT lacks")

    # -- nodes --------------------------------------------------------------------------------

    def _lint_node(self, node: NodeProto, label: str, path: str, scope: _Scope) -> None:
        op = node.op_type

        def report(severity: str, message: str) -> None:
            self.add(label, op, path, severity, message)

        if node.domain not in _STANDARD_DOMAINS:
            report(_ERROR, f"custom-domain op '{node.domain}.{op}' needs a TensorRT plugin")
            return
        if op == "Det":
            report(_ERROR, "TensorRT has no Det; export the log-determinant with the unrolled LU")
        elif op in RANDOM_OPS:
            report(_ERROR, "random op in an exported graph; randomness must be a graph input")
        elif op in UNSUPPORTED_OPS:
            report(_ERROR, "not supported by TensorRT's ONNX parser")
        elif op not in SUPPORTED_OPS:
            report(_ERROR, "not in TensorRT's ONNX operator support matrix")

        self._check_float64(node, scope, report)
        for name in node.output:
            type_proto = scope.type_of(name) if name else None
            if type_proto is not None and type_proto.tensor_type.elem_type in _NO_TRT_TYPE:
                kind = _NO_TRT_TYPE[type_proto.tensor_type.elem_type]
                report(_ERROR, f"output '{name}' has type {kind}, which TensorRT lacks")
        self._check_constraints(node, scope, report)

        if op == "Loop":
            self._lint_loop(node, label, path, scope, report)
        for attr in node.attribute:
            if op == "Loop" and attr.name == "body":
                continue
            if attr.type == onnx.AttributeProto.GRAPH:
                self._lint_graph(attr.g, f"{path}/{label}.{attr.name}", scope)
            for i, sub in enumerate(attr.graphs):
                self._lint_graph(sub, f"{path}/{label}.{attr.name}[{i}]", scope)

    def _check_float64(self, node: NodeProto, scope: _Scope, report) -> None:
        """One finding per node that creates float64 data, however many ways it does."""
        reasons = []
        for attr in node.attribute:
            is_int = attr.type == onnx.AttributeProto.INT
            if attr.name in ("to", "dtype") and is_int and attr.i == TensorProto.DOUBLE:
                reasons.append(f"attribute {attr.name}=DOUBLE")
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.DOUBLE:
                reasons.append(f"float64 tensor attribute '{attr.name}'")
        for name in node.output:
            type_proto = scope.type_of(name) if name else None
            if type_proto is not None and type_proto.tensor_type.elem_type == TensorProto.DOUBLE:
                reasons.append(f"float64 output '{name}'")
        if reasons:
            found = ", ".join(reasons)
            report(_ERROR, f"creates float64 data ({found}); TensorRT narrows DOUBLE to FLOAT")

    def _check_constraints(self, node: NodeProto, scope: _Scope, report) -> None:
        """The operator-matrix restrictions that can bite graphs like ours."""
        op = node.op_type
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if op in _CONSTANT_INPUTS:
            index, what, severity = _CONSTANT_INPUTS[op]
            if len(node.input) > index and node.input[index] and not scope.is_const(node.input[index]):
                report(severity, f"input {what} '{node.input[index]}' must be a build-time constant")
        if op == "TopK":
            k = scope.const_value(node.input[1]) if len(node.input) > 1 else None
            if k is not None and int(np.max(k)) >= _TOPK_MAX:
                report(_ERROR, f"K = {int(np.max(k))}, TensorRT needs K < {_TOPK_MAX}")
            if attrs.get("sorted", 1) != 1:
                report(_ERROR, "sorted=0 is not supported")
        elif op == "Dropout" and len(node.input) > 2 and node.input[2]:
            training = scope.const_value(node.input[2])
            if training is None or bool(np.any(training)):
                report(_ERROR, "training_mode must be a constant False")
        elif op == "LayerNormalization" and any(node.output[1:]):
            report(_ERROR, "only the first output Y is supported")
        elif op in ("MaxPool", "AveragePool", "LpPool"):
            if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
                report(_ERROR, "the Indices output is not supported")
            if any(d != 1 for d in attrs.get("dilations", [])):
                report(_ERROR, "dilations other than 1 are not supported")
        elif op == "ScatterND" and attrs.get("reduction", b"none") not in (b"none", "none"):
            report(_ERROR, "reduction other than 'none' is not supported")
        elif op == "Constant" and set(attrs) & {"sparse_value", "value_string", "value_strings"}:
            report(_ERROR, "sparse and string constants are not supported")
        elif op == "Einsum":
            self._check_einsum(node, attrs, scope, report)
        elif op == "If":
            self._check_if(node, attrs, scope, report)

    def _check_einsum(self, node: NodeProto, attrs: dict, scope: _Scope, report) -> None:
        equation = attrs.get("equation", b"")
        equation = equation.decode() if isinstance(equation, bytes) else equation
        if any(not (c.islower() or c in ",->. ") for c in equation):
            report(_ERROR, f"equation '{equation}' uses subscripts other than lower-case letters")
        lhs = equation.split("->")[0].replace(" ", "")
        if "..." in lhs:
            report(_WARNING, "ellipsis in the equation; older TensorRT parsers reject it")
        if any(len(set(term)) != len(term) for term in lhs.replace("...", "").split(",")):
            report(_WARNING, "repeated subscript (diagonal) in one operand; older TensorRT parsers reject it")
        if len(node.input) > 2:
            report(_WARNING, f"{len(node.input)} operands; keep Einsum to one or two for TensorRT")
        for name in node.input:
            type_proto = scope.type_of(name)
            if type_proto is not None and type_proto.tensor_type.elem_type in (
                TensorProto.INT32,
                TensorProto.INT64,
                TensorProto.UINT8,
            ):
                report(_ERROR, f"integer operand '{name}'; TensorRT's Einsum takes floating point only")

    def _check_if(self, node: NodeProto, attrs: dict, scope: _Scope, report) -> None:
        if not scope.is_const(node.input[0]):
            report(_WARNING, "condition is computed at run time: data-dependent control flow")
        then_branch, else_branch = attrs.get("then_branch"), attrs.get("else_branch")
        if then_branch is None or else_branch is None:
            return
        for then_out, else_out in zip(then_branch.output, else_branch.output, strict=False):
            if then_out.name == else_out.name:
                report(_ERROR, f"both branches name their output '{then_out.name}'; TensorRT needs them distinct")
            then_dims, else_dims = dims(then_out.type), dims(else_out.type)
            if then_dims is not None and else_dims is not None and len(then_dims) != len(else_dims):
                report(_ERROR, f"branch outputs '{then_out.name}' and '{else_out.name}' differ in rank")

    # -- loops --------------------------------------------------------------------------------

    def _lint_loop(self, node: NodeProto, label: str, path: str, scope: _Scope, report) -> None:
        trip = node.input[0] if node.input else ""
        cond = node.input[1] if len(node.input) > 1 else ""
        if not trip:
            report(_ERROR, "condition-only Loop (no trip count): data-dependent iteration")
        elif not scope.is_const(trip):
            report(_ERROR, f"trip count '{trip}' is computed at run time; make it an initializer or Constant")
        if cond:
            value = scope.const_value(cond)
            if not scope.is_const(cond):
                report(_ERROR, f"loop condition '{cond}' is computed at run time; use '' or a constant true")
            elif value is None:
                report(_WARNING, f"loop condition '{cond}' is constant but its value is not loaded")
            elif not bool(np.all(value)):
                report(_ERROR, f"loop condition '{cond}' is constant false: the body never runs")

        body = loop_body(node)
        if len(body.input) >= 2 and body.output and not _passes_condition(body):
            report(_ERROR, "loop body computes its own exit condition: data-dependent early exit")

        carried = list(node.input[2:])
        initial_types = [scope.type_of(name) for name in carried]
        inferred = infer_loop_body(self.model, body, initial_types, scope.all_types(), scope.all_consts())
        for i, name in enumerate(carried):
            out = inferred.output[1 + i] if len(inferred.output) > 1 + i else None
            same = same_shape(dims(initial_types[i]), dims(out.type) if out is not None else None)
            shown = f"loop-carried value '{name}' (body output '{out.name if out else '?'}')"
            if same is False:
                before, after = _shape_text(initial_types[i]), _shape_text(out.type)
                report(_ERROR, f"{shown} changes shape {before} -> {after}; TensorRT needs constant shapes")
            elif same is None:
                report(_WARNING, f"{shown}: could not prove its shape stays constant")
        self._lint_graph(inferred, f"{path}/{label}.body", scope)


def _graph_scope(graph: GraphProto, parent: _Scope | None) -> _Scope:
    scope = _Scope(parent)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        scope.types[value.name] = value.type
    for init in graph.initializer:
        scope.types.setdefault(init.name, helper.make_tensor_type_proto(init.data_type, list(init.dims)))
    scope.consts.update(constants(graph))
    for sparse in graph.sparse_initializer:
        scope.consts[sparse.values.name] = None
    return scope


def _passes_condition(body: GraphProto) -> bool:
    """True when the body's condition output is its condition input (through Identity) or constant true."""
    producers = {out: n for n in body.node for out in n.output}
    initializers = {t.name: t for t in body.initializer}
    name, cond_in = body.output[0].name, body.input[1].name
    while True:
        if name == cond_in:
            return True
        if name in initializers:
            return bool(np.all(numpy_helper.to_array(initializers[name])))
        producer = producers.get(name)
        if producer is None:
            return False
        if producer.op_type == "Identity":
            name = producer.input[0]
            continue
        if producer.op_type == "Constant":
            tensor = constant_tensor(producer)
            return tensor is not None and bool(np.all(numpy_helper.to_array(tensor)))
        return False


def _shape_text(type_proto: TypeProto | None) -> str:
    shape = dims(type_proto)
    return "?" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def lint_model(model: ModelProto) -> list[LintIssue]:
    """Lint a model (and every subgraph) for TensorRT; an empty list, or no errors, means it should parse."""
    return _Linter(model).run()


def lint_file(path: str | os.PathLike) -> list[LintIssue]:
    """Lint an ONNX file without loading its external data (only types and shapes are needed)."""
    return lint_model(onnx.load(os.fspath(path), load_external_data=False))


def lint_artifact(artifact_dir: str | os.PathLike) -> dict[str, list[LintIssue]]:
    """Lint every graph of an artifact (hash-verified first), keyed by graph name."""
    artifact = open_artifact(Path(artifact_dir))
    return {graph: lint_file(artifact.graph_path(graph)) for graph in artifact.manifest["graphs"]}


def errors(issues: Iterable[LintIssue]) -> Iterator[LintIssue]:
    return (issue for issue in issues if issue.severity == _ERROR)


def require_clean(report: dict[str, list[LintIssue]]) -> None:
    """Raise CheckFailed (exit 1) listing every error in a :func:`lint_artifact` report."""
    lines = [f"{graph}: {issue}" for graph, issues in report.items() for issue in errors(issues)]
    if lines:
        raise CheckFailed(f"TensorRT lint found {len(lines)} error(s):\n" + "\n".join(lines))
