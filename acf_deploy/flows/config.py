"""Every field of a flow config, checked before anything is built.

A config arrives from a preset, from command-line overrides or from a checkpoint's ``model.json`` that
anyone may have edited. A wrong type, an absurd size or a coefficient that makes a residual block
non-contractive is refused here in one line, in microseconds, instead of surfacing as a traceback or an
allocation of terabytes minutes later. Each host has one validator in :data:`VALIDATORS`: adding a host
means adding its entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..errors import BadInput
from .attention import GATES

#: Limits well above every preset (CIFAR-10 is 3 x 32 x 32 with 128 hidden channels) and well below
#: what would exhaust a machine while building or running the flow.
MAX_DIM = 1 << 16
MAX_SIDE = 512
MAX_CHANNELS = 64
MAX_HIDDEN = 1024
MAX_BLOCKS = 256
MAX_HEADS = 64
MAX_TOKENS = 4096
MAX_WINDOW = 64
MAX_LEVELS = 1 << 16
MAX_PARAMETERS = 200_000_000
ATTENTION = (None, "l2", "dp")

Config = dict[str, Any]


def _fail(key: str, rule: str, value: Any) -> BadInput:
    return BadInput(f"config field {key!r} must be {rule}, not {value!r}")


def _int(config: Config, key: str, low: int, high: int) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(key, f"an integer in [{low}, {high}]", value)
    return value


def _real(config: Config, key: str, low: float, high: float, closed_low: bool = False) -> float:
    """A finite number in ``(low, high)`` (``[low, high)`` with ``closed_low``)."""
    value = config.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low <= value if closed_low else low < value) or not value < high:
        raise _fail(key, f"a number in {'[' if closed_low else '('}{low}, {high})", value)
    return float(value)


def _choice(config: Config, key: str, choices: tuple) -> Any:
    value = config.get(key)
    if value not in choices or isinstance(value, bool):
        raise _fail(key, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


def _image_shape(config: Config) -> tuple[int, int, int]:
    shape = config.get("data_shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 3:
        raise _fail("data_shape", "[channels, height, width]", shape)
    c, h, w = (_int({"data_shape": v}, "data_shape", 1, MAX_SIDE) for v in shape)
    if c > MAX_CHANNELS or c * h * w > MAX_DIM:
        raise _fail("data_shape", f"at most {MAX_CHANNELS} channels and {MAX_DIM} values", shape)
    return c, h, w


def _scales(config: Config) -> list[int]:
    scales = config.get("scales")
    if not isinstance(scales, (list, tuple)) or not 1 <= len(scales) <= 8:
        raise _fail("scales", "a list of 1 to 8 block counts", scales)
    counts = [_int({"scales": n}, "scales", 1, MAX_BLOCKS) for n in scales]
    if sum(counts) > MAX_BLOCKS:
        raise _fail("scales", f"at most {MAX_BLOCKS} blocks in all", scales)
    return counts


def _check_size(parameters: int) -> None:
    if parameters > MAX_PARAMETERS:
        raise BadInput(f"the config describes a flow of about {parameters:,} parameters, above {MAX_PARAMETERS:,}")


def _resflow(config: Config) -> None:
    c, h, w = _image_shape(config)
    scales = _scales(config)
    hidden = _int(config, "hidden", 1, MAX_HIDDEN)
    _real(config, "coeff", 0.0, 1.0)
    attention = _choice(config, "attention", ATTENTION)
    if "squeeze_first" in config and not isinstance(config["squeeze_first"], bool):
        raise _fail("squeeze_first", "true or false", config["squeeze_first"])
    if attention:
        heads = _int(config, "heads", 1, MAX_HEADS)
        if hidden % heads:
            raise _fail("heads", f"a divisor of hidden ({hidden})", heads)
        if "gate" in config:
            _choice(config, "gate", GATES)
        if config.get("window") is not None:
            _int(config, "window", 2, MAX_WINDOW)
    parameters = 0
    for scale, n_blocks in enumerate(scales):
        if h % 2 == 0 and w % 2 == 0 and (scale > 0 or config.get("squeeze_first", True)):
            c, h, w = 4 * c, h // 2, w // 2
        if attention and h * w > MAX_TOKENS:
            raise _fail("data_shape", f"at most {MAX_TOKENS} attention tokens per scale", config["data_shape"])
        if attention and config.get("window"):
            _check_windows(config["window"], h, w)
        per_block = 18 * c * hidden + hidden * hidden + 2 * hidden * h * w + (4 * hidden * hidden if attention else 0)
        parameters += n_blocks * per_block
    _check_size(parameters)


def _check_windows(side: int, h: int, w: int) -> None:
    """Windows of ``side`` (clipped to the map) must tile each attention map and hold at least two tokens."""
    wh, ww = min(side, h), min(side, w)
    if h % wh or w % ww or wh * ww < 2:
        raise _fail("window", f"a window side that tiles every attention map (this one is {h}x{w})", side)


def _glow(config: Config) -> None:
    c, h, w = _image_shape(config)
    scales = _scales(config)
    hidden = _int(config, "hidden", 1, MAX_HIDDEN)
    if "coeff" in config:
        _real(config, "coeff", 0.0, 1.0)
    acf = _choice(config, "acf", ATTENTION)
    if acf:
        _int(config, "heads", 1, MAX_HEADS)
        _real(config, "acf_c", 0.0, 1.0)
    parameters = 0
    for n_steps in scales:
        if h % 2 == 0 and w % 2 == 0:
            c, h, w = 4 * c, h // 2, w // 2
        if acf and h * w > MAX_TOKENS:
            raise _fail("data_shape", f"at most {MAX_TOKENS} attention tokens per scale", config["data_shape"])
        parameters += n_steps * (c * c + 9 * c * hidden + hidden * hidden + 18 * hidden * c + (4 * c * c if acf else 0))
    _check_size(parameters)


def _toy(config: Config) -> None:
    shape = config.get("data_shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 1:
        raise _fail("data_shape", "[dimension]", shape)
    dim = _int({"data_shape": shape[0]}, "data_shape", 1, MAX_DIM)
    blocks = _int(config, "blocks", 1, 10)
    hidden = _int(config, "hidden", 1, 4 * MAX_HIDDEN)
    _real(config, "coeff", 0.0, 1.0)
    _check_size(blocks * (2 * dim * hidden + hidden * hidden))


#: Imported models may be larger than our presets (Residual Flows' CelebA-HQ is 3 x 256 x 256).
MAX_IMPORT_DIM = 3 * 256 * 256
REFERENCE_ACTIVATIONS = ("swish", "elu", "softplus", "relu", "identity", "lcube")
REFERENCE_FLAGS = ("actnorm", "fc_actnorm", "fc", "fc_end", "preact", "first_resblock", "squeeze_first")


def _reference(config: Config) -> None:
    """An imported Residual Flows / ACF-fork architecture (the ``reference`` section written by the importer)."""
    shape = config.get("data_shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 3:
        raise _fail("data_shape", "[channels, height, width]", shape)
    c, h, w = (_int({"data_shape": v}, "data_shape", 1, MAX_SIDE) for v in shape)
    if c * h * w > MAX_IMPORT_DIM:
        raise _fail("data_shape", f"at most {MAX_IMPORT_DIM} values", shape)
    arch = config.get("reference")
    if not isinstance(arch, dict):
        raise _fail("reference", "an object describing the imported architecture", arch)

    def field(key: str) -> Config:
        return {f"reference.{key}": arch.get(key)}

    _choice(field("source"), "reference.source", ("residual-flows", "acf-fork"))
    for flag in REFERENCE_FLAGS:
        if not isinstance(arch.get(flag), bool):
            raise _fail(f"reference.{flag}", "true or false", arch.get(flag))
    blocks = arch.get("n_blocks")
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= 8:
        raise _fail("reference.n_blocks", "a list of 1 to 8 block counts", blocks)
    counts = [_int({"reference.n_blocks": n}, "reference.n_blocks", 0, MAX_BLOCKS) for n in blocks]
    kernels = arch.get("kernels")
    if not isinstance(kernels, list) or not 2 <= len(kernels) <= 8:
        raise _fail("reference.kernels", "a list of 2 to 8 odd kernel sizes", kernels)
    ks = [_int({"reference.kernels": k}, "reference.kernels", 1, 7) for k in kernels]
    if any(k % 2 == 0 for k in ks):
        raise _fail("reference.kernels", "odd kernel sizes", kernels)
    idim = _int(field("idim"), "reference.idim", 1, MAX_HIDDEN)
    fc_idim = _int(field("fc_idim"), "reference.fc_idim", 1, MAX_HIDDEN)
    _choice(field("activation"), "reference.activation", REFERENCE_ACTIVATIONS)
    _real(field("coeff"), "reference.coeff", 0.0, 10.0)
    _real(field("dropout"), "reference.dropout", 0.0, 1.0, closed_low=True)
    attention = _choice(field("attention"), "reference.attention", ATTENTION)
    heads = _int(field("heads"), "reference.heads", 1, MAX_HEADS)
    if (attention == "l2" and idim % heads) or (attention == "dp" and idim < 8):
        raise _fail("reference.idim", f"a width that fits {attention} attention with {heads} heads", idim)
    if arch["squeeze_first"]:
        c, h, w = 4 * c, h // 2, w // 2
    dim, parameters = c * h * w, 0
    for n_blocks in counts:
        if attention and h * w > MAX_TOKENS:
            raise _fail("data_shape", f"at most {MAX_TOKENS} attention tokens per scale", shape)
        conv = ks[0] ** 2 * c * idim + sum(k * k * idim * idim for k in ks[1:-1]) + ks[-1] ** 2 * idim * c
        parameters += n_blocks * (conv + (4 * idim * idim if attention else 0))
        c, h, w = 4 * c, h // 2, w // 2
    if arch["fc_end"] or arch["fc"]:
        parameters += (sum(counts) + 4) * (2 * dim * max(idim, fc_idim) + len(ks) * max(idim, fc_idim) ** 2)
    _check_size(parameters)


#: One validator per host: the host's own fields (data_shape, sizes, coefficients, attention).
VALIDATORS: dict[str, Callable[[Config], None]] = {
    "resflow": _resflow,
    "glow": _glow,
    "toy": _toy,
    "reference": _reference,
}

TRAIN_FIELDS = {
    "epochs": (int, 1, 100_000),
    "batch_size": (int, 1, 1 << 20),
    "lr": (float, 0.0, 10.0),
    "warmup_steps": (int, 0, 1 << 30),
    "ema_decay": (float, 0.0, 1.0),
    "grad_clip": (float, 0.0, 1e6),
    "train_size": (int, 1, 1 << 30),
}


def _common(config: Config) -> None:
    for key in ("preset", "data"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise _fail(key, "a non-empty string", config.get(key))
    if config.get("n_levels") is not None:
        _int(config, "n_levels", 2, MAX_LEVELS)
    if config.get("logit_alpha") is not None:
        _real(config, "logit_alpha", 0.0, 0.5)
    if "data_path" in config and not isinstance(config["data_path"], str):
        raise _fail("data_path", "a path", config["data_path"])
    train = config.get("train", {})
    if not isinstance(train, dict):
        raise _fail("train", "an object of training settings", train)
    for key, (kind, low, high) in TRAIN_FIELDS.items():
        if key in train:
            scoped = {f"train.{key}": train[key]}
            if kind is int:
                _int(scoped, f"train.{key}", low, high)
            else:
                _real(scoped, f"train.{key}", low, high, closed_low=key == "ema_decay")


def validate_config(config: Any) -> Config:
    """Return ``config`` if every field is valid for its host, else raise :class:`BadInput` naming the field."""
    if not isinstance(config, dict):
        raise BadInput(f"a flow config is a JSON object, not {type(config).__name__}")
    _common(config)
    host = config.get("host")
    validator = VALIDATORS.get(host) if isinstance(host, str) else None
    if validator is None:
        raise _fail("host", "one of " + ", ".join(map(repr, VALIDATORS)), host)
    validator(config)
    return config
