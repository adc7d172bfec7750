"""``inspect``: what is inside an artifact or an ONNX file, and optionally the TensorRT lint."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx

from ..errors import BadInput
from ..onnx_util import io_entries, op_counts


def _io(values) -> list[str]:
    return [f"{e['name']} {e['dtype']}[{', '.join(str(d) for d in e['shape'])}]" for e in io_entries(values)]


def describe(path: Path) -> dict[str, Any]:
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends
        raise BadInput(f"{path} is not a readable ONNX file ({exc.__class__.__name__})") from None
    ops = op_counts(model.graph)
    return {
        "nodes": sum(ops.values()),
        "top_level_nodes": len(model.graph.node),
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "inputs": _io(model.graph.input),
        "outputs": _io(model.graph.output),
        "ops": dict(ops.most_common()),
    }


def inspect_target(target: Path, trt: bool = False) -> dict[str, Any]:
    """Describe an artifact directory (both graphs + manifest summary) or one ONNX file."""
    from .trt_lint import lint_artifact, lint_file

    target = Path(target)
    if not target.exists():
        raise BadInput(f"{target} does not exist")
    if target.is_dir():
        from ..artifact import open_artifact

        artifact = open_artifact(target)
        manifest = artifact.manifest
        report: dict[str, Any] = {
            "graphs": {g: describe(artifact.graph_path(g)) for g in ("sample", "density")},
            "manifest": {
                "preset": manifest["preset"],
                "precision": manifest["precision"],
                "logdet": manifest["logdet"]["mode"],
                "inverse": manifest["inverse"]["mode"],
                "iterations": manifest["iterations"],
                "max_safe_batch": manifest["max_safe_batch"],
                "blocks": [
                    {k: b[k] for k in ("block", "guarantee", "lipschitz_bound", "n_iter")} for b in manifest["blocks"]
                ],
            },
        }
        if trt:
            report["trt_lint"] = {g: [asdict(i) for i in issues] for g, issues in lint_artifact(target).items()}
        return report
    if target.suffix != ".onnx":
        raise BadInput(f"{target} is neither an artifact directory nor a .onnx file")
    report = {"graphs": {target.name: describe(target)}}
    if trt:
        report["trt_lint"] = {target.name: [asdict(i) for i in lint_file(target)]}
    return report


__all__ = ["describe", "inspect_target"]
