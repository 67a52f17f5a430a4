"""Cross-layer top-k overlap (the paper's Appendix A / Figure 4) and plots of it and of a search's loss curve."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from indexcache_jax.model import schedule
from indexcache_jax.model.config import DSAConfig
from indexcache_jax.model.model import check_tokens, forward


def topk_overlap(params: dict, cfg: DSAConfig, tokens: Any, *, batch_size: int | None = None) -> np.ndarray:
    """float64 `[N, N]`: mean `|T_i ∩ T_j| / k` over the query positions with at least k valid keys.

    `T_l` is the top-k set layer l attends to under `cfg.pattern` (an S layer's is its source F layer's), from a
    forward on int tokens `[R, T]` (in `batch_size`-row batches), `k = min(index_topk, T)`.
    """
    check_tokens(cfg, tokens)
    tokens = np.asarray(tokens)
    b_size = tokens.shape[0] if batch_size is None else int(batch_size)
    src = schedule.source_layers(cfg.pattern)
    n = cfg.num_layers
    t = tokens.shape[1]
    k = min(cfg.index_topk, t)
    counted = np.arange(t) + 1 >= k  # positions with >= k causal keys
    sums, count = np.zeros((n, n)), 0
    for i in range(0, tokens.shape[0], b_size):
        batch = jnp.asarray(tokens[i:i + b_size], jnp.int32)
        _, selected = forward(params, cfg, batch, return_indices=True)
        member = jnp.stack([_membership(selected[src[layer]], t) for layer in range(n)])  # [N, B, T, T]
        member = member[:, :, counted].astype(jnp.float32)
        sums += np.asarray(_pair_counts(member), np.float64) / k
        count += member.shape[1] * member.shape[2]
    return sums / count


@jax.jit
def _pair_counts(member: jax.Array) -> jax.Array:
    """member `[N, B, P, S]` 0/1 -> `[N, N]` summed intersections over (B, P)."""
    return jnp.einsum("ibps,jbps->ij", member, member)


def _membership(indices: jax.Array, num_keys: int) -> jax.Array:
    """int `[B, T, k]` (-1 = none) -> bool `[B, T, S]` set membership."""
    return jnp.any(indices[..., None] == jnp.arange(num_keys), axis=-2)


def _groups(pattern: str) -> list[tuple[int, int]]:
    """`[first, last]` layer range of each F layer's group (the F layer and its S layers)."""
    starts = [i for i, c in enumerate(pattern) if c == "F"] + [len(pattern)]
    return [(starts[g], starts[g + 1] - 1) for g in range(len(starts) - 1)]


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend; matplotlib is the optional `[plot]` extra."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'indexcache-jax[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_overlap(overlap: np.ndarray, path: str, *, pattern: str | None = None, title: str | None = None) -> str:
    """Writes a PNG heatmap of an `[N, N]` overlap matrix; with `pattern`, each F layer's group is outlined on the
    diagonal and the F layers are ticked. Returns `path`."""
    plt = _pyplot()
    from matplotlib import patches

    overlap = np.asarray(overlap)
    n = overlap.shape[0]
    fig, ax = plt.subplots(figsize=(6 + n / 16, 5 + n / 16))
    image = ax.imshow(overlap, vmin=0.0, vmax=1.0, cmap="viridis", origin="upper")
    fig.colorbar(image, ax=ax, label="|T_i ∩ T_j| / k")
    ax.set_xlabel("layer j")
    ax.set_ylabel("layer i")
    if pattern is not None:
        schedule.validate_pattern(pattern, n)
        for first, last in _groups(pattern):
            ax.add_patch(patches.Rectangle((first - 0.5, first - 0.5), last - first + 1, last - first + 1,
                                           fill=False, edgecolor="red", linewidth=1.5))
        full = [i for i, c in enumerate(pattern) if c == "F"]
        ax.set_xticks(full)
        ax.set_yticks(full)
    ax.set_title(title or ("top-k overlap" + (f", groups of {pattern}" if pattern else "")), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_search(result: Any, path: str, *, title: str | None = None) -> str:
    """Writes a PNG of a `search.SearchResult`'s calibration loss after each committed flip (step 0 = all-F
    baseline), each point labelled with the layer flipped. Returns `path`."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    losses = [result.baseline_loss] + list(result.step_losses)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(losses)), losses, marker="o")
    for i, layer in enumerate(result.removed, start=1):
        ax.annotate(str(layer), (i, losses[i]), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("flips committed (F -> S)")
    ax.set_ylabel("calibration NLL")
    ax.set_title(title or f"greedy search: {result.pattern}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
