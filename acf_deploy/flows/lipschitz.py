r"""Spectrally normalised linear and convolution layers, and LipSwish (docs/guarantees.md §2).

While training, :math:`\sigma` comes from power iteration with persistent vectors (cheap, an
underestimate) and the weight is divided by :math:`\max(1, \sigma / c)`. ``bake()`` freezes the
effective weight and computes its operator norm *exactly* (SVD of the explicit operator for small
inputs, an FFT bound on an enlarged grid otherwise); if that exceeds ``c`` the weight is rescaled.
Certified numbers only ever come from ``bake()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Branch, Linear, Tensor, lift, per_tangent

#: Largest explicit operator (rows or columns) whose norm is computed by a dense SVD.
DENSE_SVD_LIMIT = 4096
#: Power-iteration steps at construction, so that u, v (and hence sigma, even in eval mode before
#: any training step) start near the top singular vectors instead of at random vectors, whose
#: ``u^T W v`` can be tiny or negative and would leave the weight unnormalised.
INIT_POWER_ITERATIONS = 30


def _normalize(t: Tensor) -> Tensor:
    return t / t.norm().clamp_min(1e-12)


class _SpectralNorm(Branch):
    """Shared logic: power iteration while training, exact certification in ``bake``."""

    #: Whether ``bake`` rescales a weight whose exact norm exceeds ``coeff``. Imported layers keep the
    #: weight their source computes (rescaling would change the model); their exact norm is reported as is.
    rescale = True

    def __init__(self, coeff: float, n_power_iterations: int):
        super().__init__()
        self.coeff = coeff
        self.n_power_iterations = n_power_iterations
        self.register_buffer("baked_weight", torch.empty(0), persistent=False)
        self.certified_norm: float | None = None

    # subclasses provide the operator and its adjoint on the power-iteration vectors
    def _op(self, weight: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _op_t(self, weight: Tensor, u: Tensor) -> Tensor:
        raise NotImplementedError

    def exact_norm(self, weight: Tensor) -> float:
        raise NotImplementedError

    @property
    def baked(self) -> bool:
        return self.baked_weight.numel() > 0

    @torch.no_grad()
    def power_iteration(self, n_iterations: int) -> None:
        """Run ``n_iterations`` power-iteration steps on the current weight, updating u, v in place."""
        u, v = self.u, self.v
        for _ in range(n_iterations):
            v = _normalize(self._op_t(self.weight, u))
            u = _normalize(self._op(self.weight, v))
        self.u.copy_(u)
        self.v.copy_(v)

    def _power_sigma(self) -> Tensor:
        """Differentiable estimate ``u^T W v`` after updating u, v in place while training."""
        if self.training:
            self.power_iteration(self.n_power_iterations)
        return (self.u * self._op(self.weight, self.v)).sum()

    def effective_weight(self) -> Tensor:
        if self.baked:
            return self.baked_weight
        sigma = self._power_sigma()
        return self.weight / torch.clamp(sigma / self.coeff, min=1.0)

    def bake(self) -> None:
        """Freeze the effective weight and certify its operator norm exactly (rescale if above coeff)."""
        self.baked_weight = torch.empty(0, device=self.weight.device)
        with torch.no_grad():
            was_training = self.training
            self.eval()
            weight = self.effective_weight().detach().clone()
            self.train(was_training)
            norm = self.exact_norm(weight)
            # Rescale until the certified norm is at most coeff: rounding the rescaled weight to its
            # dtype can leave it a few ulps above (0.9000000117 in float32), hence the small margin.
            margin = 1.0 - 4 * torch.finfo(weight.dtype).eps
            while self.rescale and norm > self.coeff:
                weight = weight * (self.coeff / norm * margin)
                norm = self.exact_norm(weight)
        self.baked_weight = weight
        self.certified_norm = norm

    def unbake(self) -> None:
        self.baked_weight = torch.empty(0, device=self.weight.device)
        self.certified_norm = None

    def lipschitz(self) -> float:
        return self.certified_norm if self.certified_norm is not None else self.coeff


class SNLinear(_SpectralNorm):
    """Linear map with spectral normalisation; exact norm by SVD."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        coeff: float = 0.9,
        n_power_iterations: int = 1,
        init_iterations: int = INIT_POWER_ITERATIONS,
    ):
        super().__init__(coeff, n_power_iterations)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.register_buffer("u", _normalize(torch.randn(out_features)))
        self.register_buffer("v", _normalize(torch.randn(in_features)))
        self.power_iteration(init_iterations)

    def _op(self, weight: Tensor, v: Tensor) -> Tensor:
        return weight @ v

    def _op_t(self, weight: Tensor, u: Tensor) -> Tensor:
        return weight.t() @ u

    def exact_norm(self, weight: Tensor) -> float:
        return float(torch.linalg.matrix_norm(weight.double(), ord=2))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def linearize(self, x: Tensor) -> tuple[Tensor, Linear]:
        weight = self.effective_weight()
        return F.linear(x, weight, self.bias), lambda vs: F.linear(vs, weight)


