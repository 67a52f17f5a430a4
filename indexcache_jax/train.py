"""Trains the embedded DSA model from scratch: `python -m indexcache_jax.train CONFIG --out DIR`.

CONFIG is a JSON file of `TrainConfig` fields (its `model` field holds `DSAConfig` fields) or a preset name
(`default`, `tiny`). The recipe follows DeepSeek's DSA training, run from scratch:

1. dense stage (the first `1 - sparse_fraction` of the steps): the model attends densely and trains on the LM loss;
   at the same time every layer's lightning indexer learns the KL to that layer's attention distribution (summed
   over heads, L1-normalised) over all causal keys;
2. sparse stage: each layer attends only to the `index_topk` keys its indexer selects (the inference model's math,
   `Indexer.select` and `MLA.attend`); the LM loss trains the model, and the indexer learns the KL restricted to the
   selected set.

The indexer's inputs are detached, so it gets gradients from its KL only and the model from the LM loss only. The KL
runs on every `kl_query_stride`-th query (random offset per step) to bound its `[queries, keys]` cost. The MoE
layers balance their experts without an auxiliary loss (DeepSeek-V3): after each step the router bias of an expert
moves by `bias_update_rate` toward the mean load. Training runs the XLA references (`backend="xla"`, bf16 compute,
float32 master weights), with cuDNN's flash attention for the dense stage on a GPU (`attention_impl`); params keep
the model's layout, so `indexcache_jax.forward` runs the result unchanged.

Data: a mix of LM windows of the stdlib train split and retrieval cases (`data.retrieval`) with several queries each;
batch `step` depends only on (seed, step), so a resumed run sees the same data as an uninterrupted one. The run
directory holds orbax checkpoints (`checkpoints/`), `run.json` (config, resolved steps, seeds, versions, device),
`data_manifest.json` (the files of each split), `metrics.json` and `loss.png`, and `model/` (the exported weights).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import platform
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.ad_checkpoint import checkpoint_name

from indexcache_jax.data import corpus, retrieval, tokenizer
from indexcache_jax.model.config import DSAConfig, RopeConfig, read_json
from indexcache_jax.model.layers import MLA, Indexer, RMSNorm
from indexcache_jax.model.model import init_params, make_context
from indexcache_jax.model.moe import DenseMLP, route
from indexcache_jax.model.params import stack_layers, unstack_layers

Array = jax.Array
KINDS = ("dense", "sparse")
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "default_model")
TOKENIZER_PATH = os.path.join(ASSETS, "tokenizer.json")
SHARD_BYTES = 15_000_000  # each exported weight file stays under 16 MB
FINAL_EVAL_RESERVE_S = 45.0  # a first run with max_seconds plans its steps to leave this for evaluation + export


# ------------------------------------------------------------------------------------------------------------ config
def default_model_config() -> DSAConfig:
    """The embedded model: 16 layers (1 dense, 15 MoE with 8 experts, top-2, one shared), MLA with 4 heads,
    an 8-head lightning indexer keeping 256 of up to 4096 keys (1/16), a 4096-token byte-level BPE vocabulary."""
    n = 16
    return DSAConfig(
        architecture="glm_moe_dsa", vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
        num_layers=n, num_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=True, mlp_layer_types=("dense",) + ("sparse",) * (n - 1),
        index_n_heads=8, index_head_dim=32, index_topk=256, indexer_rope_interleave=True,
        rope=RopeConfig(theta=10000.0), rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False,
        eos_token_id=(0,))


ATTENTION_IMPLS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (frozen, hashable). `steps = 0` fits the run into `time_budget_s`: the
    first start times one dense and one sparse step and records the step count it resolves (a resume reuses it)."""

    model: DSAConfig = dataclasses.field(default_factory=default_model_config)
    seq_len: int = 4096
    batch_size: int = 8
    steps: int = 0
    time_budget_s: float = 0.0
    sparse_fraction: float = 0.25
    learning_rate: float = 3e-3
    warmup_fraction: float = 0.05
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bias_update_rate: float = 1e-3
    retrieval_fraction: float = 0.4
    retrieval_answer_weight: float = 1.0  # loss weight of the answered query lines (the only retrieval signal)
    retrieval_keys: int = 8
    retrieval_queries: int = 8
    min_retrieval_tokens: int = 256
    # Rows of random tokens repeated at a distance drawn per row, log-uniform in [min_copy_span, (seq_len + 1) / 2];
    # the loss covers only the repeats. Copying by content (induction) is what retrieval needs; a fixed distance
    # would teach "look d back" instead.
    copy_fraction: float = 0.0
    min_copy_span: int = 8
    # A curriculum of short rows: stages of (steps, row_len), run in order from step 0, then rows of seq_len. A stage
    # trains on seq_len / row_len times as many rows of row_len tokens (the same tokens a step), copy rows and LM
    # windows, dense attention; e.g. ((500, 64), (500, 128), (500, 256)). Copying by content formed on short rows
    # and carried over to long ones only through growing lengths: in a CPU probe 64-, 128-, then 256-token rows
    # taught it, one jump from 64 to 256 tokens did not, and on long rows from the start it did not form. Each row
    # length compiles the train step once more.
    short_rows: tuple[tuple[int, int], ...] = ()
    kl_query_stride: int = 8
    seed: int = 0
    checkpoint_every: int = 100
    eval_windows: int = 16
    retrieval_eval_cases: int = 64
    max_files: int | None = None
    compute_dtype: str = "bfloat16"  # activations; float32 on CPU, whose dots have no bf16 x bf16 -> f32
    attention_impl: str = "auto"  # dense-stage attention: "xla", "cudnn" (flash) or "auto" (cudnn on a GPU in 16 bits)

    def __post_init__(self):
        # JSON gives lists; tuples keep the config hashable (`compiled_steps` caches on it) and round-trip equal.
        object.__setattr__(self, "short_rows", _short_row_stages(self.short_rows))
        cfg = self.model
        checks = [
            (isinstance(cfg, DSAConfig), f"model must be a DSAConfig, got {type(cfg).__name__}"),
            (self.seq_len >= 2 * cfg.index_topk, f"seq_len {self.seq_len} must be >= 2 * index_topk"),
            (self.seq_len <= cfg.max_position_embeddings, "seq_len exceeds max_position_embeddings"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.steps >= 0 and (self.steps > 0 or self.time_budget_s > 0),
             "set steps > 0, or steps = 0 with a time_budget_s > 0"),
            (0.0 <= self.sparse_fraction <= 1.0, "sparse_fraction must lie in [0, 1]"),
            (0.0 <= self.retrieval_fraction <= 1.0, "retrieval_fraction must lie in [0, 1]"),
            (self.retrieval_answer_weight > 0, "retrieval_answer_weight must be > 0"),
            (1 <= self.retrieval_queries <= self.retrieval_keys, "need 1 <= retrieval_queries <= retrieval_keys"),
            (64 <= self.min_retrieval_tokens <= self.seq_len + 1, "min_retrieval_tokens must lie in [64, seq_len + 1]"),
            (0.0 <= self.copy_fraction <= 1.0, "copy_fraction must lie in [0, 1]"),
            (2 <= self.min_copy_span <= (self.seq_len + 1) // 2, "min_copy_span must lie in [2, (seq_len + 1) // 2]"),
            (1 <= self.kl_query_stride <= self.seq_len, "kl_query_stride must lie in [1, seq_len]"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.attention_impl in ATTENTION_IMPLS, f"attention_impl must be one of {ATTENTION_IMPLS}, got "
                                                     f"{self.attention_impl!r}"),
            (list(cfg.mlp_layer_types) == sorted(cfg.mlp_layer_types), "dense layers must all come before MoE ones"),
            (cfg.pattern == "F" * cfg.num_layers, "training needs an indexer on every layer (all-F pattern)"),
        ]
        lens = [n for _, n in self.short_rows]
        for i, (steps, n) in enumerate(self.short_rows):
            checks += [
                (steps >= 1, f"short_rows stage {i} {(steps, n)}: steps must be >= 1"),
                (1 <= n < self.seq_len and self.seq_len % n == 0,
                 f"short_rows stage {i} {(steps, n)}: row_len must divide seq_len {self.seq_len} and be < seq_len"),
                (n >= 2 * self.min_copy_span,
                 f"short_rows stage {i} {(steps, n)}: row_len must be >= 2 * min_copy_span = {2 * self.min_copy_span}"),
            ]
        if self.short_rows:  # a time-budgeted run (steps = 0) checks the end in `train`, once steps resolve
            checks += [
                (all(a < b for a, b in zip(lens, lens[1:])),
                 f"short_rows row lengths must strictly increase, got {lens}"),
                (self.kl_query_stride <= min(lens),
                 f"kl_query_stride {self.kl_query_stride} must not exceed the shortest short_rows row_len {min(lens)}"),
                (self.steps == 0 or self.short_rows_overrun(self.steps) is None,
                 self.short_rows_overrun(self.steps)),
            ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid TrainConfig: {msg}")

    def short_rows_overrun(self, steps: int) -> str | None:
        """Why the `short_rows` stages do not fit a run of `steps` steps (they must end within its dense stage), or
        None when they do."""
        dense_end = RunPlan(steps, self.sparse_fraction).sparse_start
        if self.short_rows_end <= dense_end:
            return None
        return (f"short_rows end at step {self.short_rows_end}, past the dense stage, which ends at step {dense_end} "
                f"of {steps}: short rows train with dense attention only")

    @property
    def short_rows_end(self) -> int:
        """The first step after the `short_rows` stages (0 without them)."""
        return sum(steps for steps, _ in self.short_rows)

    def row_len(self, step: int) -> int:
        """The length of the rows step `step` trains on: its `short_rows` stage's row_len, else `seq_len` (so a step
        trains on short rows exactly when `row_len(step) < seq_len`)."""
        end = 0
        for steps, n in self.short_rows:
            end += steps
            if step < end:
                return n
        return self.seq_len

    def to_dict(self) -> dict:
        """JSON-ready: the model as `DSAConfig.to_dict()`."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model"] = self.model.to_dict()
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The inverse of `to_dict`; JSON lists become tuples (`short_rows` in `__post_init__`)."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        if "model" in d:
            d["model"] = DSAConfig.from_dict(d["model"])
        return cls(**d)


def _short_row_stages(value) -> tuple[tuple[int, int], ...]:
    """`short_rows` as a tuple of (steps, row_len) int tuples, from tuples or JSON lists; ValueError if malformed."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"invalid TrainConfig: short_rows must be a list of (steps, row_len) pairs, got {value!r}")
    stages = []
    for entry in value:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2
                and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in entry)):
            raise ValueError(f"invalid TrainConfig: short_rows entry {entry!r} is not a (steps, row_len) pair of ints")
        stages.append((int(entry[0]), int(entry[1])))
    return tuple(stages)


