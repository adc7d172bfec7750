r"""Reduced-precision exports: an explicitly cast graph with fp32 islands (docs/guarantees.md §5).

A ``fp16``/``bf16`` export is traced from a *mixed-precision view* of the flow, not converted after
the fact, so every cast is written in the model code and every tensor type in the graph is one we
chose (TensorRT's strongly typed mode takes precision from exactly these types):

* **Half**: the residual branches ``g`` and their hand-written JVPs (the Jacobian columns of the
  exact log-det, the tangents of the series), the Banach fixed-point iterations of the sampler
  (their loop-carried ``x`` is half; ``y`` is cast to half once per block), Glow's coupling
  networks.
* **fp32 islands**: graph inputs and outputs; the "highway" ``h`` between layers (``y = x + g(x)``
  adds a half ``g(x)`` cast to fp32); the LU of ``I + J`` and every log-det term and its
  accumulation; the series' ``v^T J^k v`` products; the logit transform and its log-det; ActNorm,
  Squeeze and the invertible 1x1 convolution (cheap elementwise or CxC maps on the highway); the
  prior log-density, bits/dim, the fixed-point step norms and the ``residual`` output.

Nothing here is float64. The weights of the half parts are rounded to half once, at export; the
Lipschitz certificates in the manifest refer to the fp32 weights (rounding moves each entry by at
most one half-precision unit in the last place, 2^-11 relative for fp16, 2^-8 for bf16).
"""

from __future__ import annotations

import copy

import onnx
import onnx.version_converter
import torch
from onnx import TensorProto
from torch import nn

from ..errors import BadInput, CheckFailed
from ..flows.base import Branch, Linear, Tensor, lift
from ..flows.blocks import ResidualBlock
from ..flows.flow import Flow
from ..flows.layers import AffineCoupling
from ..flows.lipschitz import LipSwish

PRECISIONS = ("fp32", "fp16", "bf16")
HALF_PRECISIONS = ("fp16", "bf16")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_HALF_ONNX = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
#: ONNX admits bfloat16 for Conv (and Softplus, EyeLike, ...) only from opset 22.
MIN_OPSET = {"bf16": 22}

__all__ = [
    "HALF_PRECISIONS",
    "ONNX_DTYPES",
    "PRECISIONS",
    "TORCH_DTYPES",
    "MixedResidualBlock",
    "finalize_graph",
    "float_tensor_types",
    "graph_opset",
    "half_fraction",
    "mixed_precision_flow",
]


class _CastBranch(Branch):
    """Runs a half copy of a branch on fp32 inputs: casts in, computes in half, casts the results to fp32."""

    def __init__(self, inner: Branch, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    @property
    def guarantee(self) -> str:  # type: ignore[override]
        return self.inner.guarantee

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.to(self.dtype)).float()

    def linearize(self, x: Tensor) -> tuple[Tensor, Linear]:
        y, apply = self.inner.linearize(x.to(self.dtype))
        return y.float(), lambda vs: apply(vs.to(self.dtype)).float()

    def lipschitz(self) -> float:
        return self.inner.lipschitz()


