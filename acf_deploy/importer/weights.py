"""Copy a reference checkpoint's tensors into the acf-deploy layers rebuilt from its ``args``.

Parameters come from the EMA's ``shadow_params`` (``--weights ema``, what the reference evaluates and
samples with) or from ``state_dict`` (``raw``); buffers (the power-iteration vectors ``u`` and ``v``) always
come from ``state_dict``, and the dot-product attention's ``norm_value`` from the pickled module, the only
place it exists. Every tensor the rebuilt model needs must be there with the right shape and finite
values, and every tensor of the checkpoint must be used (estimator statistics aside), so a checkpoint
whose ``args`` do not describe its weights is refused instead of half-loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import BadInput
from ..flows.fork_attention import ForkDotProductAttention, ForkL2Attention
from ..flows.layers import ActNorm
from ..flows.lipschitz import LipSwish
from ..flows.reference import ReferenceConv2d, ReferenceLinear
from .safe_load import StandIn

#: State the reference keeps for training only (the log-det estimator's statistics, initialisation flags).
IGNORED_SUFFIXES = (
    ".geom_p",
    ".lamb",
    ".last_n_samples",
    ".last_firmom",
    ".last_secmom",
    ".initialized",
    ".scale",
    ".spatial_dims",
)


class ReferenceTensors:
    """Name -> tensor lookups over one checkpoint, remembering what was used."""

    def __init__(self, checkpoint: dict[str, Any], weights: str):
        self.state: dict[str, torch.Tensor] = checkpoint["state_dict"]
        self.ema = checkpoint.get("ema")
        self.params = self.state
        if weights == "ema":
            shadow = self.ema.fields.get("shadow_params") if isinstance(self.ema, StandIn) else None
            if not isinstance(shadow, dict) or not shadow:
                raise BadInput("the checkpoint has no EMA weights (ema.shadow_params); import it with --weights raw")
            self.params = shadow
        self.used: set[str] = set()

    def param(self, name: str) -> torch.Tensor:
        return self._take(self.params, name, "EMA weights" if self.params is not self.state else "state_dict")

    def buffer(self, name: str) -> torch.Tensor:
        return self._take(self.state, name, "state_dict")

    def _take(self, table: dict[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
        tensor = table.get(name)
        if not isinstance(tensor, torch.Tensor):
            raise BadInput(f"the checkpoint's {where} lack {name!r}, which its args imply; is it from another model?")
        self.used.add(name)
        return tensor

    def module_field(self, path: str, field: str) -> Any:
        """An attribute of the pickled module at ``path`` (e.g. ``norm_value``), found in ``ema.module``."""
        node = self.ema.fields.get("module") if isinstance(self.ema, StandIn) else None
        for part in path.split("."):
            children = node.fields.get("_modules") if isinstance(node, StandIn) else None
            node = children.get(part) if isinstance(children, dict) else None
        if not isinstance(node, StandIn) or field not in node.fields:
            raise BadInput(f"the pickled model has no {path}.{field}, which the import needs (it is not in state_dict)")
        return node.fields[field]

    def unused(self) -> list[str]:
        return sorted(k for k in self.state if k not in self.used and not k.endswith(IGNORED_SUFFIXES))


def _assign(target: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if value.numel() != target.numel():
        raise BadInput(f"tensor {name!r} has shape {tuple(value.shape)}, the architecture needs {tuple(target.shape)}")
    if not torch.isfinite(value).all():
        raise BadInput(f"tensor {name!r} contains NaN or infinite values")
    with torch.no_grad():
        target.copy_(value.reshape(target.shape).to(target.dtype))


def _actnorm(m: ActNorm, prefix: str, src: ReferenceTensors) -> None:
    _assign(m.log_scale, src.param(f"{prefix}.weight"), f"{prefix}.weight")
    _assign(m.bias, src.param(f"{prefix}.bias"), f"{prefix}.bias")


def _swish(m: LipSwish, prefix: str, src: ReferenceTensors) -> None:
    _assign(m.raw_beta, src.param(f"{prefix}.beta"), f"{prefix}.beta")


def _induced_norm(m: ReferenceConv2d | ReferenceLinear, prefix: str, src: ReferenceTensors) -> None:
    for name in ("weight", "bias"):
        _assign(getattr(m, name), src.param(f"{prefix}.{name}"), f"{prefix}.{name}")
    for name in ("u", "v"):
        _assign(getattr(m, name), src.buffer(f"{prefix}.{name}"), f"{prefix}.{name}")
    dims = src.state.get(f"{prefix}.spatial_dims")
    if isinstance(m, ReferenceConv2d) and m.weight.shape[-1] > 1 and dims is not None:
        if tuple(int(d) for d in dims.tolist()) != m.input_hw:
            raise BadInput(f"{prefix}.spatial_dims is {dims.tolist()}, but the architecture gives {list(m.input_hw)}")


def _conv(src: ReferenceTensors, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1x1 ``nn.Conv2d``'s weight as an ``(out, in)`` matrix, and its bias."""
    weight = src.param(f"{prefix}.weight")
    if weight.dim() != 4 or weight.shape[2:] != (1, 1):
        raise BadInput(f"{prefix}.weight has shape {tuple(weight.shape)}, not that of a 1x1 convolution")
    return weight[:, :, 0, 0], src.param(f"{prefix}.bias")


