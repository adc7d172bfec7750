r"""The two attention modules of the public ACF reference code, computed exactly as that code computes them.

Both sit inside an i-ResBlock's branch and return ``h + gamma * F(h) / c`` with a learned, unconstrained
``gamma``. They are ports for *importing* checkpoints trained with that code, not designs of ours: they keep
its memory reinterpretations (``.view`` calls that regroup channels and pixels rather than transposing),
its biases, its normalising constants (some rounded to float32, as the reference builds them) and its
missing Lipschitz guarantee. No bound proves these maps contractive (``gamma`` is unbounded and the
normalisers are not bounds of the maps computed), so a block that holds one is only ever ``verified`` by
measurement; :meth:`lipschitz` is infinite.

Every ``jvp`` is written by hand and shares the forward computation, so exported graphs need no autograd.
"""

from __future__ import annotations

import math

import torch
from scipy.special import lambertw
from torch import nn

from .base import Branch, Tensor

__all__ = ["ForkDotProductAttention", "ForkL2Attention"]


def _f32(value: float) -> torch.Tensor:
    """A float32 scalar, as the reference builds its constants with ``torch.tensor(..., dtype=torch.float32)``."""
    return torch.tensor(value, dtype=torch.float32)


def _conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A 1x1 convolution with an ``(out, in)`` matrix, as one matmul: ``(B, out, H W)``."""
    y = weight @ x.flatten(2)
    return y if bias is None else y + bias[:, None]


def _softmax_jvp(p: Tensor, ds: Tensor) -> Tensor:
    return p * (ds - (p * ds).sum(-1, keepdim=True))


class _ForkAttention(Branch):
    """Shared parts: the gate ``h + gamma * out``, the attention share, no certified bound."""

    guarantee = "verified"

    def __init__(self, channels: int, hw: tuple[int, int]):
        super().__init__()
        self.channels, self.hw = channels, tuple(hw)
        self.n_tokens = hw[0] * hw[1]
        self.gamma = nn.Parameter(torch.zeros(1))

    def lipschitz(self) -> float:
        return math.inf

    def forward(self, h: Tensor) -> Tensor:
        return h + self.gamma * self._attend(h, None)[0]

    def jvp(self, h: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        out, d_out = self._attend(h, v)
        return h + self.gamma * out, v + self.gamma * d_out

    def attention_weight(self) -> float:
        """The weight of the attention output in this map's output: ``gamma``."""
        return float(self.gamma.detach().reshape(()))

    @torch.no_grad()
    def attention_share(self, h: Tensor) -> Tensor:
        """Per sample ``||gamma F(h) / c|| / ||h||``: how much the attention changes its input."""
        return (self.gamma * self._attend(h, None)[0]).flatten(1).norm(dim=1) / h.flatten(1).norm(dim=1)

    def _attend(self, h: Tensor, v: Tensor | None) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


class ForkDotProductAttention(_ForkAttention):
    r"""The reference's ``Self_Attn``: one head, query and key of width ``C // 8``, value of width ``C``.

    ``energy_ij = q_i . k_j / norm_value`` (biases included), ``P = softmax_rows(energy)``,
    ``out = V P^T / (e^{sqrt 3} sqrt(N / C) + 2 sqrt 6)``. ``norm_value`` is a constant the reference
    computes once from its *initial* weights and keeps only on the pickled module, so it is a buffer here.
    """

    def __init__(self, channels: int, hw: tuple[int, int]):
        super().__init__(channels, hw)
        inner = channels // 8
        self.weight_q = nn.Parameter(torch.zeros(inner, channels))
        self.bias_q = nn.Parameter(torch.zeros(inner))
        self.weight_k = nn.Parameter(torch.zeros(inner, channels))
        self.bias_k = nn.Parameter(torch.zeros(inner))
        self.weight_v = nn.Parameter(torch.zeros(channels, channels))
        self.bias_v = nn.Parameter(torch.zeros(channels))
        self.register_buffer("norm_value", torch.ones(()))
        # exp(sqrt(3)) and 2 sqrt(6) are float32 constants in the reference; sqrt(N / C) follows the model dtype.
        e_root3 = float(torch.exp(torch.sqrt(_f32(3.0))))
        two_root6 = float(_f32(2.0) * torch.sqrt(_f32(6.0)))
        self.divisor = e_root3 * math.sqrt(self.n_tokens / channels) + two_root6

    def _attend(self, h: Tensor, v: Tensor | None) -> tuple[Tensor, Tensor | None]:
        q = _conv1x1(h, self.weight_q, self.bias_q).transpose(1, 2)  # (B, N, C/8)
        k = _conv1x1(h, self.weight_k, self.bias_k)  # (B, C/8, N)
        val = _conv1x1(h, self.weight_v, self.bias_v)  # (B, C, N)
        p = torch.softmax(q @ k / self.norm_value, dim=-1)
        out = (val @ p.transpose(1, 2)).reshape(-1, self.channels, *self.hw) / self.divisor
        if v is None:
            return out, None
        dq = _conv1x1(v, self.weight_q).transpose(1, 2)
        dk = _conv1x1(v, self.weight_k)
        dval = _conv1x1(v, self.weight_v)
        dp = _softmax_jvp(p, (dq @ k + q @ dk) / self.norm_value)
        d_out = (dval @ p.transpose(1, 2) + val @ dp.transpose(1, 2)).reshape(-1, self.channels, *self.hw)
        d_out = d_out / self.divisor
        return out, d_out


