"""Audio data for speech models: which clips (a directory, a list file, one file, or the built-in set) and their
samples as 16 kHz mono float32.

The shape mirrors the image side's media sets (issue 16's coordination note): a set lists files, optional reference
transcripts, a content digest for cache keys, and `texts` ("<sha256> <name>" per clip) so the existing
`hash_texts(x.texts)` build and cache keys stay content-addressed. Decoding is soundfile (libsndfile: .wav and
.flac). Every way a clip can be unusable is a DataError (exit 2) raised when the set is loaded, at plan time.

Layering: imports only errors and datafile (the per-file checks media.py's images get too); calibration (a list
file gets a text file's checks), numpy and soundfile lazily.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from edgecompress.datafile import checked_sha256
from edgecompress.errors import DataError

SAMPLE_RATE = 16_000  # what Whisper's and wav2vec2's feature extractors expect
SUFFIXES = (".wav", ".flac")
LIST_SUFFIXES = (".txt", ".lst", ".tsv")
MAX_CLIP_BYTES = 64 * 2**20  # ~30 min of 16-bit 16 kHz audio: far beyond what a speech model takes in one go
MAX_CLIP_SECONDS = 600.0
MAX_CLIPS = 10_000

Split = Literal["calibration", "evaluation"]


@dataclass(frozen=True)
class AudioSet:
    files: tuple[Path, ...]
    source: str  # the directory or list file, or "builtin:audio/evaluation"
    labels: tuple[str | None, ...]  # reference transcript per clip, None where not given
    hashes: tuple[str, ...]  # sha256 of each file's bytes
    modality: str = "audio"

    @property
    def texts(self) -> tuple[str, ...]:
        """One line per clip naming its content, so hash_texts(x.texts) keys change when any clip changes."""
        return tuple(f"{h} {f.name} {label or ''}" for f, h, label in zip(self.files, self.hashes, self.labels,
                                                                         strict=True))

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.texts).encode()).hexdigest()

    fingerprint = digest  # the task adapters' DataSet protocol name

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "count": len(self.files), "modality": self.modality,
                "transcripts": sum(label is not None for label in self.labels)}

    @property
    def has_references(self) -> bool:
        return any(label is not None for label in self.labels)


def builtin_audio(split: Split) -> AudioSet:
    """The clips shipped in the package (edgecompress/data/audio/<split>/, see its README: espeak-ng sentences)."""
    root = Path(str(resources.files("edgecompress") / "data" / "audio" / split))
    return _from_list(root / "transcripts.tsv", f"builtin:audio/{split}")


def audio_data(path: Path | None, text_column: str | None = None, role: str = "evaluation") -> AudioSet:
    """--eval/--calibration for a speech model (the adapter's data loader): the path's clips, or the built-in ones."""
    if text_column is not None:
        raise DataError("--text-column does not apply to audio data", hint="leave it out for a speech model")
    if path is None:
        return builtin_audio("calibration" if role == "calibration" else "evaluation")
    return load_audio_data(path)


def load_audio_data(path: Path) -> AudioSet:
    """--calibration/--eval for a speech model: a directory of .wav/.flac (recursive; a `<clip>.txt` beside a clip
    is its reference transcript), a list file (`path<TAB>transcript` a line, paths relative to the list file), or
    one audio file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"audio data not found: {path}", hint="give a directory of .wav/.flac files")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path} holds no audio files ({', '.join(SUFFIXES)})",
                            hint="give a directory of .wav/.flac clips, or a list file of them")
        labels = tuple(_sidecar(f) for f in files)
        return _checked(tuple(files), labels, str(path))
    if path.suffix.lower() in SUFFIXES:
        return _checked((path,), (_sidecar(path),), str(path))
    if path.suffix.lower() in LIST_SUFFIXES:
        return _from_list(path, str(path))
    raise DataError(f"{path} is not audio data for a speech model",
                    hint=f"give a directory of {'/'.join(SUFFIXES)} clips, a list file ({', '.join(LIST_SUFFIXES)}) "
                         "or one clip")


def _sidecar(clip: Path) -> str | None:
    txt = clip.with_suffix(".txt")
    if not txt.is_file():
        return None
    try:
        return " ".join(txt.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the transcript {txt}: {e}", hint="save it as UTF-8 text") from None


def _from_list(list_file: Path, source: str) -> AudioSet:
    from edgecompress.calibration import _read_text_file  # the list file gets a text file's checks, as media.py's

    lines = _read_text_file(list_file).splitlines()
    files: list[Path] = []
    labels: list[str | None] = []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, label = line.partition("\t")
        clip = (list_file.parent / name.strip())
        if clip.suffix.lower() not in SUFFIXES:
            raise DataError(f"{list_file}: '{name.strip()}' is not a {'/'.join(SUFFIXES)} file",
                            hint="one clip path a line, optionally <TAB> its transcript")
        files.append(clip)
        labels.append(" ".join(label.split()) or None)
    if not files:
        raise DataError(f"{list_file} lists no audio clips", hint="one clip path a line")
    return _checked(tuple(files), tuple(labels), source)


def _checked(files: tuple[Path, ...], labels: tuple[str | None, ...], source: str) -> AudioSet:
    """Every clip a readable regular file (datafile.py's checks) that decodes; its bytes hashed for the cache keys."""
    if len(files) > MAX_CLIPS:
        raise DataError(f"{source} has {len(files):,} clips, more than {MAX_CLIPS:,}", hint="use a sample")
    hashes = []
    for f in files:
        hashes.append(checked_sha256(f, MAX_CLIP_BYTES, "a clip", too_big_hint="cut it into clips of at most 30 s"))
        info = _info(f)
        if info[0] / info[1] > MAX_CLIP_SECONDS:
            raise DataError(f"{f} lasts {info[0] / info[1]:,.0f} s, more than {MAX_CLIP_SECONDS:.0f} s",
                            hint="cut it into clips of at most 30 s")
    return AudioSet(files, source, labels, tuple(hashes))


def _info(path: Path) -> tuple[int, int]:
    import soundfile

    try:
        i = soundfile.info(str(path))
    except Exception as e:  # libsndfile's own message: "Format not recognised", "unimplemented format", ...
        raise DataError(f"{path} is not a readable .wav/.flac file: {str(e).splitlines()[0] if str(e) else e}",
                        hint="convert it, e.g. `sox in.mp3 -r 16000 -c 1 out.flac`") from None
    if i.frames <= 0 or i.samplerate <= 0:
        raise DataError(f"{path} holds no audio samples")
    return int(i.frames), int(i.samplerate)


def read_clip(path: Path) -> Any:
    """The clip as float32 mono at SAMPLE_RATE (channels averaged; other rates resampled linearly, which is
    enough for calibration and a like-for-like FP32-vs-compressed comparison)."""
    import numpy as np
    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        n = max(1, round(len(mono) * SAMPLE_RATE / rate))
        mono = np.interp(np.linspace(0, len(mono) - 1, n), np.arange(len(mono)), mono).astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)
