"""Backends behind one interface: ``torch`` (reference), ``ort`` (CPU; ``ort-cuda``, ``ort-trt``), ``trt``, and the
peers a user might pick instead: ``torch-compile`` and OpenVINO (``openvino``, ``openvino-static``)."""

from __future__ import annotations

from ..artifact import Artifact
from ..errors import BadInput
from .base import Backend

BACKENDS = ("torch", "ort", "ort-cuda", "ort-trt", "trt", "torch-compile", "openvino", "openvino-static")


def open_backend(
    name: str, artifact: Artifact, threads: int | None = None, graphs: tuple[str, ...] = ("sample", "density")
) -> Backend:
    """Open ``artifact`` on backend ``name``; raises BackendUnavailable (exit 3) when it cannot run here.

    ``graphs``: the ONNX Runtime sessions to create (a session on the exact log-det graph takes longer
    to build than a whole sampling batch, so one-graph jobs open only theirs).
    """
    if threads is not None and threads < 1:
        raise BadInput(f"--threads must be at least 1, not {threads}")
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(artifact, threads=threads)
    if name in ("ort", "ort-cuda", "ort-trt"):
        from .ort_backend import OrtBackend

        device = {"ort": "cpu", "ort-cuda": "cuda", "ort-trt": "tensorrt"}[name]
        return OrtBackend(artifact, device=device, threads=threads, graphs=graphs)
    if name == "torch-compile":
        from .torch_compile_backend import TorchCompileBackend

        return TorchCompileBackend(artifact, threads=threads)
    if name in ("openvino", "openvino-static"):
        from .openvino_backend import OpenVinoBackend

        return OpenVinoBackend(artifact, threads=threads, static=name == "openvino-static", graphs=graphs)
    if name == "trt":
        from .trt_backend import TrtBackend

        return TrtBackend(artifact)
    raise BadInput(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
