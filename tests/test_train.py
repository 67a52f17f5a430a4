"""Training of the embedded model: the training forward against references, loss going down, exact resume, export."""

import dataclasses
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import indexcache_jax as ic
from indexcache_jax import pretrained, train

SEED = 7


@pytest.fixture(scope="module")
def tiny():
    return dataclasses.replace(train.preset("tiny"), steps=4, sparse_fraction=0.5)


def _softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def test_dense_latent_attention_matches_float64():
    rng = np.random.default_rng(SEED)
    b, t, h, c, v = 2, 9, 3, 6, 4
    q, kv = rng.standard_normal((b, t, h, c)), rng.standard_normal((b, t, c))
    got = np.asarray(train.dense_latent_attention(jnp.asarray(q, jnp.float32), jnp.asarray(kv, jnp.float32), 0.7, v))
    s = np.einsum("bthc,bsc->bhts", q, kv) * 0.7
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    want = np.einsum("bhts,bsc->bthc", _softmax(s), kv[..., :v])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a CUDA GPU")
def test_dense_latent_attention_cudnn_matches_float64():
    rng = np.random.default_rng(SEED + 7)
    b, t, h, c, v = 2, 256, 4, 80, 64
    q, kv = rng.standard_normal((b, t, h, c)), rng.standard_normal((b, t, c))
    got = np.asarray(train.dense_latent_attention(jnp.asarray(q, jnp.bfloat16), jnp.asarray(kv, jnp.bfloat16), 0.1, v,
                                                  "cudnn"), np.float64)
    s = np.einsum("bthc,bsc->bhts", q, kv) * 0.1
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    want = np.einsum("bhts,bsc->bthc", _softmax(s), kv[..., :v])
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)


def test_attention_impl_is_checked_and_resolved():
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        dataclasses.replace(train.preset("tiny"), attention_impl="flash")
    want = "cudnn" if jax.default_backend() == "gpu" else "xla"
    assert train.resolve_attention_impl("auto", "bfloat16", 80) == want
    assert train.resolve_attention_impl("auto", "float32", 80) == "xla"
    assert train.resolve_attention_impl("auto", "bfloat16", 76) == "xla"  # not a multiple of 8
    assert train.resolve_attention_impl("auto", "bfloat16", 576) == "xla"  # wider than cuDNN's flash kernel
    assert train.resolve_attention_impl("xla", "bfloat16", 80) == "xla"


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_kl_matches_float64(sparse):
    rng = np.random.default_rng(SEED + sparse)
    b, s_len, h, c, hi, d, k = 2, 12, 2, 5, 3, 4, 4
    pos = np.asarray([1, 5, 11])
    q, kv = rng.standard_normal((b, len(pos), h, c)), rng.standard_normal((b, s_len, c))
    iq, ik = rng.standard_normal((b, len(pos), hi, d)), rng.standard_normal((b, s_len, d))
    iw = rng.standard_normal((b, len(pos), hi))
    sel = None
    if sparse:  # k distinct causal keys per query, -1 where fewer exist
        sel = np.full((b, len(pos), k), -1)
        for bi in range(b):
            for qi, p in enumerate(pos):
                keys = rng.permutation(p + 1)[:k]
                sel[bi, qi, : len(keys)] = keys
    got = float(train.indexer_kl(*(jnp.asarray(x, jnp.float32) for x in (q, kv, iq, iw, ik)), jnp.asarray(pos), 0.5,
                                 None if sel is None else jnp.asarray(sel, jnp.int32)))
    total = 0.0
    for bi in range(b):
        for qi, p in enumerate(pos):
            keys = np.arange(p + 1) if sel is None else sel[bi, qi][sel[bi, qi] >= 0]
            att = _softmax(np.einsum("hc,sc->hs", q[bi, qi], kv[bi, : p + 1]) * 0.5).sum(0)[keys]
            att = att / att.sum()
            logits = np.einsum("hs,h->s", np.maximum(np.einsum("hd,sd->hs", iq[bi, qi], ik[bi]), 0), iw[bi, qi])[keys]
            logq = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
            total += np.sum(att * (np.log(att) - logq))
    assert got == pytest.approx(total / (b * len(pos)), rel=1e-4, abs=1e-6)


