"""Content-addressed cache of build intermediates (the export, the reference outputs, each pass's output).

Every entry is keyed by a sha256 over everything that determines it: the source files' sha256, the pass chain and
each pass's config, the versions of edgecompress/onnx/onnxruntime/optimum/transformers/torch, the calibration
data's hash and whatever target facts a pass reads. Two different inputs can therefore never share an entry
(Olive#1936 returned another model's results from a cache keyed too loosely).

Entries are directories written atomically (a hidden temp dir renamed into place), so a crash or Ctrl-C never
leaves a half-written entry that a later build would trust. Layering: imports only errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecompress.errors import ConfigError

_COMPLETE = ".complete"  # marker written last: an entry without it is ignored and replaced


def default_cache_dir() -> Path:
    if env := os.environ.get("EDGECOMPRESS_CACHE_DIR"):
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("edgecompress"))


def _canonical(o: Any) -> Any:
    if isinstance(o, (set, frozenset)):
        return sorted(map(str, o))  # set order varies between processes (hash randomisation)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not part of a cache key: {type(o).__name__}")


def digest(parts: Any) -> str:
    """sha256 of a JSON-able structure (sets and paths allowed), independent of dict and set ordering."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=_canonical)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_texts(texts: tuple[str, ...] | list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


# Not cache entries: the Arm emulator root (`edgecompress emulator setup`, ~540 MB and ~7 min to rebuild) lives in
# the cache dir too, but it is an installed tool, so `cache clear` keeps it (delete the dir by hand to remove it).
KEPT = frozenset({"emulator"})


@dataclass(frozen=True)
class CacheInfo:
    root: str
    entries: dict[str, int]  # kind -> count
    bytes: dict[str, int]  # kind -> bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


class Cache:
    """root/<kind>/<key[:2]>/<key>/...; `enabled=False` makes every lookup a miss and stores nothing."""

    def __init__(self, root: Path | None = None, enabled: bool = True) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled
        self.hits: list[str] = []
        self.misses: list[str] = []

    def _entry(self, kind: str, key: str) -> Path:
        if not kind.isidentifier() or len(key) != 64:
            raise ValueError(f"bad cache address {kind}/{key}")
        return self.root / kind / key[:2] / key

    def get(self, kind: str, key: str) -> Path | None:
        if not self.enabled:
            return None
        entry = self._entry(kind, key)
        if (entry / _COMPLETE).is_file():
            os.utime(entry / _COMPLETE)  # last use, for a future size-bounded eviction
            self.hits.append(f"{kind}/{key[:12]}")
            return entry
        self.misses.append(f"{kind}/{key[:12]}")
        return None

    def put(self, kind: str, key: str, fill: Callable[[Path], None], meta: dict[str, Any] | None = None) -> Path:
        """Create the entry by calling fill(tmp_dir); rename into place only if fill returns."""
        entry = self._entry(kind, key)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot write the cache at {self.root}: {e.strerror}",
                              hint="set EDGECOMPRESS_CACHE_DIR to a writable directory, or pass --no-cache") from None
        tmp = entry.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            fill(tmp)
            (tmp / "meta.json").write_text(json.dumps({"kind": kind, "key": key, "created": time.time(),
                                                       **(meta or {})}, indent=1, default=str))
            (tmp / _COMPLETE).write_text("")
            if entry.exists():  # an incomplete leftover, or a concurrent writer won: keep one
                shutil.rmtree(tmp)
                if (entry / _COMPLETE).is_file():
                    return entry
                shutil.rmtree(entry, ignore_errors=True)
                return self.put(kind, key, fill, meta)
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return entry

    def materialize(self, kind: str, key: str, fill: Callable[[Path], None], scratch: Path,
                    meta: dict[str, Any] | None = None) -> tuple[Path, bool]:
        """(directory, hit). A disabled cache fills `scratch` instead, which the caller owns."""
        if not self.enabled:
            scratch.mkdir(parents=True, exist_ok=True)
            fill(scratch)
            return scratch, False
        hit = self.get(kind, key)
        if hit is not None:
            return hit, True
        return self.put(kind, key, fill, meta), False

    def info(self) -> CacheInfo:
        entries: dict[str, int] = {}
        sizes: dict[str, int] = {}
        if self.root.is_dir():
            for kind_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
                for entry in kind_dir.glob("*/*"):
                    if (entry / _COMPLETE).is_file():
                        entries[kind_dir.name] = entries.get(kind_dir.name, 0) + 1
                        sizes[kind_dir.name] = sizes.get(kind_dir.name, 0) + sum(
                            f.stat().st_size for f in entry.rglob("*") if f.is_file())
        return CacheInfo(str(self.root), entries, sizes)

    def clear(self) -> int:
        """Remove every entry; returns how many were removed. Dirs in KEPT (installed tools) stay."""
        n = sum(self.info().entries.values())
        if self.root.is_dir():
            for kind_dir in [p for p in self.root.iterdir() if p.is_dir() and p.name not in KEPT]:
                shutil.rmtree(kind_dir, ignore_errors=True)
        return n

    def kept(self) -> list[Path]:
        """The installed tools under the cache root that `clear` leaves alone."""
        return [self.root / name for name in sorted(KEPT) if (self.root / name).is_dir()]
