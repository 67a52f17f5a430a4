"""Data for the embedded model: the Python standard library's source, its BPE tokenizer, and the retrieval task.

- `corpus`: the stdlib `.py` files, sorted, split train/validation by a hash of the relative path; LM windows.
- `tokenizer`: the byte-level BPE (trained here with `tokenizers`), bytes per token for bits per byte.
- `retrieval`: long-range key/value retrieval cases (RULER-style) built from a seed, and their exact-match score.
"""

from indexcache_jax.data import corpus, retrieval, tokenizer

__all__ = ["corpus", "retrieval", "tokenizer"]
