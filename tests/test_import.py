"""Importing checkpoints of the public research code (Residual Flows and the ACF fork).

Every folder under ``fixtures/reference-flows`` holding a ``checkpoint.pth`` is imported; those with the
reference's own outputs (``expected.npz``) must be reproduced in float64: latents within 1e-6, the exact
log-det and log p(x) within 1e-5 nats, bits/dim within 1e-6 and the inverse of its prior latents within
1e-5. A folder added later is tested without code changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import lambertw
from typer.testing import CliRunner

from acf_deploy.cli import app
from acf_deploy.flows.blocks import LogdetSpec
from acf_deploy.flows.fork_attention import ForkDotProductAttention, ForkL2Attention
from acf_deploy.importer import build_imported_flow

from .reference_writer import load_fixture, random_reference_checkpoint, save_reference_checkpoint

ROOT = Path(__file__).parent / "fixtures" / "reference-flows"
FIXTURES = sorted(p for p in ROOT.iterdir() if (p / "checkpoint.pth").is_file())
WITH_EXPECTED = [p for p in FIXTURES if (p / "expected.npz").is_file()]
RESFLOW = ROOT / "resflow-mnist-tiny" / "checkpoint.pth"
runner = CliRunner()


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


_CACHE: dict[str, tuple] = {}


def imported64(folder: Path, weights: str = "ema"):
    """The fixture's imported flow in float64 (built once per session)."""
    key = f"{folder.name}:{weights}"
    if key not in _CACHE:
        flow, config, provenance = build_imported_flow(folder / "checkpoint.pth", weights)
        _CACHE[key] = (flow.double(), config, provenance)
    return _CACHE[key]


def expected(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "expected.npz") as archive:
        return {k: archive[k] for k in archive.files}


@pytest.mark.parametrize("folder", WITH_EXPECTED, ids=_ids(WITH_EXPECTED))
def test_latents_match_the_reference(folder, float64):
    flow, _, _ = imported64(folder)
    ref = expected(folder)
    with torch.no_grad():
        z = flow(torch.from_numpy(ref["x"]), LogdetSpec(mode="none")).z
    assert float((z - torch.from_numpy(ref["z"])).abs().max()) <= 1e-6


def _check_density(folder: Path, rows: slice) -> None:
    flow, _, _ = imported64(folder)
    ref = expected(folder)
    with torch.no_grad():
        out = flow(torch.from_numpy(ref["x"][rows]), LogdetSpec(mode="exact"))
    assert np.abs(out.logdet.numpy() - ref["logabsdet_exact"][rows]).max() <= 1e-5
    assert np.abs(out.log_prob.numpy() - ref["logpx"][rows]).max() <= 1e-5
    bits = flow.bits_per_dim(out.log_prob).numpy()
    assert np.abs(bits - ref["bits_per_dim"][rows]).max() <= 1e-6


@pytest.mark.slow  # a full D x D Jacobian per input in float64: 40 s to 3 minutes per fixture
@pytest.mark.parametrize("folder", WITH_EXPECTED, ids=_ids(WITH_EXPECTED))
def test_exact_logdet_and_bits_per_dim_match_the_reference(folder, float64):
    """The first input here; the exact float64 Jacobian of a block with attention over 784 pixels takes
    about 20 s per input on 2 cores, so the slow test adds three more (all eight were checked by hand)."""
    _check_density(folder, slice(0, 1))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("folder", WITH_EXPECTED, ids=_ids(WITH_EXPECTED))
def test_exact_logdet_of_more_fixture_inputs(folder, float64):
    _check_density(folder, slice(1, 4))


@pytest.mark.parametrize("folder", WITH_EXPECTED, ids=_ids(WITH_EXPECTED))
def test_inverse_of_prior_latents_matches_the_reference(folder, float64):
    flow, _, _ = imported64(folder)
    ref = expected(folder)
    x = flow.solve_inverse(torch.from_numpy(ref["z_prior"]))
    assert float((x - torch.from_numpy(ref["x_from_z_prior_converged"])).abs().max()) <= 1e-5


