"""numpy float64 oracle of the routed MoE: `noaux_tc` sigmoid routing and the SwiGLU experts, written from the
definitions (loops over tokens and their experts), independent of the model's and the kernels' code."""

from __future__ import annotations

import numpy as np


def route_f64(x, router, bias, *, top_k: int, n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
              routed_scaling_factor: float = 1.0):
    """x [N, D] -> (ids int [N, k], weights float64 [N, k]); ties resolved towards the lower expert id."""
    x = np.asarray(x, np.float64)
    scores = 1.0 / (1.0 + np.exp(-(x @ np.asarray(router, np.float64))))
    choice = scores + np.asarray(bias, np.float64)
    n, e = choice.shape
    ids = np.zeros((n, top_k), np.int64)
    for t in range(n):
        eligible = np.ones(e, bool)
        if n_group > 1:
            per = e // n_group
            group_score = [np.sort(choice[t, g * per:(g + 1) * per])[-2:].sum() for g in range(n_group)]
            keep = sorted(range(n_group), key=lambda g: (-group_score[g], g))[:topk_group]
            eligible[:] = False
            for g in keep:
                eligible[g * per:(g + 1) * per] = True
        cand = [j for j in range(e) if eligible[j]]
        ids[t] = sorted(cand, key=lambda j: (-choice[t, j], j))[:top_k]
    weights = np.take_along_axis(scores, ids, axis=1)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return ids, weights * routed_scaling_factor


def silu(v):
    return v / (1.0 + np.exp(-v))


def experts_f64(x, ids, weights, gate, up, down):
    """y[n] = sum_j weights[n, j] * down[e] . (silu(x[n] gate[e]) * x[n] up[e]), e = ids[n, j], in float64."""
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
    ids, weights = np.asarray(ids), np.asarray(weights, np.float64)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            y[t] += weights[t, j] * ((silu(x[t] @ gate[e]) * (x[t] @ up[e])) @ down[e])
    return y


def swiglu_f64(x, gate, up, down):
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
    return (silu(x @ gate) * (x @ up)) @ down


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