def test_sparse_training_forward_is_the_inference_forward(tiny):
    cfg = tiny.model.replace(backend="xla")
    params = ic.init_params(cfg, seed=SEED)
    tokens = np.random.default_rng(SEED).integers(0, cfg.vocab_size, (2, 97)).astype(np.int32)
    logits, kl, loads = train.forward_train(train.split_params(params, cfg), jnp.asarray(tokens), jnp.arange(0, 97, 4),
                                            cfg, "sparse")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ic.forward(params, cfg, tokens)), rtol=1e-5, atol=1e-5)
    assert kl.shape == (cfg.num_layers,) and np.all(np.asarray(kl) >= 0)
    assert np.asarray(loads["sparse"]).sum(-1) == pytest.approx(2 * 97 * cfg.num_experts_per_tok)


def test_steps_reduce_the_loss(tiny):
    """Steps on one batch drive the LM loss down, and the trained indexers fit the final attention better than the
    initial ones (the attention itself moves, so the KL of step 0 is no baseline)."""
    cfg = tiny.model.replace(backend="xla")
    tx, step, _, _ = train.compiled_steps(cfg, tiny)
    params = train.split_params(ic.init_params(cfg, seed=SEED), cfg)
    initial = jax.tree_util.tree_map(jnp.copy, params)
    opt_state = tx.init(params)
    rng = np.random.default_rng(SEED)
    tokens = jnp.asarray(rng.integers(0, 200, (2, tiny.seq_len + 1)), jnp.int32)
    mask = jnp.ones((2, tiny.seq_len), jnp.float32)
    kl_pos = jnp.asarray(train.kl_positions(tiny, 0))
    lm = []
    for _ in range(8):
        params, opt_state, m = step(params, opt_state, tokens, mask, kl_pos, jnp.float32(1e-2), phase="dense")
        lm.append(float(m["lm"]))
    assert lm[-1] < lm[0] - 0.5
    stacks = {kind: {**stack, "indexer": initial["stacks"][kind]["indexer"]} for kind, stack in params["stacks"].items()}
    kl = {}
    for name, p in (("trained", params), ("initial indexers", {"top": params["top"], "stacks": stacks})):
        _, aux = train.loss_fn(p, tokens, mask, kl_pos, cfg, "dense")
        kl[name] = float(np.sum(aux["kl"]))
    assert kl["trained"] < 0.9 * kl["initial indexers"], kl


def _train_in_a_new_process(config_path, out_dir, *extra):
    """`python -m indexcache_jax.train CONFIG --out DIR`, as a user runs (and resumes) training: each run is a
    fresh process, which also keeps this long test session's XLA:CPU state out of the compiles."""
    done = subprocess.run([sys.executable, "-m", "indexcache_jax.train", str(config_path), "--out", str(out_dir),
                           *extra], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(out_dir, "run.json")) as f:
        return json.load(f)