class ForkL2Attention(_ForkAttention):
    r"""The reference's ``L2_Self_Attn``: ``heads`` heads of width ``d = D / heads`` over ``N = H W`` pixels.

    Per head, with ``s = sqrt(D / heads)`` (float32): ``q`` = the query convolution's output (bias included)
    as ``N`` tokens, ``P = softmax_rows(-||q_i - q_j||^2 / s)``, ``A = W W^T / s`` where ``W`` is the query
    weight *reinterpreted* as a ``D x d`` matrix, ``f = P X' A`` where ``X'`` is the input reinterpreted as
    ``N x D``; ``f`` is reinterpreted as a ``D``-channel map, passed through the value convolution (bias
    included), reinterpreted as ``N x d``; the heads are concatenated, reinterpreted as a ``D``-channel map,
    and passed through the output convolution (bias included). The result is divided by the reference's
    normaliser ``sqrt(N / D) (4 W0(N / e) + 1) sqrt(sum_h ||W_Q,h||_F^2 ||W_V,h||_F^2) ||W_O||_F``, computed,
    as there, in float32 arithmetic.
    """

    def __init__(self, channels: int, hw: tuple[int, int], heads: int):
        super().__init__(channels, hw)
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads, self.head_dim = heads, channels // heads
        self.weight_q = nn.Parameter(torch.zeros(heads, self.head_dim, channels))
        self.bias_q = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.weight_v = nn.Parameter(torch.zeros(heads, self.head_dim, channels))
        self.bias_v = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.weight_o = nn.Parameter(torch.zeros(channels, channels))
        self.bias_o = nn.Parameter(torch.zeros(channels))
        self.scale = float(torch.sqrt(_f32(channels / heads)))
        self.root_n_over_d = float(torch.sqrt(_f32(self.n_tokens / channels)))
        self.lambert = float(_f32(float(lambertw(self.n_tokens / math.e).real)))

    def normaliser(self, dtype: torch.dtype) -> Tensor:
        """The reference's divisor: norms in the model's dtype, products rounded to float32 as it does."""
        per_head = self.weight_q.square().sum((1, 2)) * self.weight_v.square().sum((1, 2))
        term = per_head.sum().sqrt().float()
        constant = torch.tensor([self.root_n_over_d], dtype=torch.float32) * (4 * self.lambert + 1)
        return ((constant * term) * self.weight_o.norm().float()).to(dtype)

    def _attend(self, h: Tensor, v: Tensor | None) -> tuple[Tensor, Tensor | None]:
        d, n = self.channels, self.n_tokens
        x_tokens = h.reshape(-1, 1, n, d)  # the reference's x.view(B, N, D): a reinterpretation
        w = self.weight_q.reshape(self.heads, d, self.head_dim)  # weight.view(1, D, d): a reinterpretation
        a = w @ w.transpose(1, 2) / self.scale  # (heads, D, D)
        q = self._queries(h) + self.bias_q[None, :, None, :]
        sq = (q * q).sum(-1, keepdim=True)  # (B, heads, N, 1)
        logits = (sq - 2.0 * q @ q.transpose(-1, -2) + sq.transpose(-1, -2)) / -self.scale
        p = torch.softmax(logits, dim=-1)
        mixed = p @ x_tokens  # (B, heads, N, D)
        out = self._project(mixed @ a, with_bias=True)
        if v is None:
            return out, None
        dq = self._queries(v)
        dsq = (q * dq).sum(-1, keepdim=True)
        cross = dq @ q.transpose(-1, -2)
        dlogits = 2.0 * (dsq + dsq.transpose(-1, -2) - cross - cross.transpose(-1, -2)) / -self.scale
        dmixed = _softmax_jvp(p, dlogits) @ x_tokens + p @ v.reshape(-1, 1, n, d)
        return out, self._project(dmixed @ a, with_bias=False)

    def _queries(self, h: Tensor) -> Tensor:
        """Per head, the query convolution's output (no bias) as ``N`` tokens: ``(B, heads, N, d)``."""
        return (self.weight_q @ h.flatten(2).unsqueeze(1)).transpose(-1, -2)

    def _project(self, f: Tensor, with_bias: bool) -> Tensor:
        """From each head's ``N x D`` block to the output map, through the value and output convolutions."""
        d, n = self.channels, self.n_tokens
        f = f.reshape(-1, self.heads, d, n)  # f.view(B, D, W, H) per head: a reinterpretation
        values = self.weight_v @ f  # (B, heads, d, N)
        if with_bias:
            values = values + self.bias_v[None, :, :, None]
        # .view(B, N, d) per head, concatenated over heads, then .view(B, D, W, H): two reinterpretations
        joined = values.reshape(-1, self.heads, n, self.head_dim).permute(0, 2, 1, 3).reshape(-1, d, n)
        out = self.weight_o @ joined
        if with_bias:
            out = out + self.bias_o[None, :, None]
        return out.reshape(-1, d, *self.hw) / self.normaliser(out.dtype)
