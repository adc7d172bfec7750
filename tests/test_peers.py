"""Peers beside the ONNX Runtime backend: OpenVINO runs the same ONNX graphs to the same numbers and refuses
what ONNX Runtime refuses; torch.compile matches the eager reference; ``bench`` reports a peer that cannot
run here instead of crashing, and times the ones that can (structure only: no test asserts speed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from acf_deploy.artifact import open_artifact
from acf_deploy.cli import app
from acf_deploy.errors import BackendUnavailable, BadInput
from acf_deploy.runtime import open_backend
from acf_deploy.runtime.ort_backend import OrtBackend

from .toy_artifact import DATA_SHAPE, DIM, PROBES, write_artifact

runner = CliRunner()
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(
    not HAS_OPENVINO, reason="openvino is not installed (pip install 'acf-deploy[openvino]')"
)


def _toy_inputs(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, batch])
    z = rng.standard_normal((batch, DIM)).astype(np.float32)
    x = rng.random((batch, *DATA_SHAPE)).astype(np.float32)
    probes = (rng.integers(0, 2, (batch, PROBES, DIM)) * 2 - 1).astype(np.float32)
    return z, x, probes


# ------------------------------------------------------------------------------------------ OpenVINO
@needs_openvino
@pytest.mark.parametrize("name", ["openvino", "openvino-static"])
def test_openvino_matches_onnx_runtime_on_the_toy(tmp_path: Path, name: str):
    artifact = open_artifact(write_artifact(tmp_path / "art", external_data=True))  # density reads .onnx.data
    with OrtBackend(artifact, threads=1) as ort, open_backend(name, artifact, threads=1) as ov:
        assert ov.name == name
        for batch in (1, 5, 5, 1):  # static: a compilation per size, then reused
            z, x, probes = _toy_inputs(batch)
            for got, want in ((ov.sample(z, 0.8), ort.sample(z, 0.8)), (ov.density(x, probes), ort.density(x, probes))):
                assert got.keys() == want.keys()
                for key in want:
                    assert got[key].shape == want[key].shape, key
                    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
        seconds = ov.prepare("sample", 7)
        assert (seconds is None) == (name == "openvino")
        if name == "openvino-static":
            assert sorted(ov._compiled["sample"]) == [1, 5, 7]


@needs_openvino
@pytest.mark.parametrize("name", ["openvino", "openvino-static"])
def test_openvino_batch_shards_give_the_same_outputs_as_one_stream(tmp_path: Path, name: str):
    """``threads`` split a large batch over single-threaded OpenVINO streams, as ONNX Runtime's backend does."""
    artifact = open_artifact(write_artifact(tmp_path / "art"))
    z, x, probes = _toy_inputs(41)  # 3 shards of 13, 14 and 14 rows
    with open_backend(name, artifact, threads=1) as one, open_backend(name, artifact, threads=3) as three:
        assert len(three._bounds(41)) == 4 and len(three._bounds(20)) == 3 and len(three._bounds(15)) == 2
        if name == "openvino-static":
            three.prepare("sample", 41)
            assert sorted(three._compiled["sample"]) == [13, 14]
        for got, want in ((three.sample(z), one.sample(z)), (three.density(x, probes), one.density(x, probes))):
            for key in want:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6, err_msg=key)


