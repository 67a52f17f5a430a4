"""indexcache_jax.text: loading tokenizer.json, batch encode / decode, padding, against dict-lookup references."""

import numpy as np
import pytest

import text_oracle
from indexcache_jax import text


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    text_oracle.make_tokenizer().save(str(path / "tokenizer.json"))
    return path


def random_texts(rng, n):
    words = text_oracle.WORDS + ["zebra", "Quartz"]  # two words outside the vocabulary
    return [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(n)]


def test_load_tokenizer_from_dir_or_file(tokenizer_dir, tmp_path):
    rng = np.random.default_rng(0)
    texts = random_texts(rng, 6)
    for source in (tokenizer_dir, tokenizer_dir / "tokenizer.json", str(tokenizer_dir)):
        tok = text.load_tokenizer(source)
        assert text.encode_batch(tok, texts) == [text_oracle.encode(t) for t in texts]
    assert text.load_tokenizer(tmp_path) is None
    assert text.load_tokenizer(tmp_path / "tokenizer.json") is None
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="is not a tokenizers tokenizer.json"):
        text.load_tokenizer(tmp_path)


def test_encode_decode_batch(tokenizer_dir):
    tok = text.load_tokenizer(tokenizer_dir)
    rng = np.random.default_rng(1)
    ids = [rng.integers(0, len(text_oracle.VOCAB), size=rng.integers(0, 10)).tolist() for _ in range(7)]
    assert text.decode_batch(tok, ids) == [text_oracle.decode(r) for r in ids]
    assert text.decode_batch(tok, [np.asarray(r, np.int32) for r in ids]) == [text_oracle.decode(r) for r in ids]
    eos = text_oracle.VOCAB["</s>"]
    assert text.decode_batch(tok, [[eos, 2]], skip_special_tokens=False) == ["</s> " + text_oracle.WORDS[0]]
    words = [w for w in text_oracle.WORDS[:5]]
    assert text.decode_batch(tok, text.encode_batch(tok, [" ".join(words)])) == [" ".join(words)]


def test_pad_batch():
    rng = np.random.default_rng(2)
    rows = [rng.integers(0, 50, size=rng.integers(1, 9)).tolist() for _ in range(5)]
    tokens, mask = text.pad_batch(rows, pad_id=7)
    width = max(len(r) for r in rows)
    assert tokens.shape == mask.shape == (5, width) and tokens.dtype == np.int32
    for i, r in enumerate(rows):
        assert tokens[i].tolist() == r + [7] * (width - len(r))
        assert mask[i].tolist() == [1] * len(r) + [0] * (width - len(r))


def test_bad_input(tokenizer_dir):
    tok = text.load_tokenizer(tokenizer_dir)
    with pytest.raises(ValueError, match="texts must be a list of str, got str"):
        text.encode_batch(tok, "the cat")
    with pytest.raises(ValueError, match=r"texts\[1\] is a int, not a str"):
        text.encode_batch(tok, ["the cat", 3])
    with pytest.raises(ValueError, match="ids must be a list of token-id lists"):
        text.decode_batch(tok, "12")
    with pytest.raises(ValueError, match=r"ids\[0\] must be a flat list of int token ids"):
        text.decode_batch(tok, [[1.5, 2.0]])
    with pytest.raises(ValueError, match=r"ids\[1\] holds a negative token id -1"):
        text.decode_batch(tok, [[1], [2, -1]])
    with pytest.raises(ValueError, match="rows is empty"):
        text.pad_batch([])