def preset(name: str) -> TrainConfig:
    """`default`: the embedded model, 4096-token sequences, fit into 300 s of steps on the GPU.
    `tiny`: a 4-layer model on 128-token sequences for tests (CPU, seconds)."""
    if name == "default":
        return TrainConfig(time_budget_s=300.0)
    if name == "tiny":
        n = 4
        tiny = default_model_config().replace(
            hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_layers=n, num_heads=2, q_lora_rank=16,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
            mlp_layer_types=("dense",) + ("sparse",) * (n - 1), index_n_heads=4, index_head_dim=8, index_topk=16,
            max_position_embeddings=256, pattern="F" * n)
        return TrainConfig(model=tiny, seq_len=128, batch_size=2, steps=6, sparse_fraction=0.5,
                           learning_rate=1e-2, retrieval_fraction=0.5, retrieval_keys=2, retrieval_queries=2,
                           min_retrieval_tokens=64, kl_query_stride=4, checkpoint_every=2, eval_windows=2,
                           retrieval_eval_cases=2, max_files=60, compute_dtype="float32")
    raise ValueError(f"unknown preset {name!r}: use 'default', 'tiny' or a JSON file")


def load_train_config(spec: str) -> TrainConfig:
    if os.path.isfile(spec):
        return TrainConfig.from_dict(read_json(spec, "training config"))
    return preset(spec)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """The step count a run resolved, and where the sparse stage starts."""

    steps: int
    sparse_fraction: float

    @property
    def sparse_start(self) -> int:
        return self.steps - int(round(self.steps * self.sparse_fraction))

    def phase(self, step: int) -> str:
        return "sparse" if step >= self.sparse_start else "dense"


