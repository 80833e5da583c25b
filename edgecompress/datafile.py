"""The checks every media file of a calibration or evaluation set gets (media.py's images, audio.py's clips) before
its content is trusted: it exists, is a regular file (a FIFO or a device could block or never end), is not empty and
not over its size cap; then its sha256, the content key of every cache and build key. Each failure is one line, a
DataError (exit 2), raised while the set is loaded, at plan time.

Layering: imports only errors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgecompress.errors import DataError


def checked_sha256(path: Path, max_bytes: int, kind: str, too_big_hint: str | None = None) -> str:
    """`path`'s sha256 once the checks pass; `kind` names the file in the size message ("an image", "a clip")."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}", hint="check the path and its permissions") from None
    if not path.is_file():
        raise DataError(f"{path} is not a regular file", hint="give files saved on disk")
    if st.st_size > max_bytes:
        raise DataError(f"{path} is {st.st_size / 2**20:,.0f} MiB, more than the {max_bytes // 2**20} MiB {kind} "
                        "may have", hint=too_big_hint)
    if st.st_size == 0:
        raise DataError(f"{path} is empty")
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}", hint="check the path and its permissions") from None
    return h.hexdigest()
