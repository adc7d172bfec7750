"""An artifact as a Triton Inference Server model repository: ``acf-deploy triton``.

Two models, ``<name>-sample`` and ``<name>-density``, each a ``config.pbtxt`` and numbered version
folders; a ``README.md`` on starting ``tritonserver`` and querying it; ``acf-triton.json`` recording which
artifact (and which file hashes) every version came from; for ``--backend tensorrt`` a
``build_engines.sh`` to run on the serving host.

Batching. With ``max_batch_size > 0`` Triton prepends the batch dimension to every input and output
and may concatenate requests along it (dynamic batching). Every tensor therefore needs a leading batch
axis, which the artifact's ``temperature`` (shape ``[1]``, one scalar per call) lacks. Our choice:
**temperature is a per-row input**, config ``dims: [ 1 ]``, i.e. ``[batch, 1]`` on the wire, so
requests with different temperatures can share a batch and each row keeps its own. The served
``model.onnx`` of the sampling model is ``sample.onnx`` with only the declared shape of ``temperature``
changed from ``[1]`` to ``[batch, 1]``: its sole consumer is ``Mul(z, temperature)``, which broadcasts
``[batch, D] * [batch, 1]`` row by row, so every row is bit for bit what ``sample.onnx`` gives with that
row's temperature. That is checked on ONNX Runtime when writing (where onnxruntime is installed) and
recorded in ``acf-triton.json``. The density model is ``density.onnx`` byte for byte.
Per-sample outputs of shape ``[batch]`` (``residual``, ``log_prob``, ``bits_per_dim``, ``min_pivot``)
are declared ``dims: [ 1 ]`` with ``reshape: { shape: [ ] }``, Triton's way to batch a scalar per row:
clients receive them as ``[batch, 1]``.

Backends: ``onnxruntime`` (default; KIND_CPU unless ``--kind gpu``; optionally its TensorRT execution
accelerator) or ``tensorrt`` (``platform: "tensorrt_plan"``, KIND_GPU). A TensorRT plan only runs on the
TensorRT version and GPU it was built with, so for ``tensorrt`` the version folder holds ``model.onnx``
and ``build_engines.sh`` runs ``trtexec`` from the serving container to write ``model.plan`` beside it.

Writing is atomic per version: each version folder is assembled under a dot-named staging folder in the
model directory and renamed into place, so a polling server never sees half a version; re-running adds
the next version number (shared by both models) and never touches an existing one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from .. import __version__
from ..artifact import Artifact, open_artifact
from ..errors import BadInput, CheckFailed
from ..fileio import atomic_path, check_output_dir, clean_stale, current_umask, sha256_file, write_json
from ..onnx_util import walk_graphs

__all__ = [
    "BACKENDS",
    "KINDS",
    "TritonOptions",
    "TensorSpec",
    "ModelSpec",
    "write_triton_repository",
    "model_specs",
    "render_config",
]

BACKENDS = ("onnxruntime", "tensorrt")
KINDS = ("cpu", "gpu")
DEFAULT_MAX_BATCH = 256
METADATA = "acf-triton.json"
README = "README.md"
BUILD_SCRIPT = "build_engines.sh"
TRTEXEC = "/usr/src/tensorrt/bin/trtexec"  # where NVIDIA's tritonserver and TensorRT containers keep it
CONTAINER = "nvcr.io/nvidia/tritonserver:<YY.MM>-py3"
PER_ROW_INPUTS = ("temperature",)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

TRITON_TYPES = {
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.BFLOAT16: "TYPE_BF16",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.BOOL: "TYPE_BOOL",
}


@dataclass
class TritonOptions:
    backend: str = "onnxruntime"
    max_batch: int | None = None  # default: min(256, the artifact's max_safe_batch)
    instances: int = 1
    dynamic_batching: bool = False
    queue_delay_us: int = 100
    kind: str | None = None  # cpu | gpu; default gpu for tensorrt or the TensorRT accelerator, else cpu
    ort_tensorrt: bool = False  # onnxruntime backend with its TensorRT execution accelerator
    name: str | None = None  # model name prefix; default the artifact's preset
    workspace_mb: int = 4096
    opt_batch: int | None = None  # TensorRT optimisation-profile batch; default min(64, max_batch)

    def resolved_kind(self) -> str:
        if self.kind:
            return self.kind
        return "gpu" if self.backend == "tensorrt" or self.ort_tensorrt else "cpu"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton TYPE_*
    dims: tuple[int, ...]  # without the batch axis; -1 where the graph leaves a dimension free
    per_row_scalar: bool = False  # graph shape [batch]: config dims [1] with reshape [] (clients see [batch, 1])
    made_per_row: bool = False  # graph input without a batch axis, served with one (see module docstring)


@dataclass(frozen=True)
class ModelSpec:
    graph: str  # sample | density
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def _tensor(value: onnx.ValueInfoProto, batch_axis: str, known: dict[str, int], graph: str) -> TensorSpec:
    ttype = value.type.tensor_type
    if ttype.elem_type not in TRITON_TYPES:
        raise BadInput(f"{graph}.onnx: {value.name} has ONNX type {ttype.elem_type}, which Triton cannot serve")
    dims = list(ttype.shape.dim)
    batched = bool(dims) and dims[0].dim_param == batch_axis
    if not batched:
        if value.name not in PER_ROW_INPUTS:
            raise BadInput(f"{graph}.onnx: {value.name} has no leading {batch_axis!r} axis; Triton cannot batch it")
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
        if shape != (1,):
            raise BadInput(f"{graph}.onnx: {value.name} has shape {shape}, expected [1]")
        return TensorSpec(value.name, TRITON_TYPES[ttype.elem_type], (1,), made_per_row=True)
    rest = []
    for i, d in enumerate(dims[1:], start=1):
        if d.HasField("dim_value"):
            rest.append(d.dim_value)
        else:
            rest.append(known.get(f"{value.name}:{i}", -1))
    if not rest:
        return TensorSpec(value.name, TRITON_TYPES[ttype.elem_type], (1,), per_row_scalar=True)
    return TensorSpec(value.name, TRITON_TYPES[ttype.elem_type], tuple(rest))


def model_specs(artifact: Artifact, graph: str, model: onnx.ModelProto | None = None) -> ModelSpec:
    """Inputs and outputs of ``graph`` as Triton sees them, read from the ONNX file (and cross-checked
    against the manifest): types, dims without the batch axis, per-row scalars and per-row inputs."""
    if model is None:
        model = artifact.load_graph(graph)
    batch_axis = artifact.manifest.get("batch_axis", "batch")
    # older exports declare the density graph's z output [batch, Flattenz_dim_1]: D left symbolic
    known = {"z:1": artifact.dim} if graph == "density" else {}
    inputs = tuple(_tensor(v, batch_axis, known, graph) for v in model.graph.input)
    outputs = tuple(_tensor(v, batch_axis, known, graph) for v in model.graph.output)
    spec = artifact.graph_io(graph)
    for kind, tensors in (("inputs", inputs), ("outputs", outputs)):
        listed = [entry["name"] for entry in spec[kind]]
        if [t.name for t in tensors] != listed:
            raise BadInput(
                f"{graph}.onnx {kind} {[t.name for t in tensors]} differ from the manifest's {listed}; re-export"
            )
    return ModelSpec(graph, inputs, outputs)


def _dims(values: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]" if values else "[ ]"


def _tensor_block(t: TensorSpec, indent: str) -> str:
    lines = [f'{indent}  name: "{t.name}"', f"{indent}  data_type: {t.data_type}", f"{indent}  dims: {_dims(t.dims)}"]
    if t.per_row_scalar:
        lines.append(f"{indent}  reshape: {{ shape: [ ] }}")
    return f"{indent}{{\n" + "\n".join(lines) + f"\n{indent}}}"


def render_config(model_name: str, spec: ModelSpec, options: TritonOptions, max_batch: int, precision: str) -> str:
    """``config.pbtxt`` text (protobuf text format of Triton's ``inference.ModelConfig``)."""
    kind = "KIND_GPU" if options.resolved_kind() == "gpu" else "KIND_CPU"
    lines = [f"# written by acf-deploy {__version__}; see README.md and acf-triton.json beside this model", ""]
    lines.append(f'name: "{model_name}"')
    if options.backend == "tensorrt":
        lines.append('platform: "tensorrt_plan"')
    else:
        lines.append('backend: "onnxruntime"')
    lines.append(f"max_batch_size: {max_batch}")
    lines.append("version_policy: { latest: { num_versions: 1 } }")
    for key, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        blocks = ",\n".join(_tensor_block(t, "  ") for t in tensors)
        lines.append(f"{key} [\n{blocks}\n]")
    lines.append(f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {kind}\n  }}\n]")
    if options.dynamic_batching:
        preferred = sorted({b for b in (8, 32, 128, max_batch) if b <= max_batch})
        lines.append(
            "dynamic_batching {\n"
            f"  preferred_batch_size: {_dims(tuple(preferred))}\n"
            f"  max_queue_delay_microseconds: {options.queue_delay_us}\n"
            "}"
        )
    if options.backend == "onnxruntime" and options.ort_tensorrt:
        mode = "FP16" if precision == "fp16" else "FP32"
        workspace = options.workspace_mb * (1 << 20)
        lines.append(
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
            '        name: "tensorrt"\n'
            f'        parameters {{ key: "precision_mode" value: "{mode}" }}\n'
            f'        parameters {{ key: "max_workspace_size_bytes" value: "{workspace}" }}\n'
            "      }\n    ]\n  }\n}"
        )
    return "\n".join(lines) + "\n"


