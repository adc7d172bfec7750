"""The artifact directory written by ``export`` and read by every backend (DESIGN 3).

Layout: ``sample.onnx``, ``density.onnx``, ``golden.npz``, ``manifest.json`` and optional
``engines/<key>/``. The manifest hashes every file; :func:`open_artifact` refuses a mismatch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadInput
from .fileio import sha256_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
#: Files under this prefix (the checkpoint copy for the torch reference) may be absent: parity against
#: ``golden.npz`` and every non-torch backend work without them. When present they must match.
OPTIONAL_PREFIX = "checkpoint/"


@dataclass
class Artifact:
    root: Path
    manifest: dict[str, Any]

    def path(self, name: str) -> Path:
        return self.root / name

    def graph_path(self, graph: str) -> Path:
        """Path of ``sample`` or ``density`` ONNX file."""
        return self.root / self.manifest["graphs"][graph]["file"]

    def graph_io(self, graph: str) -> dict[str, list[dict[str, Any]]]:
        spec = self.manifest["graphs"][graph]
        return {"inputs": spec["inputs"], "outputs": spec["outputs"]}

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["data_shape"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def logdet_mode(self) -> str:
        return self.manifest["logdet"]["mode"]

    @property
    def n_probes(self) -> int:
        return int(self.manifest["logdet"].get("probes", 0))

    def verify_file(self, name: str) -> Path:
        """Return the path of ``name`` after checking its sha256 against the manifest."""
        expected = self.manifest.get("files", {}).get(name)
        path = self.root / name
        if expected is None:
            raise BadInput(f"{name} is not listed in {self.root / MANIFEST}; re-export the artifact")
        if not path.is_file():
            raise BadInput(f"{path} is missing; re-export the artifact")
        actual = sha256_file(path)
        if actual != expected:
            raise BadInput(f"{path} does not match the sha256 in its manifest (tampered or truncated); re-export")
        return path


def open_artifact(root: str | Path, verify: bool = True) -> Artifact:
    """Load and validate an artifact directory; with ``verify`` every listed file's hash is checked."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise BadInput(f"{root} is not an artifact directory; run `acf-deploy export` first")
    if not manifest_path.is_file():
        raise BadInput(f"{manifest_path} is missing; run `acf-deploy export` to create the artifact")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{manifest_path} is not valid JSON ({exc.__class__.__name__}); re-export") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise BadInput(
            f"{manifest_path} has format version {found!r}, this acf-deploy reads {FORMAT_VERSION}; re-export"
        )
    expected_types = {
        "graphs": dict,
        "files": dict,
        "data_shape": list,
        "dim": int,
        "logdet": dict,
        "blocks": list,
        "config": dict,
        "inverse": dict,
        "iterations": dict,
        "preset": str,
    }
    for key, kind in expected_types.items():
        if not isinstance(manifest.get(key), kind):
            problem = "lacks the field" if key not in manifest else f"has a malformed (not {kind.__name__})"
            raise BadInput(f"{manifest_path} {problem} {key!r}; re-export")
    for graph in ("sample", "density"):
        if not isinstance(manifest["graphs"].get(graph), dict) or "file" not in manifest["graphs"][graph]:
            raise BadInput(f"{manifest_path} does not describe the {graph} graph; re-export")
    artifact = Artifact(root=root, manifest=manifest)
    if verify:
        for name in manifest["files"]:
            if name.startswith(OPTIONAL_PREFIX) and not (root / name).exists():
                continue  # only the torch reference backend needs it, and it verifies it itself
            artifact.verify_file(name)
    return artifact
