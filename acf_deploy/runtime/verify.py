"""Export verification on ONNX Runtime, run inside the exporter's temporary directory.

The exporter does not import the runtime: :func:`acf_deploy.pipeline.export_artifact` hands
:func:`verify_export` to :func:`acf_deploy.exporters.export.write_artifact`, which calls it on the
artifact it has just written, before that replaces the target. So a manifest still says
``verified`` only if the graphs, as written, loaded and matched PyTorch.
"""

from __future__ import annotations

from typing import Any

import onnx

from ..artifact import Artifact
from ..computations import density_io
from ..errors import CheckFailed
from .ort_backend import OrtBackend
from .parity import compare_golden

__all__ = ["verify_export"]


def verify_export(artifact: Artifact) -> dict[str, Any]:
    """Loads in ONNX Runtime, is not empty, has the declared IO, and matches the golden outputs.

    Returns the manifest's ``verification`` record. Raises :class:`CheckFailed` when the export is
    wrong; a precision ONNX Runtime (CPU) cannot run comes back ``"unverified"`` with the reason, and
    its numbers from per-op rounding emulation, which must still be within the precision's limit.
    """
    import onnxruntime

    for graph in ("sample", "density"):
        model = onnx.load(str(artifact.graph_path(graph)))
        if not model.graph.node:
            raise CheckFailed(f"{graph}.onnx is empty")
        expected = density_io(artifact.logdet_mode)[0] if graph == "density" else ["z", "temperature"]
        found = [i.name for i in model.graph.input]
        if found != expected:
            raise CheckFailed(f"{graph}.onnx has inputs {found}, expected {expected}")
    precision = artifact.manifest.get("precision", "fp32")
    runtime = f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"
    record: dict[str, Any] = {"runtime": runtime, "against": "golden (fp32 PyTorch)", "precision": precision}
    with OrtBackend(artifact) as backend:  # half graphs: per-op rounding emulated on the CPU provider
        result = compare_golden(artifact, backend)
        runs_natively = backend.unverified_reason is None
    record.update(metrics=result.metrics, limits=result.limits, method=result.note or "graph run as exported")
    if result.status == "failed":
        raise CheckFailed(f"export does not match PyTorch on the golden batch: {result.summary()}")
    if precision != "fp32" and runs_natively:
        # The half graph as exported: on the CPU provider this proves it loads and runs, not its accuracy.
        with OrtBackend(artifact, emulate=False) as native:
            unemulated = compare_golden(artifact, native)
        if unemulated.metrics["nonfinite"]:
            raise CheckFailed(f"the {precision} graph gives non-finite outputs on ONNX Runtime")
        record["native_metrics"] = unemulated.metrics
    record["status"] = "verified" if result.status == "passed" else "unverified"
    record["reason"] = None if result.status == "passed" else result.failures[0]
    return record