# ------------------------------------------------------------------------------------------------------------ data
class TrainData:
    """The train token stream and retrieval filler pool, validation LM windows, and `batch(step)`."""

    def __init__(self, tcfg: TrainConfig, tok, data: corpus.Corpus):
        self.tcfg, self.tok, self.corpus = tcfg, tok, data
        self.eos = tokenizer.eos_id(tok)
        self.stream = corpus.token_stream(data.train, tok, self.eos)
        if len(self.stream) <= tcfg.seq_len + 1:
            raise ValueError(f"the train split has {len(self.stream)} tokens, too few for seq_len {tcfg.seq_len}")
        self.pool = retrieval.FillerPool(data.train)
        if tcfg.retrieval_fraction > 0:
            self._check_shortest_case()
        val = corpus.token_stream(data.validation, tok, self.eos)
        self.validation = corpus.lm_windows(val, tcfg.seq_len + 1, tcfg.eval_windows)
        self.token_bytes = tokenizer.token_bytes(tok)

    def _check_shortest_case(self, cases: int = 16) -> None:
        """Fails now, not at some later step, when the shortest case length cannot hold a case's key and query
        lines (checked on `cases` draws: keys and values tokenize to slightly different lengths)."""
        t = self.tcfg
        for index in range(cases):
            try:
                retrieval.make_case(self.pool, self.tok, seed=t.seed + 1, index=index,
                                    context_tokens=t.min_retrieval_tokens, n_keys=t.retrieval_keys,
                                    n_queries=t.retrieval_queries)
            except ValueError as e:
                raise ValueError(f"min_retrieval_tokens={t.min_retrieval_tokens} is too short for "
                                 f"retrieval_keys={t.retrieval_keys} and retrieval_queries={t.retrieval_queries}: "
                                 f"{e}") from None

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch of `step`: `short_batch` during the `short_rows` stages, else `full_batch`."""
        t = self.tcfg
        return self.short_batch(step) if t.row_len(step) < t.seq_len else self.full_batch(step)

    def short_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32 `[B T / S, S + 1]`, weights float32 `[B T / S, S]`) for S = `row_len(step)`, the row length
        of the step's `short_rows` stage: copy rows with probability `copy_fraction`, else LM windows (weight 1)."""
        t = self.tcfg
        n = t.row_len(step)
        rows = t.batch_size * t.seq_len // n
        rng = np.random.default_rng([t.seed, 4, step])
        tokens = np.empty((rows, n + 1), np.int32)
        mask = np.ones((rows, n), np.float32)
        for b in range(rows):
            if rng.random() < t.copy_fraction:
                tokens[b], mask[b] = self._copy_row(rng, n)
            else:
                start = int(rng.integers(len(self.stream) - n - 1))
                tokens[b] = self.stream[start: start + n + 1]
        return tokens, mask

    def full_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32 `[B, T + 1]`, loss weights float32 `[B, T]`): 0 on the padding after a short case,
        `retrieval_answer_weight` on the positions that predict a case's answered query lines, 1 elsewhere.

        A row is a copy row with probability `copy_fraction` (drawn from its own stream, so configs without copy
        rows keep their batches), else a retrieval case with probability `retrieval_fraction`, else an LM window."""
        t = self.tcfg
        rng = np.random.default_rng([t.seed, 1, step])
        copy_rng = np.random.default_rng([t.seed, 3, step])
        tokens = np.full((t.batch_size, t.seq_len + 1), self.eos, np.int32)
        mask = np.zeros((t.batch_size, t.seq_len), np.float32)
        for b in range(t.batch_size):
            if t.copy_fraction > 0 and copy_rng.random() < t.copy_fraction:
                tokens[b], mask[b] = self._copy_row(copy_rng, t.seq_len)
            elif rng.random() < t.retrieval_fraction:
                length = t.seq_len + 1 if rng.random() < 0.5 else int(rng.integers(t.min_retrieval_tokens,
                                                                                   t.seq_len + 2))
                case = retrieval.make_case(self.pool, self.tok, seed=t.seed + 1, index=step * t.batch_size + b,
                                           context_tokens=length, n_keys=t.retrieval_keys,
                                           n_queries=t.retrieval_queries)
                ids = np.asarray(case.text_ids, np.int32)
                tokens[b, : len(ids)] = ids
                mask[b, : len(ids) - 1] = 1.0
                mask[b, len(case.prompt_ids) - 1: len(ids) - 1] = t.retrieval_answer_weight
            else:
                start = int(rng.integers(len(self.stream) - t.seq_len - 1))
                tokens[b] = self.stream[start: start + t.seq_len + 1]
                mask[b] = 1.0
        return tokens, mask

    def _copy_row(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens `[length + 1]`, weights `[length]`): a block of `span` random non-eos tokens repeated, weight 1
        on the positions that predict a repeat (index >= span), 0 on those that predict the first block."""
        t = self.tcfg
        n = length + 1
        span = int(np.exp(rng.uniform(np.log(t.min_copy_span), np.log(n // 2 + 1))))
        span = min(max(span, t.min_copy_span), n // 2)
        vocab = self.tok.get_vocab_size()
        block = rng.integers(0, vocab - 1, span)
        block = (block + (block >= self.eos)).astype(np.int32)  # every id but eos
        row = np.resize(block, n)
        weights = (np.arange(1, n) >= span).astype(np.float32)
        return row, weights


# ------------------------------------------------------------------------------------------------------------ params
def split_params(params: dict, cfg: DSAConfig) -> dict:
    """Model-layout params -> `{"top": embed/final_norm/lm_head, "stacks": {kind: layers of that MLP kind stacked}}`
    (layers in order; dense layers precede MoE ones)."""
    top, layers = unstack_layers(params, cfg)
    stacks = {}
    for kind in KINDS:
        members = [layers[i] for i in range(cfg.num_layers) if cfg.mlp_layer_types[i] == kind]
        if members:
            stacks[kind] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *members)
    return {"top": dict(top), "stacks": stacks}


def join_params(state_params: dict, cfg: DSAConfig) -> dict:
    """Inverse of `split_params`: numpy arrays in the model layout of `cfg.pattern` (all-F)."""
    layers = []
    for kind in KINDS:
        if kind in state_params["stacks"]:
            stack = jax.tree_util.tree_map(np.asarray, state_params["stacks"][kind])
            count = jax.tree_util.tree_leaves(stack)[0].shape[0]
            layers += [jax.tree_util.tree_map(lambda x, i=i: x[i], stack) for i in range(count)]
    top = jax.tree_util.tree_map(np.asarray, state_params["top"])
    return stack_layers(top, layers, cfg, xp=np)


# ------------------------------------------------------------------------------------------------------------ forward
def resolve_attention_impl(impl: str, compute_dtype: str, head_dim: int) -> str:
    """"auto" -> "cudnn" on a GPU with 16-bit activations and a head width cuDNN's flash attention takes (a multiple
    of 8 up to 128: the absorbed MLA head is `kv_lora_rank + qk_rope_head_dim` wide), else "xla". The dense stage's
    XLA attention materialises [B, H, T, T] float32 scores and rematerialises them for the backward pass."""
    if impl != "auto":
        return impl
    sixteen_bit = jnp.dtype(compute_dtype).itemsize == 2
    fits = head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if jax.default_backend() == "gpu" and sixteen_bit and fits else "xla"


def dense_latent_attention(q: Array, kv: Array, scale: float, v_dim: int, implementation: str = "xla") -> Array:
    """Causal dense MLA in absorbed form: q `[B, T, H, C]`, kv `[B, T, C]` -> latent output `[B, T, H, v_dim]`.

    `implementation="cudnn"` runs cuDNN's flash attention with kv as one shared key/value head (values are kv's
    first `v_dim` features: the kernel takes equal key and value widths, so the output's rest is dropped)."""
    if implementation == "cudnn":
        shared = kv[:, :, None, :]
        out = jax.nn.dot_product_attention(q, shared, shared, scale=scale, is_causal=True, implementation="cudnn")
        return out[..., :v_dim]
    t = q.shape[1]
    s = jnp.einsum("bthc,bsc->bhts", q, kv, preferred_element_type=jnp.float32) * scale
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    return jnp.einsum("bhts,bsc->bthc", p, kv[..., :v_dim], preferred_element_type=jnp.float32).astype(q.dtype)


def indexer_kl(q: Array, kv: Array, iq: Array, iw: Array, ik: Array, pos: Array, scale: float,
               selected: Array | None) -> Array:
    """Mean over queries of KL(p || softmax(I)) at query positions `pos [Q]`.

    q `[B, Q, H, C]`, kv `[B, S, C]`: the layer's attention (p = softmax probabilities summed over heads and
    L1-normalised, detached); iq `[B, Q, H_I, d_I]`, iw `[B, Q, H_I]`, ik `[B, S, d_I]`: the indexer, with
    I = sum_j w_j relu(q_j . k). `selected` int `[B, Q, K]` (-1 = none) restricts both to the selected keys (sparse
    stage); None takes all causal keys (dense stage).
    """
    causal = jnp.arange(kv.shape[1])[None, None, :] <= pos[None, :, None]  # [1, Q, S]
    s = jnp.einsum("bqhc,bsc->bqhs", q, kv, preferred_element_type=jnp.float32) * scale
    s = jnp.where(causal[:, :, None, :], s, -jnp.inf)
    p = jax.lax.stop_gradient(jax.nn.softmax(s, axis=-1).sum(2))
    p = p / p.sum(-1, keepdims=True)
    logits = jnp.einsum("bqhs,bqh->bqs", jax.nn.relu(jnp.einsum("bqhd,bsd->bqhs", iq.astype(jnp.float32),
                                                                ik.astype(jnp.float32))), iw)
    logits = jnp.where(causal, logits, -jnp.inf)
    if selected is not None:
        valid = selected >= 0
        safe = jnp.where(valid, selected, 0)
        logits = jnp.where(valid, jnp.take_along_axis(logits, safe, axis=-1), -jnp.inf)
        p = jnp.where(valid, jnp.take_along_axis(p, safe, axis=-1), 0.0)
        p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    logq = jax.nn.log_softmax(logits, axis=-1)
    logq = jnp.where(jnp.isfinite(logq), logq, 0.0)  # excluded keys carry p = 0
    kl = jnp.sum(jax.scipy.special.xlogy(p, p) - p * logq, axis=-1)
    return jnp.mean(kl)


def moe_train(cfg: DSAConfig, mp: dict, x: Array) -> tuple[Array, Array]:
    """`model.moe.MoE` evaluated densely (every expert on every token, same output) -> (y `[B, T, D]`, tokens routed
    to each expert `[E]`)."""
    dt = x.dtype
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    ids, weights = route(cfg, flat, mp["router"], mp["router_bias"])
    n, e = flat.shape[0], cfg.n_routed_experts
    combine = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], ids].add(weights)
    h = (jax.nn.silu(jnp.einsum("nd,edi->nei", flat, mp["experts_gate"].astype(dt)))
         * jnp.einsum("nd,edi->nei", flat, mp["experts_up"].astype(dt)))
    y = jnp.einsum("nei,eid,ne->nd", h, mp["experts_down"].astype(dt), combine.astype(dt))
    if cfg.n_shared_experts:
        d, i = cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts
        y = y + DenseMLP(d, i).apply({"params": mp["shared"]}, flat)
    load = jnp.zeros((e,), jnp.float32).at[ids.reshape(-1)].add(1.0)
    return y.reshape(shape), load


def _layer(cfg: DSAConfig, kind: str, phase: str, lp: dict, h: Array, ctx: dict, kl_pos: Array, attention: str):
    """One decoder layer for training -> (h, indexer KL, expert loads `[E]` (zeros for a dense layer))."""
    x = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps).apply({"params": lp["attn_norm"]}, h)
    mla, mp = MLA(cfg), {"params": lp["mla"]}
    qr, q = mla.apply(mp, x, ctx["cos"], ctx["sin"], method=MLA.project_q)
    kv = mla.apply(mp, x, ctx["cos"], ctx["sin"], method=MLA.project_kv)
    indexer, ip = Indexer(cfg), {"params": lp["indexer"]}
    x_d, qr_d = jax.lax.stop_gradient(x), jax.lax.stop_gradient(qr)
    ik = indexer.apply(ip, x_d, ctx["cos"], ctx["sin"], method=Indexer.keys)
    iq, iw = indexer.apply(ip, qr_d, x_d, ctx["cos"], ctx["sin"], method=Indexer.queries)
    if phase == "dense":
        attn = mla.apply(mp, dense_latent_attention(q, kv, cfg.softmax_scale, cfg.kv_lora_rank, attention),
                         method=MLA.output)
        selected = None
    else:
        indices = indexer.apply(ip, *jax.lax.stop_gradient((iq, iw, ik)), ctx["positions"], ctx["k_lengths"],
                                method=Indexer.select)
        indices = checkpoint_name(indices, "topk")
        attn = mla.apply(mp, q, kv, indices, method=MLA.attend)
        selected = indices[:, kl_pos]
    kl = indexer_kl(q[:, kl_pos], kv, iq[:, kl_pos], iw[:, kl_pos], ik, kl_pos, cfg.softmax_scale, selected)
    h = h + attn.astype(h.dtype)
    x = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps).apply({"params": lp["mlp_norm"]}, h)
    if kind == "dense":
        y = DenseMLP(cfg.hidden_size, cfg.intermediate_size).apply({"params": lp["mlp"]}, x)
        load = jnp.zeros((max(cfg.n_routed_experts, 1),), jnp.float32)
    else:
        y, load = moe_train(cfg, lp["mlp"], x)
    return h + y.astype(h.dtype), kl, load