def test_resume_is_exact_and_export_loads(tiny, tmp_path):
    """4 steps in one process == 1 step, stop, then a new process resuming for 3; the exported weights load with
    `ic.forward`."""
    config = tmp_path / "tiny.json"  # step 0 on short rows, so the resume crosses into full rows
    config.write_text(json.dumps(dataclasses.replace(tiny, short_rows=((1, 32),), copy_fraction=0.5,
                                                     min_copy_span=4).to_dict()))
    straight = _train_in_a_new_process(config, tmp_path / "a")
    first = _train_in_a_new_process(config, tmp_path / "b", "--max-seconds", "0")
    assert not first.get("finished") and first["last_step"] == 1
    resumed = _train_in_a_new_process(config, tmp_path / "b")
    assert straight["finished"] and resumed["finished"]
    assert [s["start_step"] for s in resumed["sessions"]] == [0, 1]
    cfg_a, params_a = pretrained.load_model_dir(str(tmp_path / "a" / "model"))
    cfg_b, params_b = pretrained.load_model_dir(str(tmp_path / "b" / "model"))
    assert cfg_a == cfg_b == tiny.model
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params_a, params_b)
    with open(tmp_path / "a" / "metrics.json") as f:
        steps_a = [m["loss"] for m in json.load(f)["train"]]
    with open(tmp_path / "b" / "metrics.json") as f:
        steps_b = [m["loss"] for m in json.load(f)["train"]]
    assert steps_a == steps_b and len(steps_a) == 4
    tokens = np.random.default_rng(SEED).integers(0, 4096, (1, 40))
    assert np.isfinite(np.asarray(ic.forward(params_a, cfg_a, tokens))).all()
    assert os.path.isfile(tmp_path / "a" / "loss.png") and os.path.isfile(tmp_path / "a" / "data_manifest.json")
    for run in ("a", "b"):  # the model directory carries the tokenizer it was trained with
        with open(tmp_path / run / "model" / "tokenizer.json", "rb") as got, open(train.TOKENIZER_PATH, "rb") as want:
            assert got.read() == want.read()


def test_indexer_and_model_gradients_are_clipped_separately(tiny):
    """Each group is scaled by min(1, clip / its own global norm) (numpy float64), so a large indexer gradient
    leaves the model's gradient as it was, and the other way round."""
    cfg = tiny.model
    params = train.split_params(ic.init_params(cfg, seed=2), cfg)
    rng = np.random.default_rng(SEED)
    for indexer_scale, model_scale in ((100.0, 1e-3), (1e-3, 100.0), (100.0, 100.0)):
        grads = jax.tree_util.tree_map_with_path(
            lambda path, x: (rng.standard_normal(x.shape) * (indexer_scale if train.gradient_group(path) == "indexer"
                                                               else model_scale)).astype(np.float32), params)
        clipped, _ = train.clip_per_group(1.0).update(grads, train.clip_per_group(1.0).init(params))
        flat = jax.tree_util.tree_leaves_with_path(grads)
        norms = {g: np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for p, x in flat
                                if train.gradient_group(p) == g)) for g in ("indexer", "model")}
        assert norms["indexer"] > 0 and norms["model"] > 0
        for (path, g), c in zip(flat, jax.tree_util.tree_leaves(clipped)):
            chex.assert_shape(c, g.shape)
            expected = np.asarray(g, np.float64) * min(1.0, 1.0 / norms[train.gradient_group(path)])
            np.testing.assert_allclose(np.asarray(c, np.float64), expected, rtol=1e-5, atol=1e-9)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="seq_len"):
        train.TrainConfig(seq_len=128, steps=1)
    with pytest.raises(ValueError, match="time_budget_s"):
        train.TrainConfig(steps=0)
    with pytest.raises(ValueError, match="retrieval_answer_weight"):
        train.TrainConfig(steps=1, retrieval_answer_weight=0.0)


def test_too_short_retrieval_cases_are_rejected_before_training():
    """min_retrieval_tokens that cannot hold the key and query lines fails when the data is built, naming it."""
    from indexcache_jax.data import corpus, tokenizer

    tcfg = dataclasses.replace(train.preset("tiny"), retrieval_fraction=0.5, retrieval_keys=12, retrieval_queries=12,
                               min_retrieval_tokens=64)
    tok = tokenizer.load_tokenizer(train.TOKENIZER_PATH)
    with pytest.raises(ValueError, match="min_retrieval_tokens=64 is too short for retrieval_keys=12"):
        train.TrainData(tcfg, tok, corpus.load_corpus(max_files=tcfg.max_files))


