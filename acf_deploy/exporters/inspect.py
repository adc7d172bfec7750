"""``inspect``: what is inside an artifact or an ONNX file, and optionally the TensorRT lint."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx

from ..errors import BadInput


def _ops(graph: onnx.GraphProto, counter: Counter) -> Counter:
    for node in graph.node:
        counter[node.op_type] += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _ops(attr.g, counter)
    return counter


def _io(values) -> list[str]:
    return [
        f"{v.name} {onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}"
        f"[{', '.join(str(d.dim_param or d.dim_value) for d in v.type.tensor_type.shape.dim)}]"
        for v in values
    ]


def describe(path: Path) -> dict[str, Any]:
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends
        raise BadInput(f"{path} is not a readable ONNX file ({exc.__class__.__name__})") from None
    ops = _ops(model.graph, Counter())
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
