"""`indexcache-search` and `indexcache-distill` end to end on a saved tiny model, against the Python API."""

import json

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

import indexcache_jax as ic
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
