"""Bulk scoring and sampling on a Ray cluster: ``acf-deploy score|sample --engine ray``.

The rows of a job are cut into **shards**, runs of whole batches: shard ``s`` covers batches
``[first_batch, first_batch + k)`` of the single-process job with the same ``batch``. Every batch draws
its randomness from :func:`~acf_deploy.runtime.jobs.batch_rng` ``(seed, stream, batch index)``
and is computed by the very functions the single-process path calls
(:func:`~acf_deploy.runtime.jobs.score_rows`, :func:`~acf_deploy.runtime.jobs.sample_rows`), so with
the same backend and thread count a Ray job equals :func:`~acf_deploy.runtime.jobs.score` /
:func:`~acf_deploy.runtime.jobs.sample_to_file` bit for bit, in the same order. Requests are checked,
and jobs started, by :func:`~acf_deploy.runtime.jobs.score_job` / :func:`~acf_deploy.runtime.jobs.sample_job`
(``engine="ray"``); this module holds what is Ray's: shards, workers, scheduling and retries.

Each Ray actor (:class:`ShardWorker`) opens the artifact (hash-checked) and holds one backend: ONNX
Runtime on one CPU thread by default; ``trt``, ``ort-cuda`` and ``ort-trt`` actors ask Ray for one GPU.
The driver keeps at most ``inflight`` shards per worker outstanding and writes each finished shard into
its rows of the output (a memory-mapped ``.npy`` or an array) exactly once, so its memory is bounded by
the shard size, not by the number of rows. A shard whose worker dies is given to a fresh worker and a
shard whose task raised is retried, up to ``max_attempts`` tries; library errors (bad input, a backend
that is unavailable) are deterministic and are raised at once.

The artifact directory must be readable at the same path on every node, and acf-deploy installed there.
"""

from __future__ import annotations

import math
import os
import resource
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import Artifact, open_artifact
from ..errors import AcfError, BackendUnavailable, BadInput, CheckFailed
from .jobs import (
    Progress,
    bits_per_dim,
    output_array,
    sample_rows,
    score_rows,
)

__all__ = [
    "FAIL_ONCE_ENV",
    "RayOptions",
    "Shard",
    "ShardWorker",
    "plan_shards",
    "ray_session",
    "sample_shards",
    "score_shards",
]

