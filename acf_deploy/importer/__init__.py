"""Import checkpoints written by the public research code (Residual Flows and the ACF fork)."""

from .convert import ImportResult, build_imported_flow, import_checkpoint

__all__ = ["ImportResult", "build_imported_flow", "import_checkpoint"]
