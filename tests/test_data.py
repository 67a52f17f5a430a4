"""The embedded model's data: tokenizer round trip, the path-hash split, retrieval cases and their scoring."""

import hashlib
import os
import re

import numpy as np
import pytest

import indexcache_jax as ic
from indexcache_jax import pretrained
from indexcache_jax.data import corpus, quality, retrieval, tokenizer

SEED = 2026


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load_tokenizer(os.path.join(pretrained.DEFAULT_MODEL_DIR, "tokenizer.json"))


@pytest.fixture(scope="module")
def small_corpus():
    return corpus.load_corpus(max_files=80)


def test_tokenizer_round_trip_and_byte_counts(tok, small_corpus):
    rng = np.random.default_rng(SEED)
    alphabet = list("abcXYZ019 _=()[]{}:.,'\"\n\t#") + ["é", "→", "中", "😀"]
    texts = ["".join(rng.choice(alphabet, int(rng.integers(1, 300)))) for _ in range(20)]
    texts.append(small_corpus.train[int(rng.integers(len(small_corpus.train)))].text[:5000])
    counts = tokenizer.token_bytes(tok)
    for text in texts:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
        assert counts[np.asarray(ids, np.int64)].sum() == len(text.encode("utf-8"))
    assert tok.get_vocab_size() == 4096 and tokenizer.eos_id(tok) == 0 and counts[0] == 0


def test_split_is_a_hash_of_the_path_and_deterministic(small_corpus):
    rng = np.random.default_rng(SEED)
    for _ in range(200):
        path = "/".join("".join(rng.choice(list("abcdefgh_"), int(rng.integers(1, 9)))) for _ in range(3)) + ".py"
        bucket = int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) % 100
        assert corpus.split_of(path) == ("validation" if bucket < corpus.VALIDATION_PERCENT else "train")
    again = corpus.load_corpus(max_files=80)
    assert again.manifest() == small_corpus.manifest()
    paths = [f.path for f in small_corpus.train + small_corpus.validation] + list(small_corpus.skipped)
    assert sorted(paths) == sorted(set(paths)) and len(paths) == 80
    assert all(corpus.split_of(f.path) == "validation" for f in small_corpus.validation)
    assert [f.path for f in small_corpus.train] == sorted(f.path for f in small_corpus.train)


def test_retrieval_case_format(tok, small_corpus):
    pool = retrieval.FillerPool(small_corpus.validation)
    for index in range(6):
        case = retrieval.make_case(pool, tok, seed=SEED, index=index, context_tokens=512, n_keys=6, n_queries=3)
        again = retrieval.make_case(pool, tok, seed=SEED, index=index, context_tokens=512, n_keys=6, n_queries=3)
        assert case == again
        assignments = re.findall(r"^(KEY_[0-9a-f]{4}) = (\d{4})$", case.text, flags=re.M)
        queries = re.findall(r"^assert (KEY_[0-9a-f]{4}) == (\d{4})$", case.text, flags=re.M)
        assert len(assignments) == 6 and len({k for k, _ in assignments}) == 6
        assert len(queries) == 3 and all(q in assignments for q in queries)
        assert queries[0] == (case.key, case.value) and case.answer == " " + case.value
        assert case.prompt.endswith(f"assert {case.key} ==") and case.text.startswith(case.prompt + case.answer + "\n")
        assert len(case.text_ids) <= 512 and list(case.prompt_ids) == tok.encode(case.prompt).ids
        assert list(case.text_ids) == tok.encode(case.text).ids
        assert tok.decode(list(case.answer_ids)) == case.answer
        filler = [line for line in case.prompt.splitlines() if not re.match(r"^KEY_[0-9a-f]{4} = \d{4}$", line)][:-1]
        position = case.prompt.index(f"{case.key} = {case.value}\n")
        assert abs(position / max(1, len(case.prompt)) - case.depth) < 0.2
        assert len(filler) > 0
    other = retrieval.make_case(pool, tok, seed=SEED + 1, index=0, context_tokens=512, n_keys=6)
    assert other.text != retrieval.make_case(pool, tok, seed=SEED, index=0, context_tokens=512, n_keys=6).text