GPU_BACKENDS = ("trt", "ort-cuda", "ort-trt")
MAX_SHARD_BATCHES = 16
#: Testing hook: ``"SHARD:MARKER"`` makes the worker that first takes shard ``SHARD`` create the file
#: ``MARKER`` and die (``os._exit``); the retry finds the marker and does the work.
FAIL_ONCE_ENV = "ACF_DEPLOY_RAY_FAIL_ONCE"


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of a job: whole batches, the first of which is batch ``first_batch``."""

    index: int
    start: int
    stop: int
    first_batch: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass
class RayOptions:
    """How a job runs on Ray: cluster, workers, per-worker backend and threads, shard size, retries."""

    workers: int = 2
    address: str | None = None
    backend: str = "ort"
    threads: int = 1
    shard_batches: int | None = None  # batches per shard; None: about 4 shards per worker, at most 16 batches
    max_attempts: int = 3
    inflight: int = 2  # shards queued per worker, so a worker never waits for the driver
    fail_once: tuple[int, str] | None = None  # testing hook, see FAIL_ONCE_ENV
    on_event: Callable[[str], None] | None = field(default=None, repr=False)

    def check(self) -> None:
        if self.workers < 1:
            raise BadInput("--workers must be at least 1")
        if self.threads < 1:
            raise BadInput("--threads must be at least 1")
        if self.max_attempts < 1 or self.inflight < 1:
            raise BadInput("max_attempts and inflight must be at least 1")
        if self.shard_batches is not None and self.shard_batches < 1:
            raise BadInput("shard_batches must be at least 1")
        if self.fail_once is None and os.environ.get(FAIL_ONCE_ENV):
            shard, _, marker = os.environ[FAIL_ONCE_ENV].partition(":")
            if not shard.isdigit() or not marker:
                raise BadInput(f"{FAIL_ONCE_ENV} must be SHARD:MARKER_PATH, not {os.environ[FAIL_ONCE_ENV]!r}")
            self.fail_once = (int(shard), marker)


def plan_shards(n: int, batch: int, shard_batches: int) -> list[Shard]:
    """Cut ``n`` rows into shards of ``shard_batches`` whole batches of ``batch`` rows (the last may be short)."""
    rows = batch * shard_batches
    return [
        Shard(index=i, start=start, stop=min(n, start + rows), first_batch=start // batch)
        for i, start in enumerate(range(0, n, rows))
    ]


def default_shard_batches(n: int, batch: int, workers: int) -> int:
    """About four shards per worker (so retries and stragglers cost little), at most 16 batches each."""
    n_batches = max(1, math.ceil(n / batch))
    return max(1, min(MAX_SHARD_BATCHES, math.ceil(n_batches / (4 * workers))))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: ``VmHWM`` where Linux has it (``ru_maxrss`` survives
    ``exec`` and would report the parent's peak in a freshly started subprocess), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class ShardWorker:
    """A Ray actor: one artifact, one backend; computes shards with the single-process batch functions."""

    def __init__(self, root: str, backend: str, threads: int, fail_once: tuple[int, str] | None = None):
        from . import open_backend

        self.error: tuple[str, str] | None = None
        self.fail_once = fail_once
        try:
            self.artifact = open_artifact(root)
            self.backend = open_backend(backend, self.artifact, threads=threads)
        except AcfError as exc:  # reported by ready(): the driver raises it as the same error class
            self.error = (type(exc).__name__, str(exc))

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "error": self.error}

    def _maybe_die(self, shard: Shard) -> None:
        if self.fail_once is None or shard.index != self.fail_once[0]:
            return
        try:
            fd = os.open(self.fail_once[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # a retry: the first attempt already died
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(17)

    def score(self, shard: Shard, rows: np.ndarray, seed: int, batch: int) -> tuple[int, np.ndarray, float]:
        self._maybe_die(shard)
        out = score_rows(self.backend, self.artifact, rows, seed, batch, shard.first_batch)
        return shard.index, out, peak_rss_mb()

    def sample(
        self, shard: Shard, temperature: float, seed: int, batch: int
    ) -> tuple[int, np.ndarray, float, int, float]:
        self._maybe_die(shard)
        out = np.empty((len(shard), *self.artifact.data_shape), dtype=np.float32)
        residual_max, nonfinite = sample_rows(
            self.backend, self.artifact, out, temperature, seed, batch, shard.first_batch
        )
        return shard.index, out, residual_max, nonfinite, peak_rss_mb()


def _ray():
    try:
        import ray
    except ImportError:
        raise BackendUnavailable(
            "the ray engine needs Ray; install acf-deploy[distributed] (or use --engine local)"
        ) from None
    return ray


@contextmanager
def ray_session(address: str | None = None, workers: int = 2) -> Iterator[Any]:
    """Connect to ``address``, or start a local Ray instance with ``workers`` CPUs; reuse one already up.

    Only a session started here is shut down on exit.
    """
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=workers, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise BackendUnavailable(f"cannot start or reach {where}: {str(exc).splitlines()[0][:200]}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


_ERRORS = {cls.__name__: cls for cls in (AcfError, BadInput, BackendUnavailable, CheckFailed)}


class _Pool:
    """Workers, their queues and the retry bookkeeping of one job."""

    def __init__(self, ray: Any, artifact: Artifact, options: RayOptions):
        self.ray, self.options = ray, options
        resources: dict[str, Any] = {"num_cpus": options.threads, "max_restarts": 0}
        if options.backend in GPU_BACKENDS:
            resources["num_gpus"] = 1
        self.remote_cls = ray.remote(**resources)(ShardWorker)
        self.args = (str(Path(artifact.root).resolve()), options.backend, options.threads, options.fail_once)
        self.load: dict[Any, int] = {}
        self.retries = 0
        for _ in range(options.workers):
            self._spawn()
        self._check_ready(list(self.load))

    def _spawn(self) -> Any:
        actor = self.remote_cls.remote(*self.args)
        self.load[actor] = 0
        return actor

    def _check_ready(self, actors: Sequence[Any]) -> None:
        for info in self.ray.get([a.ready.remote() for a in actors]):
            if info["error"] is not None:
                name, message = info["error"]
                raise _ERRORS.get(name, AcfError)(message)

    def free_actor(self) -> Any | None:
        actor = min(self.load, key=self.load.get, default=None)
        return actor if actor is not None and self.load[actor] < self.options.inflight else None

    def replace(self, actor: Any) -> None:
        """Forget a dead worker (once, though several of its shards report it) and start another."""
        if actor in self.load:
            del self.load[actor]
            self.ray.kill(actor, no_restart=True)
            self._check_ready([self._spawn()])

    def close(self) -> None:
        for actor in list(self.load):
            self.ray.kill(actor, no_restart=True)
        self.load.clear()


def _run_shards(
    ray: Any,
    artifact: Artifact,
    shards: list[Shard],
    options: RayOptions,
    submit: Callable[[Any, Shard], Any],
    accept: Callable[[Shard, tuple], None],
    on_progress: Progress | None,
) -> dict[str, Any]:
    """Schedule ``shards`` over the pool until each has been accepted exactly once."""
    from ray.exceptions import RayActorError

    say = options.on_event or (lambda _msg: None)
    pool = _Pool(ray, artifact, options)
    pending: deque[Shard] = deque(shards)
    attempts = [0] * len(shards)
    done = np.zeros(len(shards), dtype=bool)
    inflight: dict[Any, tuple[Any, Shard]] = {}
    try:
        while pending or inflight:
            while pending and (actor := pool.free_actor()) is not None:
                shard = pending.popleft()
                attempts[shard.index] += 1
                inflight[submit(actor, shard)] = (actor, shard)
                pool.load[actor] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                actor, shard = inflight.pop(ref)
                if actor in pool.load:
                    pool.load[actor] -= 1
                try:
                    result = ray.get(ref)
                except AcfError as exc:  # deterministic (bad input, unavailable backend): retrying cannot help
                    cause = getattr(exc, "cause", None)  # Ray's RayTaskError(BadInput) carries the original
                    raise (cause if isinstance(cause, AcfError) else exc) from None
                except RayActorError as exc:
                    reason = f"worker died ({type(exc).__name__})"
                    pool.replace(actor)
                except Exception as exc:  # a task error Ray wraps; retried like a lost worker
                    reason = f"{type(exc).__name__}: {str(exc).splitlines()[-1][:160] if str(exc) else ''}"
                else:
                    if not done[shard.index]:
                        accept(shard, result)
                        done[shard.index] = True
                        if on_progress:
                            on_progress(len(shard))
                    continue
                if attempts[shard.index] >= options.max_attempts:
                    raise CheckFailed(
                        f"shard {shard.index} (rows {shard.start}..{shard.stop - 1}) failed "
                        f"{attempts[shard.index]} times; last: {reason}"
                    )
                pool.retries += 1
                say(f"shard {shard.index} (rows {shard.start}..{shard.stop - 1}): {reason}; retrying")
                pending.appendleft(shard)
    finally:
        pool.close()
    if not done.all():  # pragma: no cover - the loop only ends when every shard is accepted
        raise CheckFailed(f"{int((~done).sum())} shards were never completed")
    return {"shards": len(shards), "retries": pool.retries, "workers": options.workers}


def score_shards(
    artifact: Artifact,
    data: np.ndarray,
    seed: int,
    batch: int,
    options: RayOptions,
    on_progress: Progress | None,
    target: Path | None,
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """:func:`~acf_deploy.runtime.jobs.score_job` on Ray, for a request it has checked: ``(log_lik, bits/dim,
    report)``.

    ``data`` may be a memory-mapped array: the driver reads one shard at a time. With ``target`` (``.npy``)
    the log-likelihoods are written into a memory-mapped file (atomically) and returned memory-mapped.
    The report has the shard count, retries, and the peak RSS (MB) of the driver and of the workers.
    """
    options.check()
    n = len(data)
    shards = plan_shards(n, batch, options.shard_batches or default_shard_batches(n, batch, options.workers))
    worker_rss = [0.0]

    def submit(actor: Any, shard: Shard) -> Any:
        return actor.score.remote(shard, np.ascontiguousarray(data[shard.start : shard.stop]), seed, batch)

    with ray_session(options.address, options.workers) as ray, output_array(target, (n,), np.float64) as log_lik:

        def accept(shard: Shard, result: tuple) -> None:
            index, values, rss = result
            assert index == shard.index and len(values) == len(shard)
            log_lik[shard.start : shard.stop] = values
            worker_rss[0] = max(worker_rss[0], rss)

        report = _run_shards(ray, artifact, shards, options, submit, accept, on_progress)
        bpd = bits_per_dim(artifact, log_lik)
    if target is not None:
        log_lik = np.load(target, mmap_mode="r")
    report.update(driver_peak_rss_mb=peak_rss_mb(), worker_peak_rss_mb=worker_rss[0])
    return log_lik, bpd, report


def sample_shards(
    artifact: Artifact,
    n: int,
    target: Path,
    temperature: float,
    seed: int,
    batch: int,
    options: RayOptions,
    on_progress: Progress | None,
) -> dict[str, Any]:
    """:func:`~acf_deploy.runtime.jobs.sample_job` on Ray, for a request it has checked: the stats of
    :func:`~acf_deploy.runtime.jobs.sample_to_file` plus a report."""
    options.check()
    shards = plan_shards(n, batch, options.shard_batches or default_shard_batches(n, batch, options.workers))
    stats: dict[str, Any] = {"n": n, "residual_max": 0.0, "nonfinite": 0}
    worker_rss = [0.0]

    def submit(actor: Any, shard: Shard) -> Any:
        return actor.sample.remote(shard, temperature, seed, batch)

    shape = (n, *artifact.data_shape)
    with ray_session(options.address, options.workers) as ray, output_array(target, shape, np.float32) as store:

        def accept(shard: Shard, result: tuple) -> None:
            index, x, residual_max, nonfinite, rss = result
            assert index == shard.index and len(x) == len(shard)
            store[shard.start : shard.stop] = x
            stats["residual_max"] = max(stats["residual_max"], residual_max)
            stats["nonfinite"] += nonfinite
            worker_rss[0] = max(worker_rss[0], rss)

        stats.update(_run_shards(ray, artifact, shards, options, submit, accept, on_progress))
    stats.update(driver_peak_rss_mb=peak_rss_mb(), worker_peak_rss_mb=worker_rss[0])
    return stats
