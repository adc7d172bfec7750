"""ONNX graph clean-up after tracing: graphs that do no work twice (docs/guarantees.md §6).

The TorchScript tracer records every ``tensor.shape`` read as ``Shape -> Gather -> Unsqueeze ->
Concat -> Reshape`` chains, because the batch axis is dynamic. Inside a fixed-point ``Loop`` body
those chains run on every iteration although only the batch size could ever change, and ONNX
Runtime does not fold them (its constant folding needs fully static shapes). :func:`fold_static_shapes`
uses ONNX shape inference (with data propagation) to find every ``Reshape``/``Expand`` whose target
is static except for the batch axis, replaces the computed target by a constant (``0``: copy the
batch dimension of the input; ``-1``: infer it), and removes the chains that fed it.

:func:`weight_only_nodes` lists nodes whose inputs are all constants (initializers, ``Constant``
nodes, or outer-scope constants inside a ``Loop`` body): work that depends only on the weights and
should have been folded at export. :func:`fold_weight_only` folds any that remain with ONNX
Runtime. The exporter runs :func:`optimize_graph` on both graphs; tests assert the result has no
weight-only nodes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, TensorProto, helper, numpy_helper

from .. import onnx_util
from ..onnx_util import infer_shapes, subgraphs, value_types

__all__ = [
    "constants_to_initializers",
    "dead_code_elimination",
    "dense_small_convs",
    "drop_softmax_shifts",
    "fold_scalar_scales",
    "fold_static_shapes",
    "fold_weight_only",
    "optimize_graph",
    "share_initializers",
    "weight_only_nodes",
]


Partial = list  # a small int64 vector whose entries are ints or symbolic dimension names (str) or None


def _int_constant(tensor: TensorProto) -> Partial | None:
    if tensor.data_type not in (TensorProto.INT64, TensorProto.INT32) or len(tensor.dims) > 1:
        return None
    values = numpy_helper.to_array(tensor).reshape(-1)
    return [int(v) for v in values] if values.size <= 16 else None


def _partial_values(
    graph: GraphProto, types: dict[str, onnx.TypeProto], outer: dict[str, Partial]
) -> dict[str, Partial]:
    """Values of the small integer shape vectors of ``graph`` where they are known up to symbolic dims."""
    values: dict[str, Partial] = dict(outer)
    for init in graph.initializer:
        value = _int_constant(init)
        if value is not None:
            values[init.name] = value
    for node in graph.node:
        ins = [values.get(n) if n else None for n in node.input]
        out: Partial | None = None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant" and "value" in attrs:
            out = _int_constant(attrs["value"])
        elif node.op_type == "Shape":
            dims = onnx_util.dims(types.get(node.input[0]))
            if dims is not None:
                start, end = attrs.get("start", 0), attrs.get("end", len(dims))
                out = dims[start:end]
        elif node.op_type == "Gather" and ins[0] is not None and ins[1] is not None and attrs.get("axis", 0) == 0:
            try:
                out = [ins[0][i] for i in ins[1]]
            except IndexError:
                out = None
        elif node.op_type == "Slice" and ins[0] is not None and all(v is not None for v in ins[1:3]):
            axes = ins[3] if len(ins) > 3 and ins[3] is not None else [0]
            steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1]
            if axes in ([0], [-1]) and steps == [1]:
                out = ins[0][ins[1][0] : ins[2][0]]
        elif node.op_type == "Concat" and all(v is not None for v in ins):
            out = [v for part in ins for v in part]
        elif node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity") and ins[0] is not None:
            out = list(ins[0])
        elif node.op_type in ("Mul", "Add", "Sub", "Div") and all(v is not None for v in ins[:2]):
            out = _arith(node.op_type, ins[0], ins[1])
        elif node.op_type == "Reshape" and ins[0] is not None and ins[1] is not None and len(ins[1]) == 1:
            out = list(ins[0])  # a shape vector reshaped to 1-D stays itself
        elif node.op_type == "ConstantOfShape" and ins[0] is not None and len(ins[0]) == 1:
            length, fill = ins[0][0], attrs.get("value")
            fill_value = _int_constant(fill) if fill is not None else [0]
            if isinstance(length, int) and length <= 16 and fill_value:
                out = fill_value * length
        elif node.op_type == "Equal" and ins[0] is not None and ins[1] is not None and len(ins[0]) == len(ins[1]):
            out = [_equal(a, b) for a, b in zip(ins[0], ins[1], strict=True)]
        elif node.op_type == "Where" and all(v is not None for v in ins[:3]) and len({len(v) for v in ins[:3]}) == 1:
            out = [x if c == 1 else y if c == 0 else None for c, x, y in zip(*ins[:3], strict=True)]
        if out is not None and len(node.output) == 1:
            values[node.output[0]] = out
    return values


def _equal(a, b) -> int | None:
    if isinstance(a, int) and isinstance(b, int):
        return int(a == b)
    if (isinstance(a, str) and b == -1) or (isinstance(b, str) and a == -1):
        return 0  # a symbolic dimension is a size, never -1
    return None


def _arith(op: str, a: Partial, b: Partial) -> Partial | None:
    """Element-wise integer arithmetic on shape vectors; unknown wherever a symbolic entry is involved."""
    if len(a) != len(b) and min(len(a), len(b)) != 1:
        return None
    n = max(len(a), len(b))
    a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
    out: Partial = []
    for x, y in zip(a, b, strict=True):
        if not (isinstance(x, int) and isinstance(y, int)):
            out.append(None)
        elif op == "Div":
            out.append(x // y if y else None)
        else:
            out.append({"Mul": x * y, "Add": x + y, "Sub": x - y}[op])
    return out


def _reshape_output(inp: list, target: Partial) -> list | None:
    """The output dims of ``Reshape(input, target)`` (``allowzero=0``) with symbolic dims, if determined."""
    dims = [inp[i] if t == 0 else t for i, t in enumerate(target)]
    if any(d is None for d in dims) or any(d is None for d in inp) or dims.count(-1) > 1:
        return None
    if -1 in dims:
        in_syms = sorted(d for d in inp if isinstance(d, str))
        out_syms = sorted(d for d in dims if isinstance(d, str))
        if in_syms != out_syms:
            return None
        in_size = int(np.prod([d for d in inp if isinstance(d, int)]))
        out_size = int(np.prod([d for d in dims if isinstance(d, int) and d != -1]))
        if out_size == 0 or in_size % out_size:
            return None
        dims[dims.index(-1)] = in_size // out_size
    return dims


def _static_target(
    node: onnx.NodeProto, types: dict[str, onnx.TypeProto], values: dict[str, Partial]
) -> list[int] | None:
    """A constant target for a Reshape/Expand whose output is static except one dynamic (batch) axis."""
    inp = onnx_util.dims(types.get(node.input[0]))
    if inp is None:
        return None
    out = onnx_util.dims(types.get(node.output[0]))
    partial = values.get(node.input[1])
    if node.op_type == "Reshape" and partial is not None:
        out = _reshape_output(inp, partial) or out
        unknown = [i for i, v in enumerate(partial) if not isinstance(v, int)]
        if (
            (out is None or any(d is None for d in out))
            and len(unknown) == 1
            and all(isinstance(v, int) and v > 0 for i, v in enumerate(partial) if i != unknown[0])
        ):
            return [-1 if i == unknown[0] else v for i, v in enumerate(partial)]  # e.g. (batch * D, C, H, W)
    if node.op_type == "Expand" and partial is not None and None not in partial and len(partial) == len(inp):
        out = [i if t == 1 else t for i, t in zip(inp, partial, strict=True)]  # numpy-style broadcast
    if out is None or any(d is None for d in out):
        return None
    dynamic = [i for i, d in enumerate(out) if isinstance(d, str)]
    if node.op_type == "Reshape":
        if len(dynamic) > 1:
            return None
        target = [d if isinstance(d, int) else -1 for d in out]
        if dynamic and dynamic[0] == 0 and inp and inp[0] == out[0]:
            target[0] = 0  # copy the input's batch dimension (also right for an empty batch)
        return target
    # Expand: keep a dynamic axis only where the input already has the same symbolic size (broadcast by 1).
    if len(inp) != len(out):
        return None
    for i in dynamic:
        if inp[i] != out[i]:
            return None
    return [1 if isinstance(d, str) else d for d in out]


def fold_static_shapes(model: ModelProto, rounds: int = 8) -> ModelProto:
    """Replace computed Reshape/Expand targets that are static except the batch axis by constants.

    Repeats shape inference after each round, since a folded target makes later shapes known.
    """
    for _ in range(rounds):
        inferred = infer_shapes(model)
        if not _fold_targets(model.graph, inferred.graph, None, {}):
            break
        dead_code_elimination(model)
    return model


def _fold_targets(
    graph: GraphProto, inferred: GraphProto, outer: dict[str, onnx.TypeProto] | None, outer_values: dict[str, Partial]
) -> int:
    types = value_types(inferred, outer)
    values = _partial_values(graph, types, outer_values)
    constants = {i.name for i in graph.initializer}
    replaced = 0
    for index, node in enumerate(graph.node):
        for sub, sub_inferred in zip(subgraphs(node), subgraphs(inferred.node[index]), strict=True):
            replaced += _fold_targets(sub, sub_inferred, types, values)
        if node.op_type not in ("Reshape", "Expand") or len(node.input) < 2 or node.input[1] in constants:
            continue
        target = _static_target(node, types, values)
        if target is None:
            continue
        name = f"{node.output[0]}__static_shape"
        graph.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), name))
        constants.add(name)
        node.input[1] = name
        replaced += 1
    return replaced


def _used_names(graph: GraphProto) -> set[str]:
    """Every name a graph's nodes read, including outer-scope names read inside subgraphs."""
    used = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for sub in subgraphs(node):
            used |= _used_names(sub)
    return used


