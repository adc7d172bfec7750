"""The ``acf-deploy`` CLI end to end on a small model, its answer to bad input (one clear line on
stderr, the documented exit code, no traceback, nothing half-written) and streaming sampling's
constant memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from acf_deploy.cli import app

from .export_fixtures import copy_artifact, rehash

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_error_line(result, code: int, fragment: str) -> None:
    """Exit ``code``; stderr is exactly one ``error:`` line containing ``fragment``; no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------------- end to end
def test_cli_end_to_end_on_a_small_model(exports, tmp_path: Path):
    root = tmp_path / "art"
    exported = invoke("export", exports.checkpoint("toy-resflow"), "--out", root, "--json")
    assert exported.exit_code == 0, exported.output
    summary = json.loads(exported.stdout)
    assert summary["preset"] == "toy-resflow" and summary["logdet"] == "exact" and summary["inverse"] == "loop"
    assert summary["iterations"]["calibrated_total"] <= summary["iterations"]["certified_total"]
    assert (root / "manifest.json").is_file()

    table = invoke("check", root, "--n", 64)
    assert table.exit_code == 0, table.output
    assert "PASSED" in table.stdout and "bits_per_dim_delta" in table.stdout and "sample.x" in table.stdout

    checked = invoke("check", root, "--n", 64, "--json")
    assert checked.exit_code == 0, checked.output
    payload = json.loads(checked.stdout)
    assert payload["passed"] is True and payload["against"] == "torch" and payload["n"] == 64
    metrics = payload["metrics"]
    assert metrics["sample_max_abs"] <= 1e-4 and metrics["log_prob_max_abs"] <= 1e-3
    assert metrics["bits_per_dim_delta"] <= 1e-5 and metrics["roundtrip_max_abs"] <= 1e-4
    assert {o["name"] for o in payload["outputs"]} >= {"sample.x", "density.log_prob"}

    golden = invoke("check", root, "--against", "golden", "--json")
    assert golden.exit_code == 0 and json.loads(golden.stdout)["passed"] is True

    samples = tmp_path / "x.npy"
    sampled = invoke("sample", root, "--n", 300, "--out", samples, "--temperature", 0.8)
    assert sampled.exit_code == 0, sampled.output
    x = np.load(samples)
    assert x.shape == (300, 2) and x.dtype == np.float32 and np.isfinite(x).all()

    data, scores = tmp_path / "points.npy", tmp_path / "ll.npy"
    np.save(data, x[:50])
    scored = invoke("score", root, data, "--json", "--out", scores)
    assert scored.exit_code == 0, scored.output
    result = json.loads(scored.stdout)
    assert result["n"] == 50 and np.isfinite(result["bits_per_dim"])
    log_lik = np.load(scores)
    assert log_lik.shape == (50,) and np.isclose(log_lik.mean(), result["mean_log_likelihood_nats"])

    described = invoke("inspect", root)
    assert described.exit_code == 0, described.output
    assert "sample" in described.stdout and "density" in described.stdout and "Loop" in described.stdout
    assert "z float32[batch, 2]" in described.stdout  # shapes are text, not rich markup
    as_json = invoke("inspect", root, "--json")
    report = json.loads(as_json.stdout)
    assert report["manifest"]["preset"] == "toy-resflow" and report["graphs"]["density"]["nodes"] > 0
    one_file = invoke("inspect", root / "sample.onnx")
    assert one_file.exit_code == 0 and "sample.onnx" in one_file.stdout
    linted = invoke("inspect", root, "--trt")
    assert linted.exit_code == 0, linted.output  # exit 1 on any lint error
    assert not [line for line in linted.stdout.splitlines() if line.startswith("error")]


