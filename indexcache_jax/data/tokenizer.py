"""The embedded model's tokenizer: a byte-level BPE trained with the `tokenizers` library on the train split.

Byte-level: every byte maps to one symbol of the GPT-2 byte alphabet, so any text round-trips exactly, and each
vocabulary entry stands for a fixed byte string (`token_bytes`), which is what bits per byte counts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

EOS = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2):
    """A byte-level BPE `tokenizers.Tokenizer` with `vocab_size` entries, id 0 = `EOS` (the only special token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 4096 <= vocab_size <= 8192:
        raise ValueError(f"vocab_size must be in [4096, 8192], got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(EOS) != 0:
        raise ValueError("the EOS token did not get id 0")
    return tok


def save_tokenizer(tok, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer at {path}")
    return Tokenizer.from_file(path)


def eos_id(tok) -> int:
    i = tok.token_to_id(EOS)
    if i is None:
        raise ValueError(f"tokenizer has no {EOS} token")
    return i


def token_bytes(tok) -> np.ndarray:
    """int64 `[V]`: how many UTF-8 bytes each token id stands for (0 for the EOS token).

    Byte-level BPE writes each byte as one character of its 256-symbol alphabet, so a vocabulary entry's length in
    characters is its length in bytes.
    """
    vocab = tok.get_vocab()
    out = np.zeros(tok.get_vocab_size(), np.int64)
    for piece, i in vocab.items():
        out[i] = 0 if piece == EOS else len(piece)
    return out
