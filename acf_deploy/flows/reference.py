r"""The Residual Flows architecture as its public research code builds it, for imported checkpoints.

:func:`reference_layers` rebuilds, from a normalised description of the reference's command line (the
``reference`` section of an imported model's config), the exact layer sequence that code's
``ResidualFlow`` builds with ``factor_out=False``: per scale a leading ActNorm before the very first block,
i-ResBlocks (the very first without its initial activation) each followed by ActNorm, a squeeze between
scales, and fully connected end blocks with their ActNorm on the last scale. The ACF fork adds its
attention inside every convolutional block's branch, before the last convolution.

Every module that holds the reference's tensors gets a ``reference_name`` attribute, the prefix its
tensors carry in the reference's ``state_dict``, so the importer can fill it and nothing else needs to
know the reference's naming.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Branch, Chain, Linear, Tensor, lift
from .blocks import ResidualBlock
from .fork_attention import ForkDotProductAttention, ForkL2Attention
from .layers import ActNorm, Squeeze
from .lipschitz import LipSwish, SNConv2d, SNLinear

__all__ = ["ACTIVATIONS", "FC_END_BLOCKS", "reference_layers", "n_scales"]

#: The reference appends this many fully connected blocks to its last scale when ``fc_end`` is set.
FC_END_BLOCKS = 4


class ReferenceConv2d(SNConv2d):
    """The reference's ``InducedNormConv2d`` (2-norms) at inference: ``W / max(1, u . conv(v, W) / coeff)``.

    ``u`` and ``v`` are the stored power-iteration vectors (full maps for ``k x k`` kernels, channel vectors
    for 1x1), used as they are. ``bake`` freezes that weight and certifies its exact norm without
    rescaling it, so the exported model is the reference's model.
    """

    rescale = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, hw: tuple[int, int], coeff: float):
        vector_hw = (1, 1) if kernel_size == 1 else hw
        super().__init__(in_channels, out_channels, kernel_size, hw, coeff, init_iterations=0, vector_hw=vector_hw)


class ReferenceLinear(SNLinear):
    """The reference's ``InducedNormLinear`` (2-norms) at inference, with its stored ``u`` and ``v``."""

    rescale = False

    def __init__(self, in_features: int, out_features: int, coeff: float):
        super().__init__(in_features, out_features, coeff, init_iterations=0)


