"""`python -m indexcache_jax.data OUT_DIR [--vocab-size 4096]`: trains the byte-level BPE on this interpreter's
stdlib train split and writes `OUT_DIR/tokenizer.json` and `OUT_DIR/tokenizer_files.json` (the files it saw)."""

from __future__ import annotations

import argparse
import os

from indexcache_jax.data import corpus, tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--vocab-size", type=int, default=tokenizer.DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    data = corpus.load_corpus()
    tok = tokenizer.train_tokenizer([f.text for f in data.train], vocab_size=args.vocab_size)
    tokenizer.save_tokenizer(tok, os.path.join(args.out_dir, "tokenizer.json"))
    data.save_manifest(os.path.join(args.out_dir, "tokenizer_files.json"))
    print(f"tokenizer ({tok.get_vocab_size()} entries) trained on {len(data.train)} files of Python "
          f"{data.python_version}'s stdlib -> {args.out_dir}")


if __name__ == "__main__":
    main()