class _CastNet(nn.Module):
    """A half copy of a plain network (Glow's coupling CNN) between fp32 tensors."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.to(self.dtype)).float()


_INV_1_1 = 1.0 / 1.1


class _HalfLipSwish(LipSwish):
    r"""LipSwish with its ``1/1.1`` as a multiplication: the same map, better rounded in half.

    Traced in half, ``x s / 1.1`` divides by ``1.1`` rounded to half (1.0996, 3.6e-4 too small), a bias
    that every LipSwish of every block repeats; ``x s (1/1.1)`` multiplies by 0.90918 (9.8e-5 off).
    """

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.beta() * x) * _INV_1_1

    def linearize(self, x: Tensor) -> tuple[Tensor, Linear]:
        beta = self.beta()
        s = torch.sigmoid(beta * x)
        slope = lift((s + beta * x * s * (1 - s)) * _INV_1_1)
        return x * s * _INV_1_1, lambda vs: vs * slope


def _swap_lipswish(module: nn.Module) -> None:
    """Replace every :class:`LipSwish` below ``module`` by :class:`_HalfLipSwish` with the same state."""
    for name, child in list(module.named_children()):
        if type(child) is LipSwish:
            half = _HalfLipSwish()
            half.raw_beta, half.baked_beta = child.raw_beta, child.baked_beta
            module._modules[name] = half
        else:
            _swap_lipswish(child)


class MixedResidualBlock(ResidualBlock):
    r"""``y = x + g(x)`` with ``g`` in half, the sum and the log-det in fp32.

    The inverse iterates ``x <- y - g(x)`` with ``x`` and ``y`` carried in fp32 and only ``g``
    evaluated in half: carrying ``x`` in half rounds every iterate and cost about 12x in sample
    error (measured: 9e-4 against 7e-5 max-abs on a small trained digits model).
    """

    def __init__(self, block: ResidualBlock, dtype: torch.dtype):
        inner = copy.deepcopy(block.g).to(dtype)
        _swap_lipswish(inner)
        super().__init__(_CastBranch(inner, dtype), block.kind)


def mixed_precision_flow(flow: Flow, precision: str) -> Flow:
    """A copy of ``flow`` (already baked) whose residual branches and coupling networks run in ``precision``.

    ``fp32`` returns ``flow`` itself. Run eagerly, the copy is a close model of the exported graph
    (PyTorch's CPU half kernels round every op's output to half, as a GPU does), except that PyTorch
    applies Python scalars in fp32 where the traced graph holds them as half constants.
    """
    if precision not in PRECISIONS:
        raise BadInput(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32":
        return flow
    dtype = TORCH_DTYPES[precision]
    mixed = copy.deepcopy(flow)
    for index, layer in enumerate(mixed.layers):
        if isinstance(layer, ResidualBlock):
            mixed.layers[index] = MixedResidualBlock(layer, dtype)
        elif isinstance(layer, AffineCoupling):
            layer.net = _CastNet(layer.net.to(dtype), dtype)
    return mixed.eval()


def graph_opset(model: onnx.ModelProto) -> int:
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def finalize_graph(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """Raise the opset where the precision needs it and check the graph with full type inference.

    Type-consistency (every op's inputs of one type, as ONNX's schemas demand) is what TensorRT's
    strongly typed mode relies on, so half graphs are checked here rather than trusted.
    """
    if precision == "fp32":
        return model
    need = MIN_OPSET.get(precision, 0)
    if graph_opset(model) < need:
        model = onnx.version_converter.convert_version(model, need)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise CheckFailed(f"the {precision} graph is not a valid, type-consistent ONNX model: {exc}") from None
    return model


# --------------------------------------------------------------------------- graph statistics
def _typed_values(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor (inputs, outputs, initializers, inferred values), Loop bodies included."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
    except Exception:  # noqa: BLE001 - statistics must not fail an export; fall back to what is declared
        inferred = model
    types: dict[str, int] = {}

    def visit(graph: onnx.GraphProto, scope: str) -> None:
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.HasField("tensor_type"):
                types[scope + value.name] = value.type.tensor_type.elem_type
        for init in graph.initializer:
            types[scope + init.name] = init.data_type
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g, f"{scope}{node.name or node.output[0]}/")
                if attr.type == onnx.AttributeProto.TENSOR:
                    types[scope + node.output[0]] = attr.t.data_type

    visit(inferred.graph, "")
    return types


def float_tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Count of named floating-point tensors per element type name (``FLOAT``, ``FLOAT16``, ...)."""
    counts: dict[str, int] = {}
    floating = {TensorProto.FLOAT, TensorProto.DOUBLE, *_HALF_ONNX}
    for elem in _typed_values(model).values():
        if elem in floating:
            name = TensorProto.DataType.Name(elem)
            counts[name] = counts.get(name, 0) + 1
    return counts


def half_fraction(model: onnx.ModelProto) -> float:
    """Share of the graph's floating-point tensors (Loop bodies included) that are fp16 or bf16."""
    counts = float_tensor_types(model)
    half = counts.get("FLOAT16", 0) + counts.get("BFLOAT16", 0)
    total = sum(counts.values())
    return half / total if total else 0.0
