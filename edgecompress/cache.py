"""Content-addressed cache of build intermediates (the export, the reference outputs, each pass's output).

Every entry is keyed by a sha256 over everything that determines it: the source files' sha256, the pass chain and
each pass's config, the versions of edgecompress/onnx/onnxruntime/optimum/transformers/torch, the calibration
data's hash and whatever target facts a pass reads. Two different inputs can therefore never share an entry
(Olive#1936 returned another model's results from a cache keyed too loosely).

Entries are directories written atomically (a hidden temp dir `.KEY.tmp-<pid>-<hex>` renamed into place) under a
lock per key (locks.py: a second writer of the same key waits, then finds the entry), so a crash or Ctrl-C never
leaves a half-written entry that a later build would trust. Each entry carries a marker written first
(`.edgecompress-entry`: `cache clear` removes only directories that carry it) and, in `.complete`, a sha256 of its
content that every read checks: a corrupt entry is dropped with a warning and rebuilt. Temp entries and lock files
of dead processes are collected when a cache is opened. Layering: imports only errors and locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecompress.errors import ConfigError
from edgecompress.locks import dead_owner, in_flight, locked

log = logging.getLogger(__name__)

_COMPLETE = ".complete"  # written last, holds the content hash: an entry without it is ignored and replaced
_MARKER = ".edgecompress-entry"  # written first: what `cache clear` recognises as its own
_ROOT_TAG = "CACHEDIR.TAG"  # https://bford.info/cachedir/: backup tools skip the directory
_TAG_TEXT = "Signature: 8a477f597d28d172789f06886806bc55\n# edgecompress build cache\n"


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
    """sha256 of a sequence of texts: each is length-prefixed, so no two different sequences can join into the
    same bytes (["ab", "c"] vs ["a", "bc"], or a text holding the separator)."""
    h = hashlib.sha256()
    h.update(len(texts).to_bytes(8, "little"))
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def content_hash(entry: Path) -> str:
    """sha256 over every file of an entry but `.complete` (relative path, size and bytes of each, sorted)."""
    h = hashlib.sha256()
    for p in sorted(entry.rglob("*")):
        rel = p.relative_to(entry).as_posix()
        if rel == _COMPLETE or not p.is_file():
            continue
        f_hash = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                f_hash.update(block)
        h.update(json.dumps([rel, p.stat().st_size, f_hash.hexdigest()]).encode() + b"\n")
    return h.hexdigest()


# Not cache entries: the Arm emulator root (`edgecompress emulator setup`, ~540 MB and ~7 min to rebuild) lives in
# the cache dir too, but it is an installed tool, so `cache clear` keeps it (delete the dir by hand to remove it).
KEPT = frozenset({"emulator"})


@dataclass(frozen=True)
class CacheInfo:
    root: str
    entries: dict[str, int]  # kind -> count
    bytes: dict[str, int]  # kind -> bytes
    other: list[str] = field(default_factory=list)  # what is under the root but not ours (never removed)

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
        self.dropped: list[str] = []  # corrupt entries dropped (and rebuilt) in this process
        if enabled:
            self.collect_stale()

    def _entry(self, kind: str, key: str) -> Path:
        if not kind.isidentifier() or len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"bad cache address {kind}/{key}")
        return self.root / kind / key[:2] / key

    def _valid(self, entry: Path) -> bool:
        """Complete and unchanged since it was written; a corrupt entry is dropped with a warning."""
        done = entry / _COMPLETE
        if not done.is_file():
            return False
        try:
            recorded = json.loads(done.read_text(encoding="utf-8") or "{}").get("sha256")
            ok = recorded is not None and recorded == content_hash(entry)
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            log.warning("cache entry %s is corrupt (its content does not match its hash): dropped, rebuilding it",
                        entry)
            self.dropped.append(str(entry))
            self._remove(entry)
        return ok

    def _remove(self, entry: Path) -> None:
        """Move aside first, so that a half-removed entry is never mistaken for a whole one."""
        aside = entry.parent / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(OSError):
            os.replace(entry, aside)
            shutil.rmtree(aside, ignore_errors=True)

    def get(self, kind: str, key: str) -> Path | None:
        if not self.enabled:
            return None
        entry = self._entry(kind, key)
        if self._valid(entry):
            os.utime(entry / _COMPLETE)  # last use, for a future size-bounded eviction
            self.hits.append(f"{kind}/{key[:12]}")
            return entry
        self.misses.append(f"{kind}/{key[:12]}")
        return None

    def put(self, kind: str, key: str, fill: Callable[[Path], None], meta: dict[str, Any] | None = None) -> Path:
        """Create the entry by calling fill(tmp_dir); rename into place only if fill returns.

        Under the key's lock: a concurrent writer of the same key waits and then uses the entry written first."""
        return self._put(kind, key, fill, meta)[0]

    def _put(self, kind: str, key: str, fill: Callable[[Path], None], meta: dict[str, Any] | None
             ) -> tuple[Path, bool]:
        """(entry, whether fill ran here): False when a concurrent writer finished it while we waited."""
        entry = self._entry(kind, key)
        try:
            self._ensure_root()
            entry.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot write the cache at {self.root}: {e.strerror}",
                              hint="set EDGECOMPRESS_CACHE_DIR to a writable directory, or pass --no-cache") from None
        with locked(entry.parent / f".{key}.lock", wait=True, what=f"cache entry {kind}/{key[:12]}"):
            if self._valid(entry):  # a concurrent writer finished it while we waited
                return entry, False
            if entry.exists():  # an incomplete leftover of an older version
                self._remove(entry)
            tmp = entry.parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            in_flight(tmp)
            try:
                (tmp / _MARKER).write_text(f"{kind}\n")
                fill(tmp)
                (tmp / "meta.json").write_text(json.dumps({"kind": kind, "key": key, "created": time.time(),
                                                           **(meta or {})}, indent=1, default=str))
                (tmp / _COMPLETE).write_text(json.dumps({"sha256": content_hash(tmp)}))
                os.replace(tmp, entry)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                in_flight(tmp, False)
        return entry, True

    def _ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tag = self.root / _ROOT_TAG
        if not tag.exists():
            tag.write_text(_TAG_TEXT)

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
        entry, filled = self._put(kind, key, fill, meta)
        return entry, not filled  # written by a concurrent build while we waited: use it as a hit

    # --- what is ours under the root -------------------------------------------------------------------------
    def _kind_dirs(self) -> list[Path]:
        if not self.root.is_dir() or self.root.is_symlink():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink() and p.name not in KEPT
                      and p.name.isidentifier())

    @staticmethod
    def _is_ours(entry: Path, kind: str) -> bool:
        """An entry (or temp entry) this cache wrote: it carries the marker, or (entries of older versions) a
        `.complete` and a meta.json naming this kind and key."""
        if entry.is_symlink() or not entry.is_dir():
            return False
        if (entry / _MARKER).is_file():
            return True
        try:
            meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return (entry / _COMPLETE).is_file() and isinstance(meta, dict) and meta.get("kind") == kind \
            and meta.get("key") == entry.name

    def _scan(self) -> tuple[list[tuple[str, Path]], list[Path], list[Path]]:
        """(kind, entry) of complete entries, our temp entries and lock files, and everything else we found."""
        entries: list[tuple[str, Path]] = []
        temps: list[Path] = []
        other: list[Path] = []
        if self.root.is_dir() and not self.root.is_symlink():
            other += [p for p in self.root.iterdir() if p.name not in KEPT and p.name != _ROOT_TAG
                      and not (p.is_dir() and not p.is_symlink() and p.name.isidentifier())]
        for kind_dir in self._kind_dirs():
            if not any(kind_dir.iterdir()):
                other.append(kind_dir)
            for shard in sorted(kind_dir.iterdir()):
                if shard.is_symlink() or not shard.is_dir() or len(shard.name) != 2:
                    other.append(shard)
                    continue
                for e in sorted(shard.iterdir()):
                    if e.name.startswith(".") and (".tmp-" in e.name or e.name.endswith(".lock")):
                        if e.name.endswith(".lock") or self._is_ours(e, kind_dir.name) or \
                                self._is_ours_tmp(e):
                            temps.append(e)
                        else:
                            other.append(e)
                    elif self._is_ours(e, kind_dir.name):
                        entries.append((kind_dir.name, e))
                    else:
                        other.append(e)
        return entries, temps, other

    @staticmethod
    def _is_ours_tmp(e: Path) -> bool:
        # a temp entry killed before its marker was written is empty
        return e.is_dir() and not e.is_symlink() and not any(e.iterdir())

    def collect_stale(self) -> list[Path]:
        """Remove the temp entries of dead processes and lock files nobody holds. Returns what was removed."""
        removed: list[Path] = []
        try:
            _, temps, _ = self._scan()
        except OSError:
            return removed
        for t in temps:
            if t.name.endswith(".lock"):
                if _unheld_lock(t):
                    removed.append(t)
            elif dead_owner(t.name):
                shutil.rmtree(t, ignore_errors=True)
                removed.append(t)
        return removed

    def info(self) -> CacheInfo:
        entries: dict[str, int] = {}
        sizes: dict[str, int] = {}
        found, _, other = self._scan()
        for kind, entry in found:
            if (entry / _COMPLETE).is_file():
                entries[kind] = entries.get(kind, 0) + 1
                sizes[kind] = sizes.get(kind, 0) + sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        return CacheInfo(str(self.root), entries, sizes, [str(p) for p in other])

    def clear(self) -> int:
        """Remove every entry this cache wrote; returns how many. Everything else under the root stays: installed
        tools (KEPT), files that are not entries (see `info().other`), entries being written by live processes."""
        self.collect_stale()
        found, _, _ = self._scan()
        for _, entry in found:
            self._remove(entry)
        # the shards and kind dirs that held what we removed, once empty (rmdir never removes content)
        for shard in sorted({e.parent for _, e in found}):
            with contextlib.suppress(OSError):
                shard.rmdir()
        for kind_dir in sorted({e.parent.parent for _, e in found}):
            with contextlib.suppress(OSError):
                kind_dir.rmdir()
        return len(found)

    def kept(self) -> list[Path]:
        """The installed tools under the cache root that `clear` leaves alone."""
        return [self.root / name for name in sorted(KEPT) if (self.root / name).is_dir()]


def _unheld_lock(path: Path) -> bool:
    """Remove a lock file that no process holds (its owner was killed); False if it is held."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            os.unlink(path)
            return True
        return False
    except OSError:
        return False
    finally:
        os.close(fd)
