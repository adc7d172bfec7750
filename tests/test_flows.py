"""The flow family outside attention internals (docs/guarantees.md §1 to §5).

* hand-written JVPs == ``torch.func.jvp`` (float64, rtol 1e-10) for every layer and every preset's
  residual branch, on random, baked and briefly trained weights;
* ``exact`` log-det == ``slogdet`` of the autograd Jacobian, per block and per whole flow, and every
  LU pivot >= 1 - L;
* ``series`` stays within its truncation bound of ``v^T log(I + J) v`` for every probe;
* the roulette estimator is unbiased (confidence interval) with finite, sensible gradients;
* baked spectral norms are certified (dense SVD <= coeff, FFT bound >= dense, power iteration <= exact);
* round trips for every preset in float64 and float32, both directions;
* the toy density integrates to 1.

All configs are shrunk (``hidden=8``, one block per scale, two toy blocks) but go through
:func:`build_flow`, so every host, scale layout and attention kind is the real one.
"""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from acf_deploy.data import digits_split, toy_density
from acf_deploy.flows import lipschitz as lipschitz_module
from acf_deploy.flows.attention import GatedAttention
from acf_deploy.flows.base import Chain
from acf_deploy.flows.blocks import (
    LogdetSpec,
    ResidualBlock,
    exact_logdet,
    iterations_for,
    lu_logdet,
    roulette_logdet,
    series_logdet,
    series_truncation_bound,
)
from acf_deploy.flows.flow import Flow
from acf_deploy.flows.layers import ActNorm, AffineCoupling, InvConv1x1, LogitTransform, Squeeze, dequantize
from acf_deploy.flows.lipschitz import LipSwish, SNConv2d, SNLinear
from acf_deploy.flows.presets import PRESETS, build_flow, preset_config
from acf_deploy.train import training_spec

from .export_fixtures import small_config

ALL_PRESETS = list(PRESETS)
RESIDUAL_PRESETS = [name for name in ALL_PRESETS if name != "digits-glow"]  # every preset with a residual step
DIGITS_PRESETS = [name for name in ALL_PRESETS if name.startswith("digits")]
JVP_RTOL = 1e-10


# ---------------------------------------------------------------------------------------------- helpers
def data_batch(config: dict, n: int, seed: int = 0) -> torch.Tensor:
    """Real data in the model's data space: dequantised digits, moons, or uniform levels otherwise."""
    gen = torch.Generator().manual_seed(seed)
    if config["data"] == "digits":
        levels = torch.as_tensor(digits_split()[0][:n])
    elif config["n_levels"] is None:
        return torch.as_tensor(toy_density(config["data"], n, seed=seed)).to(torch.get_default_dtype())
    else:
        levels = torch.randint(0, config["n_levels"], (n, *config["data_shape"]), generator=gen)
    return dequantize(levels, config["n_levels"], generator=gen)


