"""Inference: chunked prefill, an on-device decode loop over an in-place cache, sampling, and batch scoring.

- The cache (`inference.cache`) holds every layer's rows in one buffer per kind; each layer writes its new rows in
  place and the kernels read its window through an offset, so no step copies anything cache-sized. The jitted
  entry points donate it, and `Engine` keeps it across calls.
- Prefill runs the prompt in query chunks of `chunk` tokens; each chunk's indexer reads keys only up to the chunk's
  last position, and the LM head runs on each row's last prompt token only.
- Decode runs in one `lax.while_loop` on the device: one token per row, written at that row's own length,
  sampling, per-row caps and eos with early exit. F layers pick the indices, S layers reuse them (the schedule is
  `cfg.pattern`). `return_logits=True` steps from the host instead, one jitted step per token. A `stream` callback
  gets the first tokens right after the prefill, then every `stream_every` tokens from inside the loop (one host
  callback each, not one per token).
- Ragged batches are right-padded; each row has its own length, and `k_lengths` keeps padding out of both the
  indexer and the attention.
- Shapes are bucketed (powers of two up to `chunk`, then multiples of `chunk`; the batch to `max_batch`; the decode
  loop's output width to a power of two), so repeated calls reuse compiled code.
- With a mesh, params follow `sharding.param_shardings` (heads and experts on `model`), the MoE runs expert
  parallel, and the batch and caches are split on `data`.
"""
from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jax.sharding import Mesh, NamedSharding

from indexcache_jax import text as text_lib
from indexcache_jax.inference import cache as cache_lib
from indexcache_jax.inference import sharding as sharding_lib
from indexcache_jax.model.config import DSAConfig
from indexcache_jax.model.model import DSAModel, check_layout, make_context
from indexcache_jax.model.moe import resolve_moe_impl
from indexcache_jax.model.params import relayout

Array = jax.Array

DEFAULT_CHUNK = 256
DEFAULT_STREAM_EVERY = 16  # decode steps between two `stream` calls
_MIN_BUCKET = 16


