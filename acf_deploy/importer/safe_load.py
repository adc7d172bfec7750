"""Read a ``train_img.py`` checkpoint of Residual Flows or the ACF fork without running any of its code.

Such a file is a pickle whose globals name the reference's classes (the EMA object holds the whole pickled
model). It is read with ``torch.load(weights_only=True)``, which refuses every global it has not been
given, after inert stand-ins are registered for exactly the globals that those two codebases write: a
stand-in only keeps the state it is handed. The globals are listed from the file before anything is
unpickled, so a checkpoint holding any other global is refused by name and never loaded.
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInput

#: Packages the two codebases use: ``lib`` (the ACF fork, and Residual Flows before 2023-09), ``resflows``.
PACKAGES = ("lib", "resflows")

#: Classes of those packages a supported checkpoint may name (module path relative to the package).
REFERENCE_CLASSES = (
    "layers.act_norm.ActNorm1d",
    "layers.act_norm.ActNorm2d",
    "layers.base.activations.Swish",
    "layers.base.activations.Identity",
    "layers.base.activations.LipschitzCube",
    "layers.base.mixed_lipschitz.InducedNormConv2d",
    "layers.base.mixed_lipschitz.InducedNormLinear",
    "layers.elemwise.LogitTransform",
    "layers.iresblock.iResBlock",
    "layers.squeeze.SqueezeLayer",
    "resflow.FCNet",
    "resflow.FCWrapper",
    "resflow.ResidualFlow",
    "resflow.StackediResBlocks",
    "resflow.Self_Attn",
    "resflow.L2_Self_Attn",
    "utils.ExponentialMovingAverage",
)

#: PyTorch classes inside those models (containers, dropout, the attention's softmax, activations).
TORCH_CLASSES = (
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.dropout.Dropout2d",
    "torch.nn.modules.activation.Softmax",
    "torch.nn.modules.activation.ELU",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.activation.Softplus",
)

#: Reference classes that acf-deploy knows but cannot import, and the option that puts them in a model.
UNSUPPORTED = {
    "layers.coupling.CouplingBlock": "--block coupling",
    "layers.coupling.ChannelCouplingBlock": "--block coupling",
    "layers.coupling.MaskedCouplingBlock": "--block coupling",
    "resflow.StackedCouplingBlocks": "--block coupling",
    "layers.normalization.MovingBatchNorm2d": "--batchnorm True",
    "layers.normalization.MovingBatchNorm1d": "--batchnorm True",
    "layers.glow.InvertibleConv2d": "--quadratic True",
    "layers.glow.InvertibleLinear": "--quadratic True",
    "layers.base.lipschitz.LopConv2d": "--vnorms other than 2222",
    "layers.base.lipschitz.LopLinear": "--vnorms other than 2222",
    "layers.elemwise.Normalize": "--task classification/hybrid",
    "layers.container.SequentialFlow": "a model that is not a ResidualFlow",
    "resflow.L2_Self_Attn_Old": "the fork's L2_Self_Attn_Old attention",
}


class StandIn:
    """Takes the place of a reference class while unpickling: stores its state, runs nothing."""

    qualified_name = ""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    @property
    def fields(self) -> dict[str, Any]:
        state = self.__dict__.get("state")
        return state if isinstance(state, dict) else {}


def _stand_in(qualified: str) -> type[StandIn]:
    name = qualified.rsplit(".", 1)[1]
    return type(name, (StandIn,), {"qualified_name": qualified, "__module__": __name__})


def allowed_globals() -> dict[str, type | None]:
    """Every global a supported checkpoint may name, with its stand-in (``None`` for ``argparse.Namespace``)."""
    names = [f"{package}.{cls}" for package in PACKAGES for cls in REFERENCE_CLASSES] + list(TORCH_CLASSES)
    table: dict[str, type | None] = {name: _stand_in(name) for name in names}
    table["argparse.Namespace"] = None
    return table


def _refusal(name: str) -> str:
    for package in PACKAGES:
        relative = name.removeprefix(f"{package}.")
        if relative in UNSUPPORTED:
            return f"it uses {name} ({UNSUPPORTED[relative]}), which acf-deploy cannot import"
    return f"it holds the global {name}, which is not one that Residual Flows or the ACF code writes; not loaded"


def load_reference_checkpoint(path: str | Path) -> tuple[dict[str, Any], set[str]]:
    """The checkpoint's top-level dict, with stand-ins in place of the reference's objects, and the globals
    it names (which tell the reference's classes apart, e.g. its two attention variants)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} does not exist or is not a file")
    if not zipfile.is_zipfile(path):
        raise BadInput(
            f"{path} is not a zip-format torch checkpoint (a legacy torch.save file, truncated, or not a "
            "checkpoint); re-save it with torch >= 1.6"
        )
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (zipfile.BadZipFile, RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        raise BadInput(f"{path} cannot be read as a torch checkpoint ({_first_line(exc)})") from None
    table = allowed_globals()
    for name in sorted(names):
        if name not in table:
            raise BadInput(f"{path}: {_refusal(name)}")
    safe = [argparse.Namespace if cls is None else (cls, name) for name, cls in table.items() if name in names]
    try:
        with torch.serialization.safe_globals(safe):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise BadInput(f"{path} cannot be loaded as a torch checkpoint ({_first_line(exc)})") from None
    if not isinstance(loaded, dict) or "state_dict" not in loaded or "args" not in loaded:
        raise BadInput(
            f"{path} is not a train_img.py checkpoint of Residual Flows or the ACF code "
            "(expected a dict with 'state_dict' and 'args')"
        )
    if not isinstance(loaded["args"], argparse.Namespace) or not isinstance(loaded["state_dict"], dict):
        raise BadInput(f"{path}: 'args' is not an argparse.Namespace or 'state_dict' is not a dict")
    return loaded, set(names)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]
