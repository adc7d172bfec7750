"""The Ray engine: bit-identical to the single-process jobs, retried shards, bounded memory.

One local Ray instance (2 CPUs, no dashboard) serves the whole module; every backend uses one ONNX
Runtime intra-op thread, in the workers and in the single-process reference alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from acf_deploy.artifact import open_artifact
from acf_deploy.cli import app
from acf_deploy.data import digits_split
from acf_deploy.errors import BadInput
from acf_deploy.runtime import open_backend
from acf_deploy.runtime.distributed import RayOptions, plan_shards
from acf_deploy.runtime.jobs import batch_rng, sample_job, sample_to_file, score, score_batch, score_job

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install acf-deploy[distributed])")

BATCH = 32


@pytest.fixture(scope="module")
def cluster():
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"local Ray instance up in {time.perf_counter() - started:.1f} s")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def digits(exports):
    return open_artifact(exports.artifact("digits-acf-l2"))


@pytest.fixture(scope="module")
def local_scores(digits):
    with open_backend("ort", digits, threads=1) as runner:
        return score(runner, digits, digits_split()[1], seed=3, batch=BATCH)


def test_plan_shards_cover_rows_in_whole_batches():
    shards = plan_shards(1000, 32, 3)
    assert [s.start for s in shards] == list(range(0, 1000, 96))
    assert shards[-1].stop == 1000 and all(s.start % 32 == 0 and s.first_batch == s.start // 32 for s in shards)
    assert sum(len(s) for s in shards) == 1000


def test_batch_randomness_depends_only_on_seed_and_batch(digits, local_scores):
    """Batch k scored on its own reproduces rows [k*B, (k+1)*B) of the full job: no sequential stream."""
    data = digits_split()[1]
    with open_backend("ort", digits, threads=1) as runner:
        rows = score_batch(runner, digits, data[3 * BATCH : 4 * BATCH], 3, 3)
    np.testing.assert_array_equal(rows, local_scores[0][3 * BATCH : 4 * BATCH])
    assert not np.array_equal(batch_rng(3, "score", 0).random(4), batch_rng(3, "score", 1).random(4))
    with pytest.raises(BadInput):
        batch_rng(-1, "score", 0)


@pytest.mark.slow  # a local Ray cluster
def test_ray_score_equals_single_process_bit_for_bit(cluster, digits, local_scores):
    data = digits_split()[1]
    seen: list[int] = []
    options = RayOptions(workers=2, shard_batches=2)
    log_lik, bpd, report = score_job(
        digits, data, seed=3, batch=BATCH, engine="ray", options=options, on_progress=seen.append
    )
    assert report["shards"] == len(plan_shards(len(data), BATCH, 2)) and report["retries"] == 0
    np.testing.assert_array_equal(log_lik, local_scores[0])  # same values, same order
    assert bpd == local_scores[1]
    assert sum(seen) == len(data)


@pytest.mark.slow  # a local Ray cluster
def test_killed_worker_shard_is_retried_without_loss_or_duplication(cluster, digits, local_scores, tmp_path):
    data = digits_split()[1]
    marker = tmp_path / "died-on-shard-2"
    events: list[str] = []
    seen: list[int] = []
    options = RayOptions(workers=2, shard_batches=2, fail_once=(2, str(marker)), on_event=events.append)
    log_lik, bpd, report = score_job(
        digits, data, seed=3, batch=BATCH, engine="ray", options=options, target=tmp_path / "ll.npy",
        on_progress=seen.append,
    )  # fmt: skip
    assert marker.exists(), "the worker was not killed"
    assert report["retries"] >= 1 and any("shard 2" in e for e in events)
    np.testing.assert_array_equal(np.load(tmp_path / "ll.npy"), local_scores[0])
    assert bpd == local_scores[1]
    assert sum(seen) == len(data)  # every shard counted once


@pytest.mark.slow  # a local Ray cluster
def test_ray_sample_equals_single_process(cluster, digits, tmp_path):
    with open_backend("ort", digits, threads=1) as runner:
        local = sample_to_file(runner, digits, 150, tmp_path / "local.npy", 0.9, seed=5, batch=BATCH)
    options = RayOptions(workers=2, shard_batches=1)
    stats = sample_job(
        digits, 150, tmp_path / "ray.npy", temperature=0.9, seed=5, batch=BATCH, engine="ray", options=options
    )
    np.testing.assert_array_equal(np.load(tmp_path / "ray.npy"), np.load(tmp_path / "local.npy"))
    assert stats["residual_max"] == local["residual_max"] and stats["nonfinite"] == local["nonfinite"] == 0


@pytest.mark.slow  # a local Ray cluster
def test_cli_score_engine_ray_matches_local(cluster, digits, tmp_path):
    runner = CliRunner()
    common = [str(digits.root), "digits-test", "--threads", "1", "--batch", str(BATCH), "--json"]
    local = runner.invoke(app, ["score", *common, "--out", str(tmp_path / "a.npy")])
    remote = runner.invoke(
        app, ["score", *common, "--engine", "ray", "--workers", "2", "--out", str(tmp_path / "b.npy")]
    )
    assert local.exit_code == 0, local.output
    assert remote.exit_code == 0, remote.output
    assert json.loads(remote.stdout)["bits_per_dim"] == json.loads(local.stdout)["bits_per_dim"]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    wrong = runner.invoke(app, ["score", *common, "--workers", "3"])
    assert wrong.exit_code == 2 and "--engine ray" in wrong.output


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from acf_deploy.artifact import open_artifact
    from acf_deploy.runtime.distributed import RayOptions, peak_rss_mb, ray_session
    from acf_deploy.runtime.jobs import score_job

    address, root, data_path, out_dir = sys.argv[1:5]
    artifact = open_artifact(root)
    data = np.load(data_path, mmap_mode="r")
    rows = {}
    with ray_session(address):
        for n in (10_000, 100_000):
            options = RayOptions(workers=2, shard_batches=2)
            _, bpd, report = score_job(
                artifact, data[:n], batch=1024, engine="ray", options=options, target=f"{out_dir}/ll-{n}.npy"
            )
            rows[n] = {"driver": peak_rss_mb(),
                       "worker": report["worker_peak_rss_mb"], "shards": report["shards"]}
    print(json.dumps(rows))
    """
)


@pytest.mark.slow  # a local Ray cluster
def test_peak_memory_is_bounded_by_the_shard_not_the_rows(cluster, exports, tmp_path):
    """Scoring 100,000 rows peaks less than 20% above scoring 10,000 (toy model, 2,048-row shards),
    for the driver (peak RSS of a fresh subprocess, a high-water mark, so read after each size) and
    for the workers (each reports its own peak)."""
    toy = exports.artifact("toy-resflow")
    data = np.lib.format.open_memmap(tmp_path / "points.npy", mode="w+", dtype=np.float32, shape=(100_000, 2))
    data[:] = np.random.default_rng(0).standard_normal((100_000, 2))
    data.flush()
    del data
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, cluster, str(toy), str(tmp_path / "points.npy"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    print(rows)
    assert (rows[10_000]["shards"], rows[100_000]["shards"]) == (5, 49)  # shards of 2,048 rows
    assert rows[100_000]["driver"] < 1.2 * rows[10_000]["driver"]
    assert rows[100_000]["worker"] < 1.2 * rows[10_000]["worker"]
    assert np.load(tmp_path / "ll-100000.npy", mmap_mode="r").shape == (100_000,)
