"""Long-range key/value retrieval (in the spirit of RULER's needle tasks), built reproducibly from a seed.

A case is text: a stretch of real Python source with `n_keys` assignment lines `KEY_<4 hex> = <4 digits>` inserted
between its lines, then `n_queries` query lines `assert KEY_<hex> == <value>`. The model sees the text up to and
including the first query's `==` (the prompt) and must complete the value: greedy decoding must produce the
tokens of " <value>" and then a token that starts with a newline. Accuracy is exact match of that completion.

Construction (`make_case`, all choices from `numpy.random.default_rng([seed, index])`, in this order):
1. keys: `n_keys` distinct integers in [0, 65536) -> `KEY_%04x`; values: integers in [1000, 10000);
2. queried keys: `n_queries` distinct key slots, in the drawn order;
3. filler start: a line index into the pool (the lines of the given files, sorted by path, concatenated; every line
   ends with a newline), read cyclically;
4. depths: one uniform [0, 1) draw per key; key i is inserted before filler line `floor(depth_i * n_lines)`.
The number of filler lines is the largest found (by shrinking from an over-long start) whose text tokenizes to at
most `context_tokens` tokens, query lines and answers included. When even one filler line does not fit (a long
line in a short budget), the case has no filler: the assignment lines in key order, then the query lines. A case
fails only when those alone exceed the budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

KEY_FORMAT = "KEY_{:04x}"
VALUE_RANGE = (1000, 10000)
CHARS_PER_TOKEN_START = 5.0  # a first guess above this tokenizer's ~3.5 bytes per token of code; then it shrinks


@dataclasses.dataclass(frozen=True)
class RetrievalCase:
    """One case. `prompt` ends with the first query's `==`; `answer` is `" " + value`; `text` is the whole case
    (every query line answered, each ending with a newline). `depth` is the relative position of the queried
    key's assignment in the filler (0 = start)."""

    prompt: str
    answer: str
    text: str
    key: str
    value: str
    depth: float
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    text_ids: tuple[int, ...]


class FillerPool:
    """The lines of some files (sorted by path, concatenated), each ending with a newline."""

    def __init__(self, files: Sequence):
        lines = []
        for f in sorted(files, key=lambda f: f.path):
            for line in f.text.splitlines(keepends=True):
                lines.append(line if line.endswith("\n") else line + "\n")
        if not lines:
            raise ValueError("filler files hold no lines")
        self.lines = lines

    def take(self, start: int, count: int) -> list[str]:
        n = len(self.lines)
        return [self.lines[(start + i) % n] for i in range(count)]


def make_case(pool: FillerPool, tokenizer, *, seed: int, index: int, context_tokens: int, n_keys: int = 8,
              n_queries: int = 1) -> RetrievalCase:
    """The case `index` of the series `seed` (see the module docstring for the exact construction)."""
    if not 1 <= n_queries <= n_keys:
        raise ValueError(f"need 1 <= n_queries <= n_keys, got n_queries={n_queries}, n_keys={n_keys}")
    if context_tokens < 64:
        raise ValueError(f"context_tokens must be >= 64, got {context_tokens}")
    rng = np.random.default_rng([seed, index])
    keys = [KEY_FORMAT.format(int(k)) for k in rng.choice(65536, n_keys, replace=False)]
    values = [str(int(v)) for v in rng.integers(*VALUE_RANGE, n_keys)]
    queried = [int(q) for q in rng.choice(n_keys, n_queries, replace=False)]
    start = int(rng.integers(len(pool.lines)))
    depths = rng.random(n_keys)

    q0 = queried[0]
    query_tail = "".join(f"assert {keys[q]} == {values[q]}\n" for q in queried[1:])
    n_lines = max(1, int(context_tokens * CHARS_PER_TOKEN_START / 40))  # ~40 characters a line
    for _ in range(65):
        filler = pool.take(start, n_lines)
        slots = np.floor(depths * n_lines).astype(int)  # all 0 when there is no filler line
        body = []
        for i in range(n_lines + 1):
            body += [f"{keys[k]} = {values[k]}\n" for k in range(n_keys) if slots[k] == i]
            if i < n_lines:
                body.append(filler[i])
        prompt = "".join(body) + f"assert {keys[q0]} =="
        text = prompt + f" {values[q0]}\n" + query_tail
        text_ids = tokenizer.encode(text).ids
        if len(text_ids) <= context_tokens:
            break
        if n_lines == 0:
            raise ValueError(f"could not fit a case into {context_tokens} tokens: its {n_keys} assignment and "
                             f"{n_queries} query lines alone take {len(text_ids)}")
        # One line that still does not fit leaves no filler (it may be a single long line).
        n_lines = 0 if n_lines == 1 else max(1, min(n_lines - 1, int(n_lines * context_tokens / len(text_ids) * 0.995)))
    else:
        raise ValueError(f"could not fit a case into {context_tokens} tokens")
    prompt_ids = tokenizer.encode(prompt).ids
    answer_ids = tokenizer.encode(f" {values[q0]}").ids
    if list(text_ids[: len(prompt_ids) + len(answer_ids)]) != list(prompt_ids) + list(answer_ids):
        raise ValueError("prompt and answer do not tokenize on their own as inside the case text")
    return RetrievalCase(prompt=prompt, answer=f" {values[q0]}", text=text, key=keys[q0], value=values[q0],
                         depth=float(depths[q0]), prompt_ids=tuple(prompt_ids), answer_ids=tuple(answer_ids),
                         text_ids=tuple(text_ids))