def bucket(n: int, chunk: int) -> int:
    """Padded length for `n` tokens: the next power of two >= max(n, 16) up to `chunk`, then a multiple of `chunk`."""
    if n <= chunk:
        return min(chunk, max(_MIN_BUCKET, 1 << (n - 1).bit_length()))
    return -(-n // chunk) * chunk


def sample(logits: Array, key: Array, temperature: Array, top_p: Array, top_k: Array) -> Array:
    """Next tokens int32 `[B]` from logits `[B, V]` float32; the settings are traced scalars (no recompiles).

    `temperature == 0` is the argmax. Otherwise logits are divided by `temperature`, cut to the `top_k` largest
    (`top_k == 0`: all), then to the smallest set of those whose probability reaches `top_p`, and sampled.
    """
    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(key):
        scaled = logits / temperature
        desc = -jnp.sort(-scaled, axis=-1)
        rank = jnp.arange(scaled.shape[-1])
        desc = jnp.where((top_k == 0) | (rank < top_k), desc, -jnp.inf)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
        n_keep = jnp.sum((before < top_p) & (desc > -jnp.inf), axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(desc, jnp.maximum(n_keep, 1) - 1, axis=-1)
        return jax.random.categorical(key, jnp.where(scaled < threshold, -jnp.inf, scaled), axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature == 0, greedy, sampled, key)


# ------------------------------------------------------------------------------------------------- jitted kernels
def _constrain(caches, mesh: Mesh | None):
    return caches if mesh is None else jax.lax.with_sharding_constraint(caches, cache_lib.cache_shardings(caches, mesh))


def _num_slots(cache: dict, cfg: DSAConfig) -> int:
    """Key slots per layer of a cache (see `inference.cache`)."""
    return cache["kv"].shape[1] // cfg.num_layers


def _scan_chunks(params, cfg: DSAConfig, moe_impl: str, mesh, cache, tokens: Array, lengths: Array, chunk: int,
                 init, emit, head_rows=None):
    """Runs `tokens [B, W]` through the model in chunks of `min(chunk, W)` queries, writing each chunk's rows into
    `cache` (S >= W slots per layer) in place.

    Chunk i covers positions `[i c, (i + 1) c)`; keys are valid up to each query's position and below
    `lengths[b]`, and the kernels skip the slots past the chunk's last position. `head_rows(start) -> int32 [B, R]`
    picks the rows whose logits each chunk needs (None: all). `emit(acc, logits [B, c or R, V], start) ->
    (acc, out)` reduces them. Returns `(cache, acc, outs stacked over chunks)`.
    """
    b, w = tokens.shape
    c = min(chunk, w)
    model = DSAModel(cfg, moe_impl, mesh)
    offsets = jnp.arange(c, dtype=jnp.int32)
    slots = _num_slots(cache, cfg)

    def body(carry, start):
        cache, acc = carry
        tok = jax.lax.dynamic_slice_in_dim(tokens, start, c, axis=1)
        positions = jnp.broadcast_to(start + offsets, (b, c))
        ctx = make_context(cfg, positions, lengths, jnp.full((b,), start, jnp.int32))
        rows = None if head_rows is None else head_rows(start)
        logits, _, cache = model.apply({"params": params}, tok, ctx, cache, slots, rows)
        acc, out = emit(acc, logits, start)
        return (_constrain(cache, mesh), acc), out

    (cache, acc), outs = jax.lax.scan(body, (cache, init), jnp.arange(0, w, c, dtype=jnp.int32))
    return cache, acc, outs


@functools.partial(jax.jit, static_argnames=("cfg", "moe_impl", "mesh", "chunk"), donate_argnames=("caches",))
def _prefill(params, caches, tokens, lengths, key, temperature, top_p, top_k, *, cfg, moe_impl, mesh, chunk):
    """Prompts `[B, W]` (right-padded to W <= S) with `lengths [B]` -> (first new tokens `[B]`, caches, their logits
    `[B, V]`). The LM head runs on each row's last prompt token only."""
    b, w = tokens.shape
    c = min(chunk, w)

    def last_row(start):
        return jnp.clip(lengths - 1 - start, 0, c - 1)[:, None]

    def emit(last, logits, start):
        here = (lengths - 1 >= start) & (lengths - 1 < start + c)
        return jnp.where(here[:, None], logits[:, 0], last), None

    init = jnp.zeros((b, cfg.vocab_size), jnp.float32)
    caches, last, _ = _scan_chunks(params, cfg, moe_impl, mesh, caches, tokens, lengths, chunk, init, emit,
                                   head_rows=last_row)
    return sample(last, key, temperature, top_p, top_k), caches, last


def _decode_logits(params, caches, tokens, lengths, *, cfg, moe_impl, mesh):
    """One token per row: `tokens [B]` sit at position `lengths [B]` and are written there; keys are valid below
    `lengths + 1`, and the kernels read no slot past them. -> (logits `[B, V]` float32, caches)."""
    ctx = make_context(cfg, lengths[:, None], lengths + 1, lengths)
    logits, _, caches = DSAModel(cfg, moe_impl, mesh).apply({"params": params}, tokens[:, None], ctx, caches,
                                                      _num_slots(caches, cfg))
    return logits[:, 0], _constrain(caches, mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "moe_impl", "mesh"), donate_argnames=("caches",))
def _decode_step(params, caches, tokens, lengths, key, temperature, top_p, top_k, *, cfg, moe_impl, mesh):
    """One decode step (the per-token path that returns logits) -> (next tokens `[B]`, `lengths + 1`, caches,
    logits `[B, V]`)."""
    logits, caches = _decode_logits(params, caches, tokens, lengths, cfg=cfg, moe_impl=moe_impl, mesh=mesh)
    return sample(logits, key, temperature, top_p, top_k), lengths + 1, caches, logits


# Streaming sinks of the running decode loops, by the id each loop is given: the loop's host callback is one
# module-level function (so a new sink does not retrace the loop), which finds its sink here.
_STREAM_SINKS: dict[int, Callable[[np.ndarray, int], None]] = {}
_STREAM_IDS = itertools.count(1)
_STREAM_LOCK = threading.Lock()


def _to_stream_sink(sink_id, window, step) -> None:
    _STREAM_SINKS[int(sink_id)](np.asarray(window), int(step))


@functools.partial(jax.jit, static_argnames=("cfg", "moe_impl", "mesh", "out_len", "stream_every"),
                   donate_argnames=("caches",))
def _decode_loop(params, caches, first, lengths, key, temperature, top_p, top_k, row_caps, eos, stream_sink=0, *,
                 cfg, moe_impl, mesh, out_len, stream_every=0):
    """Decode on the device: one `lax.while_loop` of decode steps, no host round trip per token.

    first `[B]` (the prefill's tokens, step 0) at positions `lengths [B]`; step i samples with
    `fold_in(key, i)`, as the per-step path does. A row is done once it emits an id in `eos [E]` or reaches its
    cap `row_caps [B]` (new tokens, >= 1; pad rows pass 1); done rows stop advancing, and the loop exits when every
    row is done. With `stream_every > 0`, every step i that is a multiple of it hands the steps `i - stream_every
    + 1 .. i` (int32 `[B, stream_every]`, -1 for done rows) and i to the sink registered as `stream_sink`.
    -> (tokens int32 `[B, out_len]`, -1 after a row's end, caches).
    """
    b = first.shape[0]

    def finished(tok, count):
        return jnp.isin(tok, eos) | (count >= row_caps)

    out = jnp.full((b, out_len), -1, jnp.int32).at[:, 0].set(first)
    state = (jnp.int32(1), out, first, lengths, finished(first, 1), caches)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < out_len) & ~jnp.all(done)

    def body(state):
        i, out, cur, lengths, done, caches = state
        logits, caches = _decode_logits(params, caches, cur, lengths, cfg=cfg, moe_impl=moe_impl, mesh=mesh)
        nxt = sample(logits, jax.random.fold_in(key, i), temperature, top_p, top_k)
        out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(done, -1, nxt)[:, None], i, axis=1)
        lengths = jnp.where(done, lengths, lengths + 1)
        if stream_every:
            def emit():
                window = jax.lax.dynamic_slice_in_dim(out, i + 1 - stream_every, stream_every, axis=1)
                if mesh is not None:  # the host takes the whole window: gather it once, on purpose
                    window = jax.lax.with_sharding_constraint(window,
                                                              NamedSharding(mesh, jax.sharding.PartitionSpec()))
                # Unordered: an ordered callback inside a loop over several devices never ran (jax 0.10.2);
                # the loop's steps are sequential, so the windows still reach the host in order.
                io_callback(_to_stream_sink, None, stream_sink, window, i)
            jax.lax.cond(i % stream_every == 0, emit, lambda: None)
        return i + 1, out, jnp.where(done, cur, nxt), lengths, done | finished(nxt, i + 1), caches

    _, out, _, _, _, caches = jax.lax.while_loop(cond, body, state)
    return out, caches


