"""Versions of everything that shapes a build's output, for manifests and cache keys.

Layering: imports nothing internal.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("edgecompress", "onnx", "onnxruntime", "optimum", "optimum-onnx", "transformers", "torch", "numpy")


def library_versions() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@cache
def source_digest() -> str:
    """sha256 over edgecompress's own source files: an editable install changes without a version bump."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def cache_versions() -> dict[str, str]:
    return {**library_versions(), "edgecompress-source": source_digest()}
