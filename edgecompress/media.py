"""Calibration and evaluation data for models that read images (or, later, audio) instead of text.

One entry point for `--calibration`/`--eval` whatever the model reads (`load_data`): a text model gets the text
loaders of calibration.py unchanged; an image model gets a MediaSet, the files of

- a directory (searched recursively, sorted; only files with the modality's suffixes),
- a list file (.txt/.lst): one path a line, relative to the list file's directory, optionally followed by a TAB
  and a label (a class index or name for images; a reference transcript for audio); '#' lines are comments,
- a single image file,
- nothing: the built-in set shipped in the package (edgecompress/data/images/, written for this project).

This module lists files (the per-file checks and hash are datafile.py's, shared with audio.py); decoding them is
the task adapter's job. A MediaSet is a TextSet whose `texts` are "<sha256> <name>" per file, so every cache and
build key that hashes texts hashes file contents.

Layering: imports errors, calibration (TextSet), datafile and taskspec (what a task's data are) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgecompress import taskspec
from edgecompress.calibration import TextSet, builtin_texts, load_texts
from edgecompress.datafile import checked_sha256
from edgecompress.errors import DataError

SUFFIXES: dict[str, tuple[str, ...]] = {
    "image": (".jpg", ".jpeg", ".png", ".bmp", ".webp"),
    "audio": (".wav", ".flac"),
}
LIST_SUFFIXES = (".txt", ".lst")
# one media file larger than this is not a photo or a clip an edge model reads; a whole set at most this many files
MAX_FILE_BYTES = 64 * 2**20
MAX_FILES = 100_000


@dataclass(frozen=True)
class MediaSet(TextSet):
    """Media files for calibration or evaluation. `texts` (from TextSet) holds "<sha256> <name>" per file."""

    modality: str = "image"
    files: tuple[Path, ...] = ()
    labels: tuple[str | None, ...] = ()  # per file: the list file's label column, else None

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "count": len(self.files), "modality": self.modality}

    def fingerprint(self) -> str:
        """Content hash of the files (names and bytes), in order: part of the build and cache keys."""
        from edgecompress.cache import hash_texts

        return hash_texts(self.texts)


def modality(task: str) -> str:
    """What `task`'s data are (its adapter's TaskSpec.modality): "text", "image", "audio"."""
    spec = taskspec.spec(task)
    return spec.modality if spec is not None else "text"


def load_data(path: Path | None, task: str, split: str, text_column: str | None = None) -> TextSet:
    """The calibration or evaluation data for a model of `task`: texts (calibration.py) or a MediaSet."""
    kind = modality(task)
    if kind == "text":
        return load_texts(path, text_column) if path is not None else builtin_texts(split)  # type: ignore[arg-type]
    if path is None:
        return builtin(kind, split)
    if text_column is not None:
        raise DataError(f"--text-column does not apply to {kind} data", hint="leave it out")
    return load_media(Path(path), kind)


def builtin(kind: str, split: str) -> MediaSet:
    """The package's own images: small synthetic scenes generated for this project (edgecompress/data/images)."""
    root = Path(str(resources.files("edgecompress") / "data" / f"{kind}s" / split))
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in SUFFIXES[kind]) if root.is_dir() else []
    if not files:
        raise DataError(f"no built-in {kind} data for {split} in this install",
                        hint=f"give --{'eval' if split == 'evaluation' else 'calibration'} DIR")
    return _media_set(files, [None] * len(files), f"builtin:{kind}/{split}", kind)


def load_media(path: Path, kind: str) -> MediaSet:
    suffixes = SUFFIXES[kind]
    try:
        is_dir = path.is_dir()
        exists = path.exists()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if not exists:
        raise DataError(f"data path not found: {path}",
                        hint=f"give a directory of {kind}s ({', '.join(suffixes)}) or a list file")
    if is_dir:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path} holds no {kind} files ({', '.join(suffixes)})",
                            hint=f"give a directory of {kind}s or a list file of their paths")
        return _media_set(files, [None] * len(files), str(path), kind)
    suffix = path.suffix.lower()
    if suffix in suffixes:
        return _media_set([path], [None], str(path), kind)
    if suffix in LIST_SUFFIXES:
        return _from_list(path, kind)
    raise DataError(f"{path} is neither a directory of {kind}s nor a list file",
                    hint=f"give a directory of {kind}s ({', '.join(suffixes)}) or a .txt list of their paths")


def _from_list(path: Path, kind: str) -> MediaSet:
    from edgecompress.calibration import _read_text_file

    files: list[Path] = []
    labels: list[str | None] = []
    for lineno, raw in enumerate(_read_text_file(path).splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, label = line.partition("\t")
        f = Path(name.strip())
        f = f if f.is_absolute() else path.parent / f
        if f.suffix.lower() not in SUFFIXES[kind]:
            raise DataError(f"{path}:{lineno}: '{name.strip()}' is not a {kind} file ({', '.join(SUFFIXES[kind])})",
                            hint=f"one {kind} path a line, optionally TAB and a label")
        files.append(f)
        labels.append(label.strip() or None)
    if not files:
        raise DataError(f"{path} lists no {kind} files", hint=f"one {kind} path a line")
    return _media_set(files, labels, str(path), kind)


def _media_set(files: list[Path], labels: list[str | None], source: str, kind: str) -> MediaSet:
    if len(files) > MAX_FILES:
        raise DataError(f"{source} holds {len(files):,} {kind} files, more than {MAX_FILES:,}",
                        hint="use a sample of them")
    texts = tuple(f"{_sha256(f)} {f.name}" for f in files)
    return MediaSet(texts=texts, source=source, modality=kind, files=tuple(f.absolute() for f in files),
                    labels=tuple(labels))


def _sha256(path: Path) -> str:
    return checked_sha256(path, MAX_FILE_BYTES, "a media file")
