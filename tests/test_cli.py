"""The console scripts end to end on a saved tiny model: search and distill against the Python API, generate and eval
against the API and a numpy float64 log-softmax of `forward` logits."""

import argparse
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

import indexcache_jax as ic
import text_oracle
from indexcache_jax import cli
from indexcache_jax.methods import distill
from indexcache_jax.methods import search
from indexcache_jax.model.model import param_shapes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = ic.tiny(num_layers=4, index_topk=4, mlp_layer_types=("dense",) * 4)
    rng = np.random.default_rng(31)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(0.15 * rng.standard_normal(x.shape), jnp.float32),
                                    param_shapes(cfg))
    path = tmp_path_factory.mktemp("model") / "tiny"
    ic.save(str(path), cfg, params)
    tokens = rng.integers(0, cfg.vocab_size, (4, 12))
    return str(path), cfg, params, tokens


def test_search_cli_writes_the_api_result(model_dir, tmp_path, capsys):
    path, cfg, params, tokens = model_dir
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps(tokens.tolist()))
    out, plot = tmp_path / "result.json", tmp_path / "loss.png"
    assert cli.search_main([path, "--calib", str(calib), "--keep", "1/2", "--batch-size", "2", "--out", str(out),
                            "--plot", str(plot), "--similarity-dp", "--no-progress"]) == 0
    got = json.loads(out.read_text())
    api = search.greedy_search(params, cfg, tokens, keep="1/2", batch_size=2, progress=False)
    assert got["pattern"] == api.pattern and got["n_full"] == 2
    assert got["removed"] == api.removed and got["step_losses"] == pytest.approx(api.step_losses, abs=1e-6)
    assert got["hf_config_fields"]["index_topk_pattern"] == api.pattern
    dp = got["similarity_dp"]
    assert dp["pattern"].count("F") == 2 and dp["pattern"][0] == "F"
    assert matplotlib.image.imread(str(plot)).std() > 0
    with pytest.raises(SystemExit):
        cli.search_main([path, "--calib", str(calib), "--keep", "1/2", "--n-full", "2"])
    bad = tmp_path / "short.npy"
    np.save(bad, tokens[:, :4])
    capsys.readouterr()
    assert cli.search_main([path, "--calib", str(bad), "--n-full", "2", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "index_topk" in err[0]
    assert not (tmp_path / "x.json").exists()


def test_distill_cli_saves_the_trained_model_in_the_pattern_layout(model_dir, tmp_path, capsys):
    path, cfg, params, tokens = model_dir
    data = tmp_path / "data.npy"
    np.save(data, tokens)
    out, hist = tmp_path / "student", tmp_path / "history.json"
    assert cli.distill_main([path, "--data", str(data), "--pattern", "FSFS", "--steps", "3", "--warmup-steps", "1",
                             "--lr", "0.01", "--batch-size", "2", "--out", str(out), "--history", str(hist),
                             "--no-progress"]) == 0
    loaded_cfg, loaded = ic.load(str(out))
    assert loaded_cfg.pattern == "FSFS"
    api, history = distill.train_indexers(params, cfg, [tokens[:2], tokens[2:]], pattern="FSFS", steps=3,
                                          warmup_steps=1, learning_rate=0.01, progress=False)
    expected = ic.relayout(api, cfg, cfg.with_pattern("FSFS"))
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["loss"] for r in json.loads(hist.read_text())["history"]] == [r["loss"] for r in history]
    capsys.readouterr()
    assert cli.distill_main([path, "--data", str(data), "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "already exists" in err[0]


def test_distill_keeps_the_model_dtype_and_reports_a_resume(tmp_path, capsys):
    """A bf16 model distilled without --dtype stays bf16 and keeps its tokenizer and HF config; a run resumed from a
    checkpoint says where it resumed and summarises the whole history (from step 0)."""
    cfg = ic.tiny(num_layers=4, index_topk=4, mlp_layer_types=("dense",) * 4, dtype="bfloat16")
    rng = np.random.default_rng(17)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(0.15 * rng.standard_normal(x.shape), jnp.bfloat16),
                                    param_shapes(cfg))
    ic.save(str(tmp_path / "bf16"), cfg, params)
    text_oracle.make_tokenizer().save(str(tmp_path / "bf16" / "tokenizer.json"))
    (tmp_path / "bf16" / "hf_config.json").write_text(json.dumps({"bos_token_id": 7}))
    tokens = rng.integers(0, cfg.vocab_size, (2, 12))
    np.save(tmp_path / "data.npy", tokens)
    ckpt = tmp_path / "ckpt"

    def stop_after_step_1(step, record):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill.train_indexers(params, cfg, [tokens], pattern="FSFS", steps=4, learning_rate=0.01,
                               checkpoint_dir=str(ckpt), checkpoint_every=1, progress=False,
                               callback=stop_after_step_1)
    capsys.readouterr()
    assert cli.distill_main([str(tmp_path / "bf16"), "--data", str(tmp_path / "data.npy"), "--pattern", "FSFS",
                             "--steps", "4", "--lr", "0.01", "--batch-size", "2", "--checkpoint-dir", str(ckpt),
                             "--checkpoint-every", "1", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    _, history = distill.train_indexers(params, cfg, [tokens], pattern="FSFS", steps=4, learning_rate=0.01,
                                        progress=False)
    assert line == (f"pattern FSFS: loss {history[0]['loss']:.4g} -> {history[-1]['loss']:.4g} over steps 0..3; "
                    f"resumed from {ckpt} at step 2; wrote {tmp_path / 'out'} (bfloat16)")
    out_cfg, out = ic.load(str(tmp_path / "out"))
    assert out_cfg.dtype == "bfloat16" and out_cfg.pattern == "FSFS"
    assert {x.dtype for x in jax.tree_util.tree_leaves(out)} == {jnp.dtype(jnp.bfloat16)}
    for name in ("tokenizer.json", "hf_config.json"):  # carried along for the text CLIs and the exporter
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "bf16" / name).read_bytes()


# ------------------------------------------------------------------------------------------------------ text CLIs
TEXT = ("the cat sat on a mat and saw the dog run far away from home while rain fell over the hills near the river "
        "the old town was quiet at night and the light of the river fell on the cat")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """An all-F tiny model over the oracle tokenizer's vocabulary, with its tokenizer, and the same model saved for
    FSFS (the indexers of layers 1 and 3 dropped)."""
    cfg = ic.tiny(num_layers=4, index_topk=4, mlp_layer_types=("dense",) * 4, vocab_size=len(text_oracle.VOCAB))
    rng = np.random.default_rng(41)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(0.15 * rng.standard_normal(x.shape), jnp.float32),
                                    param_shapes(cfg))
    root = tmp_path_factory.mktemp("text")
    full = root / "full"
    ic.save(str(full), cfg, params)
    text_oracle.make_tokenizer().save(str(full / "tokenizer.json"))
    shared_cfg = cfg.with_pattern("FSFS")
    ic.save(str(root / "shared"), shared_cfg, ic.relayout(params, cfg, shared_cfg))
    text_oracle.make_tokenizer().save(str(root / "shared" / "tokenizer.json"))
    return full, root / "shared", cfg, params


def test_generate_cli_prints_the_api_completion(text_model, capsys):
    full, _, cfg, params = text_model
    prompts = ["the cat sat on", "rain fell over the hills near"]
    capsys.readouterr()
    assert cli.generate_main([str(full), "--prompt", prompts[0], "--prompt", prompts[1], "--pattern", "FSFS",
                              "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    shared_cfg = cfg.with_pattern("FSFS")
    new = ic.generate(ic.relayout(params, cfg, shared_cfg), shared_cfg, [text_oracle.encode(p) for p in prompts], 6)
    assert all(len(n) == 6 for n in new)
    assert out == "\n---\n".join(text_oracle.decode(n) for n in new) + "\n"


def reference_nll(params, cfg, ids, seq_len) -> float:
    """Summed negative log-likelihood (nats) of every token but the first, from `forward` logits in float64."""
    total = 0.0
    for start in range(0, len(ids) - 1, seq_len - 1):
        row = np.asarray(ids[start:start + seq_len])[None]
        logits = np.asarray(ic.forward(params, cfg, row), np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= logp[np.arange(row.shape[1] - 1), row[0, 1:]].sum()
    return total


def test_eval_cli_reports_each_pattern(text_model, tmp_path, capsys):
    full, _, cfg, params = text_model
    (tmp_path / "text.txt").write_text(TEXT)
    capsys.readouterr()
    assert cli.eval_main([str(full), "--text", str(tmp_path / "text.txt"), "--pattern", "FFFF", "--pattern", "FSSS",
                          "--seq-len", "9", "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    ids = text_oracle.encode(TEXT)
    n_bytes = len(TEXT) - len("the")
    assert lines[0].endswith(f"{len(ids)} tokens ({len(ids) - 1} predicted, {n_bytes} bytes) in "
                             f"{math.ceil((len(ids) - 1) / 8)} rows of <= 9 tokens")
    assert lines[1].split() == ["F", "layers", "perplexity", "bits/byte", "pattern"]
    got = {}
    for line in lines[2:]:
        n_full, ppl, bpb, pattern = line.split()
        got[pattern] = (n_full, float(ppl), float(bpb))
    assert sorted(got) == ["FFFF", "FSSS"]
    for pattern in got:
        p_cfg = cfg.with_pattern(pattern)
        nll = reference_nll(ic.relayout(params, cfg, p_cfg), p_cfg, ids, 9)
        assert got[pattern][0] == f"{pattern.count('F')}/4"
        assert got[pattern][1] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=2e-4)
        assert got[pattern][2] == pytest.approx(nll / math.log(2) / n_bytes, rel=2e-4)
    assert got["FFFF"][1] != got["FSSS"][1]  # index_topk 4 < 9 tokens: the shared layers change the result


def test_text_cli_errors(text_model, tmp_path, capsys):
    full, shared, _, _ = text_model
    (tmp_path / "text.txt").write_text(TEXT)
    cases = [
        (cli.eval_main, [str(shared), "--text", str(tmp_path / "text.txt"), "--pattern", "FFSS"], "layer 1 is F"),
        (cli.generate_main, [str(shared), "--prompt", "the cat", "--pattern", "FSFSF"], "pattern length 5"),
        (cli.generate_main, [str(tmp_path), "--prompt", "the cat"], "no tokenizer.json at"),
        (cli.eval_main, [str(full), "--text", str(tmp_path / "none.txt")], "none.txt"),
        (cli.eval_main, [str(full), "--text", str(tmp_path / "text.txt"), "--seq-len", "1"], "--seq-len must be >= 2"),
    ]
    for main, argv, fragment in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], (argv, err)
    with pytest.raises(SystemExit):
        cli.search_main([str(full), "--calib", "x.npy", "--keep", "0"])
    assert "--keep must be 1/r for an integer r >= 1 (e.g. 1/4), got '0'" in capsys.readouterr().err


def test_sigterm_runs_the_clean_ups():
    """A CLI command killed with SIGTERM unwinds (so a checkpoint being written is removed) and exits 143."""
    cleaned = []

    def command(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        cli._run(command, argparse.Namespace())
    assert exit_info.value.code == 143 and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is before