def make_cases(pool: FillerPool, tokenizer, *, seed: int, count: int, context_tokens: int, n_keys: int = 8,
               n_queries: int = 1) -> list[RetrievalCase]:
    return [make_case(pool, tokenizer, seed=seed, index=i, context_tokens=context_tokens, n_keys=n_keys,
                      n_queries=n_queries) for i in range(count)]


def newline_token_ids(tokenizer) -> np.ndarray:
    """Ids of the tokens whose text starts with a newline (any of them ends the value)."""
    from indexcache_jax.data.tokenizer import EOS

    vocab = tokenizer.get_vocab()
    newline = "\u010a"  # byte 0x0a in the byte-level alphabet
    return np.asarray(sorted(i for piece, i in vocab.items() if piece != EOS and piece.startswith(newline)), np.int64)


def eval_batch(cases: Sequence[RetrievalCase], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced inputs for scoring: (tokens int32 `[B, length]` = prompt, answer, then `pad_id`;
    prompt lengths int64 `[B]`). Causal attention makes the padding after the answer irrelevant."""
    tokens = np.full((len(cases), length), pad_id, np.int32)
    lengths = np.zeros(len(cases), np.int64)
    for b, case in enumerate(cases):
        ids = list(case.prompt_ids) + list(case.answer_ids)
        if len(ids) + 1 > length:
            raise ValueError(f"case {b} needs {len(ids) + 1} positions, more than length {length}")
        tokens[b, : len(ids)] = ids
        lengths[b] = len(case.prompt_ids)
    return tokens, lengths


def answer_positions(cases: Sequence[RetrievalCase], lengths: np.ndarray) -> np.ndarray:
    """int64 `[B, A + 1]` (A = longest answer): the positions whose logits predict each answer token and then the
    terminator; rows of shorter answers repeat their last position (masked by `exact_match`)."""
    width = max(len(c.answer_ids) for c in cases) + 1
    out = np.zeros((len(cases), width), np.int64)
    for b, case in enumerate(cases):
        n = len(case.answer_ids) + 1
        pos = lengths[b] - 1 + np.arange(n)
        out[b, :n] = pos
        out[b, n:] = pos[-1]
    return out


def exact_match(cases: Sequence[RetrievalCase], predictions: np.ndarray, newline_ids: np.ndarray) -> np.ndarray:
    """bool `[B]`: greedy completion == the value. predictions int `[B, A + 1]` are the argmax tokens at
    `answer_positions`: each answer token must be predicted in turn, then a token starting with a newline."""
    out = np.zeros(len(cases), bool)
    newline = set(int(i) for i in newline_ids)
    for b, case in enumerate(cases):
        n = len(case.answer_ids)
        out[b] = list(predictions[b, :n]) == list(case.answer_ids) and int(predictions[b, n]) in newline
    return out