def dead_code_elimination(model: ModelProto) -> ModelProto:
    """Drop nodes and initializers nothing reads (graph outputs and subgraph reads count as reads)."""
    _dce(model.graph)
    return model


def _dce(graph: GraphProto, keep: set[str] | None = None) -> None:
    for node in graph.node:
        for sub in subgraphs(node):
            _dce(sub, {o.name for o in sub.output})
    needed = {o.name for o in graph.output} | (keep or set())
    kept: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output) or node.op_type == "Loop" and not node.output:
            kept.append(node)
            needed.update(n for n in node.input if n)
            for sub in subgraphs(node):
                needed |= _used_names(sub)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def weight_only_nodes(model: ModelProto) -> list[str]:
    """``graph/node (op)`` for every node whose inputs are all constants (work that only depends on weights).

    ``Constant`` nodes themselves and nodes without inputs are not counted; inside a ``Loop`` body the
    loop-invariant constants of the outer graph count as constants, loop inputs do not.
    """
    found: list[str] = []
    _weight_only(model.graph, set(), "main", found)
    return found


def _weight_only(graph: GraphProto, outer_constants: set[str], path: str, found: list[str]) -> None:
    constants = set(outer_constants) | {i.name for i in graph.initializer}
    constants -= {i.name for i in graph.input}
    for node in graph.node:
        inputs = [n for n in node.input if n]
        if node.op_type == "Constant":
            constants.update(node.output)
            continue
        for sub in subgraphs(node):
            _weight_only(sub, constants, f"{path}/{node.name or node.op_type}", found)
        if node.op_type == "Loop":
            continue
        if inputs and all(n in constants for n in inputs):
            found.append(f"{path}/{node.name or node.output[0]} ({node.op_type})")
            constants.update(node.output)


