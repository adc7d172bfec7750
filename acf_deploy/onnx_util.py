"""ONNX graph helpers shared by the exporter's passes, the TensorRT lint, ``inspect``, the FLOP counter and
the precision tools: walking nodes into every subgraph, dims and types, node counts, and the one
Loop-aware shape inference.

**Shape inference through Loops** (:func:`infer_shapes`). ONNX's own inference gives a ``Loop`` output
an unknown shape, because a loop-carried value may change shape from one iteration to the next; every
later node, and every later Loop's inputs, then lose their shapes too. Our graphs keep carried shapes
constant by construction (``exporters/graphs.py``), and this inference *proves* it rather than assume
it: a Loop body is inferred on its own (:func:`infer_loop_body`) with each carried input typed like the
value that enters the loop and with the body's own declared shapes removed, so only inference speaks.
A carried value whose inferred output shape is that input shape, symbol for symbol (``batch`` stays
``batch``), keeps its shape; the Loop's output is then declared with it and inference runs again from
the original graph, until no Loop output gains a shape. Only these declarations carry over from one
round to the next, never other inferred types: a stale ``unk__3`` would outlive the ``batch`` that
inference can propagate once an earlier Loop is known. The TensorRT lint reports a Loop whose carried
shape this cannot prove. Only top-level Loops are pinned (our graphs never nest them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import (
    AttributeProto,
    GraphProto,
    ModelProto,
    NodeProto,
    TensorProto,
    TypeProto,
    helper,
    numpy_helper,
    shape_inference,
)

__all__ = [
    "BATCH",
    "Dims",
    "constant_tensor",
    "constants",
    "count_nodes",
    "dims",
    "elem_type_name",
    "free_names",
    "infer_loop_body",
    "infer_shapes",
    "io_entries",
    "loop_body",
    "op_counts",
    "same_shape",
    "subgraphs",
    "value_types",
    "walk_graphs",
]

#: The name of the dynamic batch axis of every graph input and output an export declares.
BATCH = "batch"
#: A shape: ints, symbolic names (``"batch"``) and ``None`` for an unknown dimension.
Dims = list[int | str | None]


# --------------------------------------------------------------------------- walking
def subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    """The graphs held by ``node``'s attributes (``Loop`` body, ``If`` branches, ``Scan`` body)."""
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def walk_graphs(graph: GraphProto) -> Iterator[GraphProto]:
    """``graph`` and every subgraph below it, depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from walk_graphs(sub)


def loop_body(node: NodeProto) -> GraphProto:
    """The ``body`` attribute of a ``Loop`` node."""
    return next(attr.g for attr in node.attribute if attr.name == "body")


def count_nodes(graph: GraphProto) -> int:
    """Nodes including those inside subgraphs (``Loop`` bodies)."""
    return sum(len(g.node) for g in walk_graphs(graph))


def op_counts(graph: GraphProto) -> Counter:
    """How often each op type occurs, subgraphs included (first seen first, depth first)."""
    counts: Counter = Counter()
    for node in graph.node:
        counts[node.op_type] += 1
        for sub in subgraphs(node):
            counts.update(op_counts(sub))
    return counts


def free_names(graph: GraphProto) -> set[str]:
    """Names a graph (and its subgraphs) reads from enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for sub in subgraphs(node):
            used |= free_names(sub)
        defined.update(node.output)
    return used - defined


# --------------------------------------------------------------------------- types and shapes
def dims(type_proto: TypeProto | None) -> Dims | None:
    """The dimensions of a tensor type, or ``None`` when it has no shape (or is no tensor)."""
    if type_proto is None or not type_proto.HasField("tensor_type"):
        return None
    tensor_type = type_proto.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]


def same_shape(a: Dims | None, b: Dims | None) -> bool | None:
    """False when two shapes provably differ, True when provably equal, None when unknown."""
    if a is None or b is None:
        return None
    if len(a) != len(b):
        return False
    known = True
    for x, y in zip(a, b, strict=True):
        if isinstance(x, int) and isinstance(y, int):
            if x != y:
                return False
        elif x is None or y is None or x != y:
            known = False
    return True if known else None


def value_types(graph: GraphProto, outer: dict[str, TypeProto] | None = None) -> dict[str, TypeProto]:
    """Every value's declared type in ``graph`` (inputs, value_info, outputs, initializers) over ``outer``'s."""
    types = dict(outer or {})
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        types[value.name] = value.type
    for init in graph.initializer:
        types[init.name] = helper.make_tensor_type_proto(init.data_type, list(init.dims))
    return types


def elem_type_name(elem_type: int) -> str:
    """The numpy name of an ONNX element type (``float32``, ``int64``, ...)."""
    return helper.tensor_dtype_to_np_dtype(elem_type).name


