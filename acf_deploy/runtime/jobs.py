"""Streaming sample and score jobs: request checking, batching, the atomic output writer, engine choice.

A job is checked once, before any work starts (a bad request is one error and writes nothing). Its rows
are then computed batch by batch by :func:`sample_rows` / :func:`score_rows`, in this process or in
shards on Ray workers (``runtime/distributed.py`` holds only what is Ray's), and written once through
:func:`output_array`: memory stays constant in the number of rows, and an output appears complete or
not at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..artifact import Artifact
from ..data import check_levels, check_points, digits_split, load_array
from ..errors import BadInput
from ..fileio import atomic_path, check_free_space, check_output_file
from ..plots import save_grid
from .base import Backend

if TYPE_CHECKING:
    from .distributed import RayOptions

Progress = Callable[[int], None]
ENGINES = ("local", "ray")
MAX_GRID = 1024
#: Memory one sampling batch may take, estimated at :data:`SAMPLE_BYTES_PER_VALUE` per data value of each
#: row (latents, samples and the flow's hidden activations, fp32).
SAMPLE_BATCH_BYTES = 1 << 30
SAMPLE_BYTES_PER_VALUE = 256
NPY_HEADER_BYTES = 4096


def check_sample_request(
    artifact: Artifact, n: int, target: str | Path, temperature: float, seed: int = 0, batch: int = 256
) -> tuple[Path, int]:
    """Validate a sampling request before any work starts (so a bad one fails at once, writing nothing).

    Returns the output path and the batch size the job uses."""
    target = Path(target)
    if target.suffix not in (".npy", ".png"):
        raise BadInput(f"--out must end in .npy or .png, not {target.suffix or '(none)'}")
    if n < 1:
        raise BadInput("--n must be at least 1")
    if target.suffix == ".png" and n > MAX_GRID:
        raise BadInput(f"a .png grid holds at most {MAX_GRID} samples; use .npy for {n}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise BadInput("--temperature must be a positive number")
    if target.suffix == ".png" and len(artifact.data_shape) != 3:
        raise BadInput("a .png grid needs image data; use .npy for a 2D toy model")
    check_output_file(target)
    if target.suffix == ".npy":
        check_free_space(target, n * artifact.dim * 4 + NPY_HEADER_BYTES)
    check_seed(seed)
    return target, sample_batch_size(artifact, batch)


def check_score_request(
    artifact: Artifact, n: int, target: str | Path | None = None, seed: int = 0, batch: int = 256
) -> tuple[Path | None, int]:
    """Validate a scoring request of ``n`` rows; returns the output path (if any) and the batch size used."""
    target = None if target is None else check_npy_target(target, n)
    check_seed(seed)
    return target, score_batch_size(artifact, batch)


def sample_batch_size(artifact: Artifact, batch: int) -> int:
    """``batch``, refused when one batch of samples would not fit in :data:`SAMPLE_BATCH_BYTES`."""
    batch = check_batch(batch)
    per_row = SAMPLE_BYTES_PER_VALUE * artifact.dim
    if batch * per_row > SAMPLE_BATCH_BYTES:
        largest = max(1, SAMPLE_BATCH_BYTES // per_row)
        raise BadInput(f"--batch {batch} would need about {batch * per_row >> 20} MB; use at most {largest}")
    return batch


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
    target, batch = check_sample_request(artifact, n, target, temperature, seed, batch)
    return _sample_checked(backend, artifact, n, target, temperature, seed, batch, on_progress)


def _sample_checked(backend, artifact, n, target, temperature, seed, batch, on_progress) -> dict[str, float]:
    stats: dict[str, float] = {"n": n, "residual_max": 0.0, "nonfinite": 0}
    with output_array(target, (n, *artifact.data_shape), np.float32) as store:
        residual_max, nonfinite = sample_rows(backend, artifact, store, temperature, seed, batch, 0, on_progress)
    stats.update(residual_max=residual_max, nonfinite=nonfinite)
    return stats


def sample_rows(
    backend: Backend,
    artifact: Artifact,
    store: np.ndarray,
    temperature: float,
    seed: int,
    batch: int,
    first_batch: int = 0,
    on_progress: Progress | None = None,
) -> tuple[float, int]:
    """Fill ``store`` with samples, batch by batch from batch ``first_batch``: ``(largest residual, non-finite)``."""
    residual_max, nonfinite = 0.0, 0
    for k, start in enumerate(range(0, len(store), batch)):
        size = min(batch, len(store) - start)
        x, residual, bad = sample_batch(backend, artifact, size, temperature, seed, first_batch + k)
        store[start : start + size] = x
        residual_max, nonfinite = max(residual_max, residual), nonfinite + bad
        if on_progress:
            on_progress(size)
    return residual_max, nonfinite


@contextmanager
def output_array(target: Path | None, shape: tuple[int, ...], dtype: Any) -> Iterator[np.ndarray]:
    """An array to fill: a ``.npy`` written through a memory map and renamed into place on success; a
    ``.png`` grid of images saved once it is full; or, without a target, an array in memory."""
    if target is None or target.suffix == ".png":
        array = np.empty(shape, dtype=dtype)
        yield array
        if target is not None:
            save_grid(array, target)
        return
    with atomic_path(target) as tmp:
        store = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield store
        store.flush()
        del store


def load_score_data(artifact: Artifact, data: str) -> np.ndarray:
    """``digits-test`` or a ``.npy``/``.npz`` file in the dataset's native levels (points for the toy).

    A ``.npy`` file is memory-mapped and validated in chunks, never copied: :func:`score_batch` converts
    one batch at a time, so memory does not grow with the file.
    """
    n_levels = artifact.manifest.get("n_levels")
    if data == "digits-test":
        if artifact.manifest["config"].get("data") != "digits":
            raise BadInput("digits-test only fits models trained on digits")
        return digits_split()[1]
    array = load_array(data, mmap=True)
    if n_levels:
        return check_levels(array, artifact.data_shape, int(n_levels))
    return check_points(array, artifact.data_shape)


def score(
    backend: Backend,
    artifact: Artifact,
    data: np.ndarray,
    seed: int = 0,
    batch: int = 256,
    on_progress: Progress | None = None,
) -> tuple[np.ndarray, float]:
    """Per-sample log-likelihood in nats of the data (discrete for images) and the dataset's bits/dim."""
    _, batch = check_score_request(artifact, len(data), None, seed, batch)
    log_lik = score_rows(backend, artifact, data, seed, batch, 0, on_progress)
    return log_lik, bits_per_dim(artifact, log_lik)


