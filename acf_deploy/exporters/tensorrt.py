"""Compile an artifact's ONNX graphs to TensorRT engines.

One precision path for TensorRT 10 and 11: the network is created strongly typed, so every tensor's
type comes from the exported graph. TensorRT 11 removed the weak-typing flags (``BuilderFlag.FP16``
and friends) and ignores ``STRONGLY_TYPED``; 10.x needs the flag to opt in. fp16/bf16 engines
therefore need an artifact exported at that precision, and a build that would silently be fp32 fails.

Engines are cached under ``engines/<key>/`` where the key hashes everything that makes a plan valid
(graph, profile, precision, TensorRT version, GPU, CUDA); a matching engine is reused, and the timing cache is shared across builds.
TensorRT is imported lazily: where it cannot run, one :class:`BackendUnavailable` line says why.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import onnx

from .. import trt_util
from ..artifact import MANIFEST, Artifact, open_artifact
from ..errors import BadInput, CheckFailed
from ..fileio import atomic_path, check_output_file, check_writable
from ..manifest import write_manifest
from ..trt_util import DeviceInfo, TrtLogger

if TYPE_CHECKING:
    import tensorrt

__all__ = [
    "PRECISIONS",
    "DEFAULT_BATCH",
    "DEFAULT_WORKSPACE_MB",
    "parse_batch",
    "build_engines",
]

PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_BATCH = (1, 64, 1024)
DEFAULT_WORKSPACE_MB = 4096
ENGINES_DIR = "engines"


def parse_batch(text: str) -> tuple[int, int, int]:
    """Parse ``MIN:OPT:MAX`` for ``--batch``."""
    parts = text.split(":")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise BadInput(f"--batch takes MIN:OPT:MAX, e.g. 1:64:1024, not {text!r}")
    return _check_batch(tuple(int(p) for p in parts))


def _check_batch(batch: tuple[int, ...]) -> tuple[int, int, int]:
    if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise BadInput(f"batch profile must satisfy 1 <= MIN <= OPT <= MAX, got {batch}")
    return batch[0], batch[1], batch[2]


# -- what goes into a build ---------------------------------------------------------------------


@dataclass(frozen=True)
class _GraphSource:
    """One graph of the artifact: its path, the hashes of its files, its inputs and the profile shapes
    of those with a batch axis (static inputs need none)."""

    name: str
    path: Path
    hashes: dict[str, str]
    inputs: tuple[str, ...]
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def _graph_source(artifact: Artifact, graph: str, batch: tuple[int, int, int]) -> _GraphSource:
    model = artifact.load_graph(graph)
    names = artifact.graph_files(graph, model)  # inside the artifact and hashed, external data included
    hashes = {}
    for name in names:
        artifact.verify_file(name)
        hashes[name] = artifact.manifest["files"][name]
    path = artifact.graph_path(graph)
    axis = artifact.manifest.get("batch_axis", "batch")
    initializers = {t.name for t in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    profile = {}
    for value in inputs:
        shapes = _profile_shapes(path.name, value, axis, batch)
        if shapes is not None:
            profile[value.name] = shapes
    return _GraphSource(graph, path, hashes, tuple(v.name for v in inputs), profile)


def _profile_shapes(
    file: str, value: onnx.ValueInfoProto, axis: str, batch: tuple[int, int, int]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """Min/opt/max shapes of one input: the named batch axis varies, every other dim must be static.
    None for a fully static input."""
    shapes: list[list[int]] = [[], [], []]
    batched = False
    for i, dim in enumerate(value.type.tensor_type.shape.dim):
        if dim.HasField("dim_value"):
            sizes = (dim.dim_value,) * 3
        elif dim.dim_param == axis:
            sizes, batched = batch, True
        else:
            raise BadInput(
                f"input {value.name!r} of {file} has dynamic dim {i} ({dim.dim_param or 'unnamed'}) besides "
                f"the batch axis {axis!r}; the TensorRT profile varies only the batch"
            )
        for shape, size in zip(shapes, sizes, strict=True):
            shape.append(size)
    if not batched:
        return None
    low, opt, high = (tuple(s) for s in shapes)
    return low, opt, high


def _engine_key(source: _GraphSource, precision: str, trt: ModuleType, device: DeviceInfo) -> dict[str, Any]:
    return {
        "graph": source.name,
        "files": source.hashes,
        "profile": {name: [list(s) for s in shapes] for name, shapes in source.profile.items()},
        "precision": precision,
        "tensorrt": trt.__version__,
        "gpu": device.name,
        "compute_capability": device.compute_capability,
        "cuda": device.cuda,
    }


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


# -- building -----------------------------------------------------------------------------------


def _build_request(
    artifact_dir: str | os.PathLike,
    precision: str,
    batch: tuple[int, ...],
    workspace_mb: int,
    timing_cache: str | os.PathLike | None,
) -> tuple[Artifact, list[_GraphSource]]:
    """Check a build request before TensorRT is touched: the artifact and what each graph's build reads."""
    if precision not in PRECISIONS:
        raise BadInput(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    batch = _check_batch(tuple(batch))
    if workspace_mb < 1:
        raise BadInput(f"--workspace must be at least 1 MB, got {workspace_mb}")
    # Only the files a build reads are verified (in _graph_source): a tampered engine is rebuilt, not fatal.
    artifact = open_artifact(artifact_dir, verify=False)
    check_writable(artifact.root)
    if timing_cache is not None:
        check_output_file(timing_cache)
    exported = artifact.manifest.get("precision", "fp32")
    if precision != exported:
        raise BadInput(
            f"{artifact.root} was exported at {exported}; a {precision} engine needs a {precision} export "
            f"(strongly typed TensorRT takes precision from the graph): re-export at --precision {precision}"
        )
    return artifact, [_graph_source(artifact, graph, batch) for graph in artifact.manifest["graphs"]]


def build_engines(
    artifact_dir: str | os.PathLike,
    precision: str = "fp32",
    batch: tuple[int, int, int] = DEFAULT_BATCH,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Build (or reuse) one engine per graph and record it in the manifest.

    Returns ``{"engines": {graph: {"key", "file", "sha256", "reused", "build_s", "half_layers"}},
    "timing_cache": path}``. Raises BadInput for a precision the artifact was not exported at, a bad
    profile or external data outside the artifact; CheckFailed for parser or build errors (node by
    node); BackendUnavailable when TensorRT cannot run here.
    """
    artifact, sources = _build_request(artifact_dir, precision, batch, workspace_mb, timing_cache)
    trt = trt_util.import_tensorrt()
    device = trt_util.cuda_device()
    logger = trt_util.make_logger(trt)
    cache_path = Path(timing_cache) if timing_cache else _default_cache_path(artifact, trt, device)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    manifest = copy.deepcopy(artifact.manifest)
    engines = manifest.setdefault("engines", {})
    builder = None
    results: dict[str, dict[str, Any]] = {}
    for source in sources:
        material = _engine_key(source, precision, trt, device)
        key = _digest(json.dumps(material, sort_keys=True).encode())
        rel = f"{ENGINES_DIR}/{key}/{source.name}.plan"
        entry = engines.get(key)
        if entry is not None and _engine_intact(artifact, rel, entry):
            results[source.name] = {**_summary(key, entry), "reused": True, "build_s": 0.0}
            continue
        builder = builder or trt_util.create_builder(trt, logger)
        start = time.perf_counter()
        plan, half_layers, cache_bytes = _build_one(trt, builder, logger, source, precision, workspace_mb, cache_bytes)
        with atomic_path(artifact.root / rel) as tmp:
            tmp.write_bytes(plan)
        entry = {**material, "file": rel, "sha256": _digest(plan), "half_layers": half_layers}
        engines.pop(key, None)
        engines[key] = entry
        manifest["files"][rel] = entry["sha256"]
        results[source.name] = {
            **_summary(key, entry),
            "reused": False,
            "build_s": round(time.perf_counter() - start, 3),
        }
    if any(not r["reused"] for r in results.values()):
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(cache_bytes)
        _forget_missing_engines(artifact.root, manifest)
        write_manifest(artifact.root / MANIFEST, manifest)
    return {"engines": results, "timing_cache": str(cache_path)}


def _default_cache_path(artifact: Artifact, trt: ModuleType, device: DeviceInfo) -> Path:
    """Timing caches are only valid for one TensorRT, GPU and CUDA: name the file after them."""
    tag = _digest(f"{trt.__version__}|{device.name}|{device.compute_capability}|{device.cuda}".encode())
    return artifact.root / ENGINES_DIR / f"timing-{tag[:16]}.cache"


def _engine_intact(artifact: Artifact, rel: str, entry: dict[str, Any]) -> bool:
    path = artifact.root / rel
    if entry.get("file") != rel or not path.is_file():
        return False
    expected = artifact.manifest["files"].get(rel)
    return expected == entry.get("sha256") and _digest(path.read_bytes()) == expected


def _summary(key: str, entry: dict[str, Any]) -> dict[str, Any]:
    return {"key": key, "file": entry["file"], "sha256": entry["sha256"], "half_layers": entry["half_layers"]}


def _forget_missing_engines(root: Path, manifest: dict[str, Any]) -> None:
    """Drop manifest entries whose engine file is gone, so hashes cover exactly what is on disk."""
    for key, entry in list(manifest["engines"].items()):
        if not (root / entry["file"]).is_file():  # listed, so inside the artifact (open_artifact)
            del manifest["engines"][key]
            manifest["files"].pop(entry["file"], None)


def _build_one(
    trt: ModuleType,
    builder: tensorrt.Builder,
    logger: TrtLogger,
    source: _GraphSource,
    precision: str,
    workspace_mb: int,
    cache_bytes: bytes,
) -> tuple[bytes, float, bytes]:
    """Parse, configure and build one graph; returns the plan, the half-precision share, the timing cache."""
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(source.path)):
        raise CheckFailed(_parser_report(parser, source.path.name))
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(source.inputs):
        raise CheckFailed(
            f"TensorRT sees inputs {sorted(inputs)} in {source.path.name}, ONNX has {sorted(source.inputs)}"
        )
    half_layers = _half_share(trt, network, precision, source.path.name)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in source.profile.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        reason = logger.errors() or "no reason logged"
        raise CheckFailed(f"TensorRT could not build an engine for {source.path.name}: {reason}")
    return bytes(plan), half_layers, bytes(config.get_timing_cache().serialize())


def _parser_report(parser: tensorrt.OnnxParser, file: str) -> str:
    lines = [f"TensorRT's ONNX parser rejected {file} ({parser.num_errors} error(s)):"]
    for i in range(parser.num_errors):
        error: tensorrt.ParserError = parser.get_error(i)  # the stubs leave get_error's type open
        where = f"node {error.node()} '{error.node_name()}' ({error.node_operator()})" if error.node() >= 0 else file
        lines.append(f"  {where}: {error.desc()}")
    return "\n".join(lines)


def _half_share(trt: ModuleType, network: tensorrt.INetworkDefinition, precision: str, file: str) -> float:
    """Share of layers with half-precision outputs; a fp16/bf16 build with none would be silently fp32."""
    wanted = {"fp16": {trt.DataType.HALF}, "bf16": {trt.DataType.BF16}}.get(
        precision, {trt.DataType.HALF, trt.DataType.BF16}
    )
    count = network.num_layers
    half = 0
    for i in range(count):
        layer = network.get_layer(i)
        if any(layer.get_output(j).dtype in wanted for j in range(layer.num_outputs)):
            half += 1
    if precision != "fp32" and half == 0:
        raise CheckFailed(
            f"{file} has no {precision} tensors although the manifest says {precision}: the engine would be "
            "fp32; re-export with an explicitly cast graph"
        )
    return round(half / count, 4) if count else 0.0