@functools.partial(jax.jit, static_argnames=("cfg", "moe_impl", "mesh", "chunk", "cache_dtype"))
def _score(params, tokens, lengths, *, cfg, moe_impl, mesh, chunk, cache_dtype):
    """tokens `[B, W]`, lengths `[B]` -> float32 `[B, W]`: `log p(tokens[b, t + 1] | tokens[b, :t + 1])` where
    `t + 1 < lengths[b]`, else 0."""
    b, w = tokens.shape
    caches = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_lib.cache_shapes(cfg, b, w, cache_dtype))
    caches = _constrain(caches, mesh)
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)

    def emit(acc, logits, start):
        tgt = jax.lax.dynamic_slice_in_dim(targets, start, logits.shape[1], axis=1)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tgt[..., None], axis=-1)[..., 0]
        valid = start + 1 + jnp.arange(logits.shape[1]) < lengths[:, None]
        return acc, jnp.where(valid, lp, 0.0)

    _, _, outs = _scan_chunks(params, cfg, moe_impl, mesh, caches, tokens, lengths, chunk, jnp.zeros(()), emit)
    return jnp.moveaxis(outs, 0, 1).reshape(b, w)


# --------------------------------------------------------------------------------------------------- validation
def _check_prompts(cfg: DSAConfig, prompts: Any) -> list[np.ndarray]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) and not isinstance(prompts, np.ndarray):
        raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        arr = np.asarray(p)
        if arr.ndim != 1:
            raise ValueError(f"prompt {i} must be a flat list of token ids, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"prompt {i} must hold integer token ids, got dtype {arr.dtype}")
        if arr.min() < 0 or arr.max() >= cfg.vocab_size:
            bad = arr[(arr < 0) | (arr >= cfg.vocab_size)]
            raise ValueError(f"prompt {i}: token ids out of range [0, {cfg.vocab_size}): e.g. {bad[:5].tolist()}")
        out.append(arr.astype(np.int32))
    return out


def _row_caps(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    """One cap of new tokens per prompt, from an int or a list of ints."""
    caps = [max_new_tokens] * n if np.ndim(max_new_tokens) == 0 else list(max_new_tokens)
    if len(caps) != n:
        raise ValueError(f"max_new_tokens lists {len(caps)} caps for {n} prompts")
    for c in caps:
        if isinstance(c, (bool, np.bool_)) or int(c) != c or c < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0 (or a list of them), got {max_new_tokens!r}")
    return [int(c) for c in caps]


def _out_bucket(max_new: int) -> int:
    """The decode loop's static output width for `max_new` tokens: the next power of two, at least 16 (the loop's
    own trip count stays exact)."""
    return max(_MIN_BUCKET, 1 << (max_new - 1).bit_length())


def _eos_ids(eos_id: int | Sequence[int] | None) -> np.ndarray:
    if eos_id is None:
        return np.zeros((0,), np.int32)
    ids = np.atleast_1d(np.asarray(eos_id))
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"eos_id must be an int, a list of ints or None, got {eos_id!r}")
    return ids.astype(np.int32)


def _check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k}")