def fold_weight_only(model: ModelProto) -> int:
    """Evaluate top-level weight-only nodes once (with ONNX Runtime) and store their results as initializers."""
    graph = model.graph
    constants = {i.name: i for i in graph.initializer}
    folded = 0
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        inputs = [n for n in node.input if n]
        if node.op_type != "Constant" and inputs and all(n in constants for n in inputs) and not list(subgraphs(node)):
            values = _evaluate(node, [constants[n] for n in inputs], model)
            if values is not None:
                for name, value in zip(node.output, values, strict=True):
                    tensor = numpy_helper.from_array(value, name)
                    graph.initializer.append(tensor)
                    constants[name] = tensor
                folded += 1
                continue
        nodes.append(node)
    if folded:
        del graph.node[:]
        graph.node.extend(nodes)
        dead_code_elimination(model)
    return folded


def _evaluate(node: onnx.NodeProto, inputs: list[TensorProto], model: ModelProto) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    try:
        sub = helper.make_graph(
            [node],
            "fold",
            [],
            [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in node.output],
            initializer=inputs,
        )
        evaluator = ReferenceEvaluator(helper.make_model(sub, opset_imports=model.opset_import))
        return [np.asarray(v) for v in evaluator.run(None, {})]
    except Exception:  # an op the reference evaluator lacks: leave it to the runtime
        return None


