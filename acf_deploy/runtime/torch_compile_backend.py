"""``torch.compile`` of the PyTorch reference: the peer a PyTorch user would reach for instead of ONNX.

It compiles the very modules :class:`~acf_deploy.runtime.torch_backend.TorchBackend` runs (the same baked
flow, folded constants, iteration counts, eval mode, ``inference_mode`` and threads) with the default
inductor backend and default shape handling: the first call at a new batch size compiles (the sampler's
fixed-point loops unroll, so this takes minutes on the digits model), and dynamo then generalises the
batch axis once it has seen two sizes. :meth:`prepare` does that first call so that a benchmark reports
compile time on its own, outside the timed medians.

Inductor's CPU code needs a C++ compiler; where there is none, or compilation fails for another reason,
the backend is unavailable with a one-line reason rather than a traceback.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from ..artifact import Artifact
from ..errors import BackendUnavailable
from .base import Arrays
from .torch_backend import TorchBackend


def compiler_problem() -> str | None:
    """Why ``torch.compile`` cannot work here, or None (checked before minutes are spent compiling)."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support this Python/PyTorch build (torch {torch.__version__})"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - the search itself raises when nothing is found
        return f"torch.compile's CPU code generator found no C++ compiler ({str(exc).splitlines()[0][:120]})"
    if shutil.which(compiler) is None:
        return f"torch.compile's CPU code generator needs a C++ compiler, and {compiler!r} is not on PATH"
    return None


@contextmanager
def _compile_errors() -> Iterator[None]:
    """Compilation failures (dynamo or inductor) become BackendUnavailable with their first line."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    try:
        yield
    except (TorchDynamoException, InductorError) as exc:
        line = next((s.strip() for s in str(exc).splitlines() if s.strip()), type(exc).__name__)
        raise BackendUnavailable(f"torch.compile failed here: {line[:200]}") from None


class TorchCompileBackend(TorchBackend):
    """:class:`TorchBackend` with both graphs wrapped in ``torch.compile`` (module docstring)."""

    name = "torch-compile"

    def __init__(self, artifact: Artifact, threads: int | None = None):
        problem = compiler_problem()
        if problem:
            raise BackendUnavailable(problem)
        super().__init__(artifact, threads=threads)
        self._sample_graph = torch.compile(self._sample_graph)
        self._density_graph = torch.compile(self._density_graph)
        #: Per ``graph/batch`` prepared: whether inductor's on-disk cache served the code ("hit"), it was
        #: compiled ("miss"), or nothing new was needed ("reused"). A hit takes seconds where a miss takes minutes.
        self.compile_cache: dict[str, str] = {}

    def sample(self, z: np.ndarray, temperature: float = 1.0) -> Arrays:
        with _compile_errors():
            return super().sample(z, temperature)

    def density(self, x: np.ndarray, probes: np.ndarray | None = None) -> Arrays:
        with _compile_errors():
            return super().density(x, probes)

    def prepare(self, graph: str, batch: int) -> float | None:
        """One call at ``batch`` rows: compiles when dynamo has no code for this shape yet."""
        call: Callable[[], Any]
        if graph == "sample":
            z = np.zeros((batch, self.artifact.dim), np.float32)
            call = lambda: self.sample(z)  # noqa: E731
        else:
            x = np.full((batch, *self.artifact.data_shape), 0.5, np.float32)
            probes = None
            if self.artifact.logdet_mode == "series":
                probes = np.ones((batch, int(self.artifact.n_probes), self.artifact.dim), np.float32)
            call = lambda: self.density(x, probes)  # noqa: E731
        from torch._dynamo.utils import counters

        before = dict(counters["inductor"])
        started = time.perf_counter()
        call()
        seconds = time.perf_counter() - started
        delta = {
            k: counters["inductor"].get(k, 0) - before.get(k, 0) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")
        }
        state = "miss" if delta["fxgraph_cache_miss"] else "hit" if delta["fxgraph_cache_hit"] else "reused"
        self.compile_cache[f"{graph}/{batch}"] = state
        return seconds