def forward_train(params: dict, inputs: Array, kl_pos: Array, cfg: DSAConfig, phase: str, attention: str = "xla"):
    """The training forward on `split_params` params: inputs int32 `[B, T]` -> (logits float32 `[B, T, V]`,
    per-layer indexer KL `[N]` at query positions `kl_pos [Q]`, expert loads per MLP kind `{kind: [L, E]}`).
    `phase="sparse"` is the inference model's math (`indexcache_jax.forward` gives the same logits)."""
    b, t = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ctx = make_context(cfg, positions, jnp.full((b,), t, jnp.int32), jnp.zeros((b,), jnp.int32))
    top = params["top"]
    h = top["embed"][inputs].astype(jnp.dtype(cfg.dtype))
    kls, loads = [], {}
    policy = jax.checkpoint_policies.save_only_these_names("topk")
    for kind in KINDS:
        if kind not in params["stacks"]:
            continue

        @functools.partial(jax.checkpoint, policy=policy)
        def body(h, lp, kind=kind):
            h, kl, load = _layer(cfg, kind, phase, lp, h, ctx, kl_pos, attention)
            return h, (kl, load)

        h, (kl, load) = jax.lax.scan(body, h, params["stacks"][kind])
        kls.append(kl)
        loads[kind] = load
    h = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps).apply({"params": top["final_norm"]}, h)
    head = top["embed"].T if cfg.tie_word_embeddings else top["lm_head"]
    return (h @ head.astype(h.dtype)).astype(jnp.float32), jnp.concatenate(kls), loads


