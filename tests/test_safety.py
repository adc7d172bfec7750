"""The CLI against an adversarial user: nothing of the user's is lost, nothing outside an artifact is read,
no traceback. One test (or a parametrised family) per hole found by trying to break it:

1. output targets that are not ours are refused untouched; the directory swap has no missing moment;
2. manifest names cannot reach outside the artifact (paths, symlinks, external data);
3. the manifest is validated, integrity-checked and checked against its graphs;
4. configs are validated before anything is built, and export judges only what it computes;
5. every failure is one line with its documented exit code (``--debug`` for internal errors);
6. leftovers of killed writers are cleaned, SIGTERM is an interrupt, free space, memory and
   permissions are respected, and nonsense options and inputs are refused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from acf_deploy import fileio
from acf_deploy.artifact import open_artifact, safe_member
from acf_deploy.checkpoint import META, load_checkpoint
from acf_deploy.cli import app
from acf_deploy.errors import BadInput
from acf_deploy.fileio import atomic_dir, atomic_path, sha256_file
from acf_deploy.flows.blocks import ResidualBlock
from acf_deploy.flows.config import validate_config
from acf_deploy.manifest import write_manifest
from acf_deploy.report import verification_failures
from acf_deploy.runtime.jobs import load_score_data, score

from .export_fixtures import copy_artifact, small_config
from .toy_artifact import write_artifact

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_error_line(result, code: int, fragment: str) -> None:
    """Exit ``code``; stderr is exactly one ``error:`` line containing ``fragment``; no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def edit_manifest(root: Path, change, restamp: bool) -> None:
    """Edit the manifest; ``restamp`` recomputes its digest (and file hashes) as a deliberate forger would."""
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if restamp:
        write_manifest(path, manifest)
    else:
        path.write_text(json.dumps(manifest, indent=2))


@pytest.fixture
def toy(exports, tmp_path: Path) -> Path:
    return copy_artifact(exports.artifact("toy-resflow"), tmp_path / "art")


@pytest.fixture
def digits(exports, tmp_path: Path) -> Path:
    return copy_artifact(exports.artifact("digits-acf-l2"), tmp_path / "digits")


# ------------------------------------------------------------------- 1. nothing of the user's is lost
def _user_dir(path: Path) -> Path:
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")
    return path


def _user_file(path: Path) -> Path:
    path.write_text("not an artifact")
    return path


def _artifact_plus_user_file(exports, path: Path) -> Path:
    copy_artifact(exports.artifact("toy-resflow"), path)
    (path / "notes.txt").write_text("mine")
    return path


@pytest.mark.parametrize("make", [_user_dir, _user_file, "artifact+user-file"])
def test_export_never_replaces_what_is_not_an_artifact(exports, tmp_path: Path, make):
    target = tmp_path / "out"
    (_artifact_plus_user_file(exports, target) if make == "artifact+user-file" else make(target))
    before = snapshot(tmp_path)
    result = invoke("export", exports.checkpoint("toy-resflow"), "--out", target)
    assert_one_error_line(result, 2, "refusing to replace it")
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_replaces_its_own_artifact(exports, tmp_path: Path):
    target = copy_artifact(exports.artifact("toy-resflow"), tmp_path / "out")
    old_digest = json.loads((target / "manifest.json").read_text())["manifest_sha256"]
    result = invoke("export", exports.checkpoint("toy-resflow"), "--out", target, "--iters", "certified")
    assert result.exit_code == 0, result.output
    manifest = open_artifact(target).manifest
    assert manifest["manifest_sha256"] != old_digest and manifest["inverse"]["iters"] == "certified"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporaries left beside it


COMMANDS_WRITING_DIRECTORIES = {
    "train": lambda exports, out: ["train", "toy-resflow", "--out", out, "--epochs", "1"],
    "quickstart": lambda exports, out: ["quickstart", "--out", out],
    "triton": lambda exports, out: ["triton", exports.artifact("toy-resflow"), "--repo", out],
    "experiment": lambda exports, out: ["experiment", "paper", "--out", out],
}


@pytest.mark.parametrize("command", list(COMMANDS_WRITING_DIRECTORIES))
def test_every_directory_writer_refuses_a_directory_of_user_files(exports, tmp_path: Path, command: str):
    target = _user_dir(tmp_path / "out")
    before = snapshot(tmp_path)
    result = invoke(*COMMANDS_WRITING_DIRECTORIES[command](exports, target))
    assert_one_error_line(result, 2, "refusing to replace it")
    assert snapshot(tmp_path) == before


