"""Compression passes. Each module holds one pass family; `base` says what a pass is."""

from edgecompress.passes.base import Batch, ModelInfo, Pass, PassContext, PassResult

__all__ = ["Batch", "ModelInfo", "Pass", "PassContext", "PassResult"]
