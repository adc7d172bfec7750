"""Named, versioned model presets and the builder that turns a config into a :class:`Flow`.

A config is a JSON-able dict; it travels with the weights in every checkpoint, so a flow can
always be rebuilt exactly from its checkpoint alone.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from torch import nn

from .attention import ACFBranch, DotProductAttention, GatedAttention, L2Attention
from .base import Branch, Chain
from .blocks import ResidualBlock
from .config import validate_config
from .flow import Flow
from .layers import ActNorm, AffineCoupling, InvConv1x1, Squeeze
from .lipschitz import LipSwish, SNConv2d, SNLinear
from .reference import reference_layers

PRESET_VERSION = 2

_DIGITS = {"data": "digits", "data_shape": [1, 8, 8], "n_levels": 17, "logit_alpha": 0.05}
_TRAIN = {
    "epochs": 16,
    "batch_size": 64,
    "lr": 2e-3,
    "warmup_steps": 100,
    "ema_decay": 0.99,
    "grad_clip": 1.0,
}
_RESFLOW = {
    "host": "resflow",
    "scales": [4, 4],
    "hidden": 32,
    "coeff": 0.9,
    "heads": 2,
    "attention": None,
}
#: Attention inside g: a smooth gate that starts half open, within 2 x 2 windows (a 4 x 4 map's certified
#: bound is 3.8 times smaller than over all 16 tokens; a 2 x 2 map is one window).
_ATTENTION = {"gate": "convex", "window": 2}
_ACF_L2 = {**_DIGITS, **_RESFLOW, **_ATTENTION, "attention": "l2"}
_GLOW = {"host": "glow", "scales": [4, 4], "hidden": 32, "coeff": 0.9, "heads": 2, "acf": None, "acf_c": 0.9}

PRESETS: dict[str, dict[str, Any]] = {
    "digits-acf-l2": {**_ACF_L2, "train": dict(_TRAIN)},
    "digits-acf-dp": {**_DIGITS, **_RESFLOW, **_ATTENTION, "attention": "dp", "train": dict(_TRAIN)},
    # ablations of the gate: the first gate, which starts closed and stays there, and a gate held half open
    "digits-acf-l2-abs-gate": {**_ACF_L2, "gate": "abs", "train": dict(_TRAIN)},
    "digits-acf-l2-open-gate": {**_ACF_L2, "gate": "open", "train": dict(_TRAIN)},
    "digits-resflow": {**_DIGITS, **_RESFLOW, "train": dict(_TRAIN)},
    "digits-glow": {**_DIGITS, **_GLOW, "train": dict(_TRAIN)},
    "digits-glow-acf": {**_DIGITS, **_GLOW, "acf": "l2", "train": dict(_TRAIN)},
    "toy-resflow": {
        "data": "moons",
        "data_shape": [2],
        "n_levels": None,
        "logit_alpha": None,
        "host": "toy",
        "blocks": 8,
        "hidden": 64,
        "coeff": 0.9,
        "train": {**_TRAIN, "epochs": 30, "batch_size": 200, "lr": 5e-3, "train_size": 8000},
    },
    "mnist-acf-l2": {
        "data": "mnist",
        "data_shape": [1, 28, 28],
        "n_levels": 256,
        "logit_alpha": 1e-6,
        **_RESFLOW,
        **_ATTENTION,
        "window": 7,
        "hidden": 64,
        "attention": "l2",
        "heads": 4,
        "train": {**_TRAIN, "epochs": 100},
    },
    "cifar10-acf-l2": {
        "data": "cifar10",
        "data_shape": [3, 32, 32],
        "n_levels": 256,
        "logit_alpha": 0.05,
        **_RESFLOW,
        **_ATTENTION,
        "window": 4,
        "scales": [4, 4, 4],
        "hidden": 128,
        "attention": "l2",
        "heads": 4,
        "train": {**_TRAIN, "epochs": 100},
    },
}


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of the preset's config with ``overrides`` applied (``train`` merged key by key)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = copy.deepcopy(PRESETS[name])
    train = overrides.pop("train", None)
    config.update(overrides)
    if train:
        config["train"].update(train)
    config["preset"] = name
    config["preset_version"] = PRESET_VERSION
    return config


def _attention(
    kind: str, channels: int, heads: int, hw: tuple[int, int], window: tuple[int, int] | None = None
) -> nn.Module:
    if kind == "l2":
        return L2Attention(channels, heads, hw, window)
    if kind == "dp":
        return DotProductAttention(channels, heads, hw, window)
    raise ValueError(f"unknown attention {kind!r}; use 'l2' or 'dp'")


def attention_window(config: dict[str, Any], hw: tuple[int, int]) -> tuple[int, int]:
    """The attention windows' size on an ``hw`` map: ``window`` clipped to the map, or the whole map."""
    side = config.get("window")  # checkpoints from before windows attend over the whole map
    return (min(side, hw[0]), min(side, hw[1])) if side else hw


