"""Checkpoints: ``model.safetensors`` (weights) plus ``model.json`` (preset, config, metrics, version).

No pickle is ever loaded. Loading checks the format version, the preset, the weights' sha256 (recorded
in the metadata, so flipped bytes inside a well-formed file are caught too) and every tensor shape,
and says exactly what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import BadInput
from .fileio import atomic_path, sha256_file, write_json
from .flows.flow import Flow
from .flows.presets import PRESETS, build_flow

FORMAT_VERSION = 1
#: The preset name of a model imported from another codebase (its config's host is ``reference``).
IMPORTED = "imported"
WEIGHTS = "model.safetensors"
META = "model.json"


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix in (".json", ".safetensors"):
        path = path.parent
    return path / WEIGHTS, path / META


def save_tensors(tensors: dict[str, torch.Tensor], target: Path) -> None:
    with atomic_path(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def save_checkpoint(
    flow: Flow,
    config: dict[str, Any],
    directory: str | Path,
    metrics: dict | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write weights then metadata (each atomically); the metadata names the weights' format.

    ``provenance`` records where an imported model came from (source kind, its original arguments, the
    source file's sha256, the weights used).
    """
    weights, meta = _paths(directory)
    save_tensors(flow.state_dict(), weights)
    write_json(
        meta,
        {
            "format_version": FORMAT_VERSION,
            "preset": config["preset"],
            "weights_sha256": sha256_file(weights),
            "config": config,
            "preprocessing": {
                "n_levels": config["n_levels"],
                "logit_alpha": config["logit_alpha"],
                "dequantization": "uniform" if config["n_levels"] else None,
                "data_shape": config["data_shape"],
            },
            "metrics": metrics or {},
            **({"provenance": provenance} if provenance else {}),
            "acf_deploy_version": __version__,
        },
    )
    return weights.parent


def read_meta(path: str | Path) -> dict[str, Any]:
    _, meta_path = _paths(path)
    if not meta_path.is_file():
        raise BadInput(f"{meta_path} is missing; a checkpoint is a directory with {WEIGHTS} and {META}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput(f"{meta_path} is not valid JSON (corrupt or truncated checkpoint)") from None
    except RecursionError:
        raise BadInput(f"{meta_path} is nested too deeply to be checkpoint metadata") from None
    if not isinstance(meta, dict):
        raise BadInput(f"{meta_path} holds a JSON {type(meta).__name__}, not checkpoint metadata (an object)")
    if meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version")
        raise BadInput(f"{meta_path} has checkpoint format version {found!r}; this acf-deploy reads {FORMAT_VERSION}")
    preset = meta.get("preset")
    if preset not in PRESETS and preset != IMPORTED:
        raise BadInput(f"{meta_path} names unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if not isinstance(meta.get("config"), dict) or meta["config"].get("preset") != preset:
        raise BadInput(f"{meta_path}: its config does not belong to preset {preset!r}")
    if (preset == IMPORTED) != (meta["config"].get("host") == "reference"):
        raise BadInput(f"{meta_path}: only imported models use the reference architecture")
    return meta


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BadInput(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadInput(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:80]})") from None


def load_state(flow: Flow, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``state`` into ``flow`` after checking every name and shape."""
    expected = flow.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise BadInput(f"{source} lacks {len(missing)} tensors the config needs, first {missing[0]!r}")
    if unexpected:
        raise BadInput(f"{source} has {len(unexpected)} tensors the config does not, first {unexpected[0]!r}")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise BadInput(
                f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, the config needs {tuple(tensor.shape)}"
            )
        got = state[name].dtype
        if got != tensor.dtype and not (got.is_floating_point and tensor.dtype.is_floating_point):
            raise BadInput(f"{source}: tensor {name!r} holds {got} values, the config needs {tensor.dtype}")
        if not torch.isfinite(state[name].float()).all():
            raise BadInput(f"{source}: tensor {name!r} contains NaN or infinite values")
    flow.load_state_dict(state)


def load_checkpoint(path: str | Path) -> tuple[Flow, dict[str, Any]]:
    """Rebuild the flow from its config and load its weights; returns ``(flow in eval mode, metadata)``."""
    weights, _ = _paths(path)
    meta = read_meta(path)
    try:  # build_flow validates every config field before allocating anything
        flow = build_flow(meta["config"])
    except (BadInput, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise BadInput(f"{path}: the config cannot build a flow ({exc})") from None
    tensors = read_tensors(weights)
    expected = meta.get("weights_sha256")
    if expected is not None and sha256_file(weights) != expected:
        raise BadInput(f"{weights} does not match the sha256 recorded in {META} (corrupt or replaced weights)")
    load_state(flow, tensors, weights)
    return flow.eval(), meta