def test_cli_images_png_grid_and_digits_score(exports, tmp_path: Path):
    root = exports.artifact("digits-acf-l2")
    grid = tmp_path / "grid.png"
    sampled = invoke("sample", root, "--n", 16, "--out", grid)
    assert sampled.exit_code == 0, sampled.output
    with Image.open(grid) as picture:
        assert picture.format == "PNG" and picture.width > 32
    scored = invoke("score", root, "digits-test", "--json")
    assert scored.exit_code == 0, scored.output
    result = json.loads(scored.stdout)
    assert result["n"] > 300 and 0 < result["bits_per_dim"] < 20
    levels = tmp_path / "levels.npy"
    np.save(levels, np.random.default_rng(0).integers(0, 17, (5, 8, 8)))  # (N, H, W): channel added
    assert invoke("score", root, levels, "--json").exit_code == 0


# ------------------------------------------------------------------------------------- bad input
def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncate_and_rehash(path: Path) -> None:
    """A truncated graph the manifest vouches for: it must be rejected cleanly when parsed."""
    _truncate(path)
    rehash(path.parent)


def _unrunnable_and_rehash(path: Path) -> None:
    """A well-formed graph the manifest vouches for, with an op ONNX Runtime lacks: it must reject it cleanly."""
    model = onnx.load(str(path))
    model.graph.node[0].op_type = "NoSuchAcfOp"
    onnx.save(model, str(path))
    rehash(path.parent)


def _edit_manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))

    return edit


ARTIFACT_DAMAGE = {
    "tampered-density": ("density.onnx", _flip, "sha256"),
    "truncated-sample": ("sample.onnx", _truncate, "sha256"),
    "missing-density": ("density.onnx", Path.unlink, "missing"),
    "missing-golden": ("golden.npz", Path.unlink, "missing"),
    "unparsable-sample": ("sample.onnx", _truncate_and_rehash, "not a readable ONNX file"),
    "unloadable-sample": ("sample.onnx", _unrunnable_and_rehash, "cannot be loaded by ONNX Runtime"),
    "missing-manifest": ("manifest.json", Path.unlink, "manifest.json is missing"),
    "truncated-manifest": ("manifest.json", _truncate, "not valid JSON"),
    "manifest-wrong-version": (
        "manifest.json",
        _edit_manifest(lambda m: m.update(format_version=99)),
        "format version 99",
    ),
    "manifest-wrong-hash": (
        "manifest.json",
        _edit_manifest(lambda m: m["files"].update({"sample.onnx": "0" * 64})),
        "sha256",
    ),
    "manifest-missing-field": ("manifest.json", _edit_manifest(lambda m: m.pop("graphs")), "'graphs'"),
}


@pytest.fixture
def toy_copy(exports, tmp_path: Path) -> Path:
    return copy_artifact(exports.artifact("toy-resflow"), tmp_path / "art")


@pytest.mark.parametrize("case", list(ARTIFACT_DAMAGE))
@pytest.mark.parametrize("command", ["check", "sample"])
def test_damaged_artifact_is_one_clear_line(toy_copy: Path, tmp_path: Path, case: str, command: str):
    name, damage, fragment = ARTIFACT_DAMAGE[case]
    damage(toy_copy / name)
    if command == "check":
        result = invoke("check", toy_copy, "--n", 8)
    else:
        result = invoke("sample", toy_copy, "--n", 8, "--out", tmp_path / "x.npy")
    assert_one_error_line(result, 2, fragment)
    assert not (tmp_path / "x.npy").exists()


def test_one_graph_jobs_load_only_their_graph(toy_copy: Path, tmp_path: Path):
    """``sample`` never builds a session on the density graph (slow to build), so a broken one cannot stop
    it; ``score`` needs it and says so in one line."""
    _unrunnable_and_rehash(toy_copy / "density.onnx")
    result = invoke("sample", toy_copy, "--n", 8, "--out", tmp_path / "x.npy")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "x.npy").shape[0] == 8
    points = _points(tmp_path, np.load(tmp_path / "x.npy"))
    assert_one_error_line(invoke("score", toy_copy, points), 2, "cannot be loaded by ONNX Runtime")