def loss_fn(params: dict, tokens: Array, mask: Array, kl_pos: Array, cfg: DSAConfig, phase: str,
            attention: str = "xla"):
    """-> (LM loss + summed indexer KL, aux). tokens int32 `[B, T + 1]` (inputs and shifted targets), mask `[B, T]`,
    kl_pos int32 `[Q]` (the query positions the KL is taken at). aux: lm loss (mean nats per counted token), summed
    NLL and count, per-layer KL `[N]`, expert loads per MoE layer."""
    logits, kl, loads = forward_train(params, tokens[:, :-1], kl_pos, cfg, phase, attention)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, 1:, None], axis=-1)[..., 0]
    nll_sum = jnp.sum(nll * mask)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    lm = nll_sum / count
    return lm + jnp.sum(kl), {"lm": lm, "nll_sum": nll_sum, "count": count, "kl": kl, "loads": loads}


# ------------------------------------------------------------------------------------------------------------ steps
def gradient_group(path) -> str:
    """"indexer" for the indexers' params, which learn from the KL loss alone, else "model" (the LM loss)."""
    return "indexer" if any(getattr(k, "key", None) == "indexer" for k in path) else "model"


def make_optimizer(tcfg: TrainConfig):
    """AdamW without its learning rate (clip, Adam, decoupled weight decay on matrices); the train step scales by
    the rate it is given, so one compiled step serves any schedule.

    The indexers and the model are clipped to `grad_clip` each, by their own global norm: their gradients come from
    different losses, and one clip over both let an indexer spike (its KL gradient is often the larger) shrink the
    model's LM update."""

    def decays(path, _):
        return getattr(path[-1], "key", None) not in ("scale", "router_bias", "k_norm_scale", "k_norm_bias")

    mask_fn = lambda params: jax.tree_util.tree_map_with_path(decays, params)  # noqa: E731
    return optax.chain(clip_per_group(tcfg.grad_clip), optax.scale_by_adam(),
                       optax.add_decayed_weights(tcfg.weight_decay, mask_fn))


