"""Every benchmark script imports on a machine without a GPU and has a `main`: a renamed module or a moved helper
breaks the script at once, not at the next (scarce) GPU run."""

import importlib.util
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_script_imports_and_has_main(path, monkeypatch):
    module = _load(path.stem, monkeypatch)
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"


def _load(name, monkeypatch):
    """Imports `benchmarks/<name>.py` as its own module."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their siblings, as `python benchmarks/x.py` does
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_moe_pairwise_reference_matches_float64_oracle(monkeypatch):
    """`moe.py`'s decode reference (pairs gathered a few at a time, padded pairs weighing 0) against the float64
    loop of `moe_oracle`, with repeated experts within a token and a pair count that is not a multiple of the step."""
    import chex
    import jax.numpy as jnp
    import numpy as np
    from moe_oracle import experts_f64, rel_err

    moe = _load("moe", monkeypatch)
    rng = np.random.default_rng(7)
    n, k, e, d, i = 5, 3, 6, 16, 24
    x = rng.standard_normal((n, d)).astype(np.float32)
    ids = rng.integers(0, e, (n, k)).astype(np.int32)
    ids[0, 1] = ids[0, 0]
    weights = rng.random((n, k)).astype(np.float32)
    w = {"gate": rng.standard_normal((e, d, i)).astype(np.float32) / 4,
         "up": rng.standard_normal((e, d, i)).astype(np.float32) / 4,
         "down": rng.standard_normal((e, i, d)).astype(np.float32) / 4}
    got = moe.pairwise_reference(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights),
                                 {name: jnp.asarray(a) for name, a in w.items()}, pairs_per_step=4)
    chex.assert_shape(got, (n, d))
    chex.assert_tree_all_finite(got)
    assert rel_err(got, experts_f64(x, ids, weights, w["gate"], w["up"], w["down"])) < 1e-5
