r"""Half-precision arithmetic on a runtime that does not have it: per-op rounding emulation.

ONNX Runtime's CPU execution provider runs a float16 graph, but not in float16: its
``InsertCastTransformer`` moves every fp16 node without a CPU fp16 kernel (on x86, nearly all of
them: Add, Mul, MatMul, Conv, Softmax, ...) to fp32 and then deletes the fp32->fp16->fp32 cast pairs
it created, so intermediate results are never rounded to half (not even overflow to ``inf``
happens). Its outputs are therefore those of fp32 arithmetic on half-rounded weights, and would
overstate the accuracy of the fp16 graph. It has no bfloat16 compute kernels at all.

:func:`emulate_rounding` rewrites an exported fp16/bf16 graph into an fp32 graph that rounds to the
half type after every node that produced a half tensor, with an explicit ``Cast`` pair (these are
kept: ONNX Runtime only folds pairs it inserted itself). That models a half-precision device that
computes each op in fp32 and stores its result in half (what PyTorch's CPU half kernels and, at
worst, TensorRT's unfused fp16 layers do). Ops that only move data are not rounded again.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, TensorProto, helper, numpy_helper

from ..onnx_util import walk_graphs

__all__ = ["HALF_TYPES", "emulate_rounding", "half_type_of"]

HALF_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16)

# Outputs of these ops are bit-for-bit elements of their (already rounded) inputs.
_DATA_MOVEMENT = frozenset(
    """
    Concat DepthToSpace Expand Flatten Gather GatherElements GatherND Identity Loop Max Min ReduceMax ReduceMin
    Reshape Slice SpaceToDepth Split Squeeze Tile Transpose Unsqueeze Where Neg Abs Relu
    """.split()
)


def half_type_of(model: ModelProto) -> int | None:
    """The half element type a graph computes in (``FLOAT16`` or ``BFLOAT16``), or ``None`` for fp32."""
    found: set[int] = set()
    for graph in walk_graphs(model.graph):
        found.update(init.data_type for init in graph.initializer if init.data_type in HALF_TYPES)
        found.update(a.i for node in graph.node for a in node.attribute if a.name == "to" and a.i in HALF_TYPES)
    if len(found) > 1:
        raise ValueError("the graph mixes float16 and bfloat16")
    return found.pop() if found else None


def _to_float(tensor: TensorProto) -> TensorProto:
    array = numpy_helper.to_array(tensor).astype(np.float32)
    return numpy_helper.from_array(array, tensor.name)


def _retype(value: onnx.ValueInfoProto) -> None:
    if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type in HALF_TYPES:
        value.type.tensor_type.elem_type = TensorProto.FLOAT


def _rewrite(graph: GraphProto, types: dict[str, int], half: int, counter: list[int]) -> None:
    for init in graph.initializer:
        if init.data_type in HALF_TYPES:
            init.CopyFrom(_to_float(init))
    for value in (*graph.input, *graph.output):
        _retype(value)
    del graph.value_info[:]
    nodes = []
    for node in graph.node:
        rounded: list[str] = []
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rewrite(attr.g, types, half, counter)
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in HALF_TYPES:
                attr.t.CopyFrom(_to_float(attr.t))
        if node.op_type == "Cast" and any(a.name == "to" and a.i in HALF_TYPES for a in node.attribute):
            rounded = list(node.output)
        elif node.op_type not in _DATA_MOVEMENT and node.op_type not in ("Constant", "ConstantOfShape"):
            rounded = [name for name in node.output if name and types.get(name) in HALF_TYPES]
        pairs = []
        for index, name in enumerate(node.output):
            if name in rounded:
                counter[0] += 1
                raw, half_name = f"{name}__fp32_{counter[0]}", f"{name}__half_{counter[0]}"
                node.output[index] = raw
                pairs.append(helper.make_node("Cast", [raw], [half_name], to=half, name=f"emulate/round{counter[0]}"))
                pairs.append(
                    helper.make_node("Cast", [half_name], [name], to=TensorProto.FLOAT, name=f"emulate/up{counter[0]}")
                )
        nodes.append(node)
        nodes.extend(pairs)
    del graph.node[:]
    graph.node.extend(nodes)


def _types(model: ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    return {
        value.name: value.type.tensor_type.elem_type
        for graph in walk_graphs(inferred.graph)
        for value in (*graph.input, *graph.output, *graph.value_info)
        if value.type.HasField("tensor_type")
    }


def emulate_rounding(model: ModelProto) -> ModelProto:
    """An fp32 copy of a half-precision graph that rounds every computed half tensor to half.

    Graphs without half tensors are returned unchanged (as a copy).
    """
    out = ModelProto()
    out.CopyFrom(model)
    half = half_type_of(model)
    if half is None:
        return out
    types = _types(model)
    _rewrite(out.graph, types, half, [0])
    return out
