"""The Python standard library as a corpus: file discovery, the train/validation split, and LM windows.

Files: every `.py` file under `sysconfig.get_paths()["stdlib"]` except `site-packages/` (installed packages, not the
stdlib) and `__pycache__/`, read as UTF-8 (files that are not valid UTF-8 are skipped and listed), sorted by relative
path. Split: a file is in validation when the first 8 hex digits of `sha256(relative path)` read as an integer modulo
100 are below `VALIDATION_PERCENT`. The split depends on the path only, so Python 3.11 and 3.12 put the files they
share on the same side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import sysconfig

import numpy as np

VALIDATION_PERCENT = 5
SPLITS = ("train", "validation")


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def split_of(relative_path: str) -> str:
    """"train" or "validation" for a path relative to the stdlib root (with "/" separators)."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).hexdigest()
    return "validation" if int(digest[:8], 16) % 100 < VALIDATION_PERCENT else "train"


@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the stdlib root, "/"-separated
    text: str

    @property
    def num_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The sorted files of each split, where they came from, and the files skipped as not UTF-8."""

    root: str
    python_version: str
    train: tuple[SourceFile, ...]
    validation: tuple[SourceFile, ...]
    skipped: tuple[str, ...]

    def files(self, split: str) -> tuple[SourceFile, ...]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)

    def manifest(self) -> dict:
        """What a run used: version, root, and per split the sorted file list with byte counts."""
        return {
            "python_version": self.python_version,
            "stdlib_root": self.root,
            "validation_percent": VALIDATION_PERCENT,
            "split_rule": "validation iff int(sha256(relative_path).hexdigest()[:8], 16) % 100 < validation_percent",
            "skipped_not_utf8": list(self.skipped),
            **{split: {"num_files": len(self.files(split)),
                       "num_bytes": sum(f.num_bytes for f in self.files(split)),
                       "files": [[f.path, f.num_bytes] for f in self.files(split)]} for split in SPLITS},
        }

    def save_manifest(self, path: str) -> None:
        write_json_atomic(path, self.manifest())


def load_corpus(root: str | None = None, max_files: int | None = None) -> Corpus:
    """Reads and splits the `.py` files under `root` (default: this interpreter's stdlib).

    `max_files` keeps only the first files in sorted order (for small tests).
    """
    root = os.path.abspath(root or stdlib_root())
    if not os.path.isdir(root):
        raise ValueError(f"corpus root {root} is not a directory")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in filenames:
            if name.endswith(".py"):
                paths.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    paths.sort()
    if max_files is not None:
        paths = paths[:max_files]
    train, validation, skipped = [], [], []
    for rel in paths:
        with open(os.path.join(root, rel), "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        (validation if split_of(rel) == "validation" else train).append(SourceFile(rel, text))
    if not train or not validation:
        raise ValueError(f"corpus at {root} has {len(train)} train and {len(validation)} validation files; "
                         "need both")
    version = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return Corpus(root, version, tuple(train), tuple(validation), tuple(skipped))


def token_stream(files, tokenizer, eos_id: int) -> np.ndarray:
    """All files encoded one by one and joined, each followed by `eos_id`: int32 `[N]`."""
    encoded = tokenizer.encode_batch([f.text for f in files])
    parts = []
    for enc in encoded:
        parts.append(np.asarray(enc.ids, np.int32))
        parts.append(np.asarray([eos_id], np.int32))
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def lm_windows(stream: np.ndarray, length: int, max_windows: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows of `length` tokens from the start of `stream`: int32 `[W, length]`."""
    if length < 2:
        raise ValueError(f"window length must be >= 2, got {length}")
    n = len(stream) // length
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"a stream of {len(stream)} tokens holds no window of {length}")
    return np.asarray(stream[: n * length], np.int32).reshape(n, length)


def write_json_atomic(path: str, obj) -> None:
    """JSON to `path` through a temporary file and a rename, so a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
