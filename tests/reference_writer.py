"""Write checkpoints in the format of the public research code's ``train_img.py``, without that code.

Two uses in the tests: re-saving a real fixture with one thing changed (an option, a tensor, a global),
and writing a full-size Residual Flows checkpoint with random weights (no trained one exists offline).
Objects are pickled under the reference's class names by registering throwaway modules of those names
while saving, so the files name exactly the globals a real checkpoint names.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from acf_deploy.flows.blocks import ResidualBlock
from acf_deploy.flows.fork_attention import ForkDotProductAttention, ForkL2Attention
from acf_deploy.flows.layers import ActNorm
from acf_deploy.flows.lipschitz import LipSwish
from acf_deploy.flows.presets import build_flow
from acf_deploy.flows.reference import (
    ELU,
    ElementActNorm,
    Identity,
    LipschitzCube,
    ReferenceConv2d,
    ReferenceLinear,
    ReLU,
    Softplus,
)
from acf_deploy.importer.architecture import config_from_args
from acf_deploy.importer.safe_load import StandIn

#: ``train_img.py``'s parser defaults (Residual Flows), as its ``args`` holds them.
RESFLOW_DEFAULTS: dict[str, Any] = {
    "data": "cifar10", "dataroot": "data", "imagesize": 32, "nbits": 8, "block": "resblock", "coeff": 0.98,
    "vnorms": "2222", "n_lipschitz_iters": None, "sn_tol": 1e-3, "learn_p": False, "n_power_series": None,
    "factor_out": False, "n_dist": "poisson", "n_samples": 1, "n_exact_terms": 2, "var_reduc_lr": 0,
    "neumann_grad": True, "mem_eff": True, "act": "swish", "idim": 512, "nblocks": "16-16-16",
    "squeeze_first": False, "actnorm": True, "fc_actnorm": False, "batchnorm": False, "dropout": 0.0,
    "fc": False, "kernels": "3-1-3", "add_noise": True, "quadratic": False, "fc_end": True, "fc_idim": 128,
    "preact": True, "padding": 0, "first_resblock": True, "cdim": 256, "optimizer": "adam", "scheduler": False,
    "nepochs": 1000, "batchsize": 64, "lr": 1e-3, "wd": 0, "warmup_iters": 1000, "annealing_iters": 0,
    "save": "experiment1", "val_batchsize": 200, "seed": 0, "ema_val": True, "update_freq": 1, "task": "density",
    "scale_dim": False, "rcrop_pad_mode": "reflect", "padding_dist": "uniform", "resume": None, "begin_epoch": 0,
    "nworkers": 4, "print_freq": 20, "vis_freq": 500,
}  # fmt: skip

#: The reference's real MNIST configuration (its README): about 16.6M parameters.
MNIST_ARGS = {"data": "mnist", "imagesize": 28, "wd": 0, "nblocks": "16-16-16", "idim": 512}

#: The reference's class of each module kind ("{}" stands for the package, lib or resflows).
_CLASS_OF = {
    ResidualBlock: "{}.layers.iresblock.iResBlock",
    ReferenceConv2d: "{}.layers.base.mixed_lipschitz.InducedNormConv2d",
    ReferenceLinear: "{}.layers.base.mixed_lipschitz.InducedNormLinear",
    LipSwish: "{}.layers.base.activations.Swish",
    ELU: "torch.nn.modules.activation.ELU",
    Softplus: "torch.nn.modules.activation.Softplus",
    ReLU: "torch.nn.modules.activation.ReLU",
    Identity: "{}.layers.base.activations.Identity",
    LipschitzCube: "{}.layers.base.activations.LipschitzCube",
    ForkDotProductAttention: "{}.resflow.Self_Attn",
    ForkL2Attention: "{}.resflow.L2_Self_Attn",
    ElementActNorm: "{}.layers.act_norm.ActNorm1d",
    ActNorm: "{}.layers.act_norm.ActNorm2d",
}


@contextlib.contextmanager
def _reference_classes() -> Iterator[dict[str, type]]:
    """Classes named as the reference names them, importable while the block runs (pickle checks that)."""
    created: dict[str, type] = {}
    added: list[str] = []

    def get(qualified: str) -> type:
        if qualified not in created:
            module_name, name = qualified.rsplit(".", 1)
            parts = module_name.split(".")
            for depth in range(1, len(parts) + 1):  # the module and its parent packages
                prefix = ".".join(parts[:depth])
                if prefix not in sys.modules:
                    sys.modules[prefix] = types.ModuleType(prefix)
                    added.append(prefix)
            cls = type(name, (), {"__module__": module_name, "__qualname__": name})
            setattr(sys.modules[module_name], name, cls)
            created[qualified] = cls
        return created[qualified]

    try:
        yield get  # type: ignore[misc]
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _convert(value: Any, get) -> Any:
    """Stand-ins (as the importer loads them) back into objects of the reference's class names."""
    if isinstance(value, StandIn):
        obj = get(type(value).qualified_name).__new__(get(type(value).qualified_name))
        obj.__dict__.update({k: _convert(v, get) for k, v in value.fields.items()})
        return obj
    if isinstance(value, dict):
        return type(value)((k, _convert(v, get)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_convert(v, get) for v in value)
    return value


def save_reference_checkpoint(checkpoint: dict[str, Any], path: Path) -> Path:
    """``torch.save`` a checkpoint dict whose stand-ins become objects of the reference's class names."""
    with _reference_classes() as get:
        torch.save(_convert(checkpoint, get), path)
    return path


def load_fixture(path: Path) -> dict[str, Any]:
    from acf_deploy.importer.safe_load import load_reference_checkpoint

    return load_reference_checkpoint(path)[0]


def _tree_node(qualified: str, fields: dict[str, Any]) -> StandIn:
    node = type(qualified.rsplit(".", 1)[1], (StandIn,), {"qualified_name": qualified})()
    node.__setstate__({"training": False, "_parameters": {}, "_buffers": {}, **fields})
    return node


def _power_vectors(module: ReferenceConv2d | ReferenceLinear, iterations: int = 20) -> None:
    """Power-iteration ``u``, ``v`` of the raw weight, as the reference's training leaves them."""
    with torch.no_grad():
        module.power_iteration(iterations)


def random_reference_checkpoint(
    overrides: dict[str, Any], package: str = "resflows", seed: int = 0, attention: str | None = None, heads: int = 1
) -> dict[str, Any]:
    """A train_img.py-format checkpoint dict (stand-ins inside) with random weights for ``overrides``' model."""
    torch.manual_seed(seed)
    args = argparse.Namespace(**{**RESFLOW_DEFAULTS, **overrides})
    config = config_from_args(args, attention, heads)
    flow = build_flow(config)
    state: dict[str, torch.Tensor] = {}
    shadow: dict[str, torch.Tensor] = {}
    root = _tree_node(f"{package}.resflow.ResidualFlow", {})
    for module in flow.modules():
        name = getattr(module, "reference_name", None)
        if name is None:
            continue
        params, buffers = _reference_tensors(module)
        for key, value in params.items():
            state[f"{name}.{key}"] = value
            shadow[f"{name}.{key}"] = value + 1e-3 * torch.randn_like(value)  # the EMA differs slightly
        for key, value in buffers.items():
            state[f"{name}.{key}"] = value
        kind = next(q for t, q in _CLASS_OF.items() if isinstance(module, t)).format(package)
        extra = {"norm_value": module.norm_value.clone()} if isinstance(module, ForkDotProductAttention) else {}
        _place(root, name, _tree_node(kind, extra), package)
    ema = _tree_node(f"{package}.utils.ExponentialMovingAverage", {})
    ema.__setstate__(
        {"module": root, "decay": 0.999, "shadow_params": shadow, "nparams": sum(v.numel() for v in shadow.values())}
    )
    return {"state_dict": state, "optimizer_state_dict": {}, "args": args, "ema": ema, "test_bpd": 1.0}


def _place(root: StandIn, path: str, node: StandIn, package: str) -> None:
    """Hang ``node`` at ``path`` in the pickled module tree, creating containers on the way."""
    parts = path.split(".")
    current = root
    for depth, part in enumerate(parts):
        children = current.fields.setdefault("_modules", {})
        if depth == len(parts) - 1:
            children[part] = node
        elif part not in children:
            children[part] = _tree_node(_container(parts, depth, package), {})
        current = children[part]


def _container(parts: list[str], depth: int, package: str) -> str:
    """The reference's class of the container at ``parts[depth]`` of a module path."""
    part, following = parts[depth], parts[depth + 1]
    if part in ("transforms", "chain"):
        return "torch.nn.modules.container.ModuleList"
    if parts[depth - 1] == "transforms":
        return f"{package}.resflow.StackediResBlocks"
    if following == "fc_module":
        return f"{package}.resflow.FCWrapper"
    if part == "nnet" and following == "nnet":
        return f"{package}.resflow.FCNet"
    return "torch.nn.modules.container.Sequential"


def _reference_tensors(module: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random tensors of the module, named and shaped as the reference stores them: (parameters, buffers)."""
    if isinstance(module, ActNorm):
        n = module.log_scale.numel()
        return {"weight": 0.1 * torch.randn(n), "bias": 0.1 * torch.randn(n)}, {"initialized": torch.tensor(1)}
    if isinstance(module, LipSwish):
        return {"beta": torch.tensor([0.5]) + 0.1 * torch.randn(1)}, {}
    if isinstance(module, (ReferenceConv2d, ReferenceLinear)):
        with torch.no_grad():
            bound = 1 / math.sqrt(module.weight[0].numel())
            module.weight.uniform_(-bound, bound)
            module.bias.uniform_(-bound, bound)
            module.u.normal_()
            module.v.normal_()
        _power_vectors(module)
        sigma = float((module.u * module._op(module.weight, module.v)).sum().detach())
        buffers = {"u": module.u.flatten().clone(), "v": module.v.flatten().clone(), "scale": torch.tensor(sigma)}
        if isinstance(module, ReferenceConv2d):
            buffers |= {
                "initialized": torch.tensor(1),
                "spatial_dims": torch.tensor(module.input_hw, dtype=torch.float),
            }
        return {"weight": module.weight.detach().clone(), "bias": module.bias.detach().clone()}, buffers
    if isinstance(module, ResidualBlock):
        return {}, {"last_n_samples": torch.zeros(1), "last_firmom": torch.zeros(1), "last_secmom": torch.zeros(1)}
    if isinstance(module, ForkDotProductAttention):
        inner, c = module.weight_q.shape
        params = {"gamma": torch.full((1,), 0.05)}
        for role, out in (("query", inner), ("key", inner), ("value", c)):
            params[f"{role}_conv.weight"] = 0.2 * torch.randn(out, c, 1, 1)
            params[f"{role}_conv.bias"] = 0.1 * torch.randn(out)
        with torch.no_grad():
            module.norm_value.fill_(float(F.softplus(torch.randn(())) + 0.5))
        return params, {}
    if isinstance(module, ForkL2Attention):
        h, d, c = module.weight_q.shape
        params = {"gamma": torch.full((1,), 0.05), "out_conv.weight": 0.2 * torch.randn(c, c, 1, 1)}
        params["out_conv.bias"] = 0.1 * torch.randn(c)
        for role in ("query", "value"):
            for i in range(h):
                params[f"{role}_conv_list.{i}.weight"] = 0.2 * torch.randn(d, c, 1, 1)
                params[f"{role}_conv_list.{i}.bias"] = 0.1 * torch.randn(d)
        return params, {}
    return {}, {}  # activations without parameters
