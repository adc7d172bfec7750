"""The ONNX graphs of the two computations of ``acf_deploy/computations.py`` (docs/guarantees.md §3, §6).

``DensityGraph`` and ``SampleGraph`` are what gets traced; the torch reference backend runs the
very same modules eagerly, so reference and export share one code path. The sampling graph
comes in two forms: ``unroll`` traces the fixed-point iterations as straight-line code, ``loop``
traces one Banach step per block and wraps it in an ONNX ``Loop`` whose trip count is a constant
initializer and whose loop-carried values keep their shapes.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from ..computations import DensityGraph, SampleGraph, density_io
from ..flows.blocks import ResidualBlock
from ..flows.flow import Flow
from ..onnx_util import BATCH

Tensor = torch.Tensor


def _export(
    module: nn.Module,
    args: tuple[Tensor, ...],
    inputs: list[str],
    outputs: list[str],
    batched: dict,
    opset: int,
    lu_marker: bool = False,
) -> onnx.ModelProto:
    """Trace ``module`` to ONNX (TorchScript exporter: fast, plain graphs, named dynamic axes).

    ``lu_marker``: the module may emit ``acf::LuLogdet`` nodes, which are expanded into Loops here.
    """
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints are expected: shapes are static
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=batched,
            opset_version=opset,
            do_constant_folding=True,
            custom_opsets={"acf": 1} if lu_marker else None,
        )
    return expand_lu_nodes(onnx.load_from_string(buffer.getvalue()))


def _lu_body(prefix: str, dim: int, dtype: int) -> onnx.GraphProto:
    """One elimination step ``k``: ``a -= (a[:, :, k] * [i > k] / a[:, k, k]) outer a[:, k, :]``."""
    p = prefix
    nodes = [
        helper.make_node("Gather", [f"{p}a_in", f"{p}k"], [f"{p}row"], axis=1),  # (B, D)
        helper.make_node("Gather", [f"{p}a_in", f"{p}k"], [f"{p}col"], axis=2),  # (B, D)
        helper.make_node("Gather", [f"{p}row", f"{p}k"], [f"{p}pivot"], axis=1),  # (B,)
        helper.make_node("Greater", [f"{p}range", f"{p}k"], [f"{p}below"]),
        helper.make_node("Cast", [f"{p}below"], [f"{p}mask"], to=dtype),
        helper.make_node("Unsqueeze", [f"{p}pivot", f"{p}axis1"], [f"{p}pivot2"]),
        helper.make_node("Div", [f"{p}col", f"{p}pivot2"], [f"{p}ratio"]),
        helper.make_node("Mul", [f"{p}ratio", f"{p}mask"], [f"{p}factor"]),
        helper.make_node("Unsqueeze", [f"{p}factor", f"{p}axis2"], [f"{p}factor3"]),
        helper.make_node("Unsqueeze", [f"{p}row", f"{p}axis1"], [f"{p}row3"]),
        helper.make_node("Mul", [f"{p}factor3", f"{p}row3"], [f"{p}update"]),
        helper.make_node("Sub", [f"{p}a_in", f"{p}update"], [f"{p}a_out"]),
        helper.make_node("Identity", [f"{p}cond_in"], [f"{p}cond_out"]),
    ]
    inits = [
        helper.make_tensor(f"{p}range", TensorProto.INT64, [dim], list(range(dim))),
        helper.make_tensor(f"{p}axis1", TensorProto.INT64, [1], [1]),
        helper.make_tensor(f"{p}axis2", TensorProto.INT64, [1], [2]),
    ]
    square = [BATCH, dim, dim]
    return helper.make_graph(
        nodes,
        f"{p}body",
        [
            helper.make_tensor_value_info(f"{p}k", TensorProto.INT64, []),
            helper.make_tensor_value_info(f"{p}cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info(f"{p}a_in", dtype, square),
        ],
        [
            helper.make_tensor_value_info(f"{p}cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info(f"{p}a_out", dtype, square),
        ],
        initializer=inits,
    )


#: Elimination steps per LU phase: each phase continues on the Schur complement its predecessor left.
LU_PHASE = 16


def _lu_phases(p: str, matrix: str, dim: int, dtype: int) -> tuple[list, list, str]:
    """Nodes and initializers that eliminate ``matrix`` (B, D, D) in phases; returns the name of its pivots (B, D)."""
    nodes: list = []
    inits: list = []
    diagonals = []
    for start in range(0, dim, LU_PHASE):
        q, size, steps = f"{p}{start}/", dim - start, min(LU_PHASE, dim - start)
        inits += [
            helper.make_tensor(f"{q}trip", TensorProto.INT64, [], [steps]),
            helper.make_tensor(f"{q}eye", dtype, [steps, size], torch.eye(steps, size).flatten().tolist()),
            helper.make_tensor(f"{q}zero", TensorProto.INT64, [1], [0]),
            helper.make_tensor(f"{q}steps", TensorProto.INT64, [1], [steps]),
            helper.make_tensor(f"{q}row_axis", TensorProto.INT64, [1], [1]),
            helper.make_tensor(f"{q}col_axis", TensorProto.INT64, [1], [-1]),
        ]
        nodes += [
            helper.make_node(
                "Loop", [f"{q}trip", "", matrix], [f"{q}u"], body=_lu_body(q, size, dtype), name=f"{q}loop"
            ),
            # this phase's pivots: the diagonal of its first ``steps`` rows
            helper.make_node("Slice", [f"{q}u", f"{q}zero", f"{q}steps", f"{q}row_axis"], [f"{q}rows"]),
            helper.make_node("Mul", [f"{q}rows", f"{q}eye"], [f"{q}diag_full"]),
            helper.make_node("ReduceSum", [f"{q}diag_full", f"{q}col_axis"], [f"{q}diag"], keepdims=0),
        ]
        diagonals.append(f"{q}diag")
        if steps < size:  # what is left below and right of the eliminated rows and columns
            inits += [
                helper.make_tensor(f"{q}from", TensorProto.INT64, [2], [steps, steps]),
                helper.make_tensor(f"{q}to", TensorProto.INT64, [2], [size, size]),
                helper.make_tensor(f"{q}axes", TensorProto.INT64, [2], [1, 2]),
            ]
            nodes.append(helper.make_node("Slice", [f"{q}u", f"{q}from", f"{q}to", f"{q}axes"], [f"{q}rest"]))
            matrix = f"{q}rest"
    nodes.append(helper.make_node("Concat", diagonals, [f"{p}diag"], axis=1))
    return nodes, inits, f"{p}diag"


def expand_lu_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every ``acf::LuLogdet`` node by ``Loop`` phases of elimination steps and a diagonal read-out.

    A step updates the whole remaining matrix under a mask (no shapes that change inside a loop), so after
    each :data:`LU_PHASE` steps the eliminated rows and columns are sliced off: the lower-right block left
    is the Schur complement, whose LU continues with the same pivots. For ``D = 64`` that is 2.1x less
    elimination work than masking the full ``D x D`` matrix for all ``D`` steps.
    """
    graph = model.graph
    nodes: list = []
    for index, node in enumerate(graph.node):
        if not (node.domain == "acf" and node.op_type == "LuLogdet"):
            nodes.append(node)
            continue
        dim = next(attr.i for attr in node.attribute if attr.name == "dim")
        p = f"lu{index}/"
        phases, inits, diag = _lu_phases(p, node.input[0], dim, TensorProto.FLOAT)
        graph.initializer.extend([*inits, helper.make_tensor(f"{p}last", TensorProto.INT64, [1], [-1])])
        logdet, pivot = node.output
        nodes += [
            *phases,
            helper.make_node("Log", [diag], [f"{p}logs"]),
            helper.make_node("ReduceSum", [f"{p}logs", f"{p}last"], [logdet], keepdims=0),
            helper.make_node("ReduceMin", [diag], [pivot], axes=[-1], keepdims=0),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [op for op in model.opset_import if op.domain != "acf"]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def export_density(flow: Flow, mode: str, terms: int, n_probes: int, example: Tensor, opset: int) -> onnx.ModelProto:
    """Density graph; per-block outputs are traced too, then demoted to internal values named ``trace_i``."""
    n_blocks = len(flow.residual_blocks())
    module = DensityGraph(flow, mode, terms, with_trace=True)
    inputs, outputs = density_io(mode, n_blocks)
    args: tuple[Tensor, ...] = (example,)
    if mode == "series":
        args = (example, torch.ones(example.shape[0], n_probes, flow.dim, dtype=example.dtype))
    model = _export(module, args, inputs, outputs, _axes(*inputs, *outputs), opset, lu_marker=mode == "exact")
    # every output is per sample; z is [batch, D], where the tracer would name D ``Flattenz_dim_1``
    kept = [
        helper.make_tensor_value_info(
            o.name, o.type.tensor_type.elem_type, [BATCH, flow.dim] if o.name == "z" else [BATCH]
        )
        for o in model.graph.output
        if not o.name.startswith("trace_")
    ]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    if mode == "series" and "probes" not in {i.name for i in model.graph.input}:
        # no residual block reads the probes (e.g. the Glow baseline): the tracer dropped the input,
        # but the graph keeps the interface its log-det mode declares
        model.graph.input.append(
            helper.make_tensor_value_info(
                "probes", model.graph.input[0].type.tensor_type.elem_type, [BATCH, n_probes, flow.dim]
            )
        )
    return model


def export_sample_unrolled(
    flow: Flow, n_iters: Sequence[int], example_z: Tensor, opset: int, schedule: str = "plain"
) -> onnx.ModelProto:
    temperature = torch.ones(1, dtype=example_z.dtype)
    axes = _axes("z", "x", "residual")
    graph = SampleGraph(flow, n_iters, schedule)
    return _export(graph, (example_z, temperature), ["z", "temperature"], ["x", "residual"], axes, opset)


# --------------------------------------------------------------------------- Loop form
class _Fn(nn.Module):
    """Wraps a function for tracing; ``owner`` registers the parameters it closes over."""

    def __init__(self, fn: Callable[..., tuple[Tensor, ...]], owner: nn.Module):
        super().__init__()
        self.fn, self.owner = fn, owner

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        return self.fn(*args)


def _inline(nodes: list, inits: list, model: onnx.ModelProto, prefix: str, rename: dict[str, str]) -> None:
    """Copy ``model``'s nodes and initializers into ``nodes``/``inits`` under ``prefix``.

    ``rename`` maps the piece's input/output names to names in the enclosing graph.
    """
    graph = onnx.compose.add_prefix(model, prefix).graph
    mapping = {prefix + k: v for k, v in rename.items()}
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
        nodes.append(node)
    inits.extend(graph.initializer)


def _iterate_body(
    step: onnx.ModelProto, prefix: str, outer_y: str, shape_x: list, dtype: int, carried: Sequence[tuple[str, str]]
) -> onnx.GraphProto:
    """Body ``(iter, cond, *state) -> (cond, *step(state, y))``, reading ``y`` from the outer scope.

    ``carried`` pairs each of the step's state inputs with the output that replaces it (all shaped like ``x``).
    """
    nodes: list = []
    inits: list = []
    rename = {"y": outer_y}
    for name_in, name_out in carried:
        rename[name_in], rename[name_out] = f"{prefix}{name_in}_in", f"{prefix}{name_out}_out"
    _inline(nodes, inits, step, prefix, rename)
    nodes.append(helper.make_node("Identity", [f"{prefix}cond_in"], [f"{prefix}cond_out"]))
    return helper.make_graph(
        nodes,
        f"{prefix}body",
        [
            helper.make_tensor_value_info(f"{prefix}iter", TensorProto.INT64, []),
            helper.make_tensor_value_info(f"{prefix}cond_in", TensorProto.BOOL, []),
            *(helper.make_tensor_value_info(rename[name], dtype, shape_x) for name, _ in carried),
        ],
        [
            helper.make_tensor_value_info(f"{prefix}cond_out", TensorProto.BOOL, []),
            *(helper.make_tensor_value_info(rename[name], dtype, shape_x) for _, name in carried),
        ],
        initializer=inits,
    )


def export_sample_loop(
    flow: Flow, n_iters: Sequence[int], example_z: Tensor, opset: int, schedule: str = "plain"
) -> onnx.ModelProto:
    """Sampling graph with one ONNX ``Loop`` per residual block, stitched from traced pieces."""
    builder = _LoopSampler(flow, opset, example_z, schedule)
    counts = list(n_iters)
    for layer, index in flow.inverse_steps():
        if index is None:
            builder.plain.append(layer)
        else:
            builder.flush()
            builder.block(layer, index, counts[index])
    builder.flush()
    return builder.finish()


class _LoopSampler:
    """The state of :func:`export_sample_loop` while it stitches the graph, one traced piece at a time.

    ``current`` names the value the next piece reads; ``example`` is a tensor of its shape (the pieces are
    traced on it); ``plain`` holds closed-form layers waiting to be exported as one segment; ``steps``
    names each block's last fixed-point step norm, whose maximum is the ``residual`` output.
    """

    def __init__(self, flow: Flow, opset: int, example_z: Tensor, schedule: str = "plain"):
        self.flow, self.opset, self.dtype, self.schedule = flow, opset, TensorProto.FLOAT, schedule
        self.nodes: list = []
        self.inits: list = []
        self.steps: list[str] = []
        self.plain: list[nn.Module] = []
        latent = flow.latent_shape

        def head(z: Tensor, temperature: Tensor) -> tuple[Tensor]:
            return ((z * temperature).reshape(z.shape[0], *latent),)

        temperature = torch.ones(1, dtype=example_z.dtype)
        piece = self._trace(head, flow, (example_z, temperature), ["z", "temperature"], ["h"])
        self.current = "h0"
        _inline(self.nodes, self.inits, piece, "head/", {"z": "z", "temperature": "temperature", "h": self.current})
        self.example = torch.zeros(example_z.shape[0], *latent, dtype=example_z.dtype)

    def _trace(self, fn: Callable, owner: nn.Module, args: tuple, inputs: list[str], outputs: list[str]):
        piece = _export(_Fn(fn, owner), args, inputs, outputs, _axes(*inputs, *outputs), self.opset)
        self.ir_version = piece.ir_version
        return piece

    def flush(self) -> None:
        """Export the pending closed-form inverses as one segment and move ``current`` past it."""
        if not self.plain:
            return
        layers = list(self.plain)

        def run(x: Tensor) -> tuple[Tensor]:
            for layer in layers:
                x = layer.inverse(x)
            return (x,)

        out, prefix = f"seg{len(self.nodes)}_out", f"seg{len(self.nodes)}/"
        piece = self._trace(run, self.flow, (self.example,), ["h_in"], ["h_out"])
        _inline(self.nodes, self.inits, piece, prefix, {"h_in": self.current, "h_out": out})
        self.plain.clear()
        self.current = out
        with torch.no_grad():
            self.example = run(self.example)[0]

    def block(self, layer: ResidualBlock, index: int, n_iter: int) -> None:
        """Residual block ``index`` inverted by ``n_iter`` fixed-point steps.

        A ``Loop`` runs ``n_iter - 1`` steps ``x <- y - g(x)`` (accelerated: the first one plain, before it,
        which starts the carried history); the last step, outside it, is plain and also gives the step norm,
        so no iteration computes a norm nobody reads.
        """
        prefix, y, h = f"block{index}/", self.current, self.example
        out_x, out_step = f"{prefix}x", f"{prefix}step"
        x_start = y
        if self.schedule == "anderson" and n_iter > 1:
            x_start = self._anderson_loop(layer, prefix, y, n_iter - 1)
        elif n_iter > 1:
            plain_step = self._trace(lambda x, y: (layer.inverse_step(x, y)[0],), layer, (h, h), ["x", "y"], ["x_new"])
            body = _iterate_body(plain_step, f"{prefix}it/", y, [BATCH, *h.shape[1:]], self.dtype, [("x", "x_new")])
            trip, x_start = f"{prefix}trip_count", f"{prefix}x_loop"
            self.inits.append(helper.make_tensor(trip, TensorProto.INT64, [], [n_iter - 1]))
            self.nodes.append(helper.make_node("Loop", [trip, "", y], [x_start], body=body, name=f"{prefix}loop"))
        if n_iter >= 1:
            step = self._trace(layer.inverse_step, layer, (h, h), ["x", "y"], ["x_new", "step"])
            rename = {"x": x_start, "y": y, "x_new": out_x, "step": out_step}
            _inline(self.nodes, self.inits, step, f"{prefix}last/", rename)
        else:
            self.nodes.append(helper.make_node("Identity", [y], [out_x]))
            self.nodes += _zeros_per_sample(y, out_step, prefix, self.dtype)
        self.steps.append(out_step)
        self.current = out_x

    def _anderson_loop(self, layer: ResidualBlock, prefix: str, y: str, n_steps: int) -> str:
        """``n_steps`` accelerated iterations of ``layer`` from ``x0 = y``: a plain first step that starts the history
        ``(x_1, T(x_0), f_0)``, then a ``Loop`` carrying it; returns the name of ``x_(n_steps)``."""
        h = self.example
        start = self._trace(layer.anderson_start, layer, (h,), ["y"], ["x", "image", "res"])
        state = [f"{prefix}start_{name}" for name in ("x", "image", "res")]
        _inline(
            self.nodes,
            self.inits,
            start,
            f"{prefix}start/",
            {"y": y, **dict(zip(["x", "image", "res"], state, strict=True))},
        )
        if n_steps == 1:
            return state[0]
        names_in, names_out = ["x", "image_prev", "res_prev", "y"], ["x_new", "image", "res"]
        step = self._trace(layer.anderson_step, layer, (h, h, h, h), names_in, names_out)
        carried = list(zip(names_in[:3], names_out, strict=True))
        body = _iterate_body(step, f"{prefix}it/", y, [BATCH, *h.shape[1:]], self.dtype, carried)
        trip, looped = f"{prefix}trip_count", [f"{prefix}loop_{name}" for name in ("x", "image", "res")]
        self.inits.append(helper.make_tensor(trip, TensorProto.INT64, [], [n_steps - 1]))
        self.nodes.append(helper.make_node("Loop", [trip, "", *state], looped, body=body, name=f"{prefix}loop"))
        return looped[0]

    def finish(self) -> onnx.ModelProto:
        """The preprocessing inverse, the ``residual`` output, and the model."""
        flow, nodes, dtype = self.flow, self.nodes, self.dtype
        if flow.preprocess is not None:
            piece = self._trace(lambda y: (flow.preprocess.inverse(y),), flow, (self.example,), ["h_in"], ["h_out"])
            _inline(nodes, self.inits, piece, "tail/", {"h_in": self.current, "h_out": "x"})
        else:
            nodes.append(helper.make_node("Identity", [self.current], ["x"]))
        if len(self.steps) > 1:
            nodes.append(helper.make_node("Max", self.steps, ["residual"]))
        elif self.steps:
            nodes.append(helper.make_node("Identity", self.steps, ["residual"]))
        else:
            nodes += _zeros_per_sample("z", "residual", "noloop/", dtype)
        graph = helper.make_graph(
            nodes,
            "acf_sample",
            [
                helper.make_tensor_value_info("z", dtype, [BATCH, flow.dim]),
                helper.make_tensor_value_info("temperature", dtype, [1]),
            ],
            [
                helper.make_tensor_value_info("x", dtype, [BATCH, *flow.data_shape]),
                helper.make_tensor_value_info("residual", dtype, [BATCH]),
            ],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="acf-deploy"
        )
        model.ir_version = self.ir_version
        return model


def _axes(*names: str) -> dict[str, dict[int, str]]:
    return {name: {0: BATCH} for name in names}


def _zeros_per_sample(source: str, target: str, prefix: str, dtype: int) -> list:
    """Nodes computing ``zeros(batch)`` from the first axis of ``source``."""
    zero = helper.make_tensor(f"{prefix}zero", dtype, [1], [0.0])
    return [
        helper.make_node("Shape", [source], [f"{prefix}shape"], start=0, end=1),
        helper.make_node("ConstantOfShape", [f"{prefix}shape"], [target], value=zero),
    ]
