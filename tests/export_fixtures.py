"""Small checkpoints and their exports, built once per test session and shared by the export,
runtime and CLI tests (registered as fixtures in ``conftest.py``).

Every preset is built at a tiny size (hidden 8, one residual block per scale; two blocks for the toy
flow), its weights nudged off their initial values (gates open) so that no block is an identity, and
saved with a per-block report as training would write it, so ``export`` needs no training run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from acf_deploy.checkpoint import save_checkpoint
from acf_deploy.fileio import sha256_file
from acf_deploy.flows.presets import build_flow, preset_config
from acf_deploy.manifest import write_manifest
from acf_deploy.pipeline import ExportOptions, export_artifact
from acf_deploy.report import block_report

PRESETS = ("digits-acf-l2", "digits-acf-dp", "digits-resflow", "digits-glow", "digits-glow-acf", "toy-resflow")
LOGDETS = ("exact", "series")
INVERSES = ("loop", "unroll")
DEFAULT = ("exact", "loop")
#: presets exported in every ``--logdet`` x ``--inverse`` combination (all of them with ACF_FULL_MATRIX=1).
FULL_MATRIX_PRESETS = PRESETS if os.environ.get("ACF_FULL_MATRIX") else ("digits-acf-l2", "toy-resflow")


def matrix() -> list[tuple[str, str, str]]:
    """(preset, logdet, inverse): every preset with the defaults, every combination on a few presets."""
    cases = [(name, *DEFAULT) for name in PRESETS]
    for name in FULL_MATRIX_PRESETS:
        cases += [(name, ld, inv) for ld in LOGDETS for inv in INVERSES if (ld, inv) != DEFAULT]
    if ("digits-glow", "series", "loop") not in cases:  # no residual block reads the probes (a past bug)
        cases.append(("digits-glow", "series", "loop"))
    return cases


def small_config(name: str) -> dict:
    """The preset shrunk for tests: same host, scales layout, attention and preprocessing (hidden 8, one
    residual block per scale; two blocks for the toy flow)."""
    if name == "toy-resflow":
        return preset_config(name, blocks=2, hidden=8)
    scales = [1, 1, 1] if name.startswith("cifar") else [1, 1]
    return preset_config(name, hidden=8, scales=scales)


def make_checkpoint(name: str, directory: Path, seed: int = 0) -> Path:
    """A small, untrained but non-trivial checkpoint of preset ``name``."""
    generator = torch.Generator().manual_seed(seed)
    config = small_config(name)
    flow = build_flow(config)
    shape = config["data_shape"]
    if config["n_levels"]:
        data = torch.rand(64, *shape, generator=generator)
    else:
        data = torch.randn(64, *shape, generator=generator)
    flow.initialize(data)
    with torch.no_grad():
        for pname, p in flow.named_parameters():
            if pname.endswith(("gamma", "theta")):  # gates open
                p.fill_(0.5)
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    metrics = {}
    baked = copy.deepcopy(flow).bake()
    if not any(block.guarantee == "verified" for block in baked.residual_blocks()):
        # what training writes; export measures verified (ACF-DP) blocks itself in any case
        metrics["blocks"] = block_report(baked, data[:16], None, n_iter=4, steps=4)
    save_checkpoint(flow, config, directory, metrics)
    return directory


class ExportStore:
    """Checkpoints and exported artifact directories, made on first use and then shared."""

    def __init__(self, root: Path):
        self.root = root
        self._checkpoints: dict[str, Path] = {}
        self._artifacts: dict[tuple[str, str, str], Path] = {}

    def checkpoint(self, name: str) -> Path:
        if name not in self._checkpoints:
            self._checkpoints[name] = make_checkpoint(name, self.root / "checkpoints" / name)
        return self._checkpoints[name]

    def artifact(self, name: str, logdet: str = "exact", inverse: str = "loop") -> Path:
        """The artifact directory of ``name`` exported with ``--logdet logdet --inverse inverse``.

        Tests must not modify it: copy it first (:func:`copy_artifact`).
        """
        key = (name, logdet, inverse)
        if key not in self._artifacts:
            target = self.root / "artifacts" / "-".join(key)
            opts = ExportOptions(logdet=logdet, inverse=inverse, terms=6, probes=2)
            export_artifact(self.checkpoint(name), target, opts)
            self._artifacts[key] = target
        return self._artifacts[key]

    def built(self) -> list[tuple[tuple[str, str, str], Path]]:
        return sorted(self._artifacts.items())


def copy_artifact(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rehash(artifact_dir: Path) -> None:
    """Rewrite the manifest's sha256 of every file and its own digest, as a deliberate forger would."""
    manifest_path = artifact_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = {name: sha256_file(artifact_dir / name) for name in manifest["files"]}
    write_manifest(manifest_path, manifest)


def all_graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph (Loop bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            for sub in attr.graphs:
                yield from all_graphs(sub)


def block_initializers(model: onnx.ModelProto, layer: str) -> list[str]:
    """Float initializers whose name carries ``layer``'s module path and whose every user is one of its nodes."""
    users: dict[str, list[str]] = {}
    for graph in all_graphs(model.graph):
        for node in graph.node:
            for name in node.input:
                users.setdefault(name, []).append(node.name)
    prefix, scope = f"flow.{layer}.", f"/flow/{layer}/"
    return [
        init.name
        for init in model.graph.initializer
        if init.name.startswith(prefix)
        and init.data_type == onnx.TensorProto.FLOAT
        and users.get(init.name)
        and all(user.startswith(scope) for user in users[init.name])
    ]


def corrupt_block(artifact_dir: Path, layer: str) -> list[str]:
    """Perturb every initializer used only by ``layer``'s nodes in ``density.onnx``; re-hash the manifest."""
    path = artifact_dir / "density.onnx"
    model = onnx.load(str(path))
    names = block_initializers(model, layer)
    for init in model.graph.initializer:
        if init.name in names:
            value = onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.numpy_helper.from_array((value * 1.5 + 0.05).astype(np.float32), init.name))
    onnx.save(model, str(path))
    rehash(artifact_dir)
    return names


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> ExportStore:
    return ExportStore(tmp_path_factory.mktemp("exports"))