def test_directory_swap_never_leaves_the_target_missing(tmp_path: Path, monkeypatch):
    """Replacing a directory: at every rename the target still exists (one atomic exchange on Linux)."""
    target = tmp_path / "art"
    target.mkdir()
    (target / "manifest.json").write_text("old")
    renames: list[str] = []

    def guarded(real):
        def rename(src, dst, *args, **kwargs):
            assert target.exists(), f"{target} is missing while renaming {src} -> {dst}"
            renames.append(str(dst))
            return real(src, dst, *args, **kwargs)

        return rename

    monkeypatch.setattr(fileio.os, "replace", guarded(os.replace))
    monkeypatch.setattr(fileio.os, "rename", guarded(os.rename))
    for round_ in range(3):
        with atomic_dir(target, lambda p: (p / "manifest.json").is_file(), "ours") as tmp:
            (tmp / "manifest.json").write_text(f"new {round_}")
        assert (target / "manifest.json").read_text() == f"new {round_}"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


# --------------------------------------------------------------- 2. nothing outside the artifact is read
def _outside_copy(toy: Path, name: str) -> Path:
    outside = toy.parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    return Path(shutil.copyfile(toy / name, outside / name))


ESCAPES = {
    "dotdot-file": lambda toy: _list_outside(toy, "../elsewhere/sample.onnx"),
    "absolute-file": lambda toy: _list_outside(toy, str(_outside_copy(toy, "sample.onnx"))),
    "dotdot-graph": lambda toy: _graph_outside(toy, "../elsewhere/sample.onnx"),
    "absolute-graph": lambda toy: _graph_outside(toy, str(toy.parent / "elsewhere" / "sample.onnx")),
    "symlink-graph": lambda toy: _symlink_graph(toy),
}


def _list_outside(toy: Path, name: str) -> None:
    outside = _outside_copy(toy, "sample.onnx")
    edit_manifest(toy, lambda m: m["files"].update({name: sha256_file(outside)}), restamp=True)


def _graph_outside(toy: Path, name: str) -> None:
    outside = _outside_copy(toy, "sample.onnx")

    def change(m: dict) -> None:
        m["graphs"]["sample"]["file"] = name
        m["files"][name] = sha256_file(outside)

    edit_manifest(toy, change, restamp=True)


def _symlink_graph(toy: Path) -> None:
    outside = _outside_copy(toy, "sample.onnx")
    (toy / "sample.onnx").unlink()
    (toy / "sample.onnx").symlink_to(outside)


@pytest.mark.parametrize("case", list(ESCAPES))
def test_manifest_names_cannot_reach_outside_the_artifact(toy: Path, tmp_path: Path, case: str):
    ESCAPES[case](toy)
    result = invoke("sample", toy, "--n", 4, "--out", tmp_path / "x.npy")
    assert_one_error_line(result, 2, "outside the artifact directory")
    assert not (tmp_path / "x.npy").exists()


def test_external_data_must_be_listed_and_hashed(tmp_path: Path):
    root = write_artifact(tmp_path / "ext", external_data=True)
    open_artifact(root)  # listed and hashed: fine
    edit_manifest(root, lambda m: m["files"].pop("density.onnx.data"), restamp=True)
    with pytest.raises(BadInput, match="density.onnx.data.*does not hash"):
        open_artifact(root)


@pytest.mark.parametrize("name", ["", "/etc/passwd", "../x", "a/../../x", "a\\b", "./sample.onnx", 7, None])
def test_safe_member_refuses_every_escape(tmp_path: Path, name):
    with pytest.raises(BadInput, match="outside the artifact directory"):
        safe_member(tmp_path, name)


# -------------------------------------------------------------------------- 3. the manifest is checked
def _deep(root: Path) -> None:
    depth = 100_000
    (root / "manifest.json").write_text('{"format_version": 2, "x": ' + "[" * depth + "]" * depth + "}")


