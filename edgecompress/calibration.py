"""Text sources -> texts -> tokenized, fixed-shape batches (for calibration and evaluation).

User files are .txt (one text a line), .jsonl (a "text" field) or .csv/.tsv (a named column). Every way a file
can be unusable (missing, unreadable, binary, empty, wrong column) is a DataError with one line saying how to fix
it. The built-in corpus ships in the package: disjoint calibration and evaluation splits written for this project.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgecompress.errors import DataError

log = logging.getLogger(__name__)

Split = Literal["calibration", "evaluation", "passages_calibration", "passages_evaluation"]
SUPPORTED = (".txt", ".jsonl", ".csv", ".tsv")


@dataclass(frozen=True)
class TextSet:
    texts: tuple[str, ...]
    source: str  # "builtin:evaluation" or the file path

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "count": len(self.texts)}

    def fingerprint(self) -> str:
        """Identifies the texts (tasks.base.DataSet): part of build keys."""
        from edgecompress.cache import hash_texts

        return hash_texts(self.texts)


def builtin_texts(split: Split) -> TextSet:
    path = resources.files("edgecompress") / "data" / "corpus" / f"{split}.txt"
    texts = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return TextSet(texts, f"builtin:{split}")


# Bounds on a user's text file, so that one bad file cannot exhaust memory: texts are truncated to the model's
# context (512 tokens at most here, a few thousand characters) anyway, so these are far above any useful input.
MAX_FILE_BYTES = 256 * 2**20
MAX_LINE_CHARS = 100_000


def _read_text_file(path: Path) -> str:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"text file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}", hint="check the path and its permissions") from None
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a text file")
    if not path.is_file():  # a FIFO, socket or device: reading it could block forever or never end
        raise DataError(f"{path} is not a regular file", hint="give a text file saved on disk")
    if st.st_size > MAX_FILE_BYTES:
        raise DataError(f"{path} is {st.st_size / 2**20:,.0f} MiB, more than the {MAX_FILE_BYTES // 2**20} MiB "
                        "a text file may have", hint="use a sample of the texts")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}", hint="check the path and its permissions") from None
    if len(raw) > MAX_FILE_BYTES:
        raise DataError(f"{path} grew past {MAX_FILE_BYTES // 2**20} MiB while being read")
    if (nul := raw.find(b"\x00")) >= 0:
        raise DataError(f"{path} contains a NUL byte (at byte {nul}): it looks binary",
                        hint=f"give a UTF-8 text file: {', '.join(SUPPORTED)}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start})", hint="re-encode it as UTF-8") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if len(line) > MAX_LINE_CHARS:
            raise DataError(f"{path}:{lineno} is {len(line):,} characters long, more than the {MAX_LINE_CHARS:,} a "
                            "line may have", hint="one text a line; split or shorten it")
    return text


def load_texts(path: str | Path, text_column: str | None = None) -> TextSet:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise DataError(f"unsupported text file type '{suffix or path.name}'",
                        hint=f"use one of {', '.join(SUPPORTED)}")
    content = _read_text_file(path)
    if suffix == ".txt":
        texts = [line.strip() for line in content.splitlines()]
    elif suffix == ".jsonl":
        texts = _jsonl_texts(path, content, text_column or "text")
    else:
        texts = _table_texts(path, content, "," if suffix == ".csv" else "\t", text_column)
    texts = [t for t in texts if t]
    if not texts:
        raise DataError(f"{path} holds no texts", hint="give at least one non-empty text")
    return TextSet(tuple(texts), str(path))


def _jsonl_texts(path: Path, content: str, field: str) -> list[str]:
    texts = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{lineno} is not valid JSON", hint="one JSON object a line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise DataError(f"{path}:{lineno} has no string field '{field}'",
                            hint="each line needs {\"" + field + "\": \"...\"}, or pass --text-column")
        texts.append(obj[field].strip())
    return texts


def _table_texts(path: Path, content: str, delimiter: str, column: str | None) -> list[str]:
    reader = csv.DictReader(io.StringIO(content), delimiter=delimiter)
    fields = reader.fieldnames or []
    if column is None:
        if "text" not in fields:
            raise DataError(f"{path} has no 'text' column (columns: {', '.join(fields) or 'none'})",
                            hint="name the column with --text-column")
        column = "text"
    elif column not in fields:
        raise DataError(f"{path} has no column '{column}' (columns: {', '.join(fields) or 'none'})",
                        hint="check --text-column")
    try:
        return [(row.get(column) or "").strip() for row in reader]
    except csv.Error as e:
        raise DataError(f"{path} is not a valid {'CSV' if delimiter == ',' else 'TSV'} file: {e}") from None


def tokenize_batches(
    tokenizer: Any,
    texts: Sequence[str],
    input_names: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int = 512,
    pad_to: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Tokenize into int64 batches with the model's input names.

    Each batch is padded to its longest text, or to `pad_to` when given (calibrators need one fixed length).
    Texts longer than `max_length` tokens are truncated; the caller learns how many via `count_truncated`.
    """
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        enc = tokenizer(chunk, padding="max_length" if pad_to else "longest", max_length=pad_to or max_length,
                        truncation=True, return_tensors="np")
        batch = {}
        for name in input_names:
            if name in enc:
                batch[name] = enc[name].astype(np.int64)
            elif name == "token_type_ids":
                batch[name] = np.zeros_like(enc["input_ids"], dtype=np.int64)
            else:
                raise DataError(f"the tokenizer gives no '{name}', which the model needs as input")
        yield batch