@torch.no_grad()
def randomize_(flow: Flow, seed: int = 0, gamma: float = 0.5) -> Flow:
    """Move every parameter off its (often special) initial value: gates open, couplings non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in flow.named_parameters():
        if name.endswith(("gamma", "theta")):  # the gate parameter, abs or convex
            p.fill_(gamma)
        elif name.endswith("raw_beta"):
            p.copy_(torch.rand((), generator=gen) * 3 - 1.5)
        else:
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    for module in flow.modules():
        if isinstance(module, lipschitz_module._SpectralNorm):
            module.power_iteration(30)  # u, v for the perturbed weights
    return flow


@torch.no_grad()
def stress_(flow: Flow, seed: int = 0) -> Flow:
    """Push every residual branch towards its Lipschitz bound.

    Random layers barely align (a random i-ResBlock has ``||J|| ~ 0.04`` against ``L = 0.73``), which
    makes series, roulette and inverse tests easy. Here every linear/conv is 3x a (semi-)orthogonal
    centre tap, so after normalisation all its singular values are about ``coeff``; biases of +1 and
    ``beta ~ 3`` keep LipSwish near its maximal slope. Blocks then reach ``||J|| ~ 0.35-0.55``.
    """
    gen = torch.Generator().manual_seed(seed)
    for module in flow.modules():
        if isinstance(module, (SNConv2d, SNLinear)):
            weight = module.weight
            c_out, c_in = weight.shape[:2]
            n = max(c_out, c_in)
            q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0][:c_out, :c_in]
            new = torch.zeros_like(weight)
            if weight.dim() == 4:
                k = weight.shape[-1]
                new[:, :, k // 2, k // 2] = 3 * q
            else:
                new = 3 * q.to(weight.dtype)
            weight.copy_(new + 0.02 * torch.randn(weight.shape, generator=gen, dtype=torch.float64))
            module.bias.fill_(1.0)
            module.power_iteration(50)
        elif isinstance(module, LipSwish):
            module.raw_beta.fill_(3.0)
    return flow


def small_flow(name: str, dtype: torch.dtype = torch.float64, seed: int = 0, stress: bool = False) -> tuple[Flow, dict]:
    """Small preset flow with random (or stressed) weights, ActNorm initialised on data, in eval mode."""
    config = small_config(name)
    torch.manual_seed(seed)
    flow = build_flow(config).to(dtype)
    randomize_(flow, seed)
    if stress:
        stress_(flow, seed)
    flow.initialize(data_batch(config, 64, seed).to(dtype))
    with torch.no_grad():  # ActNorm away from its data init too
        for module in flow.modules():
            if isinstance(module, ActNorm):
                module.log_scale.add_(0.1 * torch.randn_like(module.log_scale))
    return flow.eval(), config


def bake_(flow: Flow, config: dict) -> Flow:
    """``flow.bake()``; the shrunk mnist/cifar convs are certified by the FFT bound, as the full presets' are.

    At full width every mnist/cifar conv at its first scale is over the dense-SVD limit; shrunk to
    ``hidden=8`` they would fall under it and spend tens of seconds in SVDs of 3072 x 2048 operators
    that the real presets never build.
    """
    if config["data"] in ("mnist", "cifar10"):
        with mock.patch.object(lipschitz_module, "DENSE_SVD_LIMIT", 512):
            return flow.bake()
    return flow.bake()


def train_steps_(flow: Flow, config: dict, n_steps: int = 3, lr: float = 1e-2) -> Flow:
    """A few optimiser steps with the real training estimator ('trained-ish' weights), back in eval mode."""
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    flow.train()
    dtype = next(flow.parameters()).dtype
    for step in range(n_steps):
        x = data_batch(config, 8, seed=100 + step).to(dtype)
        loss = -flow(x, training_spec(config)).log_prob.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flow.eval()


def block_inputs(flow: Flow, x: torch.Tensor) -> list[tuple[ResidualBlock, torch.Tensor]]:
    """Each residual block with the tensor it receives when the flow runs on ``x``."""
    h = flow.preprocess(x)[0] if flow.preprocess is not None else x
    found = []
    with torch.no_grad():
        for layer in flow.layers:
            if isinstance(layer, ResidualBlock):
                found.append((layer, h.clone()))
            h = Flow._apply_layer(layer, h, LogdetSpec(mode="none"))[0]
    return found


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """``max |a - e| <= rtol * max |e|`` (relative to the tensor's scale, not element by element)."""
    err = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol:.0e} * {scale:.3e}"


