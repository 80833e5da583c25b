"""Atomic output directories: build in a hidden sibling, rename into place at the end, clean up on any failure.

What edgecompress will replace: only a directory that holds an edgecompress manifest.json (a bundle it wrote), never
the model's directory or one of its ancestors, and only with --force. A user's existing --out is replaced once the
new bundle is complete, so neither an error nor Ctrl-C can leave a half-written bundle or lose the old one.

Concurrency: the --out is locked (`.NAME.lock` beside it, locks.py) from the check to the commit; a second build
into the same --out fails at once with BusyError (exit 5).

The commit is two renames: the old bundle aside (`.NAME.old-<pid>-<hex>`), the new one in; if the second fails,
the old one is renamed back. POSIX has no atomic swap of two non-empty directories, so a SIGKILL (or power loss)
between the two renames leaves --out missing with the old bundle beside it: the next build into that --out renames
it back before anything else (`recover_leftovers`), and removes the staged dirs of dead processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from edgecompress.errors import OutputError
from edgecompress.locks import dead_owner, in_flight, locked

log = logging.getLogger(__name__)

_PARTIAL = ".partial-"
_OLD = ".old-"
# the files every edgecompress bundle's manifest.json carries at its top level
_MANIFEST_KEYS = frozenset({"artifact", "tool", "target", "recipe", "schema"})


def is_bundle(d: Path) -> bool:
    """A directory edgecompress wrote: its manifest.json parses and has the keys every manifest has."""
    m = d / "manifest.json"
    if not m.is_file() or m.stat().st_size > 64 * 2**20:  # a FIFO or device would block the read
        return False
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and set(data) >= _MANIFEST_KEYS and isinstance(data.get("tool"), dict) \
        and "edgecompress" in data["tool"]


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_out_dir(out: Path, force: bool, protect: Iterable[Path] = ()) -> None:
    """Refuse, before any work starts, an --out we must not write.

    protect: paths --out must neither be nor contain (the model's directory or file)."""
    real = out.resolve()
    for p in protect:
        p = Path(p).resolve()
        if _within(p, real):
            home = p if p.is_dir() else p.parent
            what = "the model's directory" if real == home else "a directory that holds the model"
            raise OutputError(f"--out {out} is {what}; edgecompress never replaces it",
                              hint="choose another --out")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"--out {out} is {'a symlink' if out.is_symlink() else 'a file'}, not a directory",
                          hint="choose a directory path")
    if out.is_dir():
        if not force:
            raise OutputError(f"--out {out} already exists",
                              hint="pass --force to replace it, or choose another --out")
        if not is_bundle(out):
            raise OutputError(f"--out {out} exists and is not an edgecompress bundle (no edgecompress "
                              "manifest.json); --force replaces only bundles", hint="choose another --out")
    parent = _existing_ancestor(out.parent)
    if not parent.is_dir():
        raise OutputError(f"cannot create --out {out}: {parent} is not a directory", hint="choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write under {parent}", hint="choose a writable --out")


def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and not p.is_symlink():
        p = p.parent
    return p


def recover_leftovers(out: Path) -> list[str]:
    """Under out's lock: put back an old bundle a killed commit left aside, remove staged dirs of dead processes.

    Returns what was done, one line each (logged)."""
    done: list[str] = []
    parent, name = out.parent, out.name
    if not parent.is_dir():
        return done
    for p in sorted(parent.iterdir()):
        if not p.name.startswith(f".{name}.") or not p.is_dir() or p.is_symlink() or not dead_owner(p.name):
            continue
        rest = p.name[len(name) + 1:]
        if rest.startswith(_OLD):
            if not out.exists() and not out.is_symlink() and is_bundle(p):
                os.replace(p, out)
                done.append(f"restored {out} from {p.name} (a build was killed while replacing it)")
            elif out.exists():
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p} (the bundle a killed build had replaced)")
        elif rest.startswith(_PARTIAL):
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p} (a killed build's staging directory)")
    for line in done:
        log.warning("%s", line)
    return done


class StagedDir:
    """with StagedDir(out, force) as stage: write into stage.path, then stage.commit()."""

    def __init__(self, out: Path, force: bool, protect: Iterable[Path] = ()) -> None:
        self.out = out.absolute()
        self.force = force
        self.protect = tuple(protect)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = self.out.parent / f".{self.out.name}{_PARTIAL}{tag}"
        self._old = self.out.parent / f".{self.out.name}{_OLD}{tag}"
        self._created_parents: list[Path] = []
        self._committed = False
        self._lock: contextlib.ExitStack | None = None

    def __enter__(self) -> StagedDir:
        check_out_dir(self.out, self.force, self.protect)
        missing = []
        p = self.out.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self._created_parents.append(d)
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(locked(self.out.parent / f".{self.out.name}.lock", wait=False,
                                       what=f"--out {self.out}"))
            recover_leftovers(self.out)
            check_out_dir(self.out, self.force, self.protect)  # again, under the lock
            self.path.mkdir()
            in_flight(self.path)
        except BaseException:
            stack.close()
            self._remove_created_parents()
            raise
        self._lock = stack
        return self

    def commit(self) -> Path:
        moved_aside = False
        if self.out.exists() or self.out.is_symlink():
            check_out_dir(self.out, self.force, self.protect)  # it may have changed while we were building
            os.replace(self.out, self._old)
            moved_aside = True
        try:
            os.replace(self.path, self.out)
        except BaseException:
            if moved_aside:
                os.replace(self._old, self.out)
            raise
        self._committed = True
        if moved_aside:
            shutil.rmtree(self._old, ignore_errors=True)
        return self.out

    def _remove_created_parents(self) -> None:
        for d in reversed(self._created_parents):
            try:
                d.rmdir()
            except OSError:
                break

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if not self._committed:
                shutil.rmtree(self.path, ignore_errors=True)
            in_flight(self.path, False)
        finally:
            if self._lock is not None:
                self._lock.close()
            if not self._committed:
                self._remove_created_parents()


def hash_bundle_files(stage: Path, skip: Iterable[str] = ("manifest.json", "report.md", "report.html")
                      ) -> dict[str, str]:
    """sha256 of every regular file under a bundle (relative POSIX paths), except the derived human-readable
    reports and the manifest itself, which `profile --update` rewrites."""
    from edgecompress.model import sha256_file

    skipped = set(skip)
    return {p.relative_to(stage).as_posix(): sha256_file(p) for p in sorted(stage.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.relative_to(stage).as_posix() not in skipped}