def _conv_branch(channels: int, hw: tuple[int, int], config: dict[str, Any]) -> Branch:
    """``g = W3 o [A] o act o W2 o act o W1 o act`` (3-1-3 kernels, LipSwish, attention on the hidden map)."""
    hidden, coeff = config["hidden"], config["coeff"]
    parts: list[Branch] = [
        LipSwish(),
        SNConv2d(channels, hidden, 3, hw, coeff),
        LipSwish(),
        SNConv2d(hidden, hidden, 1, hw, coeff),
        LipSwish(),
    ]
    if config.get("attention"):
        attn = _attention(config["attention"], hidden, config["heads"], hw, attention_window(config, hw))
        parts.append(GatedAttention(attn, config.get("gate", "abs")))  # checkpoints from before gates: abs
    parts.append(SNConv2d(hidden, channels, 3, hw, coeff))
    return Chain(*parts)


def _resflow_layers(config: dict[str, Any]) -> list[nn.Module]:
    c, h, w = config["data_shape"]
    layers: list[nn.Module] = []
    for scale, n_blocks in enumerate(config["scales"]):
        if h % 2 == 0 and w % 2 == 0 and (scale > 0 or config.get("squeeze_first", True)):
            layers.append(Squeeze())
            c, h, w = 4 * c, h // 2, w // 2
        for _ in range(n_blocks):
            kind = f"iresblock-{config['attention']}" if config.get("attention") else "iresblock"
            layers.append(ResidualBlock(_conv_branch(c, (h, w), config), kind))
            layers.append(ActNorm(c))
    return layers


def _glow_layers(config: dict[str, Any]) -> list[nn.Module]:
    c, h, w = config["data_shape"]
    layers: list[nn.Module] = []
    for n_steps in config["scales"]:
        if h % 2 == 0 and w % 2 == 0:
            layers.append(Squeeze())
            c, h, w = 4 * c, h // 2, w // 2
        for _ in range(n_steps):
            layers += [ActNorm(c), InvConv1x1(c), AffineCoupling(c, config["hidden"])]
            if config.get("acf"):
                heads = math.gcd(config["heads"], c)
                attn = _attention(config["acf"], c, heads, (h, w))
                layers.append(ResidualBlock(ACFBranch(attn, config["acf_c"]), f"acf-{config['acf']}"))
    return layers


def _toy_layers(config: dict[str, Any]) -> list[nn.Module]:
    (dim,) = config["data_shape"]
    hidden, coeff = config["hidden"], config["coeff"]
    layers: list[nn.Module] = []
    for _ in range(config["blocks"]):
        g = Chain(
            SNLinear(dim, hidden, coeff),
            LipSwish(),
            SNLinear(hidden, hidden, coeff),
            LipSwish(),
            SNLinear(hidden, dim, coeff),
        )
        layers += [ResidualBlock(g, "mlp"), ActNorm(dim, spatial=False)]
    return layers


_HOSTS = {"resflow": _resflow_layers, "glow": _glow_layers, "toy": _toy_layers, "reference": reference_layers}


def build_flow(config: dict[str, Any]) -> Flow:
    """Build the (untrained) flow a config describes, once every field has been validated."""
    validate_config(config)
    return Flow(_HOSTS[config["host"]](config), config["data_shape"], config["n_levels"], config["logit_alpha"])