MANIFEST_ATTACKS = {
    # name: (damage, fragment of the one error line)
    "nested-wrong-type": (
        lambda r: edit_manifest(r, lambda m: m["graphs"]["sample"].update(inputs="z"), restamp=True),
        "graphs.sample.inputs",
    ),
    "block-wrong-type": (
        lambda r: edit_manifest(r, lambda m: m["blocks"][0].update(n_iter="many"), restamp=True),
        "blocks.0.n_iter",
    ),
    "deep-json": (_deep, "nested too deeply"),
    "naive-n-levels-edit": (lambda r: edit_manifest(r, lambda m: m.update(n_levels=16), restamp=False), "sha256"),
    "naive-dim-edit": (lambda r: edit_manifest(r, lambda m: m.update(dim=100), restamp=False), "sha256"),
    "forged-dim-edit": (lambda r: edit_manifest(r, lambda m: m.update(dim=100), restamp=True), "dim 100"),
    "forged-n-levels-edit": (
        lambda r: edit_manifest(r, lambda m: m.update(n_levels=16), restamp=True),
        "differs from the config",
    ),
    "forged-io": (
        lambda r: edit_manifest(r, lambda m: m["graphs"]["density"]["outputs"].pop(), restamp=True),
        "not those of its ONNX file",
    ),
}


@pytest.mark.parametrize("case", list(MANIFEST_ATTACKS))
def test_manifest_is_validated_and_integrity_checked(digits: Path, case: str):
    damage, fragment = MANIFEST_ATTACKS[case]
    damage(digits)
    assert_one_error_line(invoke("score", digits, "digits-test", "--json"), 2, fragment)


# ------------------------------------------------------- 4. configs validated, export judges what it computes
def _edit_config(checkpoint: Path, **changes) -> None:
    meta = json.loads((checkpoint / META).read_text())
    meta["config"].update(changes)
    (checkpoint / META).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"coeff": 2.0}, "'coeff'"),
        ({"hidden": -4}, "'hidden'"),
        ({"hidden": 10**7}, "'hidden'"),
        ({"logit_alpha": 0.7}, "'logit_alpha'"),
        ({"train": {"epochs": "ten"}}, "'train.epochs'"),
    ],
)
def test_export_refuses_a_bad_config_at_once(exports, tmp_path: Path, changes: dict, fragment: str):
    checkpoint = Path(shutil.copytree(exports.checkpoint("toy-resflow"), tmp_path / "ckpt"))
    _edit_config(checkpoint, **changes)
    started = time.perf_counter()
    result = invoke("export", checkpoint, "--out", tmp_path / "art")
    assert time.perf_counter() - started < 5
    assert_one_error_line(result, 2, fragment)
    assert not (tmp_path / "art").exists()


def test_an_absurd_size_is_refused_before_allocating(exports, tmp_path: Path):
    checkpoint = Path(shutil.copytree(exports.checkpoint("digits-acf-l2"), tmp_path / "ckpt"))
    _edit_config(checkpoint, data_shape=[1, 100_000, 100_000], hidden=1_000_000)
    started = time.perf_counter()
    with pytest.raises(BadInput, match="config field 'data_shape'"):
        load_checkpoint(checkpoint)
    assert time.perf_counter() - started < 1.0
    for name in ("digits-acf-l2", "digits-glow-acf", "toy-resflow"):
        validate_config(small_config(name))  # the shipped shapes pass


def test_a_block_whose_bound_is_not_below_one_is_refused_by_name(exports, tmp_path: Path, monkeypatch):
    checkpoint = exports.checkpoint("toy-resflow")  # made before the patch
    monkeypatch.setattr(ResidualBlock, "lipschitz", lambda self: 1.25)
    result = invoke("export", checkpoint, "--out", tmp_path / "art")
    assert_one_error_line(result, 1, "layers.0 has Lipschitz bound 1.2500, not below 1")
    assert not (tmp_path / "art").exists()


def test_a_block_measuring_above_its_bound_is_refused_by_name(exports, tmp_path: Path, monkeypatch):
    checkpoint = exports.checkpoint("toy-resflow")  # made (and measured) before the patch
    monkeypatch.setattr("acf_deploy.report.measured_lipschitz", lambda *args, **kwargs: 0.99)
    result = invoke("export", checkpoint, "--out", tmp_path / "art")
    assert_one_error_line(result, 1, "layers.0 measures L = 0.9900 >")
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize(
    ("guarantee", "bound", "measured", "refused"),
    [
        ("certified", 0.7, 0.69, False),
        ("certified", 0.7, 0.71, True),
        ("certified", 1.0, 0.5, True),
        ("verified", 0.9, 0.95, False),
        ("verified", 0.9, 0.951, True),
        ("verified", 0.9, float("nan"), True),
    ],
)
def test_verification_rules(guarantee: str, bound: float, measured: float, refused: bool):
    row = {"block": "layers.3", "guarantee": guarantee, "lipschitz_bound": bound, "lipschitz_measured": measured}
    failures = verification_failures([row])
    assert bool(failures) == refused and all(f.startswith("layers.3 ") for f in failures)