def _dot_product(m: ForkDotProductAttention, prefix: str, src: ReferenceTensors) -> None:
    for role, name in (("q", "query_conv"), ("k", "key_conv"), ("v", "value_conv")):
        weight, bias = _conv(src, f"{prefix}.{name}")
        _assign(getattr(m, f"weight_{role}"), weight, f"{prefix}.{name}.weight")
        _assign(getattr(m, f"bias_{role}"), bias, f"{prefix}.{name}.bias")
    _assign(m.gamma, src.param(f"{prefix}.gamma"), f"{prefix}.gamma")
    norm_value = src.module_field(prefix, "norm_value")
    if not isinstance(norm_value, torch.Tensor) or norm_value.numel() != 1:
        raise BadInput(f"{prefix}.norm_value in the pickled model is not a scalar tensor")
    norm_value = norm_value.detach()  # the reference computed it with autograd history
    if not float(norm_value) > 0:
        raise BadInput(f"{prefix}.norm_value is {float(norm_value)}, not a positive number")
    _assign(m.norm_value, norm_value, f"{prefix}.norm_value")


def _l2(m: ForkL2Attention, prefix: str, src: ReferenceTensors) -> None:
    for role, name in (("q", "query_conv_list"), ("v", "value_conv_list")):
        heads = [_conv(src, f"{prefix}.{name}.{h}") for h in range(m.heads)]
        _assign(getattr(m, f"weight_{role}"), torch.stack([w for w, _ in heads]), f"{prefix}.{name} weights")
        _assign(getattr(m, f"bias_{role}"), torch.stack([b for _, b in heads]), f"{prefix}.{name} biases")
    weight, bias = _conv(src, f"{prefix}.out_conv")
    _assign(m.weight_o, weight, f"{prefix}.out_conv.weight")
    _assign(m.bias_o, bias, f"{prefix}.out_conv.bias")
    _assign(m.gamma, src.param(f"{prefix}.gamma"), f"{prefix}.gamma")


_LOADERS: dict[type, Callable[[Any, str, ReferenceTensors], None]] = {
    ActNorm: _actnorm,
    LipSwish: _swish,
    ReferenceConv2d: _induced_norm,
    ReferenceLinear: _induced_norm,
    ForkDotProductAttention: _dot_product,
    ForkL2Attention: _l2,
}


def fill_from_reference(flow: nn.Module, src: ReferenceTensors) -> None:
    """Copy every tensor the rebuilt model needs; refuse a checkpoint with tensors it does not explain."""
    for module in flow.modules():
        prefix = getattr(module, "reference_name", None)
        loader = next((fn for kind, fn in _LOADERS.items() if isinstance(module, kind)), None)
        if prefix is not None and loader is not None:
            loader(module, prefix, src)
    unused = src.unused()
    if unused:
        raise BadInput(
            f"the checkpoint holds {len(unused)} tensors that the architecture in its args does not have, "
            f"first {unused[0]!r}; was it trained with a modified reference?"
        )