def test_copy_rows_repeat_a_random_block_at_a_per_row_distance():
    """Copy rows against brute force: a block of non-eos tokens repeated with period `span`, weights 1 exactly on
    the positions that predict a repeat; spans vary per row within [min_copy_span, (T + 1) / 2]; about
    `copy_fraction` of the rows are copy rows."""
    from indexcache_jax.data import corpus, tokenizer

    tcfg = dataclasses.replace(train.preset("tiny"), copy_fraction=0.5, min_copy_span=4, retrieval_fraction=0.0)
    tok = tokenizer.load_tokenizer(train.TOKENIZER_PATH)
    data = train.TrainData(tcfg, tok, corpus.load_corpus(max_files=tcfg.max_files))
    n = tcfg.seq_len + 1
    spans, rows = [], 0
    for step in range(12):
        tokens, weights = data.batch(step)
        chex.assert_shape([tokens, weights], [(tcfg.batch_size, n), (tcfg.batch_size, n - 1)])
        for row, w in zip(tokens, weights):
            rows += 1
            if w.all():
                continue  # an LM window
            span = int(np.argmax(w)) + 1  # weight j predicts token j + 1
            assert tcfg.min_copy_span <= span <= n // 2 and (w[span - 1:] == 1).all() and (w[: span - 1] == 0).all()
            assert all(row[i] == row[i - span] for i in range(span, n)) and (row[:span] != data.eos).all()
            spans.append(span)
    assert len(set(spans)) > len(spans) // 2
    assert abs(len(spans) / rows - 0.5) < 3 * np.sqrt(0.25 / rows)
    with pytest.raises(ValueError, match="copy_fraction"):
        dataclasses.replace(tcfg, copy_fraction=1.5)


def test_short_rows_hold_the_same_tokens_as_copy_rows_and_stream_windows():
    """During each `short_rows` stage (steps, S) a batch is seq_len / S times as many rows of S + 1 tokens: copy rows
    (checked against brute force) and windows of the train stream (found in it by brute force); then full rows
    again. KL positions follow the row length."""
    from indexcache_jax.data import corpus, tokenizer

    tcfg = dataclasses.replace(train.preset("tiny"), steps=8, sparse_fraction=0.5, short_rows=((2, 32), (1, 64)),
                               copy_fraction=0.5, min_copy_span=4, max_files=60)
    assert tcfg.short_rows_end == 3 and [tcfg.row_len(s) for s in range(5)] == [32, 32, 64, 128, 128]
    tok = tokenizer.load_tokenizer(train.TOKENIZER_PATH)
    data = train.TrainData(tcfg, tok, corpus.load_corpus(max_files=tcfg.max_files))
    kinds = []
    for step, n in [(0, 32), (1, 32), (2, 64)]:
        windows = np.lib.stride_tricks.sliding_window_view(data.stream, n + 1)
        rows = tcfg.batch_size * tcfg.seq_len // n
        tokens, weights = data.batch(step)
        chex.assert_shape([tokens, weights], [(rows, n + 1), (rows, n)])
        positions = train.kl_positions(tcfg, step)
        assert (positions < n).all() and positions.max() >= n - tcfg.kl_query_stride
        for row, w in zip(tokens, weights):
            if w.all():
                assert (windows == row).all(axis=1).any()
                kinds.append("lm")
            else:
                span = int(np.argmax(w)) + 1
                assert all(row[i] == row[i - span] for i in range(span, n + 1)) and (w[span - 1:] == 1).all()
                kinds.append("copy")
    assert abs(kinds.count("copy") / len(kinds) - 0.5) < 3 * np.sqrt(0.25 / len(kinds))
    tokens, weights = data.batch(3)
    chex.assert_shape([tokens, weights], [(tcfg.batch_size, tcfg.seq_len + 1), (tcfg.batch_size, tcfg.seq_len)])
    assert train.kl_positions(tcfg, 3).max() >= 64