def constants_to_initializers(model: ModelProto) -> int:
    """Turn ``Constant`` nodes holding a tensor into initializers of the graph they are in."""
    moved = 0

    def visit(g: GraphProto) -> None:
        nonlocal moved
        kept = []
        for node in g.node:
            for sub in subgraphs(node):
                visit(sub)
            value = (
                next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
            )
            if value is None:
                kept.append(node)
                continue
            tensor = TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            g.initializer.append(tensor)
            moved += 1
        del g.node[:]
        g.node.extend(kept)

    visit(model.graph)
    return moved


def share_initializers(model: ModelProto) -> int:
    """Store identical main-graph tensors once (``Constant`` nodes become initializers first).

    ``Loop`` bodies keep their own copies: ONNX Runtime pre-packs and re-lays-out (NCHWc) only the
    weights a subgraph owns, and reading them from the outer scope instead measured 1.7x slower at
    batch 256. Returns the number of duplicates removed.
    """
    graph = model.graph
    constants_to_initializers(model)
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for init in graph.initializer:
        key = (init.data_type, tuple(init.dims), numpy_helper.to_array(init).tobytes())
        if key in first:
            rename[init.name] = first[key]
        else:
            first[key] = init.name
    if not rename:
        return 0
    protected = {i.name for i in graph.input} | {o.name for o in graph.output}
    rename = {k: v for k, v in rename.items() if k not in protected}

    def apply(g: GraphProto) -> None:
        for node in g.node:
            node.input[:] = [rename.get(n, n) for n in node.input]
            for sub in subgraphs(node):
                apply(sub)

    apply(graph)
    kept = [i for i in graph.initializer if i.name not in rename]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(rename)


# --------------------------------------------------------------------------- kernel choices
#: A convolution over a map of at most this many times its kernel's taps runs as one dense GEMM.
DENSE_CONV_RATIO = 2.0


def _constant_array(name: str, scopes: list[dict[str, TensorProto]]) -> np.ndarray | None:
    for scope in reversed(scopes):
        if name in scope:
            return numpy_helper.to_array(scope[name])
    return None


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _dense_conv(weight: np.ndarray, bias: np.ndarray | None, shape: list[int], pads, strides) -> tuple:
    """The convolution of a ``(C, H, W)`` map as a matrix ``(C H W, C' H' W')`` and a bias row."""
    key = (weight.tobytes(), weight.shape, None if bias is None else bias.tobytes(), tuple(shape), tuple(pads))
    key += (tuple(strides),)
    if key not in _DENSE_CACHE:
        if len(_DENSE_CACHE) > 256:
            _DENSE_CACHE.clear()
        _DENSE_CACHE[key] = _dense_conv_uncached(weight, bias, shape, pads, strides)
    return _DENSE_CACHE[key]


_DENSE_CACHE: dict[tuple, tuple] = {}


def _dense_conv_uncached(weight: np.ndarray, bias: np.ndarray | None, shape: list[int], pads, strides) -> tuple:
    import torch
    import torch.nn.functional as F

    c, h, w = shape
    basis = torch.eye(c * h * w, dtype=torch.float64).reshape(-1, c, h, w)
    padded = F.pad(basis, (pads[1], pads[3], pads[0], pads[2]))
    out = F.conv2d(padded, torch.from_numpy(weight.copy()).double(), stride=tuple(strides))
    _, c_out, h_out, w_out = out.shape
    matrix = out.reshape(c * h * w, c_out * h_out * w_out).numpy().astype(weight.dtype)
    row = None
    if bias is not None:
        row = np.repeat(bias.astype(weight.dtype), h_out * w_out)
    return matrix, row, [c_out, h_out, w_out]