def _check(artifact: Artifact, options: TritonOptions) -> tuple[str, int]:
    if options.backend not in BACKENDS:
        raise BadInput(f"--backend must be one of {', '.join(BACKENDS)}, not {options.backend!r}")
    if options.kind is not None and options.kind not in KINDS:
        raise BadInput(f"--kind must be cpu or gpu, not {options.kind!r}")
    if options.backend == "tensorrt" and options.resolved_kind() != "gpu":
        raise BadInput("TensorRT plans run on GPUs only: --backend tensorrt needs --kind gpu")
    if options.ort_tensorrt and (options.backend != "onnxruntime" or options.resolved_kind() != "gpu"):
        raise BadInput("the TensorRT accelerator is an option of the onnxruntime backend on --kind gpu")
    if options.instances < 1:
        raise BadInput("--instances must be at least 1")
    if options.queue_delay_us < 0 or options.workspace_mb < 1:
        raise BadInput("--queue-delay-us must be >= 0 and the workspace positive")
    safe = int(artifact.manifest.get("max_safe_batch", DEFAULT_MAX_BATCH))
    max_batch = options.max_batch if options.max_batch is not None else min(DEFAULT_MAX_BATCH, safe)
    if max_batch < 1:
        raise BadInput("--max-batch must be at least 1")
    if max_batch > safe:
        raise BadInput(f"--max-batch {max_batch} exceeds the artifact's largest safe batch ({safe}, see its manifest)")
    name = options.name or str(artifact.manifest.get("preset", "acf"))
    if not NAME_RE.match(name):
        raise BadInput(f"--name {name!r}: use letters, digits, '_', '-' and '.'")
    return name, max_batch