def test_damaged_artifact_fails_golden_check_too(toy_copy: Path):
    _flip(toy_copy / "golden.npz")
    assert_one_error_line(invoke("check", toy_copy, "--against", "golden"), 2, "sha256")


def _points(tmp_path: Path, array: np.ndarray) -> Path:
    path = tmp_path / "data.npy"
    np.save(path, array)
    return path


BAD_REQUESTS = {
    # name: (argv builder (artifact, tmp) -> args, exit code, message fragment)
    "unknown-backend": (lambda a, t: ["check", a, "--backend", "onnx"], 2, "unknown backend 'onnx'"),
    "cuda-unavailable": (lambda a, t: ["check", a, "--backend", "ort-cuda"], 3, "CUDAExecutionProvider"),
    "tensorrt-unavailable": (lambda a, t: ["sample", a, "--backend", "trt", "--out", t / "x.npy"], 3, ""),
    "bad-against": (lambda a, t: ["check", a, "--against", "numpy"], 2, "--against"),
    "bad-n": (lambda a, t: ["check", a, "--n", "0"], 2, "--n"),
    "not-an-artifact": (lambda a, t: ["check", t / "nowhere"], 2, "is not an artifact directory"),
    "sample-bad-suffix": (lambda a, t: ["sample", a, "--out", t / "x.txt"], 2, "--out must end in .npy or .png"),
    "sample-png-for-toy": (lambda a, t: ["sample", a, "--out", t / "x.png"], 2, "needs image data"),
    "sample-bad-temperature": (
        lambda a, t: ["sample", a, "--temperature", "-1", "--out", t / "x.npy"],
        2,
        "--temperature",
    ),
    "sample-nan-temperature": (
        lambda a, t: ["sample", a, "--temperature", "nan", "--out", t / "x.npy"],
        2,
        "--temperature",
    ),
    "sample-zero-n": (lambda a, t: ["sample", a, "--n", "0", "--out", t / "x.npy"], 2, "--n"),
    "score-nan": (lambda a, t: ["score", a, _points(t, np.array([[np.nan, 0.0]]))], 2, "NaN"),
    "score-inf": (lambda a, t: ["score", a, _points(t, np.array([[np.inf, 0.0]]))], 2, "infinite"),
    "score-wrong-shape": (lambda a, t: ["score", a, _points(t, np.zeros((4, 3)))], 2, "the model expects (N, 2)"),
    "score-missing-file": (lambda a, t: ["score", a, t / "absent.npy"], 2, "does not exist"),
    "score-corrupt-file": (lambda a, t: ["score", a, _garbage(t / "data.npy")], 2, "cannot be read"),
    "score-digits-on-toy": (lambda a, t: ["score", a, "digits-test"], 2, "digits-test"),
    "score-bad-out": (
        lambda a, t: ["score", a, _points(t, np.zeros((4, 2))), "--out", t / "ll.csv"],
        2,
        "--out must end in .npy",
    ),
    "inspect-missing": (lambda a, t: ["inspect", t / "nothing"], 2, "does not exist"),
    "inspect-not-onnx": (lambda a, t: ["inspect", a / "golden.npz"], 2, "neither an artifact directory"),
    "inspect-garbage-onnx": (lambda a, t: ["inspect", _garbage(t / "g.onnx")], 2, "not a readable ONNX file"),
    "export-missing-checkpoint": (lambda a, t: ["export", t / "nowhere", "--out", t / "out"], 2, "is missing"),
}


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x00\x01 not what it claims to be " * 10)
    return path


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_one_clear_line(toy_copy: Path, tmp_path: Path, case: str):
    build, code, fragment = BAD_REQUESTS[case]
    if case == "cuda-unavailable":
        onnxruntime = pytest.importorskip("onnxruntime")
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("this onnxruntime build has CUDA")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    before = {p.name for p in scratch.iterdir()}
    args = build(toy_copy, scratch)
    made = {p.name for p in scratch.iterdir()} - before  # inputs the case wrote on purpose
    result = invoke(*args)
    assert_one_error_line(result, code, fragment)
    assert {p.name for p in scratch.iterdir()} - before == made  # no output, no temporary file


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--logdet", "lu", "--logdet"),
        ("--inverse", "scan", "--inverse"),
        ("--iters", "lots", "--iters"),
        ("--precision", "fp8", "--precision"),
        ("--opset", "99", "--opset"),
        ("--probes", "0", "--probes"),
    ],
)
def test_bad_export_options_are_one_clear_line(exports, tmp_path: Path, option: str, value: str, fragment: str):
    result = invoke("export", exports.checkpoint("toy-resflow"), "--out", tmp_path / "art", option, value)
    assert_one_error_line(result, 2, fragment)
    assert list(tmp_path.iterdir()) == []


