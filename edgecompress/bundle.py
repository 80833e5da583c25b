"""Atomic output directories: build in a hidden sibling, rename into place at the end, clean up on any failure.

A user's existing --out is only replaced (with --force) once the new bundle is complete, so neither an error nor
Ctrl-C can leave a half-written bundle or lose the old one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from types import TracebackType

from edgecompress.errors import OutputError


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse, before any work starts, an --out we must not write."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a directory", hint="choose a directory path")
    if out.is_dir() and not force:
        raise OutputError(f"--out {out} already exists", hint="pass --force to replace it, or choose another --out")
    parent = _existing_ancestor(out.parent)
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write under {parent}", hint="choose a writable --out")


def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


class StagedDir:
    """with StagedDir(out, force) as stage: write into stage.path, then stage.commit()."""

    def __init__(self, out: Path, force: bool) -> None:
        self.out = out.absolute()
        self.force = force
        self.path = self.out.parent / f".{self.out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._created_parents: list[Path] = []
        self._committed = False

    def __enter__(self) -> StagedDir:
        check_out_dir(self.out, self.force)
        missing = []
        p = self.out.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self._created_parents.append(d)
        self.path.mkdir()
        return self

    def commit(self) -> Path:
        old = None
        if self.out.exists():
            if not self.force:  # appeared while we were building
                raise OutputError(f"--out {self.out} appeared during the build", hint="pass --force to replace it")
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(self.path, self.out)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._committed:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        for d in reversed(self._created_parents):
            try:
                d.rmdir()
            except OSError:
                break