def test_deeply_nested_checkpoint_metadata_is_one_line(exports, tmp_path: Path):
    checkpoint = Path(shutil.copytree(exports.checkpoint("toy-resflow"), tmp_path / "ckpt"))
    (checkpoint / META).write_text("[" * 100_000 + "]" * 100_000)
    assert_one_error_line(invoke("export", checkpoint, "--out", tmp_path / "art"), 2, "nested too deeply")


def test_export_measures_the_constants_it_judges(exports, tmp_path: Path):
    """Measured constants recorded in model.json are never trusted: export measures its own."""
    checkpoint = Path(shutil.copytree(exports.checkpoint("toy-resflow"), tmp_path / "ckpt"))
    meta = json.loads((checkpoint / META).read_text())
    for row in meta["metrics"]["blocks"]:
        row["lipschitz_measured"] = 0.0
    (checkpoint / META).write_text(json.dumps(meta))
    result = invoke("export", checkpoint, "--out", tmp_path / "art")
    assert result.exit_code == 0, result.output
    blocks = open_artifact(tmp_path / "art").manifest["blocks"]
    assert all(0.01 < b["lipschitz_measured"] <= b["lipschitz_bound"] < 1 for b in blocks), blocks


# ------------------------------------------------------------ 5. one line and the documented exit code
def _save(tmp_path: Path, array: np.ndarray, name: str = "data.npy") -> Path:
    path = tmp_path / name
    np.save(path, array)
    return path