def dense_small_convs(model: ModelProto, ratio: float = DENSE_CONV_RATIO) -> int:
    """Run a 2-D convolution over a tiny map as one GEMM with its explicit (Toeplitz) matrix.

    On a 4x4 or 2x2 map a 3x3 convolution is a small dense linear map; as a matrix it is one
    ``(batch, C H W) x (C H W, C' H' W')`` product instead of a direct convolution with a blocked
    layout whose channel blocks (16 wide) are mostly padding for 4 or 16 channels. Used when
    ``H W <= ratio * kH kW``, i.e. at most ``ratio`` times the convolution's multiply-adds.
    Measured on digits-acf-l2 (ORT, 1 thread): sampling at batch 256 21% faster, batch 1 within 2%.
    (Turning the per-head attention products with constant weights into single GEMMs was tried too:
    no gain at batch 256 and 8% slower at batch 1, from the extra reshapes and transposes.)
    """
    inferred = infer_shapes(model)
    return _dense_convs(model.graph, inferred.graph, None, [], ratio)


def _dense_convs(graph: GraphProto, inferred: GraphProto, outer, scopes: list, ratio: float) -> int:
    types = value_types(inferred, outer)
    scopes = [*scopes, {i.name: i for i in graph.initializer}]
    nodes: list[onnx.NodeProto] = []
    done = 0
    for index, node in enumerate(graph.node):
        for sub, sub_inferred in zip(subgraphs(node), subgraphs(inferred.node[index]), strict=True):
            done += _dense_convs(sub, sub_inferred, types, scopes, ratio)
        replacement = _conv_as_gemm(node, types, scopes, ratio, graph) if node.op_type == "Conv" else None
        if replacement is None:
            nodes.append(node)
        else:
            nodes += replacement
            done += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return done


def _conv_as_gemm(node, types, scopes, ratio, graph) -> list | None:
    weight = _constant_array(node.input[1], scopes)
    bias = _constant_array(node.input[2], scopes) if len(node.input) > 2 and node.input[2] else None
    dims = onnx_util.dims(types.get(node.input[0]))
    if weight is None or weight.ndim != 4 or dims is None or len(dims) != 4:
        return None
    if (len(node.input) > 2 and node.input[2] and bias is None) or not all(isinstance(d, int) for d in dims[1:]):
        return None
    if _attr(node, "group", 1) != 1 or list(_attr(node, "dilations", [1, 1])) != [1, 1]:
        return None
    if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    _, c, h, w = dims
    k_h, k_w = weight.shape[2:]
    if h * w > ratio * k_h * k_w or weight.shape[1] != c:
        return None
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    matrix, row, out_shape = _dense_conv(weight, bias, [c, h, w], pads, list(_attr(node, "strides", [1, 1])))
    base = f"{node.output[0]}__dense"
    graph.initializer.extend(
        [
            numpy_helper.from_array(matrix, f"{base}_matrix"),
            numpy_helper.from_array(np.array([0, c * h * w], np.int64), f"{base}_in_shape"),
            numpy_helper.from_array(np.array([0, *out_shape], np.int64), f"{base}_out_shape"),
        ]
    )
    out = [
        helper.make_node("Reshape", [node.input[0], f"{base}_in_shape"], [f"{base}_flat"], name=f"{base}/flatten"),
        helper.make_node("MatMul", [f"{base}_flat", f"{base}_matrix"], [f"{base}_mm"], name=f"{base}/matmul"),
    ]
    last = f"{base}_mm"
    if row is not None:
        graph.initializer.append(numpy_helper.from_array(row, f"{base}_bias"))
        out.append(helper.make_node("Add", [last, f"{base}_bias"], [f"{base}_biased"], name=f"{base}/bias"))
        last = f"{base}_biased"
    out.append(helper.make_node("Reshape", [last, f"{base}_out_shape"], [node.output[0]], name=f"{base}/unflatten"))
    return out