def _versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _copy_verified(artifact: Artifact, name: str, target: Path) -> str:
    """Copy artifact file ``name`` to ``target`` and check the copy's sha256 against the manifest."""
    source = artifact.verify_file(name)
    shutil.copyfile(source, target)
    digest = sha256_file(target)
    if digest != artifact.manifest["files"][name]:
        raise CheckFailed(f"{source} changed while it was copied; run `acf-deploy triton` again")
    return digest


def per_row_temperature(model: onnx.ModelProto, batch_axis: str) -> onnx.ModelProto:
    """``sample.onnx`` with ``temperature`` declared ``[batch, 1]`` instead of ``[1]``.

    Refused unless every consumer of ``temperature`` is a ``Mul`` with ``z``-shaped data (the one
    place the graph uses it), where ``[batch, D] * [batch, 1]`` broadcasts row by row.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in model.graph.input:
        if value.name not in PER_ROW_INPUTS:
            continue
        users = [n for n in model.graph.node if value.name in n.input]
        sub_users = [n.op_type for g in list(walk_graphs(model.graph))[1:] for n in g.node if value.name in n.input]
        if sub_users or not users or any(n.op_type != "Mul" or "z" not in n.input for n in users):
            raise BadInput(f"sample.onnx uses {value.name} other than as Mul(z, {value.name}); cannot serve it per row")
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        dims.add().dim_param = batch_axis
        dims.add().dim_value = 1
    return model


def _check_per_row(original: Path, rewritten: Path, dim: int) -> str:
    """Rows of the per-row-temperature model equal the original's at each row's temperature, bit for bit."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "not checked (onnxruntime is not installed)"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    old = ort.InferenceSession(str(original), options, providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(str(rewritten), options, providers=["CPUExecutionProvider"])
    z = np.random.default_rng(0).standard_normal((4, dim)).astype(np.float32)
    temps = np.array([[0.5], [0.5], [1.25], [1.25]], np.float32)
    got = new.run(None, {"z": z, "temperature": temps})
    for rows, t in ((slice(0, 2), 0.5), (slice(2, 4), 1.25)):
        want = old.run(None, {"z": z, "temperature": np.array([t], np.float32)})
        for g, w in zip(got, want, strict=True):
            if not np.array_equal(g[rows], w[rows], equal_nan=True):
                raise CheckFailed("the per-row-temperature sampling model differs from sample.onnx; please report")
    return "bit-identical to sample.onnx row by row (ONNX Runtime CPU)"


