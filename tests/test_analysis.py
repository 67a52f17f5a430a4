"""Top-k overlap against a set-based reference, and the two plots."""

import sys

import matplotlib.image
import numpy as np
import pytest

import indexcache_jax as ic
from indexcache_jax.methods import analysis
from indexcache_jax.methods import search
from random_model import random_params


def reference_overlap(selected: dict, pattern: str, t: int, k: int) -> np.ndarray:
    """Python sets: mean |T_i & T_j| / k over (row, position) with position + 1 >= k, S layers taking their
    source F layer's sets."""
    n = len(pattern)
    src = ic.schedule.source_layers(pattern)
    sets = {l: np.asarray(selected[src[l]]) for l in range(n)}
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            vals = [len(set(sets[i][b, p][sets[i][b, p] >= 0]) & set(sets[j][b, p][sets[j][b, p] >= 0])) / k
                    for b in range(sets[i].shape[0]) for p in range(t) if p + 1 >= k]
            out[i, j] = np.mean(vals)
    return out


@pytest.mark.parametrize("pattern", ["FFFFF", "FSFSS"])
def test_topk_overlap_matches_set_reference(pattern):
    cfg = ic.tiny(num_layers=5, index_topk=5, mlp_layer_types=("dense",) * 5, pattern=pattern)
    params = random_params(cfg, 4)
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (3, 14))
    overlap = analysis.topk_overlap(params, cfg, tokens, batch_size=2)
    _, selected = ic.forward(params, cfg, tokens, return_indices=True)
    ref = reference_overlap(selected, pattern, 14, 5)
    np.testing.assert_allclose(overlap, ref, atol=1e-12)
    np.testing.assert_allclose(np.diag(overlap), 1.0)
    np.testing.assert_allclose(overlap, overlap.T)
    assert overlap.min() < 1.0  # random indexers disagree somewhere
    src = ic.schedule.source_layers(pattern)
    for layer in range(5):
        assert overlap[layer, src[layer]] == pytest.approx(1.0)


def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(6)
    overlap = rng.uniform(0.2, 1.0, (8, 8))
    path = analysis.plot_overlap((overlap + overlap.T) / 2, str(tmp_path / "overlap.png"), pattern="FSSFSFSS")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    result = search.SearchResult(pattern="FSFSSS", removed=[5, 3, 1, 4], step_losses=list(5 + rng.uniform(0, 1, 4)),
                                 candidate_losses=[{}] * 4, baseline_loss=4.9, forward_passes=9.5, n_full=2,
                                 blocks=[(0, 5)], steps=[1, 2, 3, 4], method="prefix", compiles=1, seconds=1.0)
    image = matplotlib.image.imread(analysis.plot_search(result, str(tmp_path / "loss.png")))
    assert image.ndim == 3 and image.std() > 0
    with pytest.raises(ValueError, match="layer 0 must be 'F'"):
        analysis.plot_overlap(overlap, str(tmp_path / "bad.png"), pattern="SFFFFFFF")


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"indexcache-jax\[plot\]"):
        analysis.plot_overlap(np.eye(4), str(tmp_path / "x.png"))