def reference_jvp(fn, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return torch.func.jvp(fn, (x,), (v,))


def check_jvp(module, x: torch.Tensor) -> None:
    v = torch.randn_like(x)
    with torch.no_grad():
        y, jv = module.jvp(x, v)
    y_ref, jv_ref = reference_jvp(module, x, v)
    assert_rel_close(y, y_ref, JVP_RTOL)
    assert_rel_close(jv, jv_ref, JVP_RTOL)
    assert float(jv_ref.abs().max()) > 0


def dense_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """``(D, D)`` Jacobian of a single-sample map, by reverse-mode autograd."""
    jac = torch.autograd.functional.jacobian(lambda t: fn(t.unsqueeze(0)).squeeze(0), x, vectorize=True)
    return jac.reshape(x.numel(), x.numel())


def gates(flow: Flow) -> list[GatedAttention]:
    return [m for m in flow.modules() if isinstance(m, GatedAttention)]


# ---------------------------------------------------------------------------------------------- JVPs
def _layers():
    return {
        "snlinear": (lambda: SNLinear(5, 7, coeff=0.9), (3, 5)),
        "snconv3x3": (lambda: SNConv2d(3, 6, 3, (4, 4), coeff=0.9), (2, 3, 4, 4)),
        "snconv1x1": (lambda: SNConv2d(6, 4, 1, (3, 5), coeff=0.7), (2, 6, 3, 5)),
        "lipswish": (LipSwish, (2, 3, 4, 4)),
        "chain": (
            lambda: Chain(LipSwish(), SNConv2d(3, 6, 3, (4, 4)), LipSwish(), SNConv2d(6, 3, 1, (4, 4))),
            (2, 3, 4, 4),
        ),
    }


@pytest.mark.parametrize("baked", [False, True], ids=["unbaked", "baked"])
@pytest.mark.parametrize("kind", list(_layers()))
def test_layer_jvp_matches_autodiff(kind: str, baked: bool, float64):
    make, shape = _layers()[kind]
    module = make().double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("raw_beta"):
                p.fill_(-0.8)  # beta = softplus(-0.8) = 0.37, not the default
            else:
                p.mul_(3.0).add_(0.1)  # large enough that spectral normalisation is active
    module.eval()
    if baked:
        module.bake()
    check_jvp(module, torch.randn(shape) * 2)


@pytest.mark.parametrize("state", ["random", "stressed", "baked", "trained"])
@pytest.mark.parametrize("name", RESIDUAL_PRESETS)
def test_block_jvp_matches_autodiff(name: str, state: str, float64):
    """Whole residual branches (i-ResBlocks with gated attention, ACF layers, toy MLPs) of every preset."""
    flow, config = small_flow(name, stress=state == "stressed")
    if state == "trained":
        train_steps_(flow, config)
    if state == "baked":
        bake_(flow, config)
    for gate in gates(flow):
        assert abs(gate.attention_weight()) > 0.3  # the attention path really contributes
    found = block_inputs(flow, data_batch(config, 2, seed=1))
    assert found
    for block, h in found:
        check_jvp(block.g, h)


# ---------------------------------------------------------------------------------------------- exact log-det
def test_lu_logdet_matches_slogdet_and_reports_min_pivot(float64):
    a = torch.eye(6) + 0.3 * torch.randn(3, 6, 6) / math.sqrt(6)
    logdet, pivot = lu_logdet(a)
    sign, ref = torch.linalg.slogdet(a)
    assert torch.all(sign > 0)
    torch.testing.assert_close(logdet, ref, rtol=0, atol=1e-12)
    # pivots of LU without pivoting are ratios of consecutive leading principal minors
    minors = torch.stack([torch.linalg.det(a[:, :k, :k]) for k in range(1, 7)], 1)
    pivots = minors / torch.cat([torch.ones(3, 1), minors[:, :-1]], 1)
    torch.testing.assert_close(pivot, pivots.min(-1).values, rtol=0, atol=1e-12)


BLOCK_PRESETS = ["digits-acf-l2", "digits-acf-dp", "digits-resflow", "digits-glow-acf", "toy-resflow"]


@pytest.mark.parametrize("weights", ["random", "stressed"])
@pytest.mark.parametrize("baked", [False, True], ids=["unbaked", "baked"])
@pytest.mark.parametrize("name", BLOCK_PRESETS)
def test_block_exact_logdet_matches_autograd(name: str, baked: bool, weights: str, float64):
    flow, config = small_flow(name, stress=weights == "stressed")
    if baked:
        flow.bake()
    for block, h in block_inputs(flow, data_batch(config, 2, seed=2)):
        with torch.no_grad():
            _, logdet, min_pivot = exact_logdet(block.g, h)
        for i in range(h.shape[0]):
            sign, ref = torch.linalg.slogdet(dense_jacobian(lambda t, b=block: t + b.g(t), h[i]))
            assert float(sign) > 0
            assert abs(float(logdet[i]) - float(ref)) <= 1e-8
        if baked:  # certified L: every pivot of I + J is at least 1 - L
            lip = block.lipschitz()
            assert lip < 1
            assert torch.all(min_pivot >= 1 - lip - 1e-12), (float(min_pivot.min()), lip)


@pytest.mark.parametrize("name", [n for n in ALL_PRESETS if not n.startswith(("mnist", "cifar"))])
def test_flow_logdet_matches_autograd(name: str, float64):
    """The whole forward(): logit, ActNorm, squeeze, 1x1 conv, coupling and residual steps together."""
    flow, config = small_flow(name, stress=True)
    flow.bake()
    x = data_batch(config, 2, seed=3)
    with torch.no_grad():
        out = flow(x, LogdetSpec(mode="exact"))
    for i in range(x.shape[0]):
        jac = dense_jacobian(lambda t: flow(t, LogdetSpec(mode="none")).z, x[i])
        sign, ref = torch.linalg.slogdet(jac)
        assert float(sign) > 0
        assert abs(float(out.logdet[i]) - float(ref)) <= 1e-8
    blocks = flow.residual_blocks()
    if blocks:
        assert torch.all(out.min_pivot >= 1 - max(b.lipschitz() for b in blocks) - 1e-12)
    else:
        assert out.min_pivot is None
    z_ref = flow(x, LogdetSpec(mode="none")).z
    torch.testing.assert_close(out.z, z_ref, rtol=0, atol=1e-12)
    expected = -0.5 * (out.z**2).sum(1) - 0.5 * flow.dim * math.log(2 * math.pi) + out.logdet
    torch.testing.assert_close(out.log_prob, expected, rtol=0, atol=1e-10)


def _layer_cases():
    def coupling():
        layer = AffineCoupling(4, 8)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.2 * torch.randn_like(p))
        return layer

    def actnorm():
        layer = ActNorm(4)
        layer.initialize(torch.randn(16, 4, 4, 4) * 2 + 1)
        return layer

    def invconv():
        layer = InvConv1x1(4)
        with torch.no_grad():
            layer.weight.add_(0.3 * torch.randn(4, 4))
        return layer

    return {
        "logit": (lambda: LogitTransform(0.05), lambda: torch.rand(2, 1, 4, 4)),
        "actnorm": (actnorm, lambda: torch.randn(2, 4, 4, 4)),
        "actnorm-flat": (lambda: ActNorm(3, spatial=False), lambda: torch.randn(2, 3)),
        "squeeze": (Squeeze, lambda: torch.randn(2, 2, 4, 4)),
        "invconv1x1": (invconv, lambda: torch.randn(2, 4, 3, 3)),
        "coupling": (coupling, lambda: torch.randn(2, 4, 4, 4)),
    }