class SNConv2d(_SpectralNorm):
    """'Same' convolution with spectral normalisation of the operator at a fixed input resolution."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        input_hw: tuple[int, int],
        coeff: float = 0.9,
        n_power_iterations: int = 1,
        init_iterations: int = INIT_POWER_ITERATIONS,
        vector_hw: tuple[int, int] | None = None,
    ):
        """``vector_hw`` is the resolution of the power-iteration vectors (default ``input_hw``)."""
        super().__init__(coeff, n_power_iterations)
        self.padding = kernel_size // 2
        self.input_hw = tuple(input_hw)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        h, w = vector_hw or self.input_hw
        self.register_buffer("u", _normalize(torch.randn(1, out_channels, h, w)))
        self.register_buffer("v", _normalize(torch.randn(1, in_channels, h, w)))
        self.power_iteration(init_iterations)

    def _op(self, weight: Tensor, v: Tensor) -> Tensor:
        return F.conv2d(v, weight, padding=self.padding)

    def _op_t(self, weight: Tensor, u: Tensor) -> Tensor:
        return F.conv_transpose2d(u, weight, padding=self.padding)

    def exact_norm(self, weight: Tensor) -> float:
        """Largest singular value of the zero-padded convolution at ``input_hw``.

        A 1x1 convolution applies one matrix at every pixel: its norm is that matrix's, exactly. Otherwise
        a dense eigenvalue problem when the operator is small, or the FFT bound on a grid of size
        ``n + k - 1``, which upper-bounds the zero-padded operator (it is a compression of the
        circular one on that grid).
        """
        c_out, c_in, k, _ = weight.shape
        h, w = self.input_hw
        weight = weight.double()
        if k == 1:
            return float(torch.linalg.matrix_norm(weight[:, :, 0, 0], ord=2))
        if max(c_in, c_out) * h * w <= DENSE_SVD_LIMIT:
            basis = torch.eye(c_in * h * w, dtype=torch.float64, device=weight.device)
            basis = basis.reshape(-1, c_in, h, w)
            columns = F.conv2d(basis, weight, padding=self.padding).reshape(c_in * h * w, -1)
            # sigma_max^2 is the top eigenvalue of the smaller Gram matrix: far cheaper than an SVD
            gram = columns.T @ columns if columns.shape[1] <= columns.shape[0] else columns @ columns.T
            return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0).sqrt())
        grid = (h + k - 1, w + k - 1)
        spectrum = torch.fft.fft2(weight, s=grid)  # (c_out, c_in, gh, gw)
        per_freq = spectrum.permute(2, 3, 0, 1)
        return float(torch.linalg.matrix_norm(per_freq, ord=2).max())

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, padding=self.padding)

    def linearize(self, x: Tensor) -> tuple[Tensor, Linear]:
        weight = self.effective_weight()

        def apply(vs: Tensor) -> Tensor:
            return per_tangent(lambda v: F.conv2d(v, weight, padding=self.padding), vs)

        return F.conv2d(x, weight, self.bias, padding=self.padding), apply


class LipSwish(Branch):
    r"""``x * sigmoid(beta x) / 1.1`` with learned ``beta = softplus(p)``; 1-Lipschitz for every beta > 0."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_beta = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("baked_beta", torch.empty(0), persistent=False)

    def beta(self) -> Tensor:
        return self.baked_beta if self.baked_beta.numel() else F.softplus(self.raw_beta)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.beta() * x) / 1.1

    def linearize(self, x: Tensor) -> tuple[Tensor, Linear]:
        beta = self.beta()
        s = torch.sigmoid(beta * x)
        slope = lift((s + beta * x * s * (1 - s)) / 1.1)
        return x * s / 1.1, lambda vs: vs * slope

    def lipschitz(self) -> float:
        return 1.0

    def bake(self) -> None:
        self.baked_beta = F.softplus(self.raw_beta).detach().clone()
