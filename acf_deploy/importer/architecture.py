"""From the reference's pickled command line (``args``) to an acf-deploy config, or a refusal by name.

The reference's ``train_img.py`` builds its model from ``args``; this module reads the same fields, the
same way, and describes the result as the ``reference`` section of an ordinary config, which
:func:`acf_deploy.flows.reference.reference_layers` turns back into layers. Every option that changes the
model and is not implemented is refused with its name, never approximated.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..checkpoint import IMPORTED
from ..errors import BadInput
from ..flows.config import MAX_HIDDEN, MAX_SIDE, validate_config
from ..flows.reference import ACTIVATIONS, n_scales

#: ``--data`` -> (channels, logit alpha) as ``train_img.py`` sets them for the density task.
DATASETS = {
    "mnist": (1, 1e-6),
    "cifar10": (3, 0.05),
    "svhn": (3, 0.05),
    "celebahq": (3, 0.05),
    "celeba_5bit": (3, 0.05),
    "imagenet32": (3, 0.05),
    "imagenet64": (3, 0.05),
}


def _get(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def _flag(args: argparse.Namespace, name: str, default: bool = False) -> bool:
    value = _get(args, name, default)
    if not isinstance(value, bool):
        raise BadInput(f"args.{name} is {value!r}, not True or False")
    return value


def _positive_int(args: argparse.Namespace, name: str, limit: int) -> int:
    value = _get(args, name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
        raise BadInput(f"args.{name} is {value!r}; expected an integer in 1..{limit}")
    return value


def _int_list(text: Any, name: str) -> list[int]:
    try:
        values = [int(part) for part in str(text).split("-")]
    except ValueError:
        raise BadInput(f"args.{name} is {text!r}; expected integers joined by '-' such as 16-16-16") from None
    return values


def _refuse_options(args: argparse.Namespace) -> None:
    """Every option the importer does not implement, by its command-line name."""
    unsupported = [
        (_get(args, "block", "resblock") != "resblock", f"--block {_get(args, 'block')}"),
        (_flag(args, "factor_out"), "--factor-out True"),
        (_flag(args, "quadratic"), "--quadratic True"),
        (_flag(args, "batchnorm"), "--batchnorm True"),
        (_flag(args, "learn_p"), "--learn-p True"),
        (_get(args, "task", "density") != "density", f"--task {_get(args, 'task')}"),
        ((_get(args, "padding", 0) or 0) > 0, f"--padding {_get(args, 'padding')}"),
        (not _flag(args, "add_noise", True), "--add-noise False (the model was trained on undequantised data)"),
        (
            _get(args, "data") == "celebahq" and _get(args, "nbits", 8) != 8,
            f"--data celebahq with --nbits {_get(args, 'nbits')}",
        ),
    ]
    for refused, option in unsupported:
        if refused:
            raise BadInput(f"the checkpoint was trained with {option}, which acf-deploy cannot import")
    vnorms = str(_get(args, "vnorms", ""))
    if set(vnorms) != {"2"}:
        raise BadInput(
            f"the checkpoint was trained with --vnorms {vnorms} (induced norms other than 2), which acf-deploy cannot import"
        )
    act = _get(args, "act")
    if act not in ACTIVATIONS:
        raise BadInput(f"the checkpoint was trained with --act {act}, which acf-deploy cannot import")


def n_levels_for(data: str) -> int:
    """Quantisation levels of the reference's data pipeline (``add_noise``'s ``nvals``)."""
    return 32 if data == "celeba_5bit" else 256


def config_from_args(args: argparse.Namespace, attention: str | None, heads: int) -> dict[str, Any]:
    """The config of the model ``args`` describes; ``attention`` is the fork's variant found in the file."""
    data = _get(args, "data")
    if data not in DATASETS:
        raise BadInput(f"args.data is {data!r}; expected one of {', '.join(DATASETS)}")
    _refuse_options(args)
    channels, alpha = DATASETS[data]
    side = _positive_int(args, "imagesize", MAX_SIDE)
    kernels = _int_list(_get(args, "kernels"), "kernels")
    if any(k < 1 or k % 2 == 0 for k in kernels) or len(kernels) < 2:
        raise BadInput(f"args.kernels is {_get(args, 'kernels')!r}; expected at least two odd kernel sizes")
    if len(str(_get(args, "vnorms"))) != len(kernels) + 1:
        raise BadInput(f"args.vnorms {_get(args, 'vnorms')!r} does not match args.kernels {_get(args, 'kernels')!r}")
    n_blocks = _int_list(_get(args, "nblocks"), "nblocks")
    coeff = _get(args, "coeff")
    if not isinstance(coeff, (int, float)) or isinstance(coeff, bool):
        raise BadInput(f"args.coeff is {coeff!r}; expected a number")
    dropout = _get(args, "dropout", 0.0) or 0.0
    arch = {
        "source": "acf-fork" if attention or hasattr(args, "attention") else "residual-flows",
        "attention": attention,
        "heads": heads,
        "n_blocks": n_blocks,
        "idim": _positive_int(args, "idim", MAX_HIDDEN),
        "kernels": kernels,
        "activation": _get(args, "act"),
        "coeff": float(coeff),
        "actnorm": _flag(args, "actnorm"),
        "fc_actnorm": _flag(args, "fc_actnorm"),
        "fc": _flag(args, "fc"),
        "fc_end": _flag(args, "fc_end"),
        "fc_idim": _positive_int(args, "fc_idim", MAX_HIDDEN),
        "preact": _flag(args, "preact"),
        "first_resblock": _flag(args, "first_resblock"),
        "squeeze_first": _flag(args, "squeeze_first"),
        "dropout": float(dropout),
    }
    shape = [channels, side, side]
    if arch["squeeze_first"] and side % 2:
        raise BadInput(f"args.squeeze_first needs an even image size, not {side}")
    model_side = side // 2 if arch["squeeze_first"] else side
    scales = n_scales(n_blocks, (model_side, model_side))
    if scales < 1:
        raise BadInput(f"an image of side {side} leaves the reference no scale (it needs at least 4 pixels)")
    if model_side % (2 ** (scales - 1)):
        raise BadInput(f"image side {model_side} cannot be squeezed {scales - 1} times")
    return validate_config(
        {
            "host": "reference",
            "preset": IMPORTED,
            "data": data,
            "data_shape": shape,
            "n_levels": n_levels_for(data),
            "logit_alpha": alpha,
            "reference": arch,
        }
    )