def _trtexec_shapes(spec: ModelSpec, batch: int) -> str:
    parts = []
    for t in spec.inputs:
        dims = [batch, *t.dims]
        if any(d < 0 for d in dims):
            raise BadInput(f"{spec.graph}: input {t.name} has a free dimension; TensorRT profiles need fixed ones")
        parts.append(f"{t.name}:" + "x".join(str(d) for d in dims))
    return ",".join(parts)


def trtexec_command(
    spec: ModelSpec, version_dir: str, max_batch: int, opt_batch: int, options: TritonOptions, precision: str
) -> list[str]:
    """The ``trtexec`` call that builds ``model.plan`` from ``model.onnx`` in ``version_dir``."""
    command = [
        "$TRTEXEC",
        f"--onnx={version_dir}/model.onnx",
        f"--saveEngine={version_dir}/model.plan.partial",
        f"--minShapes={_trtexec_shapes(spec, 1)}",
        f"--optShapes={_trtexec_shapes(spec, opt_batch)}",
        f"--maxShapes={_trtexec_shapes(spec, max_batch)}",
        f"--memPoolSize=workspace:{options.workspace_mb}M",
        "--skipInference",
    ]
    if precision != "fp32":
        command.append("--stronglyTyped")  # the ONNX carries its precision; TensorRT >= 10
    return command