@needs_openvino
def test_openvino_refuses_a_tampered_graph_and_missing_probes(tmp_path: Path):
    root = write_artifact(tmp_path / "art", external_data=True)
    data = bytearray((root / "density.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "density.onnx.data").write_bytes(bytes(data))
    artifact = open_artifact(root, verify=False)  # each consumer checks the files it reads
    with pytest.raises(BadInput, match="sha256"):
        open_backend("openvino", artifact, threads=1)
    with open_backend("openvino", artifact, threads=1, graphs=("sample",)) as ov:
        assert ov.sample(_toy_inputs(2)[0])["x"].shape == (2, *DATA_SHAPE)
    good = open_artifact(write_artifact(tmp_path / "good"))
    with open_backend("openvino", good, threads=1) as ov, pytest.raises(BadInput, match="probes"):
        ov.density(_toy_inputs(2)[1])


def test_missing_openvino_is_one_line_exit_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    root = write_artifact(tmp_path / "art")
    with pytest.raises(BackendUnavailable, match=r"install acf-deploy\[openvino\]"):
        open_backend("openvino", open_artifact(root))
    result = runner.invoke(
        app, ["sample", str(root), "--backend", "openvino", "--n", "2", "--out", str(tmp_path / "x.npy")]
    )
    assert result.exit_code == 3, result.output
    assert "acf-deploy[openvino]" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "x.npy").exists()


@needs_openvino
def test_check_cli_passes_on_openvino(exports):
    root = exports.artifact("toy-resflow")
    result = runner.invoke(app, ["check", str(root), "--backend", "openvino", "--n", "32", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True


# ------------------------------------------------------------------------------------ bench with peers
def test_bench_reports_unavailable_peers_and_times_the_rest(exports, monkeypatch: pytest.MonkeyPatch):
    """torch.compile without a compiler fails when opened; a peer failing to compile a cell's shape fails in
    ``prepare``: both are listed with their reason and the benchmark finishes."""
    from acf_deploy.runtime import torch_compile_backend

    monkeypatch.setattr(torch_compile_backend, "compiler_problem", lambda: "no C++ compiler here (test)")
    peers = ["torch-compile", "openvino"]
    if HAS_OPENVINO:
        from acf_deploy.runtime.openvino_backend import OpenVinoBackend

        original = OpenVinoBackend._compile

        def refuse_batch_3(self, graph, batch):
            if batch == 3:
                raise BackendUnavailable("OpenVINO cannot compile the sample graph: refused by the test")
            return original(self, graph, batch)

        monkeypatch.setattr(OpenVinoBackend, "_compile", refuse_batch_3)
        peers.append("openvino-static")
    root = exports.artifact("toy-resflow")
    args = ["bench", str(root), "--backends", ",".join(["ort", *peers]), "--batch", "1,3", "--what", "sample,density"]
    args += ["--repeats", "1", "--warmup", "0", "--threads", "1", "--max-seconds", "5", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["unavailable"]["torch-compile"] == "no C++ compiler here (test)"
    cells = {(r["backend"], r["what"], r["batch"]) for r in report["results"]}
    assert not any(b == "torch-compile" for b, _, _ in cells)
    if not HAS_OPENVINO:
        assert "acf-deploy[openvino]" in report["unavailable"]["openvino"]
        return
    assert "refused by the test" in report["unavailable"]["openvino-static"]
    assert ("openvino-static", "sample", 1) in cells and ("openvino-static", "sample", 3) not in cells
    for row in report["results"]:
        if row["backend"] in ("ort", "openvino", "openvino-static"):
            assert row["max_abs_diff_vs_torch"] < 1e-3, row
        assert (row["compile_s"] is not None) == (row["backend"] == "openvino-static"), row
    assert {("openvino", w, b) for w in ("sample", "density") for b in (1, 3)} <= cells
    assert report["machine"]["openvino"]


# ------------------------------------------------------------------------------------- torch.compile
def _compiled_toy(exports):
    from acf_deploy.runtime.torch_compile_backend import TorchCompileBackend, compiler_problem

    if compiler_problem():
        pytest.skip(compiler_problem())
    artifact = open_artifact(exports.artifact("toy-resflow"))
    return artifact, TorchCompileBackend(artifact, threads=1)


def test_torch_compile_samples_like_eager(exports):
    """The toy's sampler compiles in a few seconds (a cold inductor cache included)."""
    from acf_deploy.runtime.torch_backend import TorchBackend

    artifact, compiled = _compiled_toy(exports)
    z = np.random.default_rng(0).standard_normal((6, artifact.dim)).astype(np.float32)
    with TorchBackend(artifact, threads=1) as eager, compiled:
        assert compiled.prepare("sample", 6) > 0
        assert compiled.compile_cache["sample/6"] in ("hit", "miss")
        got, want = compiled.sample(z, 0.9), eager.sample(z, 0.9)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.slow  # the density graph compiles for about 15 s, and the bench compiles again
def test_torch_compile_density_and_bench_report_compile_time(exports):
    from acf_deploy.runtime.torch_backend import TorchBackend

    artifact, compiled = _compiled_toy(exports)
    x = np.random.default_rng(0).standard_normal((6, *artifact.data_shape)).astype(np.float32)
    with TorchBackend(artifact, threads=1) as eager, compiled:
        got, want = compiled.density(x), eager.density(x)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-4, err_msg=key)
    args = ["bench", str(artifact.root), "--backends", "torch-compile", "--batch", "2", "--what", "sample"]
    args += ["--repeats", "1", "--warmup", "0", "--threads", "1", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    row = next(r for r in report["results"] if r["backend"] == "torch-compile")
    assert row["compile_s"] > 0 and row["max_abs_diff_vs_torch"] < 1e-4
    info = report["backends"]["torch-compile"]
    assert info["compile_s"]["sample"]["2"] == row["compile_s"]
    assert info["compile_cache"]["sample/2"] in ("hit", "miss", "reused")


# ------------------------------------------------------------------------------------ BENCHMARKS.md text
def _benchmarks_run():
    spec = importlib.util.spec_from_file_location("benchmarks_run", Path(__file__).parents[1] / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_peer_text_follows_the_numbers():
    run = _benchmarks_run()
    medians = {  # (backend, graph, batch) -> median ms
        ("ort", "sample", 1): 2.0,
        ("torch-compile", "sample", 1): 6.0,
        ("openvino-static", "sample", 1): 1.0,  # a peer twice as fast
        ("ort", "sample", 256): 100.0,
        ("openvino-static", "sample", 256): 98.0,  # within 5%: level
        ("ort", "density", 1): 10.0,
        ("openvino", "density", 1): 20.0,  # ORT 2x faster: goal met
        ("ort", "density", 256): 100.0,
    }
    rows = [{"backend": b, "what": w, "batch": n, "median_ms": ms} for (b, w, n), ms in medians.items()]
    report = {"results": rows, "unavailable": {"openvino": "not at density 256 (test)"}}
    ratios = {(w, n): (peer, ratio) for w, n, peer, ratio in run.peer_ratios(report)}
    assert ratios[("sample", 1)] == ("openvino-static", 0.5)
    assert ratios[("density", 1)] == ("openvino", 2.0) and ratios[("density", 256)] == (None, None)
    note = run.peer_note(report)
    assert "**openvino-static is faster than ONNX Runtime at sample batch 1** (1 ms vs 2 ms, 2.00x)" in note
    assert (
        "`--backend openvino-static`" in note and "sample batch 256 openvino-static and ONNX Runtime are level" in note
    )
    assert "at least 1.5x faster than the best peer at density batch 1 (2.00x over openvino)" in note
    assert "`openvino` was not measured: not at density 256 (test)." in note
    lines = run.peer_table(report).splitlines()
    assert lines[0].startswith("| graph | batch | ORT ms | torch-compile ms | ORT speed-up vs torch-compile |")
    assert "| sample | 1 | 2 | 6 | 3 |" in lines[2]