def clip_per_group(max_norm: float) -> optax.GradientTransformation:
    """`clip_by_global_norm(max_norm)` applied to each `gradient_group` separately."""
    groups = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: gradient_group(path), params)  # noqa: E731
    return optax.partition({g: optax.clip_by_global_norm(max_norm) for g in ("indexer", "model")}, groups)


def lr_schedule(tcfg: TrainConfig, steps: int):
    """Linear warm-up over `warmup_fraction` of the steps, then cosine decay to `end_lr_ratio`."""
    warmup = max(1, int(round(steps * tcfg.warmup_fraction)))
    return optax.warmup_cosine_decay_schedule(0.0, tcfg.learning_rate, warmup, max(steps, warmup + 1),
                                              end_value=tcfg.learning_rate * tcfg.end_lr_ratio)


def kl_positions(tcfg: TrainConfig, step: int) -> np.ndarray:
    """The query positions the indexer KL uses at `step`: every `kl_query_stride`-th of the step's row length, from
    a per-step offset."""
    offset = int(np.random.default_rng([tcfg.seed, 2, step]).integers(tcfg.kl_query_stride))
    return np.arange(offset, tcfg.row_len(step), tcfg.kl_query_stride, dtype=np.int32)


def make_train_step(cfg: DSAConfig, tcfg: TrainConfig, tx):
    """Jitted `(params, opt_state, tokens, mask, kl_pos, lr, phase) -> (params, opt_state, metrics)`."""
    attention = resolve_attention_impl(tcfg.attention_impl, tcfg.compute_dtype, cfg.latent_row_dim)

    def step(params, opt_state, tokens, mask, kl_pos, lr, phase):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, mask, kl_pos, cfg, phase,
                                                                       attention)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, jax.tree_util.tree_map(lambda u: -lr * u, updates))
        if "sparse" in params["stacks"]:  # auxiliary-loss-free balancing: push each expert toward the mean load
            load = aux["loads"]["sparse"]  # [L, E]
            nudge = tcfg.bias_update_rate * jnp.sign(load.mean(-1, keepdims=True) - load)
            mlp = dict(params["stacks"]["sparse"]["mlp"])
            mlp["router_bias"] = mlp["router_bias"] + nudge
            params = {"top": params["top"],
                      "stacks": {**params["stacks"], "sparse": {**params["stacks"]["sparse"], "mlp": mlp}}}
        metrics = {"loss": loss, "lm": aux["lm"], "kl": aux["kl"], "grad_norm": optax.tree.norm(grads)}
        return params, opt_state, metrics

    return jax.jit(step, static_argnames=("phase",), donate_argnums=(0, 1))


def make_eval_step(cfg: DSAConfig):
    """Jitted `(params, tokens, mask, kl_pos) -> (summed NLL, count)` under sparse (DSA) attention."""

    def run(params, tokens, mask, kl_pos):
        _, aux = loss_fn(params, tokens, mask, kl_pos, cfg, "sparse")
        return aux["nll_sum"], aux["count"]

    return jax.jit(run)


def make_predict(cfg: DSAConfig):
    """Jitted `(params, inputs [B, T], positions [B, P]) -> argmax tokens [B, P]` under sparse (DSA) attention."""

    def run(params, inputs, positions):
        logits, _, _ = forward_train(params, inputs, jnp.zeros((1,), jnp.int32), cfg, "sparse")
        return jnp.argmax(jnp.take_along_axis(logits, positions[..., None], axis=1), axis=-1)

    return jax.jit(run)


def evaluate(eval_step, params, data: TrainData, tcfg: TrainConfig) -> float:
    """Held-out bits per byte of the validation windows under DSA (sparse) attention."""
    nll, nbytes = 0.0, 0
    kl_pos = kl_positions(tcfg, tcfg.short_rows_end)  # a full-row step's: validation windows are full rows
    for i in range(0, len(data.validation), tcfg.batch_size):
        tokens = data.validation[i: i + tcfg.batch_size]
        mask = np.ones((tokens.shape[0], tokens.shape[1] - 1), np.float32)
        s, _ = eval_step(params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(kl_pos))
        nll += float(s)
        nbytes += int(data.token_bytes[tokens[:, 1:]].sum())
    return nll / np.log(2) / nbytes


def retrieval_accuracy(predict, params, data: TrainData, tcfg: TrainConfig, count: int, seed: int = 1000) -> float:
    """Exact-match accuracy on `count` retrieval cases (seed `seed`) of `seq_len` tokens from the validation files."""
    pool = retrieval.FillerPool(data.corpus.validation)
    newline = retrieval.newline_token_ids(data.tok)
    hits = []
    for i in range(0, count, tcfg.batch_size):
        cases = [retrieval.make_case(pool, data.tok, seed=seed, index=j, context_tokens=tcfg.seq_len,
                                     n_keys=tcfg.retrieval_keys) for j in range(i, min(count, i + tcfg.batch_size))]
        tokens, lengths = retrieval.eval_batch(cases, tcfg.seq_len, data.eos)
        positions = retrieval.answer_positions(cases, lengths)
        pred = np.asarray(predict(params, jnp.asarray(tokens), jnp.asarray(positions, jnp.int32)))
        hits += list(retrieval.exact_match(cases, pred, newline))
    return float(np.mean(hits))


@functools.lru_cache(maxsize=4)
def compiled_steps(train_cfg: DSAConfig, tcfg: TrainConfig):
    """(optimizer, train step, eval step, predict) for a run; cached so runs in one process compile once."""
    tx = make_optimizer(tcfg)
    return tx, make_train_step(train_cfg, tcfg, tx), make_eval_step(train_cfg), make_predict(train_cfg)


# ------------------------------------------------------------------------------------------------------------ run
def versions() -> dict:
    import flax
    import orbax.checkpoint
    import tokenizers

    import jaxlib

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "orbax_checkpoint": orbax.checkpoint.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__}


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class _Stop:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint and returns instead of dying mid-write."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True