def test_digits_score_rejects_non_level_data(exports, tmp_path: Path):
    root = exports.artifact("digits-acf-l2")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((3, 1, 8, 8), 0.5))
    assert_one_error_line(invoke("score", root, bad), 2, "integer levels")
    np.save(bad, np.zeros((3, 1, 7, 7)))
    assert_one_error_line(invoke("score", root, bad), 2, "the model expects (N, 1, 8, 8)")


# ------------------------------------------------------------------------------------ peak memory
def _peak_rss_kib(args: list[str]) -> int:
    """Run ``acf-deploy args`` in a fresh child of a fresh interpreter; that child's peak RSS (KiB)."""
    probe = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run(sys.argv[1:]).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(code)\n"
    )
    cli = [sys.executable, "-c", "from acf_deploy.cli import app; app()"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", probe, *cli, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


def test_sample_peak_memory_does_not_grow_with_n(exports, tmp_path: Path):
    root = str(exports.artifact("toy-resflow"))
    small = _peak_rss_kib(["sample", root, "--n", "10000", "--out", str(tmp_path / "small.npy")])
    large = _peak_rss_kib(["sample", root, "--n", "100000", "--out", str(tmp_path / "large.npy")])
    assert np.load(tmp_path / "large.npy", mmap_mode="r").shape == (100_000, 2)
    assert large < 1.2 * small, (small, large)


# ------------------------------------------------------------------------ the CLI as a new user meets it
def _commands():
    """``(name, click command)`` for every command, sub-commands of groups included."""
    import typer

    def walk(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])
        if not hasattr(command, "commands"):
            yield " ".join(path), command

    return list(walk(typer.main.get_command(app), []))


def test_version_and_help_on_every_option():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("acf-deploy ")
    missing = [f"{name} {p.name}" for name, command in _commands() for p in command.params if not p.help]
    assert missing == []


@pytest.mark.parametrize("command", ["check", "sample", "score", "quickstart", "export", "inspect"])
def test_help_shows_flags_as_flags_and_backend_choices(command: str):
    from acf_deploy.cli import BACKEND_CHOICES
    from acf_deploy.runtime import BACKENDS

    assert tuple(BACKENDS) == BACKEND_CHOICES
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    if "--backend" in result.output:
        assert "|".join(BACKENDS) in result.output


def test_openmp_workers_spin_briefly_except_when_benchmarking(monkeypatch):
    """Every command but ``bench`` has PyTorch's OpenMP workers spin only briefly (neighbouring PyTorch
    processes made long spins 15x slower); ``bench`` keeps the default; a user's own setting is kept."""
    import os

    from acf_deploy.cli import OPENMP_SPINCOUNT

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert runner.invoke(app, ["bench", "--help"]).exit_code == 0
    assert "GOMP_SPINCOUNT" not in os.environ
    assert runner.invoke(app, ["export", "--help"]).exit_code == 0
    assert os.environ["GOMP_SPINCOUNT"] == OPENMP_SPINCOUNT
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    assert runner.invoke(app, ["check", "--help"]).exit_code == 0
    assert os.environ["GOMP_SPINCOUNT"] == "7"