def count_truncated(tokenizer: Any, texts: Sequence[str], max_length: int) -> int:
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=False)["input_ids"]]
    return sum(1 for n in lengths if n > max_length)


@dataclass(frozen=True)
class SampleChoice:
    """Which calibration samples a pass uses: a seeded choice, reproducible from (total, count, seed)."""

    total: int
    count: int
    seed: int
    batch_size: int

    def describe(self) -> dict[str, Any]:
        return {"available": self.total, "used": self.count, "seed": self.seed, "batch_size": self.batch_size}


def _rows(batch: dict[str, np.ndarray]) -> int:
    return int(next(iter(batch.values())).shape[0])


# What calibration batches hold (tasks.EncoderTask.calibration_batches; an .onnx file's random inputs too).
CALIBRATION_BATCH = 8


def select_samples(
    batches: Callable[[], Iterator[dict[str, np.ndarray]]],
    count: int,
    seed: int,
    batch_size: int = CALIBRATION_BATCH,
) -> tuple[Callable[[], Iterator[dict[str, np.ndarray]]], SampleChoice]:
    """A seeded choice of `count` samples out of `batches`, regrouped into batches of the source's batch size.
    `batch_size` is the least number of samples the source must hold.

    Streams twice over the source (once to count, once per use) and never holds more than one batch, so memory
    does not grow with the number of texts. The chosen samples keep their source order. Fewer samples than one
    batch is a DataError: statistics over a handful of texts would not represent the model's inputs.
    """
    total, source_batch = 0, 0
    for batch in batches():
        total += _rows(batch)
        source_batch = source_batch or _rows(batch)
    if total < batch_size:
        raise DataError(f"calibration data has {total} text{'s' if total != 1 else ''}, fewer than one batch of "
                        f"{batch_size}", hint=f"give at least {batch_size} texts with --calibration")
    # regroup at the source's own batch size: a model with a fixed batch dimension accepts only that
    batch_size = source_batch
    used = min(count, total)
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=used, replace=False))

    def choose() -> Iterator[dict[str, np.ndarray]]:
        offset = 0
        pending: list[dict[str, np.ndarray]] = []
        for batch in batches():
            n = _rows(batch)
            lo, hi = np.searchsorted(chosen, [offset, offset + n])
            offset += n
            if hi > lo:
                idx = chosen[lo:hi] - (offset - n)
                part = {k: v[idx] for k, v in batch.items()}
                # samples of different lengths cannot share a batch: flush before a shape change
                if pending and any(pending[0][k].shape[1:] != v.shape[1:] for k, v in part.items()):
                    yield from _regroup(pending, batch_size)
                    pending = []
                pending.append(part)
                pending = list(_regroup(pending, batch_size))
                while pending and _rows(pending[0]) == batch_size:
                    yield pending.pop(0)
        yield from _regroup(pending, batch_size)

    return choose, SampleChoice(total=total, count=int(used), seed=seed, batch_size=batch_size)


def _regroup(parts: list[dict[str, np.ndarray]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Concatenate parts and cut them into batches of `size`, the remainder last."""
    if not parts:
        return
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    n = _rows(merged)
    full = n // size * size
    for start in range(0, full, size):
        yield {k: v[start:start + size] for k, v in merged.items()}
    if full < n:
        yield {k: v[full:] for k, v in merged.items()}


def trim_padding(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch cut to its longest real text, when every input is [batch, seq] with an attention mask.

    Exact for what fidelity compares (outputs at masked positions are never read), and much cheaper to run:
    calibration batches are padded to a fixed length that most sentences are far shorter than.
    """
    mask = batch.get("attention_mask")
    if mask is None or mask.ndim != 2 or any(v.shape != mask.shape for v in batch.values()):
        return batch
    cols = np.flatnonzero(mask.any(axis=0))
    length = int(cols[-1]) + 1 if cols.size else 1
    return {k: v[:, :length] for k, v in batch.items()}
