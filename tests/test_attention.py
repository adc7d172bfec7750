"""ACF attention: hand-written JVPs, certified/derived bounds against independent formulas and
measurement, token-permutation equivariance, per-sample independence, and ONNX export."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from scipy.special import lambertw
from torch import nn

from acf_deploy.errors import BadInput
from acf_deploy.flows.attention import (
    GATE_RATE,
    ACFBranch,
    DotProductAttention,
    GatedAttention,
    L2Attention,
    dp_value_constant,
    l2_constant,
)
from acf_deploy.flows.measure import adversarial_lipschitz, jacobian_norm, measured_lipschitz
from acf_deploy.flows.presets import build_flow, preset_config

DIM, HW = 8, (4, 4)
N = HW[0] * HW[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a single thread avoids oversubscription on shared 2-core machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise(module: nn.Module, scale: float = 1.0) -> nn.Module:
    """Generic (non-orthogonal) weights, so no identity hides a wrong derivative."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("gamma", "theta")):
                continue
            p.copy_(scale * torch.randn_like(p) / math.sqrt(DIM))
    return module


def _inputs(batch: int = 4, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Random normal inputs and data-like ones (logits of values in [0.05, 0.95], so within [-3, 3])."""
    x = torch.randn(batch, DIM, *HW, dtype=dtype)
    u = 0.05 + 0.9 * torch.rand(batch, DIM, *HW, dtype=dtype)
    return [x, torch.logit(u)]


def _gate(gate: GatedAttention, value: float) -> GatedAttention:
    with torch.no_grad():
        gate.param.fill_(value)
    return gate


def _make(kind: str, heads: int) -> nn.Module:
    l2 = _randomise(L2Attention(DIM, heads, HW))
    dp = _randomise(DotProductAttention(DIM, heads, HW))
    return {
        "l2": l2,
        "dp": dp,
        "gated-l2": _gate(GatedAttention(l2, "abs"), 0.7),
        "gated-dp": _gate(GatedAttention(dp, "abs"), -1.3),
        "convex-l2": _gate(GatedAttention(l2, "convex"), 0.4 / GATE_RATE),
        "tanh-dp": _gate(GatedAttention(dp, "tanh"), -0.8 / GATE_RATE),
        "branch-l2": ACFBranch(l2, c=0.9),
        "branch-dp": ACFBranch(dp, c=0.9),
    }[kind]


def l2_reference_bound(module: L2Attention) -> float:
    """Independent float64 formula: sqrt(N/d) (4 W0((N-1)/e) + 1) sqrt(sum_h |W_h|^4 |V_h|^2) |W_O|."""
    n, d = module.window[0] * module.window[1], module.dim // module.heads
    w = module.weight_qk.detach().double().numpy()
    v = module.weight_v.detach().double().numpy()
    o = module.weight_o.detach().double().numpy()
    per_head = [np.linalg.norm(w[h], ord=2) ** 4 * np.linalg.norm(v[h], ord=2) ** 2 for h in range(module.heads)]
    constant = 4.0 * lambertw((n - 1) / np.e).real + 1.0
    return float(np.sqrt(n / d) * constant * np.sqrt(sum(per_head)) * np.linalg.norm(o, ord=2))


def check_l2_bound(module: L2Attention, inputs: list[torch.Tensor], steps: int = 30) -> float:
    """Raise AssertionError unless the module's B equals the reference formula and dominates Lip(F).

    Returns measured Lip(F) / B. ``F = module(x) * B`` is the unnormalised attention.
    """
    bound = float(module.bound().detach())
    reference = l2_reference_bound(module)
    assert bound == pytest.approx(reference, rel=1e-9), f"bound {bound} != formula {reference}"
    measured = measured_lipschitz(lambda x: module(x) * bound, inputs, n_iter=20, steps=steps)
    assert measured <= bound * (1 + 1e-9), f"measured {measured} exceeds bound {bound}"
    return measured / bound


# --- constants -------------------------------------------------------------------------------


def test_l2_constant_table():
    table = {4: 3.41, 16: 6.53, 64: 10.23, 256: 14.35, 784: 17.89, 1024: 18.76}
    for n, value in table.items():
        assert l2_constant(n) == pytest.approx(value, abs=0.005)


def test_dp_value_constant_bounds_attention_matrix_norm():
    """kappa_N bounds ||P||_2 for any row-stochastic P whose scores lie in [-1, 1]."""
    torch.manual_seed(0)
    for n in (4, 16, 64):
        assert dp_value_constant(n) <= min(math.sqrt(n), math.e)
        # the extreme case: every row puts score 1 on token 0 and -1 elsewhere
        scores = -torch.ones(n, n, dtype=torch.float64)
        scores[:, 0] = 1.0
        p = torch.softmax(scores, -1)
        assert float(p[:, 0].sum()) == pytest.approx(dp_value_constant(n) ** 2, rel=1e-12)  # column sum
        assert float(torch.linalg.matrix_norm(p, ord=2)) <= dp_value_constant(n)
        random = torch.softmax(2 * torch.rand(16, n, n, dtype=torch.float64) - 1, -1)
        assert float(torch.linalg.matrix_norm(random, ord=2).max()) <= dp_value_constant(n)


# --- hand-written JVPs ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l2", "dp", "gated-l2", "gated-dp", "convex-l2", "tanh-dp", "branch-l2", "branch-dp"])
@pytest.mark.parametrize("heads", [1, 4])
def test_jvp_matches_autodiff(kind: str, heads: int):
    torch.manual_seed(heads)
    module = _make(kind, heads).double()
    x, v = torch.randn(3, DIM, *HW, dtype=torch.float64), torch.randn(3, DIM, *HW, dtype=torch.float64)
    y_ref, dy_ref = torch.func.jvp(module, (x,), (v,))
    for baked in (False, True):
        if baked:
            module.bake()
        y, dy = module.jvp(x, v)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dy, dy_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(module(x), y, rtol=0, atol=0)
    # and against autodiff of the baked forward itself
    y_b, dy_b = torch.func.jvp(module, (x,), (v,))
    torch.testing.assert_close(module.jvp(x, v)[1], dy_b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["l2", "dp", "gated-l2", "tanh-dp"])
def test_linearize_applies_to_many_tangents(kind: str):
    """One linearization, applied to tangents shared by the batch ``(1, K, ...)`` or per sample ``(B, K, ...)``,
    gives every tangent's JVP, so the log-dets need the primal once."""
    torch.manual_seed(7)
    module = _make(kind, 2).double()
    module.bake()
    x = torch.randn(3, DIM, *HW, dtype=torch.float64)
    shared, own = torch.randn(1, 5, DIM, *HW, dtype=torch.float64), torch.randn(3, 5, DIM, *HW, dtype=torch.float64)
    y, apply = module.linearize(x)
    torch.testing.assert_close(y, module(x), rtol=0, atol=0)
    for vs in (shared, own):
        got = apply(vs)
        assert got.shape == (3, 5, DIM, *HW)
        for k in range(5):
            expected = torch.func.jvp(module, (x,), (vs[:, k].expand_as(x),))[1]
            torch.testing.assert_close(got[:, k], expected, rtol=1e-10, atol=1e-12)


# --- L2 bound -------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 4])
def test_l2_bound_matches_formula_and_dominates_measurement(heads: int):
    torch.manual_seed(10 + heads)
    module = _randomise(L2Attention(DIM, heads, HW), scale=1.5).double()
    inputs = _inputs()
    check_l2_bound(module, inputs)
    module.bake()
    check_l2_bound(module, inputs)
    assert module.lipschitz() == 1.0 and module.guarantee == "certified"


def test_l2_bound_grows_with_square_of_query_weight():
    """An earlier design wrote |W_h|^2 |V_h|^2 under the root; measurement breaks that at |W_h| = 30.

    ``W -> a W`` gives ``F_a(X) = a F(a X)``: Lip grows like a^2, so the root needs |W_h|^4.
    """
    torch.manual_seed(3)
    module = L2Attention(DIM, 1, HW).double()  # orthogonal init: every norm is 1
    with torch.no_grad():
        module.weight_qk.mul_(30.0)
        bound = float(module.bound())
    design = bound / 30.0  # the |W_h|^2-under-the-root version
    x = torch.randn(4, DIM, *HW, dtype=torch.float64) / 30.0
    measured = float(jacobian_norm(lambda t: module(t) * bound, x, n_iter=30).max())
    assert design < measured <= bound


def test_bound_check_catches_dropped_head_factor(monkeypatch: pytest.MonkeyPatch):
    """The reference code's sqrt(N/D) (instead of sqrt(N/d)) under-normalises by sqrt(heads)."""
    torch.manual_seed(4)
    module = _randomise(L2Attention(DIM, 4, HW)).double()
    inputs = _inputs(batch=2)
    check_l2_bound(module, inputs, steps=5)
    right = L2Attention._bound_from

    def dropped_head_factor(self, w, v, o):
        return right(self, w, v, o) * math.sqrt(self.head_dim / self.dim)

    monkeypatch.setattr(L2Attention, "_bound_from", dropped_head_factor)
    with pytest.raises(AssertionError, match="formula"):
        check_l2_bound(module, inputs, steps=5)


def test_training_bound_is_recomputed_and_differentiable():
    """Not frozen at construction (reference defect 4): scaling weights changes B, and B has gradients."""
    torch.manual_seed(5)
    for module in (L2Attention(DIM, 2, HW), DotProductAttention(DIM, 2, HW)):
        before = float(module.bound().detach())
        with torch.no_grad():
            module.weight_o.mul_(2.0)
        assert float(module.bound().detach()) == pytest.approx(2.0 * before, rel=1e-5)
        module(torch.randn(2, DIM, *HW)).square().sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


# --- structure --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [L2Attention, DotProductAttention])
@pytest.mark.parametrize("heads", [1, 4])
def test_permutation_equivariant_over_pixels(cls, heads: int):
    torch.manual_seed(6)
    module = _randomise(cls(DIM, heads, HW))
    x = torch.randn(3, DIM, *HW)
    perm = torch.randperm(N)
    xp = x.flatten(2)[:, :, perm].reshape(x.shape)
    expected = module(x).flatten(2)[:, :, perm]
    torch.testing.assert_close(module(xp).flatten(2), expected, rtol=0, atol=1e-6)


def test_dp_sample_does_not_depend_on_batch():
    torch.manual_seed(7)
    module = _randomise(DotProductAttention(DIM, 4, HW)).double()
    x0 = torch.randn(1, DIM, *HW, dtype=torch.float64)
    others = (
        torch.randn(5, DIM, *HW, dtype=torch.float64)
        * torch.tensor([1e-3, 1.0, 30.0, 1e3, 0.0]).view(-1, 1, 1, 1).double()
    )
    v0 = torch.randn_like(x0)
    alone_y, alone_dy = module.jvp(x0, v0)
    y, dy = module.jvp(torch.cat([x0, others]), torch.cat([v0, torch.randn_like(others)]))
    torch.testing.assert_close(y[:1], alone_y, rtol=0, atol=1e-14)
    torch.testing.assert_close(dy[:1], alone_dy, rtol=0, atol=1e-14)
    assert torch.isfinite(y).all() and torch.isfinite(dy).all()  # the all-zero sample included


# --- windows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 2])
def test_windowed_l2_is_attention_within_each_tile(heads: int):
    """Masked 2 x 2 windows of a 4 x 4 map compute, tile by tile, the global attention of that tile."""
    torch.manual_seed(12)
    windowed = _randomise(L2Attention(DIM, heads, HW, (2, 2))).double()
    tile = L2Attention(DIM, heads, (2, 2)).double()
    tile.load_state_dict(windowed.state_dict())
    assert float(tile.bound().detach()) == pytest.approx(float(windowed.bound().detach()), rel=1e-12)
    x = torch.randn(3, DIM, *HW, dtype=torch.float64)
    y = windowed(x)
    for i in (0, 2):
        for j in (0, 2):
            torch.testing.assert_close(y[:, :, i : i + 2, j : j + 2], tile(x[:, :, i : i + 2, j : j + 2]))


def test_windowed_l2_jacobian_is_block_diagonal():
    """The bound of one tile holds for the map only because no output reads another tile's input."""
    torch.manual_seed(13)
    module = _randomise(L2Attention(DIM, 2, HW, (2, 2))).double()
    x = torch.randn(1, DIM, *HW, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(module, x).reshape(DIM, *HW, DIM, *HW)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    tile = (rows // 2) * 2 + cols // 2
    cross = tile[:, :, None, None] != tile[None, None, :, :]  # (H, W, H', W'): pixels in different tiles
    assert float(jac.permute(1, 2, 4, 5, 0, 3)[cross].abs().max()) == 0.0
    assert float(jac.permute(1, 2, 4, 5, 0, 3)[~cross].abs().max()) > 0.0


@pytest.mark.parametrize("window", [(2, 2), (1, 4), (4, 2)])
def test_windowed_l2_bound_uses_tile_tokens_and_dominates_measurement(window):
    torch.manual_seed(14)
    module = _randomise(L2Attention(DIM, 2, HW, window), scale=1.5).double()
    assert module.n_bound == window[0] * window[1] < N
    ratio = check_l2_bound(module, _inputs())  # the formula at N = tile tokens, and measured <= it
    whole = _randomise(L2Attention(DIM, 2, HW), scale=1.5).double()
    whole.load_state_dict(module.state_dict())
    # the point of windows: a smaller certified bound
    assert float(module.bound().detach()) < float(whole.bound().detach())
    assert 0.0 < ratio <= 1.0


def test_presets_attend_in_windows_and_old_configs_over_the_whole_map():
    flow = build_flow(preset_config("digits-acf-l2", hidden=8))
    attns = [m for m in flow.modules() if isinstance(m, L2Attention)]
    assert {(a.hw, a.window) for a in attns} == {((4, 4), (2, 2)), ((2, 2), (2, 2))}
    assert all((a.mask is None) == (a.hw == (2, 2)) for a in attns)  # one tile: no mask at all
    gates = {m.form for m in flow.modules() if isinstance(m, GatedAttention)}
    assert gates == {"convex"}
    saved_before = {k: v for k, v in preset_config("digits-acf-l2", hidden=8).items() if k not in ("window", "gate")}
    old = build_flow(saved_before)  # a checkpoint written before windows and gates rebuilds as it was
    assert {(a.hw, a.window) for a in old.modules() if isinstance(a, L2Attention)} == {
        ((4, 4), (4, 4)),
        ((2, 2), (2, 2)),
    }
    assert {m.form for m in old.modules() if isinstance(m, GatedAttention)} == {"abs"}
    for bad in (1, 3, "2", 100):
        with pytest.raises(BadInput, match="'window'"):
            build_flow(preset_config("digits-acf-l2", hidden=8, window=bad))


def test_open_gate_is_fixed_at_half():
    attn = L2Attention(DIM, 2, HW).double()
    gated = GatedAttention(attn, "open").double()
    assert gated.attention_weight() == 0.5 and gated.lipschitz() == pytest.approx(1.0)
    assert not any(name.endswith("theta") for name, _ in gated.named_parameters())  # nothing to train
    h = torch.randn(2, DIM, *HW, dtype=torch.float64)
    gated.bake()
    torch.testing.assert_close(gated(h), 0.5 * h + 0.5 * attn(h))


def test_windows_must_tile_the_map():
    with pytest.raises(ValueError, match="tile"):
        L2Attention(DIM, 2, HW, (3, 3))
    with pytest.raises(ValueError, match="two tokens"):
        L2Attention(DIM, 2, HW, (1, 1))


def test_wrong_shape_is_rejected():
    module = L2Attention(DIM, 2, HW)
    with pytest.raises(BadInput):
        module(torch.randn(1, DIM, 8, 8))
    with pytest.raises(BadInput):
        module(torch.randn(1, DIM + 1, *HW))


# --- Lipschitz bounds of the composed maps --------------------------------------------------


def test_dp_bound_dominates_measurement():
    """The derived DP bound holds on random, data-like and near-degenerate (tiny) inputs, in windows too
    (rows attend within their tile, so ``kappa`` is the tile's; the normaliser still spans the map)."""
    torch.manual_seed(8)
    for heads, window in ((1, None), (4, None), (2, (2, 2))):
        module = _randomise(DotProductAttention(DIM, heads, HW, window), scale=2.0).double()
        module.bake()
        bound = float(module.bound())
        inputs = _inputs(batch=3) + [1e-3 * torch.randn(3, DIM, *HW, dtype=torch.float64)]
        measured = measured_lipschitz(lambda x, m=module, b=bound: m(x) * b, inputs, n_iter=20, steps=30)
        assert measured <= bound
        assert module.lipschitz() == 1.0 and module.guarantee == "verified"


@pytest.mark.parametrize("kind", ["gated-l2", "gated-dp", "convex-l2", "tanh-dp", "branch-l2", "branch-dp"])
def test_composed_bounds_dominate_measurement(kind: str):
    torch.manual_seed(9)
    module = _make(kind, 2).double()
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(2.0)  # gamma too: 1.4 and -2.6
    module.bake()
    measured = measured_lipschitz(module, _inputs(batch=3), n_iter=20, steps=30)
    assert measured <= module.lipschitz()
    assert module.guarantee == ("certified" if kind.endswith("l2") else "verified")


@pytest.mark.parametrize(
    ("form", "value", "a", "b"),
    [
        ("abs", 0.7, 1 / 1.7, 0.7 / 1.7),
        ("convex", 0.4 / GATE_RATE, 1 - 1 / (1 + math.exp(-0.4)), 1 / (1 + math.exp(-0.4))),
        ("tanh", -0.8 / GATE_RATE, 0.5, 0.5 * math.tanh(-0.8)),
    ],
)
def test_gates_mix_input_and_attention_within_one(form: str, value: float, a: float, b: float):
    """``A(h) = a h + b F/B`` with ``|a| + |b| <= 1`` (so Lip(A) <= 1), the same before and after bake."""
    torch.manual_seed(11)
    attn = _randomise(L2Attention(DIM, 2, HW)).double()
    gated = _gate(GatedAttention(attn, form).double(), value)
    assert gated.lipschitz() == pytest.approx(abs(a) + abs(b)) and gated.lipschitz() <= 1 + 1e-12
    assert gated.attention_weight() == pytest.approx(b)
    h = torch.randn(3, DIM, *HW, dtype=torch.float64)
    expected = (b * attn(h)).flatten(1).norm(dim=1) / h.flatten(1).norm(dim=1)
    torch.testing.assert_close(gated.attention_share(h), expected)
    gated.bake()
    torch.testing.assert_close(gated(h), a * h + b * attn(h), rtol=1e-12, atol=1e-14)


def test_new_gates_start_open_and_smooth():
    """The old gate starts closed with a kink at 0; the new ones start with attention on, differentiably."""
    attn = L2Attention(DIM, 2, HW).double()
    assert GatedAttention(attn, "abs").attention_weight() == 0.0
    for form in ("convex", "tanh"):
        gated = GatedAttention(attn, form).double()
        assert gated.attention_weight() > 0.2
        weight = gated._coeffs()[1]
        (grad,) = torch.autograd.grad(weight, gated.param)
        assert float(grad) > 0.1  # a real gradient, not a subgradient pulling it to zero


# --- measurement tools ----------------------------------------------------------------------


def test_measure_tools_on_known_maps():
    torch.manual_seed(12)
    m = torch.randn(6, 6, dtype=torch.float64)
    sigma = float(torch.linalg.matrix_norm(m, ord=2))
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(jacobian_norm(lambda t: t @ m.T, x, n_iter=200), torch.full((5,), sigma).double())
    # sin(3 t): Lip 3, attained only near t = 0 in every coordinate; start away from it
    found = adversarial_lipschitz(lambda t: torch.sin(3.0 * t), x.abs() + 0.4, steps=150, lr=0.05)
    assert found.min() > 2.9 and found.max() <= 3.0 + 1e-9


# --- export -----------------------------------------------------------------------------------


class _JvpGraph(nn.Module):
    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.branch.jvp(x, v)


def _float64_tensors(model: onnx.ModelProto) -> list[str]:
    double = onnx.TensorProto.DOUBLE
    graph = onnx.shape_inference.infer_shapes(model).graph
    found = [t.name for t in graph.initializer if t.data_type == double]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == double:
                found.append(node.name)
            if node.op_type == "Cast" and attr.name == "to" and attr.i == double:
                found.append(node.name)
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        if info.type.tensor_type.elem_type == double:
            found.append(info.name)
    return found


@pytest.mark.parametrize("kind", ["branch-l2", "gated-dp"])
def test_export_onnx_matches_torch(kind: str, tmp_path):
    torch.manual_seed(13)
    branch = _make(kind, 2).float().eval()
    branch.bake()
    graph = _JvpGraph(branch)
    x, v = torch.randn(2, DIM, *HW), torch.randn(2, DIM, *HW)
    path = tmp_path / "jvp.onnx"
    torch.onnx.export(
        graph,
        (x, v),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x", "v"],
        output_names=["y", "jv"],
        dynamic_axes={name: {0: "batch"} for name in ("x", "v", "y", "jv")},
    )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert _float64_tensors(model) == []
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, v = torch.randn(5, DIM, *HW), torch.randn(5, DIM, *HW)  # another batch size than traced
    y, jv = session.run(None, {"x": x.numpy(), "v": v.numpy()})
    with torch.no_grad():
        y_ref, jv_ref = graph(x, v)
    np.testing.assert_allclose(y, y_ref.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(jv, jv_ref.numpy(), rtol=0, atol=1e-5)
