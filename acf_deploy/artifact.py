"""The artifact directory written by ``export`` and read by every backend.

Layout: ``sample.onnx``, ``density.onnx``, ``golden.npz``, ``checkpoint/``, ``manifest.json`` and optional
``engines/<key>/``. Every file name read from the manifest or from a graph's external-data references
goes through :func:`safe_member`, so nothing outside the directory is ever opened. The manifest hashes
every file (ONNX external data included) and is itself covered by a digest (:mod:`acf_deploy.manifest`);
:func:`open_artifact` refuses a mismatch, an edited manifest, and fields that disagree with the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import onnx

from .errors import BadInput
from .fileio import is_temporary, read_json, sha256_file
from .manifest import FORMAT_VERSION, MANIFEST, read_manifest

__all__ = ["FORMAT_VERSION", "MANIFEST", "Artifact", "is_artifact_dir", "open_artifact", "safe_member"]

#: Files under this prefix (the checkpoint copy for the torch reference) may be absent: parity against
#: ``golden.npz`` and every non-torch backend work without them. When present they must match.
OPTIONAL_PREFIX = "checkpoint/"
#: TensorRT engines and timing caches, written by ``build`` after the export.
ENGINES_DIR = "engines"


def safe_member(root: Path, name: Any, source: str = MANIFEST) -> Path:
    """``root / name`` for a ``name`` read from ``source``, refused unless it stays inside ``root``.

    A name must be a plain relative POSIX path (no absolute path, no ``..``, no backslash), and the
    path must still be inside ``root`` once symlinks are resolved.
    """
    pure = PurePosixPath(name) if isinstance(name, str) else None
    if (
        pure is None
        or not name
        or "\0" in name
        or "\\" in name
        or pure.is_absolute()
        or ".." in pure.parts
        or pure.as_posix() != name
    ):
        raise BadInput(f"{source} names {name!r} outside the artifact directory; refused")
    path = root / pure
    if not path.resolve().is_relative_to(root.resolve()):
        raise BadInput(f"{source} names {name!r}, a link outside the artifact directory; refused")
    return path


def external_locations(model: onnx.ModelProto) -> set[str]:
    """Every external-data location named by tensors of the model, subgraphs included."""
    found: set[str] = set()

    def visit_tensor(tensor: onnx.TensorProto) -> None:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            found.update(e.value for e in tensor.external_data if e.key == "location")

    def visit_graph(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            visit_tensor(tensor)
        for sparse in graph.sparse_initializer:
            visit_tensor(sparse.values)
            visit_tensor(sparse.indices)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    visit_tensor(attr.t)
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    visit_graph(sub)

    visit_graph(model.graph)
    return found


@dataclass
class Artifact:
    root: Path
    manifest: dict[str, Any]

    def path(self, name: str) -> Path:
        """The path of file ``name`` of the artifact (never outside it)."""
        return safe_member(self.root, name)

    def graph_path(self, graph: str) -> Path:
        """Path of ``sample`` or ``density`` ONNX file."""
        return self.path(self.manifest["graphs"][graph]["file"])

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
    def schedule(self) -> str:
        """How the sampler iterates each block: ``plain`` or ``anderson`` (artifacts before it: plain)."""
        return self.manifest["inverse"].get("schedule", "plain")

    @property
    def n_probes(self) -> int:
        return int(self.manifest["logdet"].get("probes") or 0)

    def verify_file(self, name: str) -> Path:
        """Return the path of ``name`` after checking its sha256 against the manifest."""
        expected = self.manifest.get("files", {}).get(name)
        path = self.path(name)
        if expected is None:
            raise BadInput(f"{name} is not listed in {self.root / MANIFEST}; re-export the artifact")
        if not path.is_file():
            raise BadInput(f"{path} is missing; re-export the artifact")
        actual = sha256_file(path)
        if actual != expected:
            raise BadInput(f"{path} does not match the sha256 in its manifest (tampered or truncated); re-export")
        return path

    def load_graph(self, graph: str) -> onnx.ModelProto:
        """The graph's ONNX structure (external data not loaded), after checking its sha256."""
        path = self.verify_file(self.manifest["graphs"][graph]["file"])
        try:
            return onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
            raise BadInput(f"{path} is not a readable ONNX file ({exc.__class__.__name__}); re-export") from None

    def graph_files(self, graph: str, model: onnx.ModelProto | None = None) -> list[str]:
        """The graph's file and every external-data file it reads: inside the artifact and hashed."""
        name = self.manifest["graphs"][graph]["file"]
        model = model if model is not None else self.load_graph(graph)
        folder = PurePosixPath(name).parent
        names = [name]
        for location in sorted(external_locations(model)):
            source = f"{name} (external data)"
            member = (folder / location).as_posix()
            safe_member(self.root, member, source)
            if member not in self.manifest["files"]:
                raise BadInput(f"{source} names {member!r}, which the manifest does not hash; re-export")
            names.append(member)
        return names

    def verify_graph(self, graph: str) -> Path:
        """The graph's path after checking the sha256 of its file and of every external-data file."""
        for name in self.graph_files(graph):
            self.verify_file(name)
        return self.graph_path(graph)

    def check_graph_io(self, graph: str, model: onnx.ModelProto) -> None:
        """The manifest's inputs and outputs of ``graph`` must be those of the ONNX file itself."""
        spec = self.graph_io(graph)
        for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
            found = [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]
            listed = [(t["name"], list(t["shape"])) for t in spec[kind]]
            if found != listed:
                raise BadInput(
                    f"{self.root / MANIFEST}: the {graph} graph's {kind} {listed} are not those of its ONNX file "
                    f"{found}; re-export"
                )