def _check_score_inputs(cfg: DSAConfig, tokens: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """-> (tokens int32 `[B, T]` with padding set to 0, lengths `[B]`). The mask must be right padding."""
    tok = np.asarray(tokens)
    if tok.ndim != 2 or not np.issubdtype(tok.dtype, np.integer):
        raise ValueError(f"tokens must be an int array [B, T], got shape {tok.shape} and dtype {tok.dtype}")
    if tok.shape[0] == 0 or tok.shape[1] == 0:
        raise ValueError(f"tokens must be non-empty, got shape {tok.shape}")
    if tok.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {tok.shape[1]} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    if mask is None:
        valid = np.ones(tok.shape, bool)
    else:
        valid = np.asarray(mask)
        if valid.shape != tok.shape:
            raise ValueError(f"mask shape {valid.shape} != tokens shape {tok.shape}")
        valid = valid.astype(bool)
    lengths = valid.sum(axis=1).astype(np.int32)
    if not np.array_equal(valid, np.arange(tok.shape[1])[None, :] < lengths[:, None]):
        raise ValueError("mask must mark a prefix of each row (1 = real token, right padding only)")
    real = tok[valid]
    if real.size and (real.min() < 0 or real.max() >= cfg.vocab_size):
        bad = real[(real < 0) | (real >= cfg.vocab_size)]
        raise ValueError(f"token ids out of range [0, {cfg.vocab_size}): e.g. {bad[:5].tolist()}")
    return np.where(valid, tok, 0).astype(np.int32), lengths


def params_pattern(params: dict) -> str:
    """The F/S pattern a stacked params tree is laid out for, read off its segments: each segment holds G groups
    of one F layer (`full`, leading dim G) and its S layers (`shared_r`, `[G, n_r]`)."""
    out = []
    for s in range(sum(k.startswith("segment_") for k in params)):
        seg = params[f"segment_{s}"]
        groups = seg["full"]["attn_norm"]["scale"].shape[0]
        shared = sum(seg[part]["attn_norm"]["scale"].shape[1] for part in seg if part.startswith("shared_"))
        out.append(("F" + "S" * shared) * groups)
    return "".join(out)


def params_for(params: dict, cfg: DSAConfig) -> dict:
    """`params` laid out for `cfg.pattern`: as they are when they match, else relayouted from the pattern they hold
    (F -> S drops indexers). Raises a ValueError naming the layers when `cfg` makes F a layer the params hold no
    indexer for."""
    try:
        check_layout(params, cfg)
        return params
    except ValueError:
        held = params_pattern(params)
        if len(held) != cfg.num_layers:
            raise
    missing = [i for i, (want, have) in enumerate(zip(cfg.pattern, held)) if want == "F" and have == "S"]
    if missing:
        raise ValueError(f"pattern {cfg.pattern!r} makes layers {missing} F, but the params (laid out for "
                         f"{held!r}) hold no indexer weights for them")
    return relayout(params, cfg.with_pattern(held), cfg)


def _is_text(items: Any) -> bool:
    return not isinstance(items, (str, bytes)) and isinstance(items, Sequence) and len(items) > 0 and all(
        isinstance(x, str) for x in items)


def _encode(tokenizer, texts: Sequence[str], what: str) -> list[list[int]]:
    if tokenizer is None:
        raise ValueError(f"{what} are strings: pass tokenizer= (e.g. indexcache_jax.load_tokenizer(model_dir))")
    return text_lib.encode_batch(tokenizer, texts)


# ------------------------------------------------------------------------------------------------------- Engine
class _StreamSink:
    """Turns the decode loop's token windows into `stream` calls for one batch slice (prompts `first_row ..`).

    Windows come in step order and without gaps, each `[B, width]` holding steps `next_step .. step` of every row;
    each row's tokens are kept up to its end (its cap, its eos, or the loop's -1 once it is done), so the streamed
    ids are exactly the returned ones. `finish` hands over what the last window did not reach.
    """

    def __init__(self, stream, first_row: int, caps: Sequence[int], eos: np.ndarray):
        self.stream, self.first_row, self.caps, self.eos = stream, first_row, list(caps), eos
        self.sent = [0] * len(caps)  # tokens handed over per row
        self.ended = [False] * len(caps)
        self.next_step = 0

    def register(self) -> int:
        with _STREAM_LOCK:
            sink_id = next(_STREAM_IDS)
            _STREAM_SINKS[sink_id] = self
        return sink_id

    @staticmethod
    def unregister(sink_id: int) -> None:
        with _STREAM_LOCK:
            _STREAM_SINKS.pop(sink_id, None)

    def __call__(self, window: np.ndarray, step: int) -> None:
        new = {}
        for r in range(len(self.caps)):
            if self.ended[r]:
                continue
            got = []
            for t in window[r]:
                if t < 0 or self.sent[r] + len(got) >= self.caps[r]:
                    self.ended[r] = True
                    break
                got.append(int(t))
                if t in self.eos:
                    self.ended[r] = True
                    break
            if got:
                self.sent[r] += len(got)
                new[self.first_row + r] = got
        self.next_step = step + 1
        if new:
            self.stream(new)

    def finish(self, tokens: np.ndarray) -> None:
        """`tokens` `[B, >= next_step]`: every step's tokens; streams the steps after the last window."""
        if self.next_step < tokens.shape[1]:
            self(tokens[:, self.next_step:], tokens.shape[1] - 1)


class Engine:
    """Repeated generation and scoring for one model, compiled once per shape bucket.

    `max_len` bounds prompt plus new tokens (and scored sequences); `max_batch` is the batch every call is padded
    to (larger inputs run in slices of `max_batch`). The decode cache (`max_batch x max_len` slots, `cache_dtype`,
    default `cfg.dtype`: bfloat16 for a bfloat16 model) is allocated once and donated through every step. With
    `mesh` (see `sharding.make_mesh`), params are placed by `sharding.param_shardings`, and batch and cache split
    over the `data` axis; `max_batch` is rounded up to a multiple of the data axis size. `chunk` (a power of two)
    is the prefill / scoring query chunk. `moe_impl` None picks `moe.resolve_moe_impl`'s default for the platform
    and mesh. Params laid out for another pattern are relayouted (`params_for`).
    """

    def __init__(self, params: dict, cfg: DSAConfig, *, max_len: int, max_batch: int, mesh: Mesh | None = None,
                 chunk: int = DEFAULT_CHUNK, cache_dtype: Any = None, moe_impl: str | None = None):
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if chunk < 1 or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two, got {chunk}")
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        self.cfg = cfg
        self.mesh = mesh
        self.chunk = chunk
        self.max_len = max_len
        data = 1 if mesh is None else mesh.shape.get(sharding_lib.DATA_AXIS, 1)
        self.max_batch = -(-max_batch // data) * data
        self.cache_len = bucket(max_len, chunk)
        self.cache_dtype = jnp.dtype(cfg.dtype if cache_dtype is None else cache_dtype)
        self.moe_impl = resolve_moe_impl(moe_impl, mesh)
        params = params_for(params, cfg)
        self.params = params if mesh is None else sharding_lib.shard_params(params, cfg, mesh)
        self._cache = None

    # ------------------------------------------------------------------------------------------------ helpers
    def _put_batch(self, x: np.ndarray) -> Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, sharding_lib.batch_sharding(self.mesh, x.ndim))

    def _replicated(self, x) -> Array:
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

    def _take_cache(self) -> list:
        caches, self._cache = self._cache, None
        if caches is None or any(leaf.is_deleted() for leaf in jax.tree.leaves(caches)):
            caches = cache_lib.init_cache(self.cfg, self.max_batch, self.cache_len, self.cache_dtype, mesh=self.mesh)
        return caches

    # ---------------------------------------------------------------------------------------------- generate
    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[str], max_new_tokens: int | Sequence[int], *,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 eos_id: int | Sequence[int] | None = None, return_logits: bool = False, tokenizer=None,
                 stream: Callable[[dict[int, list[int]]], Any] | None = None,
                 stream_every: int = DEFAULT_STREAM_EVERY):
        """New tokens for each prompt (a list of lists of token ids, any lengths; or a list of strings with a
        `tokenizer`, and then the completions come back as strings).

        `max_new_tokens` is one cap for every row or a list with one cap per prompt. temperature 0 is greedy;
        otherwise sampling with `top_k` (0 = off) and `top_p` (1 = off) from `jax.random.key(seed)`. A row stops
        after emitting any id in `eos_id` (the eos is kept); None never stops early. The decode loop runs on the
        device and exits once every row is done. Returns a list of new-token lists; with `return_logits`, also a
        list of float32 `[n_i, V]` arrays, the logits each new token was drawn from (that path steps from the
        host, one call per token).

        `stream`, if given, is called with `{prompt index: token ids emitted since its last call}` (token ids, also
        for text prompts; rows with nothing new are left out): once with each row's first token right after the
        prefill, then every `stream_every` decode steps from inside the device loop, and once with the rest. The
        ids it is handed, joined per prompt, are the returned ones. The loop waits while it runs, so keep it short.
        """
        if stream is not None and not callable(stream):
            raise ValueError(f"stream must be callable, got {type(stream).__name__}")
        if isinstance(stream_every, bool) or not isinstance(stream_every, (int, np.integer)) or stream_every < 1:
            raise ValueError(f"stream_every must be an int >= 1, got {stream_every!r}")
        if _is_text(prompts):
            out = self.generate(_encode(tokenizer, prompts, "prompts"), max_new_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed, eos_id=eos_id, return_logits=return_logits,
                                stream=stream, stream_every=stream_every)
            tokens = out[0] if return_logits else out
            texts = text_lib.decode_batch(tokenizer, tokens)
            return (texts, out[1]) if return_logits else texts
        rows = _check_prompts(self.cfg, prompts)
        caps = _row_caps(max_new_tokens, len(rows))
        for i, (r, c) in enumerate(zip(rows, caps)):
            if len(r) + c > self.max_len:
                raise ValueError(f"prompt {i}: length {len(r)} + max_new_tokens {c} exceeds max_len {self.max_len}")
        _check_sampling(temperature, top_p, top_k)
        settings = tuple(self._replicated(np.asarray(v, dt)) for v, dt in
                         ((temperature, np.float32), (top_p, np.float32), (top_k, np.int32)))
        eos = _eos_ids(eos_id)
        tokens, logits = [], []
        key = jax.random.key(seed)
        for g in range(0, len(rows), self.max_batch):
            sink = None if stream is None else _StreamSink(stream, g, caps[g:g + self.max_batch], eos)
            t, lg = self._generate_batch(rows[g:g + self.max_batch], caps[g:g + self.max_batch], settings, eos,
                                         jax.random.fold_in(key, g), return_logits, sink, int(stream_every))
            tokens += t
            logits += lg
        return (tokens, logits) if return_logits else tokens

    def _generate_batch(self, rows, caps, settings, eos, key, return_logits, sink, stream_every):
        n = len(rows)
        max_new = max(caps)
        if max_new == 0:
            return [[] for _ in rows], [np.zeros((0, self.cfg.vocab_size), np.float32) for _ in rows]
        w = bucket(max(len(r) for r in rows), self.chunk)
        tok = np.zeros((self.max_batch, w), np.int32)
        lengths = np.ones((self.max_batch,), np.int32)  # pad rows: one token, ignored
        row_caps = np.ones((self.max_batch,), np.int32)
        for i, r in enumerate(rows):
            tok[i, :len(r)] = r
            lengths[i] = len(r)
            row_caps[i] = caps[i]
        statics = dict(cfg=self.cfg, moe_impl=self.moe_impl, mesh=self.mesh)
        nxt, caches, lg = _prefill(self.params, self._take_cache(), self._put_batch(tok), self._put_batch(lengths),
                                   self._replicated(jax.random.fold_in(key, 0)), *settings, chunk=self.chunk,
                                   **statics)
        if sink is not None:
            sink(np.asarray(nxt)[:, None], 0)
        if return_logits:
            gen, logits_np, caches = self._step_from_host(caches, nxt, lg, lengths, key, settings, max_new,
                                                          sink, stream_every)
        else:
            sink_id = 0 if sink is None else sink.register()
            try:
                out, caches = _decode_loop(self.params, caches, nxt, self._put_batch(lengths),
                                           self._replicated(key), *settings, self._put_batch(row_caps),
                                           self._replicated(eos), self._replicated(np.int32(sink_id)),
                                           out_len=_out_bucket(max_new), stream_every=0 if sink is None else
                                           stream_every, **statics)
                gen, logits_np = np.asarray(out), None
            finally:
                if sink is not None:
                    sink.unregister(sink_id)
        if sink is not None:
            jax.effects_barrier()  # every window the loop sent has reached the sink
            sink.finish(gen)
        self._cache = caches
        results, res_logits = [], []
        for i in range(n):
            row = gen[i, :caps[i]]
            hits = np.flatnonzero(np.isin(row, eos) | (row < 0))
            keep = hits[0] + int(row[hits[0]] >= 0) if len(hits) else len(row)
            results.append(row[:keep].tolist())
            if return_logits:
                res_logits.append(logits_np[i, :keep])
        return results, res_logits

    def _step_from_host(self, caches, nxt, lg, lengths, key, settings, max_new, sink, stream_every):
        """The per-token decode path (one jitted step per token, logits returned): -> (tokens `[B, max_new]`,
        logits `[B, max_new, V]`, caches)."""
        statics = dict(cfg=self.cfg, moe_impl=self.moe_impl, mesh=self.mesh)
        out, all_logits = [nxt], [lg]
        cur = self._put_batch(lengths)
        for i in range(1, max_new):
            nxt, cur, caches, lg = _decode_step(self.params, caches, nxt, cur,
                                                self._replicated(jax.random.fold_in(key, i)), *settings, **statics)
            out.append(nxt)
            all_logits.append(lg)
            if sink is not None and i % stream_every == 0:
                sink(np.stack([np.asarray(x) for x in out[-stream_every:]], axis=1), i)
        return (np.stack([np.asarray(x) for x in out], axis=1), np.stack([np.asarray(x) for x in all_logits], axis=1),
                caches)

    # ------------------------------------------------------------------------------------------------- score
    def score(self, tokens: Any, *, mask: Any = None, tokenizer=None) -> np.ndarray | list[np.ndarray]:
        """int `[B, T]` -> float32 `[B, T - 1]`: log-prob of each next token, `out[b, t] = log p(tokens[b, t + 1] |
        tokens[b, :t + 1])`. `mask [B, T]` (1 = real token, right padding) marks each row's length; entries whose
        target is padding are 0. Runs in query chunks, so long sequences never build a `[T, T]` matrix.

        With a list of strings and a `tokenizer`: one float32 `[n_i - 1]` array per text (n_i its tokens)."""
        if _is_text(tokens):
            rows = _encode(tokenizer, tokens, "texts")
            padded, mask = text_lib.pad_batch(rows)
            lp = self.score(padded, mask=mask)
            return [lp[i, :len(r) - 1] for i, r in enumerate(rows)]
        tok, lengths = _check_score_inputs(self.cfg, tokens, mask)
        b, t = tok.shape
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len {self.max_len}")
        w = bucket(t, self.chunk)
        out = np.zeros((b, t - 1), np.float32)
        for g in range(0, b, self.max_batch):
            rows = tok[g:g + self.max_batch]
            padded = np.zeros((self.max_batch, w), np.int32)
            padded[:len(rows), :t] = rows
            lens = np.zeros((self.max_batch,), np.int32)
            lens[:len(rows)] = lengths[g:g + self.max_batch]
            lp = _score(self.params, self._put_batch(padded), self._put_batch(lens), cfg=self.cfg,
                        moe_impl=self.moe_impl, mesh=self.mesh, chunk=self.chunk, cache_dtype=self.cache_dtype)
            out[g:g + len(rows)] = np.asarray(lp)[:len(rows), :t - 1]
        return out


