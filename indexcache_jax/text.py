"""Text in, text out: a checkpoint's `tokenizers.Tokenizer`, and batch encode / decode around the token-id API.

The engine (`generate`, `score`) works on token ids; these helpers turn strings into id lists and back, with the
Hugging Face `tokenizer.json` that HF checkpoints ship. The files that travel with a model's weights from one
directory to the next (converter, distillation, exporter) are listed here too: the tokenizer files and generation
defaults (`TOKENIZER_FILES`, copied as they are) and the source HF config, kept as `HF_CONFIG_COPY` in converted
directories (the exporter restores from it the fields our config does not hold).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
HF_CONFIG_COPY = "hf_config.json"


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies the `TOKENIZER_FILES` that the directory `src` holds into `dst`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def load_tokenizer(path: str | os.PathLike):
    """The `tokenizers.Tokenizer` of `path`: a `tokenizer.json` file, or a directory holding one; None when there is
    none. A file that is not a tokenizer raises ValueError naming it."""
    from tokenizers import Tokenizer

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(path):
        return None
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own Exception type for every parse error
        raise ValueError(f"{path} is not a tokenizers tokenizer.json ({' '.join(str(e).split())})") from None


def _check_texts(texts: Any, what: str) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise ValueError(f"{what} must be a list of str, got {type(texts).__name__}")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{what}[{bad[0]}] is a {type(texts[bad[0]]).__name__}, not a str")
    return list(texts)


def encode_batch(tokenizer, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
    """One list of token ids per text. `add_special_tokens` applies the tokenizer's post-processor (e.g. a BOS), as
    `transformers` tokenizers do by default."""
    texts = _check_texts(texts, "texts")
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]


def decode_batch(tokenizer, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True) -> list[str]:
    """One string per list of token ids (special tokens such as an EOS dropped unless `skip_special_tokens=False`)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise ValueError(f"ids must be a list of token-id lists, got {type(ids).__name__}")
    rows = []
    for i, row in enumerate(ids):
        arr = np.asarray(row)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"ids[{i}] must be a flat list of int token ids, got {arr.dtype} {arr.shape}")
        if arr.size and arr.min() < 0:
            raise ValueError(f"ids[{i}] holds a negative token id {int(arr.min())}")
        rows.append(arr.astype(np.int64).tolist())
    return tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists -> (int32 `[B, T]` right-padded with `pad_id`, int32 mask `[B, T]`: 1 = real token), the
    `score(tokens, mask=...)` inputs; T is the longest row."""
    if not rows:
        raise ValueError("rows is empty: pass at least one token-id list")
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return tokens, mask


__all__ = ["HF_CONFIG_COPY", "TOKENIZER_FILE", "TOKENIZER_FILES", "copy_tokenizer_files", "decode_batch",
           "encode_batch", "load_tokenizer", "pad_batch"]