def test_raw_and_ema_weights_are_different_models(float64):
    folder = RESFLOW.parent
    ema, _, provenance = imported64(folder, "ema")
    raw, _, raw_provenance = imported64(folder, "raw")
    x = torch.from_numpy(expected(folder)["x"][:2])
    with torch.no_grad():
        gap = float((ema(x, LogdetSpec(mode="none")).z - raw(x, LogdetSpec(mode="none")).z).abs().max())
    assert gap > 1e-3  # the fixture's EMA moved its weights by up to 0.1
    assert (provenance["weights"], raw_provenance["weights"]) == ("ema", "raw")
    assert provenance["source_sha256"] == hashlib.sha256(RESFLOW.read_bytes()).hexdigest()
    assert provenance["args"]["nblocks"] == "1-1-1"


# ------------------------------------------------------------------ the fork's attention, formula by formula
def _conv1x1(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution's output map, contiguous as a convolution leaves it."""
    return torch.nn.functional.conv2d(x, weight[:, :, None, None], bias).contiguous()


def _literal_l2(x: torch.Tensor, m: ForkL2Attention) -> torch.Tensor:
    """The fork's L2 attention written out with its own bmm and ``view`` steps (an independent transcription)."""
    b, d, w, h = x.shape
    n, heads, hd = w * h, m.heads, m.head_dim
    scalar = torch.sqrt(torch.tensor(d / heads, dtype=torch.float32))
    outs = []
    for i in range(heads):
        q = _conv1x1(m.weight_q[i], m.bias_q[i], x).view(b, hd, n).permute(0, 2, 1)
        sq = (q.norm(dim=2) ** 2).view(b, n, 1)
        ones = torch.ones(b, n, 1, dtype=x.dtype)
        logits = sq @ ones.permute(0, 2, 1) + (-2) * q @ q.permute(0, 2, 1) + ones @ sq.permute(0, 2, 1)
        p = torch.softmax(logits / (-scalar), dim=-1)
        wq = m.weight_q[i].contiguous().view(1, d, hd).repeat(b, 1, 1)
        a = (wq @ wq.permute(0, 2, 1) / scalar).view(b, d, d)
        f = ((p @ x.view(b, n, d)) @ a).view(b, d, w, h)
        outs.append(_conv1x1(m.weight_v[i], m.bias_v[i], f).view(b, n, hd))
    out = _conv1x1(m.weight_o, m.bias_o, torch.cat(outs, dim=2).view(b, d, w, h))
    phi = torch.tensor(float(np.real(lambertw(n / math.e))), dtype=torch.float32)
    term = torch.sqrt(sum(m.weight_q[i].norm() ** 2 * m.weight_v[i].norm() ** 2 for i in range(heads)))
    bound = torch.sqrt(torch.tensor(n / d, dtype=torch.float32)) * (4 * phi.reshape(1) + 1) * term * m.weight_o.norm()
    return m.gamma * (out / bound).view(b, d, w, h) + x


def _literal_dp(x: torch.Tensor, m: ForkDotProductAttention) -> torch.Tensor:
    b, c, w, h = x.shape
    n = w * h
    q = _conv1x1(m.weight_q, m.bias_q, x).view(b, -1, n).permute(0, 2, 1)
    k = _conv1x1(m.weight_k, m.bias_k, x).view(b, -1, n)
    v = _conv1x1(m.weight_v, m.bias_v, x).view(b, -1, n)
    p = torch.softmax((q @ k) / m.norm_value, dim=-1)
    out = (v @ p.permute(0, 2, 1)).view(b, c, w, h)
    bound = torch.exp(torch.sqrt(torch.tensor(3, dtype=torch.float32))) * torch.sqrt(
        torch.tensor(n / c)
    ) + torch.tensor(2, dtype=torch.float32) * torch.sqrt(torch.tensor(6, dtype=torch.float32))
    return m.gamma * (out / bound) + x


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn_like(p))
        if isinstance(module, ForkDotProductAttention):
            module.norm_value.fill_(0.7)
    return module


@pytest.mark.parametrize(
    "make, literal",
    [(lambda: ForkL2Attention(8, (3, 4), 2), _literal_l2), (lambda: ForkDotProductAttention(16, (3, 3)), _literal_dp)],
    ids=["l2", "dp"],
)
def test_fork_attention_is_the_reference_formula_and_its_jvp_is_exact(make, literal, float64):
    module = _randomised(make())
    x = torch.randn(3, module.channels, *module.hw)
    with torch.no_grad():
        assert float((module(x) - literal(x, module)).abs().max()) <= 1e-12
        tangent = torch.randn_like(x)
        y, dy = module.jvp(x, tangent)
    dy_auto = torch.func.jvp(module, (x,), (tangent,))[1].detach()
    assert float((dy - dy_auto).abs().max()) <= 1e-10 * float(dy_auto.abs().max())
    assert math.isinf(module.lipschitz()) and module.guarantee == "verified"