def score_rows(
    backend: Backend,
    artifact: Artifact,
    rows: np.ndarray,
    seed: int,
    batch: int,
    first_batch: int = 0,
    on_progress: Progress | None = None,
) -> np.ndarray:
    """Log-likelihoods (float64 nats) of ``rows``, batch by batch from batch ``first_batch``."""
    log_lik = np.empty(len(rows), dtype=np.float64)
    for k, start in enumerate(range(0, len(rows), batch)):
        values = score_batch(backend, artifact, rows[start : start + batch], seed, first_batch + k)
        log_lik[start : start + len(values)] = values
        if on_progress:
            on_progress(len(values))
    return log_lik


def bits_per_dim(artifact: Artifact, log_lik: np.ndarray) -> float:
    """The dataset's bits/dim from per-sample log-likelihoods (nats, discrete data for images)."""
    return float(-log_lik.mean() / (artifact.dim * math.log(2)))


# Randomness, per batch (docs/guarantees.md §1). Every random draw of a job comes from the generator of the
# batch it belongs to, derived from (seed, stream, batch index) alone: batch ``i`` covers rows
# ``[i * batch, (i + 1) * batch)`` and gets the same dequantisation noise, probes or latents whichever
# process computes it and whatever ran before. A distributed job whose shards are runs of whole
# batches (runtime/distributed.py) therefore reproduces the single-process job bit for bit.
STREAMS = {"score": 1, "sample": 2}


def check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise BadInput(f"--seed must be a non-negative integer, not {seed!r}")
    return int(seed)


def check_batch(batch: int) -> int:
    if batch < 1:
        raise BadInput("--batch must be at least 1")
    return int(batch)


def batch_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The generator of batch ``index`` of a ``stream`` (``score`` or ``sample``) job with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([check_seed(seed), STREAMS[stream], int(index)]))


def score_batch_size(artifact: Artifact, batch: int) -> int:
    """The batch a score job really uses: ``batch`` capped by the artifact's ``max_safe_batch``."""
    batch = check_batch(batch)
    return max(1, min(batch, int(artifact.manifest.get("max_safe_batch", batch))))