class _Elementwise(Branch):
    """A 1-Lipschitz activation applied elementwise: ``f`` and its derivative ``df``."""

    def f(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def df(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x)

    def linearize(self, x: Tensor) -> tuple[Tensor, Linear]:
        slope = lift(self.df(x))
        return self.f(x), lambda vs: vs * slope

    def lipschitz(self) -> float:
        return 1.0


class ELU(_Elementwise):
    def f(self, x: Tensor) -> Tensor:
        return F.elu(x)

    def df(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, torch.ones_like(x), torch.exp(torch.clamp(x, max=0.0)))


class Softplus(_Elementwise):
    def f(self, x: Tensor) -> Tensor:
        return F.softplus(x)

    def df(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x)


class ReLU(_Elementwise):
    def f(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def df(self, x: Tensor) -> Tensor:
        return (x > 0).to(x.dtype)


class Identity(_Elementwise):
    def f(self, x: Tensor) -> Tensor:
        return x

    def df(self, x: Tensor) -> Tensor:
        return torch.ones_like(x)


class LipschitzCube(_Elementwise):
    """``x^3 / 3`` inside ``[-1, 1]``, continued linearly with slope 1 outside."""

    def f(self, x: Tensor) -> Tensor:
        inside = x * x * x / 3
        return torch.where(x >= 1, x - 2 / 3, torch.where(x <= -1, x + 2 / 3, inside))

    def df(self, x: Tensor) -> Tensor:
        return torch.where(x.abs() >= 1, torch.ones_like(x), x * x)


#: The reference's ``--act`` choices.
ACTIVATIONS = {
    "swish": LipSwish,
    "elu": ELU,
    "softplus": Softplus,
    "relu": ReLU,
    "identity": Identity,
    "lcube": LipschitzCube,
}


class Flattened(Branch):
    """The reference's ``FCNet``: a fully connected branch on the flattened ``(C H W)`` features."""

    def __init__(self, inner: Chain, shape: tuple[int, int, int]):
        super().__init__()
        self.inner, self.shape = inner, tuple(shape)

    @property
    def guarantee(self) -> str:  # type: ignore[override]
        return self.inner.guarantee

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.flatten(1)).reshape(-1, *self.shape)  # static sizes: exported shapes stay provable

    def linearize(self, x: Tensor) -> tuple[Tensor, Linear]:
        y, apply = self.inner.linearize(x.flatten(1))
        return y.reshape(-1, *self.shape), lambda vs: apply(vs.flatten(2)).unflatten(2, self.shape)

    def lipschitz(self) -> float:
        return self.inner.lipschitz()

    def bake(self) -> None:
        self.inner.bake()


class ElementActNorm(ActNorm):
    """The reference's ``ActNorm1d`` on flattened features: one shift and log-scale per element of ``(C, H, W)``."""

    def __init__(self, shape: tuple[int, ...]):
        nn.Module.__init__(self)
        self.spatial = False
        self.bias = nn.Parameter(torch.zeros(1, *shape))
        self.log_scale = nn.Parameter(torch.zeros(1, *shape))
        self.register_buffer("initialized", torch.tensor(1, dtype=torch.uint8))


def n_scales(n_blocks: list[int], hw: tuple[int, int]) -> int:
    """The reference's number of scales: at most one per ``n_blocks`` entry, halving while both sides are >= 4."""
    h, w = hw
    count = 0
    while h >= 4 and w >= 4:
        count, h, w = count + 1, h // 2, w // 2
    return min(len(n_blocks), count)


def _named(module: nn.Module, name: str) -> nn.Module:
    module.reference_name = name  # type: ignore[attr-defined]
    return module


class _Sequence:
    """An ``nn.Sequential`` of the reference being rebuilt: ``prefix.0``, ``prefix.1``, ..."""

    def __init__(self, prefix: str):
        self.prefix, self.parts, self.index = prefix, [], 0

    def add(self, module: Branch) -> None:
        self.parts.append(_named(module, f"{self.prefix}.{self.index}"))
        self.index += 1

    def skip(self) -> None:
        """A module without tensors that is the identity at inference (dropout) still takes an index."""
        self.index += 1


class _Builder:
    """Walks the reference's construction order, naming every module as its ``state_dict`` does."""

    def __init__(self, arch: dict[str, Any]):
        self.arch = arch
        self.layers: list[nn.Module] = []

    def activation(self) -> Branch:
        return ACTIVATIONS[self.arch["activation"]]()

    def actnorm(self, name: str, shape: tuple[int, int, int], fc: bool) -> nn.Module:
        if fc:  # FCWrapper(ActNorm1d): its tensors live under fc_module
            return _named(ElementActNorm(shape), f"{name}.fc_module")
        return _named(ActNorm(shape[0]), name)

    def conv_block(self, name: str, shape: tuple[int, int, int], first: bool) -> ResidualBlock:
        arch, (c, h, w) = self.arch, shape
        kernels, idim, coeff = arch["kernels"], arch["idim"], arch["coeff"]
        net = _Sequence(f"{name}.nnet")
        if not first and arch["preact"]:
            net.add(self.activation())
        widths = [c] + [idim] * (len(kernels) - 1)
        for i, k in enumerate(kernels[:-1]):
            net.add(ReferenceConv2d(widths[i], widths[i + 1], k, (h, w), coeff))
            net.add(self.activation())
        if arch["dropout"]:
            net.skip()
        if arch["attention"] == "dp":
            net.add(ForkDotProductAttention(idim, (h, w)))
        elif arch["attention"] == "l2":
            net.add(ForkL2Attention(idim, (h, w), arch["heads"]))
        net.add(ReferenceConv2d(widths[-1], c, kernels[-1], (h, w), coeff))
        kind = f"iresblock-fork-{arch['attention']}" if arch["attention"] else "iresblock"
        return _named(ResidualBlock(Chain(*net.parts), kind, verify_if_unbounded=True), name)

    def fc_block(self, name: str, shape: tuple[int, int, int], idim: int) -> ResidualBlock:
        arch = self.arch
        dim = shape[0] * shape[1] * shape[2]
        net = _Sequence(f"{name}.nnet.nnet")
        if arch["preact"]:
            net.add(self.activation())
        widths = [dim] + [idim] * (len(arch["kernels"]) - 1)
        for i in range(len(widths) - 1):
            net.add(ReferenceLinear(widths[i], widths[i + 1], arch["coeff"]))
            net.add(self.activation())
        if arch["dropout"]:
            net.skip()
        net.add(ReferenceLinear(widths[-1], dim, arch["coeff"]))
        block = ResidualBlock(Flattened(Chain(*net.parts), shape), "iresblock-fc", verify_if_unbounded=True)
        return _named(block, name)

    def scale(self, i: int, shape: tuple[int, int, int], last: bool) -> None:
        """One ``StackediResBlocks``: ``transforms.i.chain.*``."""
        arch = self.arch
        chain = _Sequence(f"transforms.{i}.chain")
        if i == 0:
            chain.skip()  # chain.0 of the first scale is the LogitTransform: the flow's preprocess
        first = arch["first_resblock"] and i == 0

        def add(make) -> None:
            self.layers.append(make(f"{chain.prefix}.{chain.index}"))
            chain.skip()

        if first and arch["actnorm"]:
            add(lambda n: self.actnorm(n, shape, arch["fc"]))
        if first and arch["fc_actnorm"]:
            add(lambda n: self.actnorm(n, shape, True))
        for b in range(arch["n_blocks"][i]):
            if arch["fc"]:
                add(lambda n: self.fc_block(n, shape, arch["idim"]))
            else:
                # the reference passes first_resblock only to the blocks of the scales it squeezes
                add(lambda n, b=b: self.conv_block(n, shape, first and b == 0 and not last))
            if arch["actnorm"]:
                add(lambda n: self.actnorm(n, shape, arch["fc"]))
            if arch["fc_actnorm"]:
                add(lambda n: self.actnorm(n, shape, True))
        if not last:
            add(lambda _n: Squeeze())  # SqueezeLayer holds no tensors
        elif arch["fc_end"]:
            for _ in range(FC_END_BLOCKS):
                add(lambda n: self.fc_block(n, shape, arch["fc_idim"]))
                if arch["actnorm"] or arch["fc_actnorm"]:
                    add(lambda n: self.actnorm(n, shape, True))


def reference_layers(config: dict[str, Any]) -> list[nn.Module]:
    """The layers (after the logit preprocessing) of the reference model ``config["reference"]`` describes."""
    arch = config["reference"]
    c, h, w = config["data_shape"]
    builder = _Builder(arch)
    if arch["squeeze_first"]:  # the training script squeezes before the model
        builder.layers.append(Squeeze())
        c, h, w = 4 * c, h // 2, w // 2
    count = n_scales(arch["n_blocks"], (h, w))
    for i in range(count):
        builder.scale(i, (c, h, w), last=i == count - 1)
        c, h, w = 4 * c, h // 2, w // 2
    return builder.layers