def write_triton_repository(
    artifact_dir: str | Path, repo: str | Path, options: TritonOptions | None = None
) -> dict[str, Any]:
    """Write (or add a version to) a Triton model repository for the artifact; returns a summary."""
    options = options or TritonOptions()
    artifact = open_artifact(artifact_dir)  # every file's sha256 checked against the manifest
    name, max_batch = _check(artifact, options)
    repo = check_output_dir(repo, lambda path: (path / METADATA).is_file(), "a repository written by acf-deploy")
    repo.mkdir(parents=True, exist_ok=True)
    precision = str(artifact.manifest.get("precision", "fp32"))
    models = {graph: f"{name}-{graph}" for graph in ("sample", "density")}
    version = 1 + max([0, *(v for m in models.values() for v in _versions(repo / m))])
    opt_batch = min(options.opt_batch or 64, max_batch)
    summary: dict[str, Any] = {
        "repository": str(repo),
        "backend": options.backend,
        "version": version,
        "max_batch_size": max_batch,
        "models": {},
    }
    build_lines: list[str] = []
    for graph, model_name in models.items():
        model_dir = repo / model_name
        model_dir.mkdir(exist_ok=True)
        original = artifact.load_graph(graph)
        spec = model_specs(artifact, graph, original)
        source_name = artifact.manifest["graphs"][graph]["file"]
        entry: dict[str, Any] = {
            "artifact": str(Path(artifact_dir).resolve()),
            "preset": artifact.manifest.get("preset"),
            "source": source_name,
            "source_sha256": artifact.manifest["files"][source_name],
            "manifest_files": dict(artifact.manifest["files"]),
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "backend": options.backend,
        }
        target = _write_version(artifact, graph, original, spec, model_dir / str(version), entry)
        config = render_config(model_name, spec, options, max_batch, precision)
        with atomic_path(model_dir / "config.pbtxt") as tmp:
            tmp.write_text(config)
        if options.backend == "tensorrt":
            version_dir = f"$REPO/{model_name}/{version}"
            command = trtexec_command(spec, version_dir, max_batch, opt_batch, options, precision)
            build_lines += [
                f"echo 'building {model_name} version {version}'",
                " ".join(_sh(c) for c in command),
                f'mv -f "{version_dir}/model.plan.partial" "{version_dir}/model.plan"',
            ]
            entry["build"] = " ".join(command)
        summary["models"][model_name] = {
            "graph": graph,
            "dir": str(target),
            "inputs": [_io_json(t) for t in spec.inputs],
            "outputs": [_io_json(t) for t in spec.outputs],
        }
        _record(repo, model_name, version, entry)
    if build_lines:
        _write_build_script(repo, version, build_lines)
        summary["build_script"] = str(repo / BUILD_SCRIPT)
    _write_readme(repo, artifact, models, summary, options, max_batch)
    summary["readme"] = str(repo / README)
    return summary


def _write_version(
    artifact: Artifact,
    graph: str,
    original: onnx.ModelProto,
    spec: ModelSpec,
    target: Path,
    entry: dict[str, Any],
) -> Path:
    """The model files of one version, staged beside ``target`` and renamed into place whole; ``entry``
    (the version's record) gains the files' hashes and, for a per-row temperature, how it was checked."""
    model_dir, version = target.parent, target.name
    source_name = artifact.manifest["graphs"][graph]["file"]
    clean_stale(model_dir, version)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.{os.getpid()}.", suffix=".tmpdir", dir=model_dir))
    try:
        externals = artifact.graph_files(graph, original)[1:]
        if any(t.made_per_row for t in spec.inputs):
            full = onnx.load(str(artifact.verify_file(source_name)))
            rewritten = per_row_temperature(full, artifact.manifest.get("batch_axis", "batch"))
            if externals:
                onnx.save(
                    rewritten, str(staging / "model.onnx"), save_as_external_data=True, location="model.onnx.data"
                )
            else:
                onnx.save(rewritten, str(staging / "model.onnx"))
            entry["per_row_inputs"] = [t.name for t in spec.inputs if t.made_per_row]
            entry["per_row_check"] = _check_per_row(artifact.graph_path(graph), staging / "model.onnx", artifact.dim)
        else:
            _copy_verified(artifact, source_name, staging / "model.onnx")
            for ext in externals:
                (staging / ext).parent.mkdir(parents=True, exist_ok=True)
                _copy_verified(artifact, ext, staging / ext)
        entry["files"] = {
            p.relative_to(staging).as_posix(): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()
        }
        os.chmod(staging, 0o777 & ~current_umask())
        if target.exists():
            raise BadInput(f"{target} appeared while writing; run `acf-deploy triton` again")
        os.rename(staging, target)  # the version appears whole, or not at all
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _sh(word: str) -> str:
    """Quote for sh, letting ``$REPO`` and ``$TRTEXEC`` expand (model names cannot hold quotes or ``$``)."""
    return f'"{word}"' if "$" in word else shlex.quote(word)