def score_batch(backend: Backend, artifact: Artifact, chunk: np.ndarray, seed: int, index: int) -> np.ndarray:
    """Log-likelihoods (float64 nats) of the rows of batch ``index``: dequantisation noise, then probes."""
    n_levels = artifact.manifest.get("n_levels")
    dim = artifact.dim
    rng = batch_rng(seed, "score", index)
    chunk = np.asarray(chunk)
    if n_levels:
        x = ((chunk + rng.random(chunk.shape)) / n_levels).astype(np.float32)
    else:
        x = chunk.astype(np.float32)
    probes = None
    if artifact.logdet_mode == "series":
        probes = (rng.integers(0, 2, (len(x), artifact.n_probes, dim)) * 2 - 1).astype(np.float32)
    log_p = backend.density(x, probes)["log_prob"].astype(np.float64)
    return log_p - (dim * math.log(n_levels) if n_levels else 0.0)


def sample_batch(
    backend: Backend, artifact: Artifact, size: int, temperature: float, seed: int, index: int
) -> tuple[np.ndarray, float, int]:
    """Samples of batch ``index`` (``size`` rows): ``(x, largest residual, non-finite count)``."""
    z = batch_rng(seed, "sample", index).standard_normal((size, artifact.dim)).astype(np.float32)
    out = backend.sample(z, temperature)
    x = out["x"]
    nonfinite = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    return x, float(np.nanmax(out["residual"])), nonfinite


def check_npy_target(target: str | Path, n: int | None = None) -> Path:
    """A writable ``.npy`` output; with ``n``, room for ``n`` float64 values."""
    target = Path(target)
    if target.suffix != ".npy":
        raise BadInput(f"--out must end in .npy, not {target.suffix or '(none)'}")
    check_output_file(target)
    if n is not None:
        check_free_space(target, 8 * n + NPY_HEADER_BYTES)
    return target


def save_npy(values: np.ndarray, target: str | Path) -> Path:
    target = check_npy_target(target)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, values)
    return target


# --------------------------------------------------------------------------- the jobs the CLI runs
def engine_options(engine: str, backend: str, threads: int | None, options: RayOptions | None) -> RayOptions | None:
    """The Ray options of a job on ``engine`` (``None`` for one local process), its backend and threads set."""
    from .distributed import RayOptions

    if engine not in ENGINES:
        raise BadInput(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "local":
        if options is not None and (options.address or options.workers != RayOptions.workers):
            raise BadInput("--address and --workers need --engine ray")
        return None
    options = options or RayOptions()
    options.backend = backend
    if threads is not None:
        options.threads = threads
    return options


def sample_job(
    artifact: Artifact,
    n: int,
    target: str | Path,
    *,
    backend: str = "ort",
    temperature: float = 1.0,
    seed: int = 0,
    batch: int = 256,
    engine: str = "local",
    threads: int | None = None,
    options: RayOptions | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """``acf-deploy sample``: ``n`` samples into ``target``, in one process (``local``) or Ray shards (``ray``)."""
    from . import open_backend

    options = engine_options(engine, backend, threads, options)
    target, batch = check_sample_request(artifact, n, target, temperature, seed, batch)
    if options is not None:
        from .distributed import sample_shards

        return sample_shards(artifact, n, target, temperature, seed, batch, options, on_progress)
    with open_backend(backend, artifact, threads=threads, graphs=("sample",)) as runner:
        return _sample_checked(runner, artifact, n, target, temperature, seed, batch, on_progress)


def score_job(
    artifact: Artifact,
    data: np.ndarray,
    *,
    backend: str = "ort",
    seed: int = 0,
    batch: int = 256,
    engine: str = "local",
    threads: int | None = None,
    options: RayOptions | None = None,
    target: str | Path | None = None,
    on_progress: Progress | None = None,
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """``acf-deploy score``: ``(log-likelihoods, bits/dim, report)`` in one process or Ray shards; saves ``target``."""
    from . import open_backend

    options = engine_options(engine, backend, threads, options)
    target, batch = check_score_request(artifact, len(data), target, seed, batch)
    if options is not None:
        from .distributed import score_shards

        return score_shards(artifact, data, seed, batch, options, on_progress, target)
    with open_backend(backend, artifact, threads=threads, graphs=("density",)) as runner:
        log_lik = score_rows(runner, artifact, data, seed, batch, 0, on_progress)
    if target is not None:
        save_npy(log_lik, target)
    return log_lik, bits_per_dim(artifact, log_lik), {"engine": "local"}