def test_retrieval_case_without_room_for_a_filler_line(tok):
    """A pool of lines longer than the budget: the case keeps its assignment and query lines and drops the filler
    (it used to fail after 64 tries); a budget too small even for those is a ValueError that says so."""
    rng = np.random.default_rng(SEED)
    words = ["".join(rng.choice(list("abcdefghij_"), int(rng.integers(3, 9)))) for _ in range(400)]
    long_lines = "".join(" = ".join(words[i: i + 40]) + "\n" for i in range(0, 400, 40))  # ~400 characters a line
    pool = retrieval.FillerPool([corpus.SourceFile("long.py", long_lines)])
    for index in range(4):
        case = retrieval.make_case(pool, tok, seed=SEED, index=index, context_tokens=100, n_keys=4, n_queries=2)
        assignments = re.findall(r"^(KEY_[0-9a-f]{4}) = (\d{4})$", case.text, flags=re.M)
        queries = re.findall(r"^assert (KEY_[0-9a-f]{4}) == (\d{4})$", case.text, flags=re.M)
        assert len(case.text_ids) <= 100 and len(assignments) == 4 and len(queries) == 2
        assert all(q in assignments for q in queries) and queries[0] == (case.key, case.value)
        assert case.text.count("\n") == 4 + 2  # no filler line
        assert case.text.startswith(case.prompt + case.answer + "\n") and list(case.text_ids) == tok.encode(case.text).ids
    with pytest.raises(ValueError, match="4 assignment and 2 query lines alone take"):
        retrieval.make_case(pool, tok, seed=SEED, index=0, context_tokens=64, n_keys=4, n_queries=2)


def test_exact_match_against_decoded_text(tok, small_corpus):
    """exact_match on planted predictions agrees with decoding the greedy tokens as text."""
    pool = retrieval.FillerPool(small_corpus.validation)
    cases = retrieval.make_cases(pool, tok, seed=SEED, count=12, context_tokens=256, n_keys=4)
    newline = retrieval.newline_token_ids(tok)
    rng = np.random.default_rng(SEED)
    width = max(len(c.answer_ids) for c in cases) + 1
    preds = rng.integers(0, tok.get_vocab_size(), (len(cases), width))
    for b, case in enumerate(cases):
        if b % 3 != 2:
            preds[b, : len(case.answer_ids)] = case.answer_ids
            preds[b, len(case.answer_ids)] = rng.choice(newline) if b % 3 == 0 else tok.token_to_id("Ġ")
    got = retrieval.exact_match(cases, preds, newline)
    for b, case in enumerate(cases):
        n = len(case.answer_ids)
        text = tok.decode([int(i) for i in preds[b, :n]])
        nxt = tok.decode([int(preds[b, n])])
        assert got[b] == (text == case.answer and nxt.startswith("\n")), b
    assert got.sum() == 4


def test_answer_positions_match_greedy_decoding(tok, small_corpus):
    """The argmax at `answer_positions` of one padded forward equals brute-force greedy steps on each prefix."""
    cfg = ic.tiny(vocab_size=4096, max_position_embeddings=512, index_topk=16, backend="xla")
    params = ic.init_params(cfg, seed=1)
    pool = retrieval.FillerPool(small_corpus.validation)
    cases = retrieval.make_cases(pool, tok, seed=SEED, count=2, context_tokens=128, n_keys=2)
    tokens, lengths = retrieval.eval_batch(cases, 160, pad_id=0)
    positions = retrieval.answer_positions(cases, lengths)
    logits = np.asarray(ic.forward(params, cfg, tokens))
    fast = np.take_along_axis(logits, positions[..., None], axis=1).argmax(-1)
    for b, case in enumerate(cases):
        ids = list(case.prompt_ids) + list(case.answer_ids)
        for i in range(len(case.answer_ids) + 1):
            prefix = np.asarray([ids[: len(case.prompt_ids) + i]], np.int32)
            assert int(np.asarray(ic.forward(params, cfg, prefix))[0, -1].argmax()) == fast[b, i]


def test_bootstrap_intervals():
    rng = np.random.default_rng(SEED)
    nll = rng.uniform(100, 200, 40)
    nbytes = rng.integers(300, 600, 40)
    lo, hi = quality.bpb_interval(nll, nbytes, seed=3, reps=500)
    idx = np.random.default_rng(3).integers(0, 40, (500, 40))
    brute = sorted(nll[r].sum() / np.log(2) / nbytes[r].sum() for r in idx)
    assert lo == pytest.approx(np.percentile(brute, 2.5)) and hi == pytest.approx(np.percentile(brute, 97.5))
    assert lo < quality.bits_per_byte(nll, nbytes) < hi
    assert quality.paired_bpb_interval(nll, nll, nbytes, seed=3) == [0.0, 0.0]
    hits = rng.random(200) < 0.7
    lo, hi = quality.mean_interval(hits, seed=1)
    assert lo < hits.mean() < hi and hi - lo < 0.2
