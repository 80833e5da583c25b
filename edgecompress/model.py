"""Load and save ONNX models (external data only when needed), hash and size artifacts.

Layering: imports nothing internal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import onnx

# protobuf refuses messages over 2 GiB; keep a margin for the graph itself.
_PROTO_LIMIT = 2 * 1024**3 - 64 * 1024**2
EXTERNAL_DATA_SUFFIX = ".data"


def load_model(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=load_external_data)


def needs_external_data(model: onnx.ModelProto) -> bool:
    return model.ByteSize() > _PROTO_LIMIT


def save_model(model: onnx.ModelProto, path: str | Path) -> list[Path]:
    """Save `model` to `path`; weights go to `<name>.data` beside it only if the proto would pass 2 GB.

    Returns the files written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if needs_external_data(model):
        data_name = path.name + EXTERNAL_DATA_SUFFIX
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        return [path, path.parent / data_name]
    onnx.save_model(model, str(path))
    return [path]


class UnsafeExternalData(ValueError):
    """An external-data location that escapes the model's directory, or is not a regular file."""


def artifact_files(model_path: str | Path) -> list[Path]:
    """The model file plus any external data files it references.

    Every location is checked before anything reads it: it must resolve (symlinks followed) inside the model's
    directory and be a regular file, so that a model cannot make us read /etc/shadow or block forever on a FIFO or
    /dev/zero (UnsafeExternalData)."""
    model_path = Path(model_path)
    files = [model_path]
    m = onnx.load(str(model_path), load_external_data=False)
    locations: set[str] = set()
    for init in _all_initializers(m.graph):
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for entry in init.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    home = model_path.parent.resolve()
    for loc in sorted(locations):
        p = model_path.parent / loc
        real = p.resolve()
        if not loc or Path(loc).is_absolute() or home not in real.parents:
            raise UnsafeExternalData(f"{model_path}: external data '{loc}' is outside the model's directory")
        if not real.is_file():  # is_file: a regular file, not a FIFO, device or directory
            what = "missing" if not real.exists() else "not a regular file"
            raise UnsafeExternalData(f"{model_path}: external data '{loc}' is {what}")
        files.append(p)
    return files


def _all_initializers(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_initializers(g)


def artifact_size_bytes(model_path: str | Path) -> int:
    return sum(f.stat().st_size for f in artifact_files(model_path))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: Iterable[Path], root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(paths)}