# --------------------------------------------------------------------------- algebraic peepholes
_MOVES = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Identity"}  # commute with scaling


def _scalar(name: str, scopes: list[dict[str, TensorProto]]) -> float | None:
    value = _constant_array(name, scopes)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(-1)[0])


def _consumers(graph: GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
        for sub in subgraphs(node):
            for name in _used_names(sub):
                users.setdefault(name, []).append(node)
    return users


def _scaled_constant(graph: GraphProto, scopes, name: str, factor: float) -> str:
    value = _constant_array(name, scopes)
    new = f"{name}__x{len(graph.initializer)}"
    graph.initializer.append(numpy_helper.from_array((value * factor).astype(value.dtype), new))
    return new


def fold_scalar_scales(model: ModelProto) -> int:
    """Fold multiplications and divisions by constant scalars into the linear ops around them.

    ``Div(x, c)`` whose every use reaches, through reshapes and transposes only, the data input of a
    MatMul / Conv with a constant weight or a multiplication by a constant scalar, disappears into those
    constants (LipSwish's ``/ 1.1`` before a convolution or the attention projections). ``Mul(c, y)``
    where ``y`` comes, through reshapes and transposes used nowhere else, from a MatMul with a constant
    weight is folded into that weight (the attention gate into ``W_O / B``). Exact up to rounding.
    """
    return _fold_scales(model.graph, [])


def _fold_scales(graph: GraphProto, scopes: list) -> int:
    scopes = [*scopes, {i.name: i for i in graph.initializer}]
    done = 0
    for node in graph.node:
        for sub in subgraphs(node):
            done += _fold_scales(sub, scopes)
    state = _FoldState(graph, scopes)
    for node in list(graph.node):
        if node.op_type not in ("Div", "Mul") or len(node.input) != 2:
            continue
        scalar_at = 1 if _scalar(node.input[1], scopes) is not None else 0
        if node.op_type == "Div" and scalar_at != 1:
            continue
        c = _scalar(node.input[scalar_at], scopes)
        if c is None or c == 0:
            continue
        factor = 1.0 / c if node.op_type == "Div" else c
        data = node.input[1 - scalar_at]
        if state.forward(node, data, factor) or (node.op_type == "Mul" and state.backward(node, data, factor)):
            done += 1
    state.finish()
    return done


class _FoldState:
    """Users and producers of one graph, kept current while nodes are bypassed."""

    def __init__(self, graph: GraphProto, scopes: list):
        self.graph, self.scopes = graph, scopes
        self.users = _consumers(graph)
        self.producers = {o: n for n in graph.node for o in n.output}
        self.outputs = {o.name for o in graph.output}
        self.removed: set[int] = set()

    def _constant(self, name: str) -> bool:
        return any(name in scope for scope in self.scopes)

    def _scale(self, name: str, factor: float) -> str:
        new = _scaled_constant(self.graph, self.scopes, name, factor)
        self.scopes[-1][new] = self.graph.initializer[-1]
        return new

    def _bypass(self, node: onnx.NodeProto, data: str) -> None:
        out = node.output[0]
        moved = self.users.pop(out, [])
        for user in moved:
            user.input[:] = [data if n == out else n for n in user.input]
        self.users[data] = [u for u in self.users.get(data, []) if u is not node] + moved
        self.producers.pop(out, None)
        self.removed.add(id(node))

    def forward(self, node: onnx.NodeProto, data: str, factor: float) -> bool:
        """Push ``factor`` into every linear end of the uses of ``node``'s output, then bypass ``node``."""
        ends: list[tuple[onnx.NodeProto, int]] = []
        stack = [node.output[0]]
        while stack:
            name = stack.pop()
            if name in self.outputs:
                return False
            for user in self.users.get(name, []):
                if list(subgraphs(user)):
                    return False
                if user.op_type in _MOVES and user.input[0] == name:
                    stack.append(user.output[0])
                elif user.op_type in ("MatMul", "Conv") and user.input[0] == name and len(user.input) > 1:
                    if not self._constant(user.input[1]):
                        return False
                    ends.append((user, 1))
                elif user.op_type == "Mul" and name in user.input:
                    other = 1 - list(user.input).index(name)
                    if _scalar(user.input[other], self.scopes) is None:
                        return False
                    ends.append((user, other))
                else:
                    return False
        if not ends:
            return False
        for user, slot in ends:
            user.input[slot] = self._scale(user.input[slot], factor)
        self._bypass(node, data)
        return True

    def backward(self, node: onnx.NodeProto, data: str, factor: float) -> bool:
        """Scale the constant weight of the MatMul that ``data`` comes from (through single-use moves)."""
        if node.output[0] in self.outputs:
            return False
        name = data
        while True:
            producer = self.producers.get(name)
            if producer is None or name in self.outputs or len(self.users.get(name, [])) != 1:
                return False
            if producer.op_type in _MOVES:
                name = producer.input[0]
                continue
            if producer.op_type == "MatMul" and self._constant(producer.input[1]):
                producer.input[1] = self._scale(producer.input[1], factor)
                break
            return False
        self._bypass(node, data)
        return True

    def finish(self) -> None:
        if self.removed:
            kept = [n for n in self.graph.node if id(n) not in self.removed]
            del self.graph.node[:]
            self.graph.node.extend(kept)


def drop_softmax_shifts(model: ModelProto) -> int:
    """Remove terms that are constant along a softmax's axis: ``softmax(c (a - b))`` with ``b`` of size 1
    on that axis equals ``softmax(c a)`` (the L2-attention logits' ``- |q_i|^2``)."""
    inferred = infer_shapes(model)
    return _drop_shifts(model.graph, inferred.graph, None, [])


def _drop_shifts(graph, inferred, outer, scopes) -> int:
    types = value_types(inferred, outer)
    scopes = [*scopes, {i.name: i for i in graph.initializer}]
    done = 0
    for index, node in enumerate(graph.node):
        for sub, sub_inferred in zip(subgraphs(node), subgraphs(inferred.node[index]), strict=True):
            done += _drop_shifts(sub, sub_inferred, types, scopes)
    users = _consumers(graph)
    producers = {o: n for n in graph.node for o in n.output}
    for node in list(graph.node):
        if node.op_type != "Softmax":
            continue
        rank = len(onnx_util.dims(types.get(node.input[0])) or [])
        axis = _attr(node, "axis", -1)
        if rank == 0 or axis not in (-1, rank - 1):
            continue
        name = node.input[0]
        while True:
            producer = producers.get(name)
            if producer is None or len(users.get(name, [])) != 1:
                break
            if producer.op_type == "Mul":
                scales = [_scalar(i, scopes) for i in producer.input]
                if scales[1] is not None and scales[1] > 0:
                    name = producer.input[0]
                    continue
                if scales[0] is not None and scales[0] > 0:
                    name = producer.input[1]
                    continue
                break
            if producer.op_type in ("Sub", "Add"):
                a, b = (onnx_util.dims(types.get(i)) for i in producer.input)
                out = onnx_util.dims(types.get(producer.output[0]))
                if a is None or b is None or out is None or len(b) == 0 or out[-1] == 1:
                    break
                if b[-1] == 1 and a == out:  # the second operand is constant along the softmax axis
                    for user in users.get(producer.output[0], []):
                        user.input[:] = [producer.input[0] if n == producer.output[0] else n for n in user.input]
                    graph.node.remove(producer)
                    done += 1
                    users = _consumers(graph)
                    producers = {o: n for n in graph.node for o in n.output}
                    name = producer.input[0]
                    continue
                if producer.op_type == "Sub":
                    name = producer.input[0]  # keep a full-width subtrahend; look further up the minuend
                    continue
            break
    return done


def optimize_graph(model: ModelProto) -> ModelProto:
    """The exporter's post-trace passes: fold weight-only nodes, static shapes, shared weights, dead code."""
    fold_weight_only(model)
    fold_static_shapes(model)
    constants_to_initializers(model)
    dense_small_convs(model)
    fold_scalar_scales(model)
    drop_softmax_shifts(model)
    dead_code_elimination(model)
    share_initializers(model)  # last: the passes above write per-node copies of shared weights
    dead_code_elimination(model)
    return model