def io_entries(values: Any) -> list[dict[str, Any]]:
    """``{name, dtype, shape}`` of graph inputs or outputs; a symbolic dimension is its name."""
    return [
        {
            "name": v.name,
            "dtype": elem_type_name(v.type.tensor_type.elem_type),
            "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        }
        for v in values
    ]


# --------------------------------------------------------------------------- Loop-aware inference
def infer_loop_body(
    model: ModelProto,
    body: GraphProto,
    initial: list[TypeProto | None],
    outer_types: dict[str, TypeProto],
    outer_constants: dict[str, TensorProto | None],
) -> GraphProto:
    """Shape-infer a Loop body on its own, its carried inputs typed like the values entering the loop.

    The body's declared output and intermediate shapes are removed first, so the inferred carried outputs
    follow from the body's ops alone (see the module docstring). Outer-scope constants become initializers,
    other outer values inputs. Returns the body as written (no borrowed names) with the inferred types; when
    inference fails, the body as declared.
    """
    graph = GraphProto()
    graph.CopyFrom(body)
    for value in graph.output:
        value.type.tensor_type.ClearField("shape")
    del graph.value_info[:]
    for i, type_proto in enumerate(initial):
        if type_proto is not None and len(graph.input) > 2 + i:
            graph.input[2 + i].type.CopyFrom(type_proto)
    for name in sorted(free_names(body)):
        tensor = outer_constants.get(name)
        if tensor is not None and tensor.data_location != TensorProto.EXTERNAL:
            graph.initializer.append(tensor)
        elif name in outer_types:
            graph.input.append(helper.make_value_info(name, outer_types[name]))
    standalone = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        inferred = shape_inference.infer_shapes(standalone, strict_mode=False, data_prop=True).graph
    except Exception:  # onnx raises InferenceError and friends; the body keeps its declared types
        return body
    result = GraphProto()
    result.CopyFrom(body)
    inferred_types = {v.name: v.type for v in [*inferred.input, *inferred.output, *inferred.value_info]}
    for value in [*result.input, *result.output]:
        if value.name in inferred_types:
            value.type.CopyFrom(inferred_types[value.name])
    declared = {v.name for v in [*result.input, *result.output, *result.value_info]}
    result.value_info.extend(v for v in inferred.value_info if v.name not in declared)
    return result


def constant_tensor(node: NodeProto) -> TensorProto | None:
    """The value of a ``Constant`` node as a tensor (``None`` for sparse and string constants)."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
            return numpy_helper.from_array(np.asarray(helper.get_attribute_value(attr)))
    return None


def constants(graph: GraphProto) -> dict[str, TensorProto | None]:
    """The graph's initializers and ``Constant`` node outputs, by name."""
    found: dict[str, TensorProto | None] = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            found[node.output[0]] = constant_tensor(node)
    return found


def _proved_loop_outputs(inferred: ModelProto) -> list[onnx.ValueInfoProto]:
    """Declarations for the top-level Loop outputs whose carried shape the body provably keeps, where the
    inferred output does not have that shape yet."""
    graph = inferred.graph
    types, consts = value_types(graph), constants(graph)
    proved = []
    for node in graph.node:
        if node.op_type != "Loop":
            continue
        carried = list(node.input[2:])
        initial = [types.get(name) for name in carried]
        outputs = [
            out
            for out, start in zip(node.output, initial, strict=False)
            if out and not same_shape(dims(types.get(out)), dims(start))
        ]
        if not outputs:
            continue
        body = infer_loop_body(inferred, loop_body(node), initial, types, consts)
        for i, out in enumerate(node.output[: len(carried)]):
            if (
                out in outputs
                and len(body.output) > 1 + i
                and same_shape(dims(initial[i]), dims(body.output[1 + i].type))
            ):
                proved.append(helper.make_value_info(out, initial[i]))
    return proved


def infer_shapes(model: ModelProto, batch: int | None = None) -> ModelProto:
    """Shape inference with data propagation that carries shapes through shape-preserving Loops.

    Returns an inferred copy. With ``batch`` the dynamic batch axis of every graph input and output is fixed
    to that size first. See the module docstring for how Loop outputs get their shapes.
    """
    source = ModelProto.FromString(model.SerializeToString())
    if batch is not None:
        for value in [*source.graph.input, *source.graph.output]:
            shape = value.type.tensor_type.shape.dim
            if shape and shape[0].dim_param:
                shape[0].dim_value = batch
    pinned: dict[str, onnx.ValueInfoProto] = {}
    loops = sum(node.op_type == "Loop" for node in source.graph.node)
    for _ in range(loops + 1):
        attempt = ModelProto()
        attempt.CopyFrom(source)
        attempt.graph.value_info.extend(pinned.values())
        inferred = shape_inference.infer_shapes(attempt, strict_mode=False, data_prop=True)
        proved = _proved_loop_outputs(inferred)
        if not proved:
            break
        pinned.update((value.name, value) for value in proved)  # a later round may sharpen an earlier pin
    return inferred