# ----------------------------------------------------------------------------------------------- functional API
def generate(params: dict, cfg: DSAConfig, prompts: Sequence[Sequence[int]] | Sequence[str],
             max_new_tokens: int | Sequence[int], *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int = 0, eos_id: int | Sequence[int] | None = None, tokenizer=None,
             stream: Callable[[dict[int, list[int]]], Any] | None = None,
             stream_every: int = DEFAULT_STREAM_EVERY) -> list[list[int]] | list[str]:
    """New tokens for each prompt of `prompts` (lists of token ids, lengths may differ), as a list of lists; with
    a list of strings and a `tokenizer`, the completions as strings.

    One-shot `Engine.generate` with `max_len` and batch bucketed from the inputs (compiled code is reused across
    calls of the same buckets). temperature 0 is greedy; `eos_id` (int or list) stops a row after it is emitted.
    `max_new_tokens` is one cap or one per prompt. `stream` and `stream_every` as in `Engine.generate`. Params
    laid out for another pattern are relayouted.
    """
    if _is_text(prompts):
        ids = generate(params, cfg, _encode(tokenizer, prompts, "prompts"), max_new_tokens,
                       temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, eos_id=eos_id, stream=stream,
                       stream_every=stream_every)
        return text_lib.decode_batch(tokenizer, ids)
    rows = _check_prompts(cfg, prompts)
    max_len = max(len(r) + c for r, c in zip(rows, _row_caps(max_new_tokens, len(rows))))
    engine = Engine(params, cfg, max_len=max(max_len, 2), max_batch=1 << (len(rows) - 1).bit_length())
    return engine.generate(rows, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                           eos_id=eos_id, stream=stream, stream_every=stream_every)