def test_short_rows_stages_are_checked_and_round_trip_json():
    """Bad `short_rows` stages fail at construction, naming the problem; JSON lists come back as the same tuples."""
    tcfg = dataclasses.replace(train.preset("tiny"), steps=8, sparse_fraction=0.5, short_rows=((2, 32), (1, 64)),
                               min_copy_span=4)
    bad = [({"short_rows": ((2, 64), (1, 32))}, r"row lengths must strictly increase, got \[64, 32\]"),
           ({"short_rows": ((2, 32), (1, 32))}, "row lengths must strictly increase"),
           ({"short_rows": ((2, 48),)}, r"stage 0 \(2, 48\): row_len must divide seq_len 128"),
           ({"short_rows": ((2, 32), (1, 128))}, r"stage 1 \(1, 128\): row_len must divide seq_len 128 and be <"),
           ({"short_rows": ((0, 32),)}, r"stage 0 \(0, 32\): steps must be >= 1"),
           ({"short_rows": ((3, 32), (2, 64))}, "short_rows end at step 5, past the dense stage, which ends at step 4"),
           ({"short_rows": ((2, 32),), "min_copy_span": 20}, "row_len must be >= 2 \\* min_copy_span = 40"),
           ({"short_rows": ((2, 16), (1, 32)), "kl_query_stride": 32},
            "kl_query_stride 32 must not exceed the shortest short_rows row_len 16")]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(tcfg, **change)

    d = json.loads(json.dumps(tcfg.to_dict()))
    assert d["short_rows"] == [[2, 32], [1, 64]]
    back = train.TrainConfig.from_dict(d)
    assert back == tcfg and hash(back) == hash(tcfg) and back.short_rows == ((2, 32), (1, 64))
    assert train.TrainConfig.from_dict(json.loads(json.dumps(back.to_dict()))) == tcfg
    for entry in ([2, 32, 1], [2], [2, "32"], [2.0, 32], [True, 32], 32):
        with pytest.raises(ValueError, match=r"short_rows entry .* is not a \(steps, row_len\) pair of ints"):
            train.TrainConfig.from_dict({**d, "short_rows": [entry]})
    with pytest.raises(ValueError, match="short_rows must be a list of"):
        train.TrainConfig.from_dict({**d, "short_rows": 32})


def test_batch_weights_the_answered_query_lines():
    """A batch's loss weights, against the case rebuilt from its documented seed: `retrieval_answer_weight` on the
    positions predicting the answered query lines, 1 on the rest of the case, 0 on padding; LM rows all 1."""
    from indexcache_jax.data import corpus, retrieval, tokenizer

    tcfg = dataclasses.replace(train.preset("tiny"), retrieval_fraction=1.0, retrieval_answer_weight=5.0,
                               min_retrieval_tokens=64)
    tok = tokenizer.load_tokenizer(train.TOKENIZER_PATH)
    data = train.TrainData(tcfg, tok, corpus.load_corpus(max_files=tcfg.max_files))
    step = 3
    tokens, weights = data.batch(step)
    chex.assert_shape(weights, (tcfg.batch_size, tcfg.seq_len))
    rng = np.random.default_rng([tcfg.seed, 1, step])
    for b in range(tcfg.batch_size):
        assert rng.random() < tcfg.retrieval_fraction
        length = tcfg.seq_len + 1 if rng.random() < 0.5 else int(rng.integers(tcfg.min_retrieval_tokens,
                                                                                 tcfg.seq_len + 2))
        case = retrieval.make_case(data.pool, tok, seed=tcfg.seed + 1, index=step * tcfg.batch_size + b,
                                   context_tokens=length, n_keys=tcfg.retrieval_keys,
                                   n_queries=tcfg.retrieval_queries)
        n, p = len(case.text_ids), len(case.prompt_ids)
        np.testing.assert_array_equal(tokens[b, :n], case.text_ids)
        expected = np.zeros(tcfg.seq_len)
        expected[: n - 1] = 1.0
        expected[p - 1: n - 1] = 5.0
        np.testing.assert_array_equal(weights[b], expected)
        # the weighted positions predict exactly the answer " value\n" and the query lines after it
        assert tok.decode(list(tokens[b, p: n])).startswith(case.answer + "\nassert" if tcfg.retrieval_queries > 1
                                                           else case.answer)