def train(tcfg: TrainConfig, out_dir: str, *, max_seconds: float | None = None, tokenizer_path: str = TOKENIZER_PATH,
          progress: bool = True) -> dict:
    """Runs (or resumes) the training in `out_dir`; returns the run record (also in `out_dir/run.json`).

    Stops after `steps`, or earlier when `max_seconds` of wall time have passed or SIGTERM/SIGINT arrives, always
    with a checkpoint; calling again with the same `out_dir` resumes. A time-budgeted first run (`steps = 0`) also
    caps its step count to finish inside `max_seconds`. At the end exports `out_dir/model`.
    """
    import orbax.checkpoint.experimental.v1 as ocp
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    cfg = tcfg.model
    train_cfg = cfg.replace(dtype=tcfg.compute_dtype, backend="xla")
    os.makedirs(out_dir, exist_ok=True)
    run_path = os.path.join(out_dir, "run.json")
    record = _read_json(run_path)
    if record is not None and record["train_config"] != tcfg.to_dict():
        raise ValueError(f"{out_dir} holds a run with another config; use a fresh directory")

    tok = tokenizer.load_tokenizer(tokenizer_path)
    if tok.get_vocab_size() != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} entries but the model's vocab_size is "
                         f"{cfg.vocab_size}")
    data = TrainData(tcfg, tok, corpus.load_corpus(max_files=tcfg.max_files))
    data.corpus.save_manifest(os.path.join(out_dir, "data_manifest.json"))

    params = split_params(init_params(cfg, seed=tcfg.seed), cfg)
    tx, train_step, eval_step, predict = compiled_steps(train_cfg, tcfg)
    steps = tcfg.steps or (record or {}).get("steps", 0)
    calibration = (record or {}).get("calibration")
    if not steps:
        steps, calibration = _calibrate(train_step, tx, tcfg, params, data)
        if max_seconds is not None:  # leave room for the final evaluation and export inside max_seconds
            room = max_seconds - (time.perf_counter() - t_start) - FINAL_EVAL_RESERVE_S
            steps = max(1, min(steps, int(room / calibration["per_step_s"])))
    plan = RunPlan(steps, tcfg.sparse_fraction)
    if (overrun := tcfg.short_rows_overrun(steps)) is not None:  # steps from time_budget_s: unchecked until now
        raise ValueError(overrun)
    schedule = lr_schedule(tcfg, steps)
    opt_state = tx.init(params)

    ckpt_dir = os.path.abspath(os.path.join(out_dir, "checkpoints"))
    # One orbax API across the project: the v1 training Checkpointer, as distillation and checkpoint.py use.
    checkpointer = ocp.training.Checkpointer(
        ckpt_dir, preservation_policy=ocp.training.preservation_policies.LatestN(1), cleanup_tmp_directories=True)
    start = 0
    if checkpointer.latest is not None:
        start = int(checkpointer.latest.step)
        restored = checkpointer.load(checkpointer.latest, {"params": params, "opt_state": opt_state})
        params, opt_state = restored["params"], restored["opt_state"]
    metrics = _read_json(os.path.join(out_dir, "metrics.json")) or {"train": [], "eval": []}
    metrics["train"] = [m for m in metrics["train"] if m["step"] < start]
    metrics["eval"] = [m for m in metrics["eval"] if m["step"] <= start]
    record = {"train_config": tcfg.to_dict(), "steps": steps, "sparse_start": plan.sparse_start,
              "calibration": calibration, "seeds": {"init": tcfg.seed, "batches": [tcfg.seed, 1],
                                                    "retrieval_cases": tcfg.seed + 1, "kl_queries": [tcfg.seed, 2]},
              "tokenizer_sha256": file_sha256(tokenizer_path), "data": {
                  "python_version": data.corpus.python_version, "train_files": len(data.corpus.train),
                  "validation_files": len(data.corpus.validation), "train_tokens": int(len(data.stream)),
                  "manifest": "data_manifest.json"},
              "sessions": (record or {}).get("sessions", []) + [{
                  "start_step": start, "versions": versions(), "device": str(jax.devices()[0]),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}]}
    _write_json(run_path, record)

    stop = _Stop()
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    pool = concurrent.futures.ThreadPoolExecutor(1)
    pending = pool.submit(data.batch, start) if start < steps else None
    step = start
    try:
        bar = tqdm(range(start, steps), desc="train", initial=start, total=steps, disable=not progress)
        for step in bar:
            tokens, mask = pending.result()
            pending = pool.submit(data.batch, step + 1) if step + 1 < steps else None
            phase = plan.phase(step)
            if phase == "sparse" and step == plan.sparse_start and not any(e["step"] == step for e in metrics["eval"]):
                metrics["eval"].append({"step": step, "phase": "dense->sparse",
                                        "val_bits_per_byte": evaluate(eval_step, params, data, tcfg)})
            params, opt_state, m = train_step(params, opt_state, jnp.asarray(tokens), jnp.asarray(mask),
                                              jnp.asarray(kl_positions(tcfg, step)), jnp.float32(schedule(step)),
                                              phase=phase)
            m = jax.device_get(m)
            entry = {"step": step, "phase": phase, "loss": float(m["loss"]), "lm_loss": float(m["lm"]),
                     "indexer_kl_mean": float(np.mean(m["kl"])), "grad_norm": float(m["grad_norm"]),
                     "lr": float(schedule(step)), "seconds": round(time.perf_counter() - t_start, 2)}
            metrics["train"].append(entry)
            bar.set_postfix(phase=phase, lm=f"{entry['lm_loss']:.3f}", kl=f"{entry['indexer_kl_mean']:.3f}")
            done = step + 1
            out_of_time = max_seconds is not None and time.perf_counter() - t_start > max_seconds
            if done % tcfg.checkpoint_every == 0 or done == steps or out_of_time or stop.requested:
                checkpointer.save(done, {"params": params, "opt_state": opt_state}, force=True)
                _write_json(os.path.join(out_dir, "metrics.json"), metrics)
            if out_of_time or stop.requested:
                step = done
                break
        else:
            step = steps
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        checkpointer.close()
        for s, handler in old.items():
            signal.signal(s, handler)
    if step >= steps:
        if not any(e["step"] == steps for e in metrics["eval"]):
            metrics["eval"].append({"step": steps, "phase": "final",
                                    "val_bits_per_byte": evaluate(eval_step, params, data, tcfg),
                                    "retrieval_accuracy": retrieval_accuracy(predict, params, data, tcfg,
                                                                             tcfg.retrieval_eval_cases)})
        _write_json(os.path.join(out_dir, "metrics.json"), metrics)
        plot_losses(metrics, plan, os.path.join(out_dir, "loss.png"))
        model_dir = os.path.join(out_dir, "model")
        export_model(join_params(jax.device_get(params), cfg), cfg, model_dir)
        # The model directory stands alone (load_model_dir plus its tokenizer), as the shipped one does.
        shutil.copyfile(tokenizer_path, os.path.join(model_dir, "tokenizer.json.tmp"))
        os.replace(os.path.join(model_dir, "tokenizer.json.tmp"), os.path.join(model_dir, "tokenizer.json"))
        record["finished"] = True
    record["last_step"] = step
    record["final_eval"] = metrics["eval"][-1] if metrics["eval"] else None
    _write_json(run_path, record)
    return record


