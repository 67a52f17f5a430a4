"""A word-level `tokenizers` tokenizer with a known vocabulary, so tests can encode and decode by dict lookups."""

from __future__ import annotations

WORDS = ("the cat sat on a mat and saw dog run far away from home while rain fell over hills near river "
         "old town quiet night light sound").split()
SPECIAL = ("[UNK]", "</s>")
VOCAB = {w: i for i, w in enumerate(SPECIAL + tuple(WORDS))}


def make_tokenizer():
    """`tokenizers.Tokenizer`: whitespace-split words -> ids of VOCAB ([UNK] for others); decode joins by spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL))
    return tok


def encode(text: str) -> list[int]:
    return [VOCAB.get(w, VOCAB["[UNK]"]) for w in text.split()]


def decode(ids: list[int]) -> str:
    words = {i: w for w, i in VOCAB.items()}
    return " ".join(words[i] for i in ids if words[i] not in SPECIAL)
