"""Training (docs/guarantees.md §4): short runs beat a diagonal Gaussian, big presets take a step, resume is exact.

Every run goes through :func:`acf_deploy.train.train` (roulette log-det, Neumann gradient, Adam, warm-up,
EMA, per-epoch atomic checkpoints), only shrunk by config overrides.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from acf_deploy.checkpoint import load_checkpoint, read_tensors
from acf_deploy.data import digits_split
from acf_deploy.errors import BadInput
from acf_deploy.flows.flow import Flow
from acf_deploy.flows.layers import Transform
from acf_deploy.flows.presets import preset_config
from acf_deploy.train import STATE_WEIGHTS, diagonal_gaussian_bpd, evaluate_bpd, train

# Short runs: one epoch of batch 8 (180 steps), sized so all five digits presets train and evaluate in
# well under a minute on 2 cores. The full presets are [4, 4] blocks of width 32 for 30 epochs; here
# [2, 2] residual blocks (one ActNorm-1x1-coupling step per scale for Glow), a short warm-up and a
# faster EMA, so 180 steps already count. Attention presets use width 8: their steps cost 2-3x more.
_SHORT = {"epochs": 1, "batch_size": 8, "lr": 5e-3, "warmup_steps": 10, "ema_decay": 0.9}
SHORT_RUNS = {
    "digits-acf-l2": {"hidden": 8, "scales": [2, 2], "train": _SHORT},
    "digits-acf-dp": {"hidden": 8, "scales": [2, 2], "train": _SHORT},
    "digits-resflow": {"hidden": 16, "scales": [2, 2], "train": _SHORT},
    "digits-glow": {"hidden": 16, "scales": [1, 1], "train": _SHORT},
    "digits-glow-acf": {"hidden": 16, "scales": [1, 1], "train": _SHORT},
}


@pytest.fixture(scope="module")
def digits():
    return digits_split()


class _PixelAffine(Transform):
    """``(y - mean) / std`` per dimension: a flow whose density is exactly a diagonal Gaussian."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.mean, self.std = nn.Parameter(mean), nn.Parameter(std)

    def forward(self, x):
        return (x - self.mean) / self.std, -torch.log(self.std).sum().expand(x.shape[0])

    def inverse(self, z):
        return z * self.std + self.mean


def test_diagonal_gaussian_baseline_is_the_flow_pipeline(digits):
    """The baseline equals evaluate_bpd of a Flow that *is* that Gaussian: same dequantisation, logit, bits/dim."""
    train_data, test_data = digits
    config = preset_config("digits-resflow")
    baseline = diagonal_gaussian_bpd(train_data, test_data, config)
    assert 1.0 < baseline < math.log2(17)  # better than uniform over the 17 levels

    # refit the same maximum-likelihood Gaussian by hand and wrap it as a Flow
    gen = torch.Generator().manual_seed(0)
    from acf_deploy.data import to_model_space
    from acf_deploy.flows.layers import LogitTransform

    y = LogitTransform(0.05)(to_model_space(train_data, config, gen).double())[0]
    mean, std = y.mean(0), y.var(0, unbiased=False).sqrt()
    flow = Flow([_PixelAffine(mean, std)], (1, 8, 8), 17, 0.05).double()
    flow_bpd = evaluate_bpd(flow, test_data, config)
    # float32 dequantised inputs go through the float64 flow in evaluate_bpd; same noise stream
    assert abs(flow_bpd - baseline) < 1e-4, (flow_bpd, baseline)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if "acf" in n else n for n in SHORT_RUNS]
)  # the attention presets train for about 20 s each
def test_short_training_beats_diagonal_gaussian(name: str, digits, tmp_path: Path):
    train_data, test_data = digits
    config = preset_config(name, **SHORT_RUNS[name])
    flow, metrics = train(config, tmp_path)
    assert metrics["epochs"] == config["train"]["epochs"] and len(metrics["history"]) == config["train"]["epochs"]
    assert all(math.isfinite(r["train_estimate"]) for r in metrics["history"])
    flow.bake()
    heldout = evaluate_bpd(flow, test_data, config)
    baseline = diagonal_gaussian_bpd(train_data, test_data, config)
    assert heldout < baseline, (name, heldout, baseline)
    # the epoch checkpoint is the EMA model that was just evaluated
    loaded, meta = load_checkpoint(tmp_path)
    assert meta["metrics"]["epochs_done"] == config["train"]["epochs"]
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, flow.state_dict()[key]), key


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["mnist-acf-l2", "cifar10-acf-l2"])
def test_full_size_preset_takes_one_step(name: str, tmp_path: Path):
    """The full mnist/cifar presets build and take one optimiser step on synthetic data of their shape."""
    config = preset_config(name, train={"epochs": 1, "batch_size": 2})
    rng = np.random.default_rng(0)
    shape = tuple(config["data_shape"])
    path = tmp_path / "data.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (2, *shape), dtype=np.uint8),
        x_test=rng.integers(0, 256, (2, *shape), dtype=np.uint8),
    )
    config["data_path"] = str(path)
    steps = []
    flow, metrics = train(config, tmp_path / "run", on_step=steps.append)
    assert len(steps) == 1 and math.isfinite(steps[0]["loss"])
    assert math.isfinite(metrics["history"][0]["train_estimate"])
    state = read_tensors(tmp_path / "run" / STATE_WEIGHTS)
    exp_avg = [v for k, v in state.items() if k.endswith(".exp_avg")]
    assert exp_avg and any(float(v.abs().max()) > 0 for v in exp_avg)  # Adam really stepped


def _resume_config(epochs: int) -> dict:
    return preset_config("digits-acf-l2", hidden=8, scales=[1, 1], train={"epochs": epochs, "batch_size": 256})


@pytest.mark.timeout(180)
def test_resume_matches_uninterrupted_run(tmp_path: Path):
    """1 epoch, then --resume to 2, equals 2 epochs straight, bit for bit.

    Exact because everything random is re-seeded per epoch (batch order and dequantisation noise from
    a generator seeded by (seed, epoch), roulette counts and probes from torch.manual_seed(seed, epoch)),
    and the resume state holds the raw weights, power-iteration vectors, ActNorm flags, Adam moments
    and step counts, and the EMA.
    """
    straight, _ = train(_resume_config(2), tmp_path / "straight")
    first, _ = train(_resume_config(1), tmp_path / "resumed")
    resumed, metrics = train(_resume_config(2), tmp_path / "resumed", resume=True)
    assert [r["epoch"] for r in metrics["history"]] == [0, 1]
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert any(not torch.equal(first.state_dict()[k], v) for k, v in straight.state_dict().items())
    a = read_tensors(tmp_path / "straight" / STATE_WEIGHTS)
    b = read_tensors(tmp_path / "resumed" / STATE_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_config(tmp_path: Path):
    config = preset_config("toy-resflow", blocks=2, hidden=8, train={"epochs": 1, "train_size": 256})
    train(config, tmp_path)
    other = preset_config("toy-resflow", blocks=2, hidden=8, train={"epochs": 2, "train_size": 256, "lr": 1e-4})
    with pytest.raises(BadInput, match=r"different config \(train\.lr\)"):
        train(other, tmp_path, resume=True)
    with pytest.raises(BadInput, match="missing"):
        train(config, tmp_path / "fresh", resume=True)