def score(params: dict, cfg: DSAConfig, tokens: Any, *, mask: Any = None, chunk: int = DEFAULT_CHUNK,
          tokenizer=None) -> np.ndarray | list[np.ndarray]:
    """int32 `[B, T]` -> float32 `[B, T - 1]` log-probs of each next token (see `Engine.score`).

    `mask [B, T]`: 1 = real token, right padding; log-probs whose target is padding are 0. T and B are padded to
    buckets, so repeated calls (e.g. a pattern search's calibration loss) reuse compiled code. With a list of
    strings and a `tokenizer`: one float32 `[n_i - 1]` array per text. Params laid out for another pattern are
    relayouted.
    """
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    if _is_text(tokens):
        rows = _encode(tokenizer, tokens, "texts")
        padded, text_mask = text_lib.pad_batch(rows)
        lp = score(params, cfg, padded, mask=text_mask, chunk=chunk)
        return [lp[i, :len(r) - 1] for i, r in enumerate(rows)]
    params = params_for(params, cfg)
    tok, lengths = _check_score_inputs(cfg, tokens, mask)
    b, t = tok.shape
    w, bb = bucket(t, chunk), 1 << (b - 1).bit_length()
    padded = np.zeros((bb, w), np.int32)
    padded[:b, :t] = tok
    lens = np.zeros((bb,), np.int32)
    lens[:b] = lengths
    lp = _score(params, jnp.asarray(padded), jnp.asarray(lens), cfg=cfg, moe_impl=resolve_moe_impl(None), mesh=None,
                chunk=chunk,
                cache_dtype=jnp.dtype(cfg.dtype))
    return np.asarray(lp)[:b, :t - 1]