def is_artifact_dir(path: Path) -> bool:
    """Whether ``path`` holds an artifact of ours and nothing else (so re-exporting over it loses nothing).

    Ours: its ``manifest.json`` is an acf-deploy manifest (any format version), and every other file is
    one it lists, a TensorRT engine or timing cache, or one of our temporaries.
    """
    try:
        manifest = read_json(path / MANIFEST, "an artifact manifest")
    except (BadInput, OSError):
        return False
    if not (
        isinstance(manifest, dict)
        and isinstance(manifest.get("format_version"), int)
        and isinstance(manifest.get("graphs"), dict)
        and isinstance(manifest.get("files"), dict)
    ):
        return False
    listed = set(manifest["files"]) | {MANIFEST}
    for entry in path.rglob("*"):
        name = entry.relative_to(path).as_posix()
        if entry.is_dir() and not entry.is_symlink():
            continue
        if name not in listed and not name.startswith(f"{ENGINES_DIR}/") and not is_temporary(entry.name):
            return False
    return True


def open_artifact(root: str | Path, verify: bool = True) -> Artifact:
    """Load and validate an artifact directory.

    Always: the manifest's schema, digest and the agreement of its fields, and that every file it lists
    is inside ``root``. With ``verify``, also every listed file's sha256 and, for each graph, its external
    data and its inputs and outputs.
    """
    root = Path(root)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise BadInput(f"{root} is not an artifact directory; run `acf-deploy export` first")
    if not manifest_path.is_file():
        raise BadInput(f"{manifest_path} is missing; run `acf-deploy export` to create the artifact")
    artifact = Artifact(root=root, manifest=read_manifest(manifest_path))
    for name in artifact.manifest["files"]:
        artifact.path(name)  # every listed name (graphs and engines among them) stays inside
    if verify:
        for name in artifact.manifest["files"]:
            if name.startswith(OPTIONAL_PREFIX) and not artifact.path(name).exists():
                continue  # only the torch reference backend needs it, and it verifies it itself
            artifact.verify_file(name)
        for graph in ("sample", "density"):
            model = artifact.load_graph(graph)
            artifact.graph_files(graph, model)
            artifact.check_graph_io(graph, model)
    return artifact