def _io_json(t: TensorSpec) -> dict[str, Any]:
    shape = [-1, *t.dims]
    return {"name": t.name, "data_type": t.data_type, "shape": shape}


def _record(repo: Path, model_name: str, version: int, entry: dict[str, Any]) -> None:
    path = repo / METADATA
    data: dict[str, Any] = {"format_version": 1, "models": {}}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadInput(f"{path} is not valid JSON; move it away and run again") from None
    data.setdefault("models", {}).setdefault(model_name, {})[str(version)] = entry
    write_json(path, data)


def _write_build_script(repo: Path, version: int, lines: list[str]) -> None:
    script = render_template(
        "triton_build_engines.sh",
        version=version,
        acf_version=__version__,
        container=CONTAINER,
        build_script=BUILD_SCRIPT,
        trtexec=TRTEXEC,
        commands="\n".join(lines),
    )
    with atomic_path(repo / BUILD_SCRIPT) as tmp:
        tmp.write_text(script)
        os.chmod(tmp, 0o755)


def _write_readme(
    repo: Path,
    artifact: Artifact,
    models: dict[str, str],
    summary: dict[str, Any],
    options: TritonOptions,
    max_batch: int,
) -> None:
    sample, density = models["sample"], models["density"]
    io = {name: summary["models"][model] for name, model in models.items()}
    probes = next((t for t in io["density"]["inputs"] if t["name"] == "probes"), None)
    version = summary["version"]
    build = ""
    if options.backend == "tensorrt":
        build = render_template(
            "triton_README_tensorrt.md", container=CONTAINER, build_script=BUILD_SCRIPT, version=version
        )
    probe_note = ""
    if probes is not None:
        probe_note = (
            f"\nThe density model uses the `series` log-det: send Rademacher probes `probes` of shape "
            f"`[batch, {probes['shape'][1]}, {probes['shape'][2]}]` (+1/-1 float32) with every request.\n"
        )
    text = render_template(
        "triton_README.md",
        preset=artifact.manifest.get("preset", "?"),
        acf_version=__version__,
        source=Path(artifact.root).resolve(),
        metadata=METADATA,
        backend=options.backend,
        max_batch=max_batch,
        instances=options.instances,
        kind=options.resolved_kind().upper(),
        dynamic_batching="on" if options.dynamic_batching else "off",
        sample=sample,
        density=density,
        sample_inputs=_io_md(io["sample"]["inputs"]),
        sample_outputs=_io_md(io["sample"]["outputs"]),
        density_inputs=_io_md(io["density"]["inputs"]),
        density_outputs=_io_md(io["density"]["outputs"]),
        shape=", ".join(str(d) for d in artifact.data_shape),
        probe_note=probe_note,
        tensorrt_build=build,
        gpus="--gpus all " if options.resolved_kind() == "gpu" else "",
        container=CONTAINER,
        version=version,
        dim=artifact.dim,
    )
    with atomic_path(repo / README) as tmp:
        tmp.write_text(text)


def render_template(name: str, **values: Any) -> str:
    """``exporters/templates/<name>`` with every ``{{key}}`` replaced by ``values[key]``."""
    text = (Path(__file__).parent / "templates" / name).read_text()
    return re.sub(r"\{\{(\w+)\}\}", lambda match: str(values[match.group(1)]), text)


def _io_md(tensors: list[dict[str, Any]]) -> str:
    return ", ".join(f"`{t['name']}` {t['data_type'][5:]} {t['shape']}" for t in tensors)