def _calibrate(train_step, tx, tcfg: TrainConfig, params: dict, data: TrainData) -> tuple[int, dict]:
    """Times one dense and one sparse step (after compiling them, on throwaway copies: the step donates its inputs)
    and returns the step count whose planned mix of the two fits `time_budget_s`, with the timings."""
    tokens, mask = (jnp.asarray(a) for a in data.full_batch(0))
    kl_pos = jnp.asarray(kl_positions(tcfg, tcfg.short_rows_end))  # full rows' positions, as the batch's
    lr = jnp.float32(0.0)
    times = {}
    for phase in ("dense", "sparse"):
        copy = lambda: jax.tree_util.tree_map(jnp.copy, params)  # noqa: E731
        t0 = time.perf_counter()
        jax.block_until_ready(train_step(copy(), tx.init(params), tokens, mask, kl_pos, lr, phase=phase))
        compile_s = time.perf_counter() - t0
        p, o = copy(), tx.init(params)
        t0 = time.perf_counter()
        for _ in range(3):
            p, o, m = train_step(p, o, tokens, mask, kl_pos, lr, phase=phase)
        jax.block_until_ready(m)
        times[phase] = {"compile_s": compile_s, "step_s": (time.perf_counter() - t0) / 3}
    per_step = ((1 - tcfg.sparse_fraction) * times["dense"]["step_s"] + tcfg.sparse_fraction
                * times["sparse"]["step_s"])
    times["per_step_s"] = per_step
    return max(1, int(tcfg.time_budget_s / per_step)), times


def export_model(params: dict, cfg: DSAConfig, out_dir: str) -> list[str]:
    """Writes `config.json` (float32 compute, default backend) and the params as bfloat16 safetensors shards
    (`model-0000i-of-0000n.safetensors`, each under 16 MB; tensor names are "/"-joined pytree paths)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf, np.float32).astype(ml_dtypes.bfloat16)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    shards, current, size = [], {}, 0
    for name in sorted(flat):
        if current and size + flat[name].nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = flat[name]
        size += flat[name].nbytes
    shards.append(current)
    names = []
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tmp = os.path.join(out_dir, name + ".tmp")
        save_file(shard, tmp, metadata={"format": "indexcache_jax", "dtype": "bfloat16"})
        os.replace(tmp, os.path.join(out_dir, name))
        names.append(name)
    _write_json(os.path.join(out_dir, "config.json"), cfg.replace(dtype="float32", backend="auto").to_dict())
    return names


def plot_losses(metrics: dict, plan: RunPlan, path: str) -> str:
    """PNG: LM loss and mean indexer KL per step, the stage boundary, and held-out bits per byte."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = metrics["train"]
    steps = [m["step"] for m in tr]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(steps, [m["lm_loss"] for m in tr], lw=0.8, label="train LM loss (nats/token)")
    a.axvline(plan.sparse_start, color="k", ls="--", lw=0.8, label="dense -> sparse (top-k) attention")
    if metrics["eval"]:
        ax2 = a.twinx()
        ax2.plot([e["step"] for e in metrics["eval"]], [e["val_bits_per_byte"] for e in metrics["eval"]], "ro",
                 label="held-out bits/byte (DSA)")
        ax2.set_ylabel("bits per byte")
        ax2.legend(loc="center right")
    a.set_xlabel("step")
    a.set_ylabel("nats per token")
    a.legend(loc="upper right")
    b.semilogy(steps, [m["indexer_kl_mean"] for m in tr], lw=0.8)
    b.axvline(plan.sparse_start, color="k", ls="--", lw=0.8)
    b.set_xlabel("step")
    b.set_ylabel("indexer KL (nats, mean over layers)")
    b.set_title("dense: over all keys; sparse: over the top-k set")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _read_json(path: str):
    """The JSON at `path`, or None when there is none yet (a first run)."""
    return read_json(path) if os.path.isfile(path) else None


def _write_json(path: str, obj) -> None:
    corpus.write_json_atomic(path, obj)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a JSON file of TrainConfig fields, or a preset: default, tiny")
    parser.add_argument("--out", required=True, help="run directory (created; an existing one is resumed)")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop (with a checkpoint) after this wall time")
    parser.add_argument("--tokenizer", default=TOKENIZER_PATH)
    args = parser.parse_args(argv)
    record = train(load_train_config(args.config), args.out, max_seconds=args.max_seconds,
                   tokenizer_path=args.tokenizer)
    state = "finished" if record.get("finished") else f"stopped at step {record['last_step']} (run again to resume)"
    print(f"{state}: {record['steps']} steps planned; last evaluation {record['final_eval']}", file=sys.stderr)


if __name__ == "__main__":
    main()
