"""The TensorRT environment, shared by engine building (``exporters/tensorrt.py``) and the ``trt`` backend
(``runtime/trt_backend.py``): importing TensorRT, its logger, the CUDA device, builder creation.

Polygraphy keeps the same helpers in ``backend/trt/util``. Everything here fails with one
:class:`~acf_deploy.errors.BackendUnavailable` line (exit 3) where TensorRT or a GPU is missing. Callers use
them as ``trt_util.cuda_device()`` (module attribute, not a copied name), so a test can swap one in one place.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from .errors import BackendUnavailable

if TYPE_CHECKING:
    import tensorrt

__all__ = [
    "DeviceInfo",
    "TrtLogger",
    "create_builder",
    "cuda_device",
    "import_tensorrt",
    "make_logger",
    "trt_builder_available",
]


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU an engine is built for or run on; part of the engine key."""

    name: str
    compute_capability: str
    cuda: str
    torch_device: str


def import_tensorrt() -> ModuleType:
    """Import TensorRT, or say in one line that its libraries are missing."""
    try:
        return importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:
        raise BackendUnavailable(
            f"TensorRT libraries are missing ({exc}); install tensorrt or use the acf-deploy Docker image"
        ) from None


def cuda_device(index: int = 0) -> DeviceInfo:
    """Describe CUDA device ``index`` through PyTorch, or say why there is none."""
    import torch

    if torch.version.cuda is None:
        raise BackendUnavailable("TensorRT needs a CUDA GPU, but this PyTorch build has no CUDA support")
    try:
        torch.cuda.init()
    except Exception as exc:  # torch raises RuntimeError or AssertionError, depending on the cause
        raise BackendUnavailable(f"CUDA initialisation failed: {exc}") from None
    if torch.cuda.device_count() <= index:
        raise BackendUnavailable(f"no CUDA GPU {index} is visible (found {torch.cuda.device_count()})")
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(
        name=props.name,
        compute_capability=f"{props.major}.{props.minor}",
        cuda=str(torch.version.cuda),
        torch_device=f"cuda:{index}",
    )


class TrtLogger(Protocol):
    """What :func:`make_logger` returns: a ``trt.ILogger`` that also remembers what it was told."""

    messages: list[tuple[int, str]]

    def errors(self) -> str: ...


def make_logger(trt: ModuleType) -> TrtLogger:
    """A TensorRT logger that keeps warnings and errors, so failures can quote TensorRT's reason."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[int, str]] = []

        def log(self, severity: tensorrt.ILogger.Severity, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.WARNING):
                self.messages.append((int(severity), msg))

        def errors(self) -> str:
            found = [msg for level, msg in self.messages if level <= int(trt.ILogger.ERROR)]
            return "; ".join(found[-3:])

    return _Logger()


def create_builder(trt: ModuleType, logger: TrtLogger) -> tensorrt.Builder:
    """``trt.Builder``, turning its failure (typically CUDA initialisation) into BackendUnavailable."""
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError) as exc:
        builder, reason = None, logger.errors() or str(exc)
    else:
        reason = logger.errors() or "trt.Builder returned nothing"
    if builder is None:
        raise BackendUnavailable(f"TensorRT builder creation failed: {reason}")
    return builder


def trt_builder_available() -> tuple[bool, str]:
    """Whether a TensorRT builder can really be created here, and why not (for test skips and doctor)."""
    try:
        trt = import_tensorrt()
        device = cuda_device()
        create_builder(trt, make_logger(trt))
    except BackendUnavailable as exc:
        return False, str(exc)
    return (
        True,
        f"TensorRT {trt.__version__} on {device.name} (compute capability {device.compute_capability})",
    )
