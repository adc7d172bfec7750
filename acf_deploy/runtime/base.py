"""One interface for every runtime (Polygraphy's loader/runner split).

A backend opens an artifact directory and runs its two graphs on numpy arrays:

* ``sample(z, temperature)`` -> ``{"x": (B, *data_shape), "residual": (B,)}``
* ``density(x, probes)`` -> ``{"z": (B, D), "log_prob": (B,), "bits_per_dim": (B,)}`` plus
  ``"min_pivot": (B,)`` in ``exact`` log-det mode. ``probes`` is ``(B, P, D)`` float32 in
  ``series`` mode and ``None`` otherwise.

Inputs and outputs are float32 numpy arrays. A backend runs the batch it is given: callers keep
density batches within the artifact's ``max_safe_batch`` (:func:`~acf_deploy.runtime.parity.run_chunked`,
the jobs' batch sizes); the ``trt`` backend also splits batches to fit its engines' profiles.
"""

from __future__ import annotations

import signal
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..artifact import Artifact

Arrays = dict[str, np.ndarray]


def _block_interrupts() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def shard_pool(workers: int) -> ThreadPoolExecutor | None:
    """Threads that run batch shards side by side, or ``None`` for one worker.

    They block SIGINT and SIGTERM, so the kernel delivers an interrupt to the main thread, where it
    breaks the wait on the shards at once (an interrupted ``sample`` was once seen to keep running
    while its main thread waited on them).
    """
    return ThreadPoolExecutor(workers, initializer=_block_interrupts) if workers > 1 else None


class Backend(ABC):
    """A runner for one artifact on one runtime."""

    name: str = "?"
    #: Set when this backend's numbers cannot verify the artifact's precision (see runtime.parity).
    unverified_reason: str | None = None
    #: How the numbers were produced, when that is not simply "the graph ran".
    precision_note: str | None = None

    def __init__(self, artifact: Artifact):
        self.artifact = artifact

    @abstractmethod
    def sample(self, z: np.ndarray, temperature: float = 1.0) -> Arrays:
        """Push latents through the fixed-iteration inverse."""

    @abstractmethod
    def density(self, x: np.ndarray, probes: np.ndarray | None = None) -> Arrays:
        """Map data to latents with log-likelihood and bits/dim."""

    def prepare(self, graph: str, batch: int) -> float | None:
        """Compile ``graph`` for ``batch`` rows ahead of use, so a benchmark times runs, not compilation.

        Returns the seconds spent, or None when this backend does not compile per batch size.
        """
        return None

    def close(self) -> None:
        """Release sessions, engines and device memory."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