# ------------------------------------------------------------------ architecture options, by writing checkpoints
ARCHITECTURES = {
    "elu-fc-actnorm": {"act": "elu", "fc_actnorm": True},
    "softplus-dropout": {"act": "softplus", "dropout": 0.5},
    "lcube-kernels-3-3": {"act": "lcube", "kernels": "3-3", "vnorms": "222"},
    "squeeze-first": {"squeeze_first": True, "nblocks": "1-1"},
    "all-fc": {"fc": True, "first_resblock": False},
    "cifar": {"data": "cifar10", "imagesize": 8, "fc_end": False},
}


@pytest.mark.parametrize("overrides", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_options_rebuild_and_use_every_tensor(overrides, tmp_path, float64):
    """A checkpoint of each option imports (every tensor used), inverts and has the brute-force log-det."""
    small = {"data": "mnist", "imagesize": 8, "nblocks": "1-1", "idim": 8, "fc_idim": 4, **overrides}
    path = save_reference_checkpoint(random_reference_checkpoint(small), tmp_path / "c.pth")
    flow, config, _ = build_imported_flow(path)
    flow = flow.double()
    x = torch.rand(2, *config["data_shape"]) * 0.9 + 0.05
    with torch.no_grad():
        out = flow(x, LogdetSpec(mode="exact"))
    jac = torch.func.jacrev(lambda v: flow(v.reshape(1, *x.shape[1:]), LogdetSpec(mode="none")).z[0])(x[0].flatten())
    assert abs(float(torch.linalg.slogdet(jac.detach())[1]) - float(out.logdet[0])) <= 1e-8
    assert float((flow.solve_inverse(out.z) - x).abs().max()) <= 1e-8


# ------------------------------------------------------------------ refusals: one line, the right exit code
def _import(path: Path, out: Path, *extra: str):
    return runner.invoke(app, ["import", str(path), "--out", str(out), *extra])


def _one_line_error(result) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


class _Payload:
    """Pickles as a call to os.system: loading it with plain pickle would run a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_foreign_global_is_refused_by_name_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    checkpoint = load_fixture(RESFLOW)
    checkpoint["optimizer_state_dict"] = {"hook": _Payload(marker)}
    path = save_reference_checkpoint(checkpoint, tmp_path / "evil.pth")
    result = _import(path, tmp_path / "out")
    assert result.exit_code == 2
    assert "system" in _one_line_error(result)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["legacy", "truncated", "not-a-checkpoint", "text"])
def test_unreadable_files_are_refused(kind, tmp_path):
    path = tmp_path / "bad.pth"
    if kind == "legacy":
        torch.save({"state_dict": {}, "args": None}, path, _use_new_zipfile_serialization=False)
    elif kind == "truncated":
        data = RESFLOW.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not-a-checkpoint":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        path.write_text("hello")
    result = _import(path, tmp_path / "out")
    assert result.exit_code == 2
    _one_line_error(result)
    assert not (tmp_path / "out").exists()


REFUSED = {
    "factor_out": (True, "--factor-out True"),
    "quadratic": (True, "--quadratic True"),
    "vnorms": ("2122", "--vnorms 2122"),
    "task": ("hybrid", "--task hybrid"),
    "padding": (1, "--padding 1"),
    "batchnorm": (True, "--batchnorm True"),
}


@pytest.mark.parametrize("option", REFUSED, ids=REFUSED.keys())
def test_unsupported_options_are_refused_by_name(option, tmp_path):
    value, named = REFUSED[option]
    checkpoint = load_fixture(RESFLOW)
    setattr(checkpoint["args"], option, value)
    result = _import(save_reference_checkpoint(checkpoint, tmp_path / "c.pth"), tmp_path / "out")
    assert result.exit_code == 2
    assert named in _one_line_error(result)


def test_import_never_writes_into_a_directory_of_user_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = _import(RESFLOW, out)
    assert result.exit_code == 2 and "refusing" in _one_line_error(result)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_args_that_do_not_describe_the_weights_are_refused(tmp_path):
    checkpoint = load_fixture(RESFLOW)
    checkpoint["args"].idim = 64
    result = _import(save_reference_checkpoint(checkpoint, tmp_path / "c.pth"), tmp_path / "out")
    assert result.exit_code == 2
    assert "shape" in _one_line_error(result)


def test_a_block_that_is_not_contractive_is_refused_with_its_numbers(tmp_path):
    """A conv whose stored u flips sign is not normalised at all: scaled up, its block expands."""
    checkpoint = load_fixture(RESFLOW)
    name = "transforms.1.chain.0.nnet.1"
    checkpoint["state_dict"][f"{name}.u"] *= -1
    shadow = checkpoint["ema"].fields["shadow_params"]
    shadow[f"{name}.weight"] = shadow[f"{name}.weight"] * 20
    result = _import(save_reference_checkpoint(checkpoint, tmp_path / "c.pth"), tmp_path / "out")
    assert result.exit_code == 1
    line = _one_line_error(result)
    assert "layers.4" in line and "L =" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the whole path on the command line
@pytest.fixture(scope="module")
def imported_resflow(tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "resflow"
    result = _import(RESFLOW, out, "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_import_writes_an_ordinary_checkpoint_with_provenance(imported_resflow):
    out, report = imported_resflow
    meta = json.loads((out / "model.json").read_text())
    assert meta["preset"] == "imported" and meta["config"]["host"] == "reference"
    assert meta["provenance"]["source"] == "residual-flows" and meta["provenance"]["weights"] == "ema"
    assert meta["preprocessing"]["n_levels"] == 256 and meta["preprocessing"]["logit_alpha"] == 1e-6
    assert [b["guarantee"] for b in report["blocks"]] == ["certified"] * 7
    for row in report["blocks"]:
        assert row["lipschitz_measured"] <= row["lipschitz_certified"] < 1


@pytest.mark.slow  # a full export of an imported MNIST-shaped model
def test_imported_model_exports_checks_and_scores_uint8_images(imported_resflow, tmp_path):
    """export (series log-det, calibrated on the fixture's own test digits) and check at the fp32 limits; score
    takes uint8 N x H x W arrays and IDX files and lands near the reference's own bits/dim on them."""
    checkpoint, _ = imported_resflow
    folder = RESFLOW.parent
    ref = expected(folder)
    images = tmp_path / "test.npy"
    np.save(images, ref["test_uint8"][:, 0])
    artifact = tmp_path / "artifact"
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(artifact), "--data", str(images)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["check", str(artifact), "--n", "64", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["bits_per_dim_delta"] <= 1e-5
    idx = tmp_path / "t10k-images-idx3-ubyte"
    header = np.array([0, 0, 8, 3], dtype=np.uint8).tobytes() + np.array([8, 28, 28], dtype=">u4").tobytes()
    idx.write_bytes(header + ref["test_uint8"].tobytes())
    scores = []
    for data in (images, idx):
        result = runner.invoke(app, ["score", str(artifact), str(data), "--json"])
        assert result.exit_code == 0, result.output
        scores.append(json.loads(result.stdout)["bits_per_dim"])
    assert scores[0] == pytest.approx(scores[1], abs=1e-9)
    assert abs(scores[0] - float(ref["bits_per_dim"].mean())) < 0.05


@pytest.mark.slow  # a full export, calibrated on model samples
def test_export_without_data_calibrates_on_model_samples(imported_resflow, tmp_path):
    checkpoint, _ = imported_resflow
    artifact = tmp_path / "artifact"
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(artifact), "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["heldout"]["source"] == "model samples" and manifest["verified"]
    result = runner.invoke(app, ["check", str(artifact), "--n", "32"])
    assert result.exit_code == 0, result.output


def test_pickled_cifar_batches_are_refused_and_binary_ones_read(tmp_path):
    from acf_deploy.data import load_array

    records = np.random.default_rng(0).integers(0, 256, (5, 3073), dtype=np.uint8)
    (tmp_path / "data_batch_1.bin").write_bytes(records.tobytes())
    images = load_array(tmp_path / "data_batch_1.bin")
    assert images.shape == (5, 3, 32, 32) and np.array_equal(images[2, 1].ravel(), records[2, 1025:2049])
    shutil.copy(tmp_path / "data_batch_1.bin", tmp_path / "data_batch_2")
    with pytest.raises(Exception, match="never unpickles"):
        load_array(tmp_path / "data_batch_2")