@pytest.mark.parametrize("baked", [False, True], ids=["unbaked", "baked"])
@pytest.mark.parametrize("kind", list(_layer_cases()))
def test_layer_logdet_and_inverse(kind: str, baked: bool, float64):
    make, inputs = _layer_cases()[kind]
    layer = make().double()
    if baked:
        layer.bake()
    x = inputs()
    with torch.no_grad():
        y, logdet = layer(x)
    assert logdet.shape == (x.shape[0],)
    for i in range(x.shape[0]):
        jac = dense_jacobian(lambda t: layer(t)[0], x[i])
        sign, ref = torch.linalg.slogdet(jac)
        assert float(sign) != 0
        assert abs(float(logdet[i]) - float(ref)) <= 1e-10
    with torch.no_grad():
        torch.testing.assert_close(layer.inverse(y), x, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- series
@pytest.mark.parametrize("name", BLOCK_PRESETS)
def test_series_within_truncation_bound_per_probe(name: str, float64):
    flow, config = small_flow(name, stress=True)
    flow.bake()
    n_probes = 6
    for block, h in block_inputs(flow, data_batch(config, 2, seed=4)):
        lip = block.lipschitz()
        dim = h[0].numel()
        probes = torch.randint(0, 2, (h.shape[0], n_probes, dim)).double() * 2 - 1
        jacs = torch.stack([dense_jacobian(block.g, h[i]) for i in range(h.shape[0])])  # J_g, (B, D, D)
        assert float(torch.linalg.matrix_norm(jacs, ord=2).max()) <= lip
        exact = []
        for i in range(h.shape[0]):
            log_m = scipy.linalg.logm(np.eye(dim) + jacs[i].numpy())
            if np.iscomplexobj(log_m):
                assert np.abs(log_m.imag).max() < 1e-10
            log_m = torch.as_tensor(np.real(log_m))
            exact.append(torch.einsum("pd,de,pe->p", probes[i], log_m, probes[i]))
        exact = torch.stack(exact)  # (B, P): v^T log(I + J) v
        # one probe per row so the estimator's per-probe value is visible
        h_rep = h.repeat_interleave(n_probes, 0)
        for terms in (2, 5, 10):
            with torch.no_grad():
                _, est = series_logdet(block.g, h_rep, probes.reshape(-1, 1, dim), terms)
            est = est.reshape(h.shape[0], n_probes)
            # the K-term partial sum itself, from the dense Jacobian: sum_k (-1)^(k+1) v^T J^k v / k
            power, partial = torch.eye(dim).expand_as(jacs), torch.zeros(h.shape[0], dim, dim)
            for k in range(1, terms + 1):
                power = power @ jacs
                partial = partial + (-1) ** (k + 1) / k * power
            assert_rel_close(est, torch.einsum("bpd,bde,bpe->bp", probes, partial, probes), 1e-10)
            err = (est - exact).abs()
            bound = series_truncation_bound(dim, lip, terms)
            assert float(err.max()) <= bound, (terms, float(err.max()), bound)
        # probes averaged the way the graphs use them: the mean of the per-probe values
        with torch.no_grad():
            _, mean_est = series_logdet(block.g, h, probes, 10)
        torch.testing.assert_close(mean_est, exact.mean(1), rtol=0, atol=series_truncation_bound(dim, lip, 10))


# ---------------------------------------------------------------------------------------------- roulette
def _flat_grad(output: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(output, params, allow_unused=True)
    return torch.cat(
        [torch.zeros_like(p).flatten() if g is None else g.flatten() for g, p in zip(grads, params, strict=True)]
    )


def _roulette_draws(block: ResidualBlock, h: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` independent draws at one input: each batch row has its own Poisson count and probe."""
    x = h.expand(n, *h.shape[1:]).clone().requires_grad_(True)
    return roulette_logdet(block.g, x, LogdetSpec(mode="roulette"))[1]


@pytest.mark.parametrize("name", ["digits-acf-l2", "toy-resflow"])
def test_roulette_value_unbiased_and_gradient_finite(name: str, float64):
    flow, config = small_flow(name, stress=True)
    block, h = block_inputs(flow, data_batch(config, 1, seed=5))[-1]
    with torch.no_grad():
        exact = float(exact_logdet(block.g, h)[1])
    estimate = _roulette_draws(block, h, 2000)
    values = estimate.detach()
    mean, stderr = float(values.mean()), float(values.std()) / math.sqrt(len(values))
    assert abs(mean - exact) <= 4 * stderr, (mean, exact, stderr)
    grad = _flat_grad(estimate.mean(), [p for p in block.g.parameters() if p.requires_grad])
    assert torch.isfinite(grad).all() and float(grad.abs().max()) > 0


def test_roulette_gradient_unbiased(float64):
    """The Neumann gradient's mean is the exact log-det gradient (16 groups of 125 draws).

    ``R = ||mean - exact||^2 / sum(se^2)`` over all weights is about 1 when unbiased (0.9-1.1 across
    seeds); dropping the Neumann series' alternating sign gives 10-13. The exact gradient is autograd
    through the hand-written JVPs of ``exact_logdet``. (Not the toy block: at D = 2 the Poisson(2)
    roulette is so heavy-tailed that 16 group variances make ``R`` swing between 0.003 and 9.)
    """
    flow, config = small_flow("digits-acf-l2", stress=True)
    block, h = block_inputs(flow, data_batch(config, 1, seed=5))[-1]
    params = [p for p in block.g.parameters() if p.requires_grad]
    exact_grad = _flat_grad(exact_logdet(block.g, h)[1].sum(), params)
    groups = torch.stack([_flat_grad(_roulette_draws(block, h, 125).mean(), params) for _ in range(16)])
    assert torch.isfinite(groups).all()
    mean, se2 = groups.mean(0), groups.var(0) / len(groups)
    ratio = float((mean - exact_grad).square().sum() / se2.sum())
    assert ratio < 4.0, ratio


# ---------------------------------------------------------------------------------------------- spectral norms
def dense_conv_norm(weight: torch.Tensor, hw: tuple[int, int]) -> float:
    """Exact operator 2-norm of the zero-padded 'same' convolution, by SVD of its autograd Jacobian."""
    c_in = weight.shape[1]
    x = torch.zeros(1, c_in, *hw, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: F.conv2d(t, weight.double(), padding=weight.shape[-1] // 2), x)
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), ord=2))


@pytest.mark.parametrize(
    "c_in,c_out,k,hw,coeff",
    [(1, 4, 3, (8, 8), 0.9), (4, 8, 3, (4, 4), 0.9), (8, 8, 1, (4, 4), 0.8), (3, 5, 3, (3, 5), 0.97)],
)
def test_baked_conv_norm_is_certified(c_in: int, c_out: int, k: int, hw, coeff: float):
    layer = SNConv2d(c_in, c_out, k, hw, coeff=coeff)
    with torch.no_grad():
        layer.weight.mul_(5.0)  # far above coeff
        raw_exact = dense_conv_norm(layer.weight.detach(), hw)
        # power iteration only ever underestimates; poor u, v underestimate a lot
        for _ in range(5):
            layer.train()
            sigma = float(layer._power_sigma())
            assert sigma <= raw_exact * (1 + 1e-6)
        layer.u.copy_(torch.randn_like(layer.u))  # worst case: unconverged vectors at bake time
        layer.v.copy_(torch.randn_like(layer.v))
        layer.u.div_(layer.u.norm())
        layer.v.div_(layer.v.norm())
    layer.bake()
    baked_exact = dense_conv_norm(layer.baked_weight, hw)
    assert baked_exact <= coeff
    assert abs(baked_exact - layer.certified_norm) <= 1e-9
    assert layer.lipschitz() == layer.certified_norm
    assert baked_exact >= coeff * 0.999  # rescaled to the boundary, not shrunk further


@pytest.mark.parametrize("shape,coeff", [((7, 5), 0.9), ((16, 2), 0.5), ((3, 3), 0.97)])
def test_baked_linear_norm_is_certified(shape, coeff: float):
    layer = SNLinear(shape[1], shape[0], coeff=coeff)
    with torch.no_grad():
        layer.weight.mul_(4.0)
    exact = float(torch.linalg.svdvals(layer.weight.detach().double())[0])
    layer.train()
    with torch.no_grad():
        assert float(layer._power_sigma()) <= exact * (1 + 1e-6)
    layer.bake()
    baked = float(torch.linalg.svdvals(layer.baked_weight.double())[0])
    assert baked <= coeff
    assert abs(baked - layer.certified_norm) <= 1e-9


def test_fft_bound_dominates_dense_norm(monkeypatch: pytest.MonkeyPatch):
    """Both apply to a 4-channel 8x8 conv (256 x 256 operator): the FFT bound is never below the exact norm."""
    for seed in range(3):
        torch.manual_seed(seed)
        layer = SNConv2d(4, 4, 3, (8, 8))
        weight = layer.weight.detach()
        dense = layer.exact_norm(weight)
        assert abs(dense - dense_conv_norm(weight, (8, 8))) <= 1e-9
        monkeypatch.setattr(lipschitz_module, "DENSE_SVD_LIMIT", 0)
        fft = layer.exact_norm(weight)
        monkeypatch.undo()
        assert dense <= fft <= 1.5 * dense, (dense, fft)


def test_fresh_layer_is_normalised_before_training():
    """Eval-mode sigma of a just-built layer is near the true norm, so an untrained flow already contracts."""
    layer = SNConv2d(4, 16, 3, (4, 4), coeff=0.9).eval()
    effective = dense_conv_norm(layer.effective_weight().detach(), (4, 4))
    assert effective <= 0.9 * 1.02


@pytest.mark.parametrize("name", RESIDUAL_PRESETS)
def test_baked_block_bounds(name: str):
    flow, config = small_flow(name, dtype=torch.float32)
    bake_(flow, config)
    for block in flow.residual_blocks():
        coeff_product = 0.9**3 if block.kind.startswith("iresblock") or block.kind == "mlp" else 0.9
        assert block.lipschitz() <= coeff_product + 1e-12
        assert block.guarantee == ("verified" if block.kind.endswith("-dp") else "certified")


# ---------------------------------------------------------------------------------------------- round trips
def iteration_counts(flow: Flow, tol: float) -> list[int]:
    """Certified fixed-point counts for inputs with ||g(y)|| <= 100 (asserted afterwards via the residual)."""
    return [iterations_for(block.lipschitz(), 100.0, tol) for block in flow.residual_blocks()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ALL_PRESETS)
def test_round_trip(name: str, dtype: torch.dtype):
    """inverse(forward(x)) in data space and forward(inverse(z)) in z space, docs/guarantees.md §5 tolerances."""
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    flow, config = small_flow(name, dtype=torch.float64, stress=True)
    flow = bake_(flow.to(dtype), config)
    counts = iteration_counts(flow, tol=1e-8)
    batch = 4 if config["data"] in ("mnist", "cifar10") else 8
    x = data_batch(config, batch, seed=6).to(dtype)
    with torch.no_grad():
        z = flow(x, LogdetSpec(mode="none")).z
        x_back, residual = flow.inverse(z, counts)
        assert float((x_back - x).abs().max()) <= tol
        assert float(residual.max()) <= tol

        z = torch.randn(batch, flow.dim, dtype=dtype)
        x_s, residual = flow.sample(z, counts)
        assert torch.isfinite(x_s).all() and float(residual.max()) <= tol
        z_back = flow(x_s, LogdetSpec(mode="none")).z
        rel = (z_back - z).norm(dim=1) / z.norm(dim=1)
        assert float(rel.max()) <= tol


@pytest.mark.parametrize("name", ["digits-acf-l2", "digits-resflow", "toy-resflow"])
def test_anderson_schedule_converges_and_its_pieces_compose(name: str):
    """Accelerated iterations reach the float64 inverse; what ``inverse`` returns with ``n`` evaluations of g is the
    ``n``-th iterate; and the exported Loop's pieces (start, carried step, plain last step) give the same values."""
    flow, config = small_flow(name, dtype=torch.float64, stress=True)
    flow = bake_(flow, config)
    x = data_batch(config, 4, seed=3).double()
    for block, h in block_inputs(flow, x):
        with torch.no_grad():
            y = h + block.g(h)
            n = next(
                n
                for n, (x_n, _) in enumerate(block.iterates(y, "anderson"), start=1)
                if n == 300 or float((x_n - h).abs().max()) <= 1e-10
            )
            x_n, step = block.inverse(y, n, "anderson")
            assert float((x_n - h).abs().max()) <= 1e-10
            state = block.anderson_start(y)
            for _ in range(n - 2):
                state = block.anderson_step(*state, y)
            torch.testing.assert_close(block.inverse_step(state[0], y), (x_n, step), rtol=0, atol=0)


def test_anderson_schedule_needs_fewer_evaluations_on_the_shipped_model():
    """On the trained digits-acf-l2, at the exporter's accuracy (max-abs 5e-6 in float32 against float64),
    Anderson-accelerated iterations need fewer evaluations of g than plain ones in every block."""
    from acf_deploy.checkpoint import load_checkpoint
    from acf_deploy.data import to_model_space
    from acf_deploy.quickstart import shipped_model

    flow, meta = load_checkpoint(shipped_model())
    flow.bake()
    x = to_model_space(digits_split()[1][:32], meta["config"], torch.Generator().manual_seed(0))
    totals = {"plain": 0, "anderson": 0}
    for block, h in block_inputs(flow, x):
        with torch.no_grad():
            y = h + block.g(h)
            truth = block.double().solve(y.double())
            block.float()
            for schedule in totals:
                errors = ((x_n.double() - truth).abs().max() for x_n, _ in block.iterates(y, schedule))
                n = next(n for n, err in enumerate(errors, start=1) if err <= 5e-6 or n == 200)
                totals[schedule] += n
            assert totals["anderson"] <= totals["plain"]
    assert totals["anderson"] < 0.85 * totals["plain"], totals


def test_iteration_count_meets_its_tolerance(float64):
    """The certified count of blocks.iterations_for really reaches tol against a long-run reference."""
    flow, config = small_flow("digits-acf-l2", stress=True)
    flow.bake()
    block, h = block_inputs(flow, data_batch(config, 4, seed=7))[0]
    with torch.no_grad():
        y = h + block.g(h)
        r0 = float((block.g(y)).flatten(1).norm(dim=1).max())  # first Banach step from x0 = y
        n = iterations_for(block.lipschitz(), r0, 1e-9)
        x_n, _ = block.inverse(y, n)
    assert float((x_n - h).flatten(1).norm(dim=1).max()) <= 1e-9
    assert n < 100


# ---------------------------------------------------------------------------------------------- toy density
@pytest.mark.timeout(60)
def test_toy_density_integrates_to_one(tmp_path):
    """Train the real toy preset briefly, then integrate exp(log p) on a grid.

    Box choice: a flow is a homeomorphism of R^2, so the pre-image of the disk ||z|| <= 5 is the region
    bounded by the pre-image of the circle ||z|| = 5. The box is that curve's bounding box (from 2,000
    points on the circle, plus a 15% margin), so the mass outside it is at most P(||z|| > 5) =
    exp(-12.5) = 4e-6, far below the 2% tolerance; the rest of the error is the midpoint rule's.
    """
    from acf_deploy.train import train

    config = preset_config("toy-resflow", train={"epochs": 1, "train_size": 2000, "batch_size": 200})
    flow, _ = train(config, tmp_path)
    flow.bake()
    counts = iteration_counts(flow, tol=1e-6)
    angles = torch.linspace(0, 2 * math.pi, 2000)
    circle = 5.0 * torch.stack([angles.cos(), angles.sin()], 1)
    with torch.no_grad():
        curve, residual = flow.inverse(circle, counts)
    assert float(residual.max()) < 1e-4
    lo, hi = curve.min(0).values, curve.max(0).values
    lo, hi = lo - 0.15 * (hi - lo), hi + 0.15 * (hi - lo)
    n = 240
    axes = [torch.linspace(float(lo[i]), float(hi[i]), n + 1) for i in range(2)]
    mids = [(a[1:] + a[:-1]) / 2 for a in axes]
    cell = float((axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0]))
    grid = torch.cartesian_prod(mids[0], mids[1])
    with torch.no_grad():
        log_p = torch.cat([flow.log_prob(chunk) for chunk in grid.split(30_000)])
    mass = float(log_p.double().exp().sum()) * cell
    assert abs(mass - 1.0) <= 0.02, (mass, lo.tolist(), hi.tolist())