def _huge_header(tmp_path: Path, suffix: str) -> Path:
    """A .npy (or a .npz holding one) whose header claims 10^12 float64 values over a few bytes."""
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**12, 2)}
    npy = tmp_path / "huge.npy"
    with open(npy, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(b"\0" * 64)
    if suffix == ".npy":
        return npy
    import zipfile

    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.write(npy, "x.npy")
    return tmp_path / "huge.npz"


BAD_INPUTS = {
    "empty": (lambda t: _save(t, np.zeros((0, 2))), "no samples"),
    "strings": (lambda t: _save(t, np.array([["a", "b"]])), "dtype <U1"),
    "complex": (lambda t: _save(t, np.ones((3, 2), np.complex64)), "dtype complex64"),
    "boolean": (lambda t: _save(t, np.ones((3, 2), bool)), "dtype bool"),
    "huge-npy-header": (lambda t: _huge_header(t, ".npy"), "cannot be read"),
    "huge-npz-header": (lambda t: _huge_header(t, ".npz"), "cannot be read"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_score_data_is_one_line(toy: Path, tmp_path: Path, case: str):
    build, fragment = BAD_INPUTS[case]
    assert_one_error_line(invoke("score", toy, build(tmp_path)), 2, fragment)


def _a_directory(path: Path) -> Path:
    path.mkdir()
    return path


BAD_OUTPUTS = {
    "sample-out-is-a-directory": lambda a, t: ["sample", a, "--n", 4, "--out", _a_directory(t / "x.npy")],
    "sample-out-under-a-file": lambda a, t: ["sample", a, "--n", 4, "--out", _user_file(t / "f") / "x.npy"],
    "score-out-is-a-directory": lambda a, t: [
        "score",
        a,
        _save(t, np.zeros((4, 2))),
        "--out",
        _a_directory(t / "o.npy"),
    ],
    "sample-batch-absurd": lambda a, t: ["sample", a, "--n", 10**9, "--batch", 10**9, "--out", t / "x.npy"],
    "sample-threads-zero": lambda a, t: ["sample", a, "--n", 4, "--threads", 0, "--out", t / "x.npy"],
    "score-threads-zero": lambda a, t: ["score", a, _save(t, np.zeros((4, 2))), "--threads", 0],
    "sample-no-room": lambda a, t: ["sample", a, "--n", 10**14, "--out", t / "x.npy"],
}


@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
def test_bad_outputs_and_options_fail_before_any_work(toy: Path, tmp_path: Path, case: str):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args = BAD_OUTPUTS[case](toy, scratch)
    before = snapshot(scratch), sorted(p.name for p in scratch.iterdir())
    result = invoke(*args)
    assert_one_error_line(result, 2, "")
    assert (snapshot(scratch), sorted(p.name for p in scratch.iterdir())) == before


def test_no_room_names_the_numbers(toy: Path, tmp_path: Path):
    result = invoke("sample", toy, "--n", 10**14, "--out", tmp_path / "x.npy")
    assert_one_error_line(result, 2, "needs 800.0 TB, but only")


def test_a_bug_is_one_line_and_its_traceback_only_under_debug(toy: Path, tmp_path: Path, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("acf_deploy.runtime.jobs.sample_job", broken)
    args = ["sample", toy, "--n", 4, "--out", tmp_path / "x.npy"]
    assert_one_error_line(invoke(*args), 4, "internal error, a bug in acf-deploy (ZeroDivisionError")
    debug = invoke("--debug", *args)
    assert debug.exit_code == 4 and "Traceback" in debug.stderr and "ZeroDivisionError" in debug.stderr


# ------------------------------------------------------------------------ 6. leftovers and limits
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_killed_writers_are_cleaned_on_the_next_write(tmp_path: Path):
    dead, alive = _dead_pid(), os.getpid()
    stale_file = tmp_path / f".x.npy.{dead}.abcd1234.tmp"
    stale_dir = tmp_path / f".art.{dead}.abcd1234.tmpdir"
    live_file = tmp_path / f".x.npy.{alive}.efgh5678.tmp"
    other = tmp_path / f".y.npy.{dead}.abcd1234.tmp"  # another target's: left for its own next write
    stale_file.write_text("")
    stale_dir.mkdir()
    (stale_dir / "sample.onnx").write_text("")
    live_file.write_text("")
    other.write_text("")
    with atomic_path(tmp_path / "x.npy") as tmp:
        tmp.write_text("new")
    with atomic_dir(tmp_path / "art", lambda p: True, "ours") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert not stale_file.exists() and not stale_dir.exists()
    assert live_file.exists() and other.exists()


def test_sigterm_is_an_interrupt_that_leaves_nothing_behind(exports, tmp_path: Path):
    root = str(exports.artifact("toy-resflow"))
    out = tmp_path / "x.npy"
    command = [sys.executable, "-m", "acf_deploy", "sample", root, "--n", "50000000", "--batch", "4096", "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".x.npy.*.tmp")):  # it is writing
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_normal_permissions_under_the_umask(exports, tmp_path: Path):
    umask = fileio.current_umask()
    root = exports.artifact("toy-resflow")
    assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((root / "manifest.json").stat().st_mode) == 0o666 & ~umask
    result = invoke("sample", root, "--n", 4, "--out", tmp_path / "x.npy")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "x.npy").stat().st_mode) == 0o666 & ~umask


class _NullBackend:
    """Density zero for every row: what scoring costs besides the graph."""

    def density(self, x: np.ndarray, probes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return {"log_prob": np.zeros(len(x), np.float32)}


def test_score_streams_its_data_instead_of_copying_it(exports, tmp_path: Path):
    artifact = open_artifact(exports.artifact("digits-acf-l2"))
    rows = 1 << 18  # 16 MB of uint8 levels; an int64 copy would be 128 MB
    path = tmp_path / "levels.npy"
    levels = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, 1, 8, 8))
    levels[:] = np.random.default_rng(0).integers(0, 17, (rows, 1, 8, 8), dtype=np.uint8)
    del levels
    tracemalloc.start()
    try:
        data = load_score_data(artifact, str(path))
        _, loaded = tracemalloc.get_traced_memory()
        assert loaded < 8 << 20, f"loading took {loaded >> 20} MB"
        tracemalloc.reset_peak()
        log_lik, bpd = score(_NullBackend(), artifact, data[: 1 << 16], batch=256)
        _, scored = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data) == rows and math.isfinite(bpd) and len(log_lik) == 1 << 16
    assert scored < (1 << 16) * 8 + (8 << 20), f"scoring took {scored >> 20} MB"
