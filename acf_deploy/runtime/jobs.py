"""Streaming sample and score jobs: constant memory in the number of samples, atomic outputs."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..artifact import Artifact
from ..data import as_levels, as_points, digits_split, load_array
from ..errors import BadInput
from ..fileio import atomic_path
from ..plots import save_grid
from .base import Backend

Progress = Callable[[int], None]
MAX_GRID = 1024


def sample_to_file(
    backend: Backend,
    artifact: Artifact,
    n: int,
    target: str | Path,
    temperature: float = 1.0,
    seed: int = 0,
    batch: int = 256,
    on_progress: Progress | None = None,
) -> dict[str, float]:
    """Draw ``n`` samples in batches into ``.npy`` (memory-mapped) or a ``.png`` grid; returns residual stats."""
    target = Path(target)
    if target.suffix not in (".npy", ".png"):
        raise BadInput(f"--out must end in .npy or .png, not {target.suffix or '(none)'}")
    if n < 1:
        raise BadInput("--n must be at least 1")
    if target.suffix == ".png" and n > MAX_GRID:
        raise BadInput(f"a .png grid holds at most {MAX_GRID} samples; use .npy for {n}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise BadInput("--temperature must be a positive number")
    shape = artifact.data_shape
    if target.suffix == ".png" and len(shape) != 3:
        raise BadInput("a .png grid needs image data; use .npy for a 2D toy model")
    rng = np.random.default_rng(seed)
    stats = {"n": n, "residual_max": 0.0, "nonfinite": 0}

    def draw(store: np.ndarray) -> None:
        for start in range(0, n, batch):
            size = min(batch, n - start)
            z = rng.standard_normal((size, artifact.dim)).astype(np.float32)
            out = backend.sample(z, temperature)
            store[start : start + size] = out["x"]
            stats["residual_max"] = max(stats["residual_max"], float(np.nanmax(out["residual"])))
            stats["nonfinite"] += int(np.size(out["x"]) - np.count_nonzero(np.isfinite(out["x"])))
            if on_progress:
                on_progress(size)

    if target.suffix == ".png":
        images = np.empty((n, *shape), dtype=np.float32)
        draw(images)
        save_grid(images, target)
    else:
        with atomic_path(target) as tmp:
            store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, *shape))
            draw(store)
            store.flush()
            del store
    return stats


def load_score_data(artifact: Artifact, data: str) -> np.ndarray:
    """``digits-test`` or a ``.npy``/``.npz`` file in the dataset's native levels (points for the toy)."""
    n_levels = artifact.manifest.get("n_levels")
    if data == "digits-test":
        if artifact.manifest["config"].get("data") != "digits":
            raise BadInput("digits-test only fits models trained on digits")
        return digits_split()[1]
    array = load_array(data)
    if n_levels:
        return as_levels(array, artifact.data_shape, int(n_levels))
    return as_points(array, artifact.data_shape)


def score(
    backend: Backend,
    artifact: Artifact,
    data: np.ndarray,
    seed: int = 0,
    batch: int = 256,
    on_progress: Progress | None = None,
) -> tuple[np.ndarray, float]:
    """Per-sample log-likelihood in nats of the data (discrete for images) and the dataset's bits/dim."""
    n_levels = artifact.manifest.get("n_levels")
    dim = artifact.dim
    rng = np.random.default_rng(seed)
    batch = max(1, min(batch, int(artifact.manifest.get("max_safe_batch", batch))))
    log_lik = np.empty(len(data), dtype=np.float64)
    for start in range(0, len(data), batch):
        chunk = data[start : start + batch]
        if n_levels:
            x = ((chunk + rng.random(chunk.shape)) / n_levels).astype(np.float32)
        else:
            x = chunk.astype(np.float32)
        probes = None
        if artifact.logdet_mode == "series":
            probes = (rng.integers(0, 2, (len(x), artifact.n_probes, dim)) * 2 - 1).astype(np.float32)
        log_p = backend.density(x, probes)["log_prob"].astype(np.float64)
        log_lik[start : start + len(x)] = log_p - (dim * math.log(n_levels) if n_levels else 0.0)
        if on_progress:
            on_progress(len(x))
    bpd = float(-log_lik.mean() / (dim * math.log(2)))
    return log_lik, bpd


def save_npy(values: np.ndarray, target: str | Path) -> Path:
    target = Path(target)
    if target.suffix != ".npy":
        raise BadInput("--out must end in .npy")
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, values)
    return target
