"""Checkpoints: exact save/load round trip; every broken checkpoint is one clear BadInput line (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from acf_deploy.checkpoint import FORMAT_VERSION, META, WEIGHTS, load_checkpoint, read_meta, save_checkpoint
from acf_deploy.errors import BadInput
from acf_deploy.flows.blocks import LogdetSpec
from acf_deploy.flows.presets import build_flow, preset_config


def _flow(name: str = "digits-acf-l2"):
    overrides = {"blocks": 2, "hidden": 8} if name == "toy-resflow" else {"hidden": 8, "scales": [1, 1]}
    config = preset_config(name, **overrides)
    flow = build_flow(config)
    shape = config["data_shape"]
    flow.initialize(torch.rand(32, *shape))
    with torch.no_grad():  # weights off their initial values, gates open
        for pname, p in flow.named_parameters():
            p.copy_(torch.full_like(p, 0.5) if pname.endswith(("gamma", "theta")) else p + 0.05 * torch.randn_like(p))
    return flow.eval(), config


@pytest.fixture
def saved(tmp_path: Path):
    flow, config = _flow()
    directory = save_checkpoint(flow, config, tmp_path / "ckpt", {"heldout_bits_per_dim": 1.23})
    return flow, config, directory


def _outputs(flow, x: torch.Tensor, z: torch.Tensor):
    with torch.no_grad():
        out = flow(x, LogdetSpec(mode="exact"))
        sample, residual = flow.sample(z, 20)
    return out.z, out.logdet, sample, residual


@pytest.mark.parametrize("name", ["digits-acf-l2", "digits-acf-dp", "digits-glow-acf", "toy-resflow"])
def test_round_trip_preserves_outputs_exactly(name: str, tmp_path: Path):
    flow, config = _flow(name)
    directory = save_checkpoint(flow, config, tmp_path / name, {"note": "x"})
    loaded, meta = load_checkpoint(directory)
    assert not loaded.training
    assert meta["preset"] == name and meta["config"] == config and meta["metrics"] == {"note": "x"}
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["preprocessing"]["n_levels"] == config["n_levels"]
    for key, value in flow.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(4, *config["data_shape"])
    z = torch.randn(4, flow.dim)
    for a, b in zip(_outputs(flow, x, z), _outputs(loaded, x, z), strict=True):
        assert torch.equal(a, b)
    # and after baking both (what export does)
    flow.bake()
    loaded.bake()
    for a, b in zip(_outputs(flow, x, z), _outputs(loaded, x, z), strict=True):
        assert torch.equal(a, b)
    # a path to either file works as well as the directory
    assert load_checkpoint(directory / META)[1]["preset"] == name
    assert load_checkpoint(directory / WEIGHTS)[1]["preset"] == name


def _edit_meta(directory: Path, **changes) -> None:
    meta = json.loads((directory / META).read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (directory / META).write_text(json.dumps(meta))


def _flip_byte(path: Path, offset_from_end: int = 10) -> None:
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00not a safetensors header at all")


def _other_shapes(directory: Path) -> None:
    """The config asks for hidden=12 while the weights were saved with hidden=8."""
    meta = json.loads((directory / META).read_text())
    meta["config"]["hidden"] = 12
    (directory / META).write_text(json.dumps(meta))


def _missing_tensor(directory: Path) -> None:
    flow, config = _flow()
    state = {k: v.contiguous() for k, v in flow.state_dict().items() if not k.endswith("theta")}
    save_file(state, str(directory / WEIGHTS))
    _edit_meta(directory, weights_sha256=None)


def _nan_weights(directory: Path) -> None:
    flow, _ = _flow()
    state = {k: v.contiguous() for k, v in flow.state_dict().items()}
    name = next(k for k in state if k.endswith("weight"))
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(directory / WEIGHTS))
    _edit_meta(directory, weights_sha256=None)


CASES = {
    # name: (how to break the saved checkpoint, words the message must contain)
    "weights-bitflip": (lambda d: _flip_byte(d / WEIGHTS), ["sha256", WEIGHTS]),
    "weights-truncated": (lambda d: _truncate(d / WEIGHTS), ["not a readable safetensors", WEIGHTS]),
    "weights-truncated-nohash": (
        lambda d: (_truncate(d / WEIGHTS), _edit_meta(d, weights_sha256=None)),
        ["not a readable safetensors"],
    ),
    "weights-garbage": (lambda d: _garbage(d / WEIGHTS), ["not a readable safetensors"]),
    "weights-missing": (lambda d: (d / WEIGHTS).unlink(), ["missing", WEIGHTS]),
    "meta-truncated": (lambda d: _truncate(d / META), ["not valid JSON", META]),
    "meta-missing": (lambda d: (d / META).unlink(), ["missing", META]),
    "meta-not-object": (lambda d: (d / META).write_text("[1, 2]"), ["JSON list", "not checkpoint metadata"]),
    "wrong-version": (lambda d: _edit_meta(d, format_version=FORMAT_VERSION + 1), ["format version", "2"]),
    "no-version": (lambda d: _edit_meta(d, format_version=None), ["format version", "None"]),
    "unknown-preset": (lambda d: _edit_meta(d, preset="digits-bogus"), ["unknown preset", "digits-bogus"]),
    "preset-config-mismatch": (lambda d: _edit_meta(d, preset="digits-resflow"), ["does not belong", "digits-resflow"]),
    "wrong-shape": (_other_shapes, ["shape", "(8,"]),
    "missing-tensor": (_missing_tensor, ["lacks", "theta"]),
    "nan-weights": (_nan_weights, ["NaN"]),
    "config-cannot-build": (
        lambda d: _edit_meta(d, config={**json.loads((d / META).read_text())["config"], "heads": 3}),
        ["cannot build"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_checkpoint_is_one_clear_bad_input(case: str, saved):
    _, _, directory = saved
    breaker, words = CASES[case]
    breaker(directory)
    with pytest.raises(BadInput) as info:
        load_checkpoint(directory)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and len(message) < 400
    for word in words:
        assert word in message, (word, message)
    assert info.value.exit_code == 2


def test_missing_directory_is_bad_input(tmp_path: Path):
    with pytest.raises(BadInput, match="is missing"):
        read_meta(tmp_path / "nowhere")
