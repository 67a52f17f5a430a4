"""The inference engine against independent references: full forwards, transformers, per-row runs, softmax."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import indexcache_jax as ic
from indexcache_jax.inference import engine as engine_lib
import random_model

# Every test reuses a few compiled shapes: prompts <= 16 tokens, batch 4 and 32 cache slots (ic.generate buckets
# these the same way), and reference forwards padded to REF_LEN.
REF_LEN = 32


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def random_prompts(rng, vocab: int, lengths) -> list[list[int]]:
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def random_params(cfg, seed: int) -> dict:
    return random_model.random_params(cfg, seed, std=0.1)


def reference_logits(params, cfg, seqs: list[list[int]]) -> list[np.ndarray]:
    """Full causal forwards of each sequence, batched: padded at the end to `[4, REF_LEN]` (causality keeps the
    real positions exact), so every call shares one compiled forward."""
    out = []
    for g in range(0, len(seqs), 4):
        batch = np.zeros((4, REF_LEN), np.int32)
        for i, s in enumerate(seqs[g:g + 4]):
            batch[i, :len(s)] = s
        logits = np.asarray(ic.forward(params, cfg, batch))
        out += [logits[i, :len(s)] for i, s in enumerate(seqs[g:g + 4])]
    return out


def reference_logprobs(params, cfg, tokens: np.ndarray, lengths) -> list[np.ndarray]:
    """`log_softmax(forward)` at each next token of each row's first `lengths[b]` tokens."""
    seqs = [tokens[b, :n].tolist() for b, n in enumerate(lengths)]
    return [np.take_along_axis(jax.nn.log_softmax(lg, axis=-1)[:-1], np.array(s)[1:, None], axis=-1)[:, 0]
            for lg, s in zip(reference_logits(params, cfg, seqs), seqs)]


@pytest.fixture(scope="module")
def tiny_mixed():
    """A 6-layer model with a mixed schedule (two F groups of different shape) and index_topk well below T."""
    cfg = ic.tiny(pattern="FSFSSF", index_topk=4)
    return cfg, random_params(cfg, seed=3)


# --------------------------------------------------------------------------------------------- decode consistency
@pytest.mark.parametrize("pattern", ["FFFFFF", "FSFSSF"])
def test_decode_logits_equal_full_forward(pattern, tiny_mixed):
    """Every greedy step's logits equal a full forward over the same prefix; ragged prompts, multi-chunk prefill."""
    cfg, params = tiny_mixed
    if pattern != cfg.pattern:
        cfg = cfg.with_pattern(pattern)
        params = random_params(cfg, seed=4)
    prompts = random_prompts(np.random.default_rng(pattern.count("S")), cfg.vocab_size, (3, 13, 7))
    eng = ic.Engine(params, cfg, max_len=32, max_batch=4, chunk=8)
    tokens, logits = eng.generate(prompts, 10, return_logits=True)
    refs = reference_logits(params, cfg, [p + t for p, t in zip(prompts, tokens)])
    for prompt, new, lg, ref in zip(prompts, tokens, logits, refs):
        assert len(new) == 10 and lg.shape == (10, cfg.vocab_size)
        ref = ref[len(prompt) - 1:-1]
        assert rel_err(lg, ref) <= 1e-4
        np.testing.assert_array_equal(np.argmax(ref, -1), new)


def test_chunked_prefill_equals_unchunked(tiny_mixed):
    cfg, params = tiny_mixed
    prompts = random_prompts(np.random.default_rng(5), cfg.vocab_size, (16, 6, 11))
    outs = [ic.Engine(params, cfg, max_len=32, max_batch=4, chunk=chunk).generate(prompts, 4, return_logits=True)
            for chunk in (4, 8, 256)]  # 4 and 2 chunks of queries vs one
    for toks, lgs in outs[:-1]:
        assert toks == outs[-1][0]
        for lg, ref in zip(lgs, outs[-1][1]):
            assert rel_err(lg, ref) <= 1e-5
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (3, 29))
    np.testing.assert_allclose(ic.score(params, cfg, tokens, chunk=8), ic.score(params, cfg, tokens), atol=1e-5)


def test_ragged_batch_equals_per_row_runs(tiny_mixed):
    cfg, params = tiny_mixed
    prompts = random_prompts(np.random.default_rng(7), cfg.vocab_size, (2, 13, 5, 9))
    eng = ic.Engine(params, cfg, max_len=32, max_batch=4, chunk=8)
    batch_toks, batch_lgs = eng.generate(prompts, 6, return_logits=True)
    for prompt, toks, lgs in zip(prompts, batch_toks, batch_lgs):
        alone_toks, alone_lgs = eng.generate([prompt], 6, return_logits=True)
        assert toks == alone_toks[0]
        assert rel_err(lgs, alone_lgs[0]) <= 1e-5


# ------------------------------------------------------------------------------------------ transformers parity
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by repeated full forwards without a cache."""
    import torch

    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            seq.append(int(torch.argmax(logits)))
    return seq[len(prompt):]


@pytest.mark.parametrize("which", ["glm_mixed", "deepseek_v32"])
def test_greedy_generate_equals_transformers(which):
    import hf_oracle

    if which == "glm_mixed":
        hf_cfg = hf_oracle.glm_config(indexer_types=["full", "shared", "full", "shared", "shared"], index_topk=4)
    else:
        hf_cfg = hf_oracle.deepseek_config(index_topk=4)
    model = hf_oracle.build(hf_cfg, seed=21)
    cfg = ic.DSAConfig.from_hf(hf_cfg.to_dict())
    params = ic.params_from_hf(cfg, hf_oracle.hub_tensors(model))
    prompts = random_prompts(np.random.default_rng(22), cfg.vocab_size, (9, 4, 12))
    got = ic.generate(params, cfg, prompts, 8)
    assert got == [hf_greedy(model, p, 8) for p in prompts]


# ---------------------------------------------------------------------------------------------------------- score
def test_score_equals_log_softmax_forward_per_row(tiny_mixed):
    cfg, params = tiny_mixed
    rng = np.random.default_rng(9)
    lengths = np.array([17, 5, 12])
    tokens = rng.integers(0, cfg.vocab_size, (3, 17))
    mask = np.arange(17)[None] < lengths[:, None]
    tokens[~mask] = -1  # padding ids need not be valid
    lp = ic.score(params, cfg, tokens, mask=mask.astype(np.int32))
    assert lp.shape == (3, 16) and lp.dtype == np.float32
    for b, (n, ref) in enumerate(zip(lengths, reference_logprobs(params, cfg, tokens, lengths))):
        np.testing.assert_allclose(lp[b, :n - 1], ref, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(lp[b, n - 1:], 0.0)
    eng = ic.Engine(params, cfg, max_len=32, max_batch=2, chunk=8)  # 3 rows run as two slices of max_batch
    np.testing.assert_allclose(eng.score(tokens, mask=mask), lp, atol=1e-5)


def test_score_is_bucketed_and_not_retraced(tiny_mixed):
    cfg, params = tiny_mixed
    rng = np.random.default_rng(10)
    ic.score(params, cfg, rng.integers(0, cfg.vocab_size, (3, 29)))
    size = engine_lib._score._cache_size()
    for b, t in ((4, 20), (3, 32), (4, 17)):  # the same (batch 4, length 32) bucket
        tokens = rng.integers(0, cfg.vocab_size, (b, t))
        refs = reference_logprobs(params, cfg, tokens, [t] * b)
        np.testing.assert_allclose(ic.score(params, cfg, tokens), np.stack(refs), atol=1e-5)
    assert engine_lib._score._cache_size() == size


# ------------------------------------------------------------------------------------------------- engine mechanics
def test_engine_reuses_compiled_steps_and_donates_cache(tiny_mixed):
    cfg, params = tiny_mixed
    eng = ic.Engine(params, cfg, max_len=32, max_batch=4, chunk=8)
    rng = np.random.default_rng(11)
    eng.generate(random_prompts(rng, cfg.vocab_size, (3, 5)), 3, temperature=0.5)
    sizes = engine_lib._prefill._cache_size(), engine_lib._decode_loop._cache_size()
    held = eng._cache
    # Another prompt bucket-mate, batch size, sampling setting and token count: nothing recompiles.
    eng.generate(random_prompts(rng, cfg.vocab_size, (8, 7, 2)), [5, 9, 1], top_k=3, top_p=0.5, temperature=1.0)
    assert (engine_lib._prefill._cache_size(), engine_lib._decode_loop._cache_size()) == sizes
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(held))  # donated, not copied
    held = eng._cache
    eng.generate(random_prompts(rng, cfg.vocab_size, (4,)), 2)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(held))
    b = jnp.zeros((4,), jnp.int32)
    lowered = engine_lib._decode_loop.lower(
        eng.params, eng._cache, b, b + 1, jax.random.key(0), jnp.float32(1), jnp.float32(1), jnp.int32(0), b + 1,
        jnp.zeros((1,), jnp.int32), cfg=cfg, moe_impl=eng.moe_impl, mesh=None, out_len=16)
    assert "tf.aliasing_output" in lowered.as_text()


def test_device_loop_equals_per_step_loop(tiny_mixed):
    """The on-device while loop and the host-stepped path (return_logits) agree token for token, greedy and
    sampled with one key, with per-row caps and eos; and the greedy tokens are the argmax of the step logits."""
    cfg, params = tiny_mixed
    eng = ic.Engine(params, cfg, max_len=32, max_batch=4, chunk=8)
    prompts = random_prompts(np.random.default_rng(21), cfg.vocab_size, (3, 11, 6))
    caps = [7, 2, 9]
    for settings in (dict(), dict(temperature=1.0, top_k=20, seed=5), dict(temperature=0.8, top_p=0.9, seed=6)):
        device = eng.generate(prompts, caps, **settings)
        stepped, logits = eng.generate(prompts, caps, return_logits=True, **settings)
        assert device == stepped
        assert [len(d) for d in device] == caps
        if not settings:
            for toks, lg in zip(device, logits):
                np.testing.assert_array_equal(np.argmax(lg, axis=-1), toks)
    eos = eng.generate(prompts, caps)[2][3]
    free = eng.generate(prompts, caps)
    with_eos = eng.generate(prompts, caps, eos_id=eos)
    assert with_eos == eng.generate(prompts, caps, eos_id=eos, return_logits=True)[0]
    for f, s in zip(free, with_eos):
        assert s == (f[:f.index(eos) + 1] if eos in f else f)


def test_streamed_tokens_are_the_returned_ones(tiny_mixed):
    """`stream` gets each row's first token after the prefill, then at most `stream_every` new tokens per row a
    call, from inside the device loop (a host callback in the compiled loop, not one per token); joined per prompt
    they are the returned tokens, on the device loop and the host-stepped path, with caps, eos, sampling and more
    prompts than `max_batch`. A new callback compiles nothing new."""
    cfg, params = tiny_mixed
    eng = ic.Engine(params, cfg, max_len=32, max_batch=4, chunk=8)
    prompts = random_prompts(np.random.default_rng(23), cfg.vocab_size, (3, 11, 6, 9, 4))
    caps = [7, 2, 9, 12, 5]
    eos = eng.generate(prompts, caps)[3][4]
    for settings in (dict(), dict(temperature=1.0, top_k=20, seed=5), dict(eos_id=eos)):
        for every in (1, 3, 16):
            for return_logits in (False, True):
                calls = []
                out = eng.generate(prompts, caps, stream=calls.append, stream_every=every,
                                   return_logits=return_logits, **settings)
                out = out[0] if return_logits else out
                assert out == eng.generate(prompts, caps, **settings)
                joined = {i: [] for i in range(len(prompts))}
                for call in calls:
                    for i, toks in call.items():
                        assert 1 <= len(toks) <= every
                        joined[i] += toks
                assert [joined[i] for i in range(len(prompts))] == out, (settings, every, return_logits)
                # First tokens alone in each slice's first call (prompts 0-3, then 4).
                assert calls[0] == {i: out[i][:1] for i in range(4)}
    sizes = engine_lib._decode_loop._cache_size()
    eng.generate(prompts[:2], 6, stream=lambda new: None, stream_every=3)
    assert engine_lib._decode_loop._cache_size() == sizes
    calls = []  # the one-shot function streams the same way
    out = ic.generate(params, cfg, prompts[:3], caps[:3], stream=calls.append, stream_every=4)
    assert [sum((c.get(i, []) for c in calls), []) for i in range(3)] == out == eng.generate(prompts[:3], caps[:3])
    b = jnp.zeros((4,), jnp.int32)
    streaming = engine_lib._decode_loop.lower(
        eng.params, eng._cache, b, b + 1, jax.random.key(0), jnp.float32(1), jnp.float32(1), jnp.int32(0), b + 1,
        jnp.zeros((1,), jnp.int32), jnp.int32(1), cfg=cfg, moe_impl=eng.moe_impl, mesh=None, out_len=16,
        stream_every=3).compile().as_text()
    assert "callback" in streaming and "while" in streaming
    for bad, problem in ((dict(stream_every=0), "stream_every"), (dict(stream="tokens"), "callable")):
        with pytest.raises(ValueError, match=problem):
            eng.generate(prompts, 3, **bad)


def test_device_loop_exits_early_when_every_row_is_done(tiny_mixed, monkeypatch):
    """With every row stopped by eos at its first token, the loop runs no decode step (counted through the
    traced step function's calls inside the compiled loop, via a host callback)."""
    cfg, params = tiny_mixed
    prompts = random_prompts(np.random.default_rng(22), cfg.vocab_size, (5, 9))
    first = [g[0] for g in ic.generate(params, cfg, prompts, 1)]
    steps = []
    real = engine_lib._decode_logits

    def counted(*args, **kwargs):
        jax.debug.callback(lambda: steps.append(1))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_lib, "_decode_logits", counted)
    engine_lib._decode_loop.clear_cache()
    out = ic.Engine(params, cfg, max_len=64, max_batch=2).generate(prompts, 40, eos_id=first)
    jax.effects_barrier()
    assert out == [[f] for f in first] and steps == []
    ic.Engine(params, cfg, max_len=64, max_batch=2).generate(prompts, 5, eos_id=[cfg.vocab_size + 1])
    jax.effects_barrier()
    assert len(steps) == 4  # four steps after the prefill's token, then every row is at its cap
    engine_lib._decode_loop.clear_cache()


def test_decode_program_keeps_no_cache_sized_temporary(tiny_mixed):
    """The compiled decode loop's temporaries do not grow with max_len, and it copies no cache-sized buffer: the
    cache is updated in place and no per-layer window of it is sliced out, reshaped or copied. Doubling the slots
    twice must leave temp bytes (nearly) unchanged."""
    cfg, params = tiny_mixed
    temps, caches = [], []
    for max_len in (256, 1024, 4096):
        cache = jax.eval_shape(lambda max_len=max_len: ic.cache.init_cache(cfg, 2, max_len, cfg.dtype))
        b = jax.ShapeDtypeStruct((2,), jnp.int32)
        compiled = engine_lib._decode_loop.lower(
            params, cache, b, b, jax.random.key(0), jnp.float32(0), jnp.float32(1), jnp.int32(0), b,
            jax.ShapeDtypeStruct((1,), jnp.int32), cfg=cfg, moe_impl="ragged", mesh=None, out_len=16).compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
        caches.append(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))
        smallest = min(x.size for x in jax.tree.leaves(cache))
        copies = [line for line in compiled.as_text().splitlines() if " copy(" in line
                  and np.prod([int(d) for d in line.split("[", 1)[1].split("]", 1)[0].split(",") if d]) >= smallest]
        assert not copies, copies[:3]
    growth = temps[-1] - temps[0]
    assert growth < 0.01 * (caches[-1] - caches[0]), (temps, caches)


# --------------------------------------------------------------------------------------- layouts and text in/out
def test_params_of_another_pattern_are_relayouted(tiny_mixed):
    cfg, params = tiny_mixed  # laid out for FSFSSF
    assert engine_lib.params_pattern(params) == "FSFSSF"
    fewer = cfg.with_pattern("FSSSSF")
    tokens = np.random.default_rng(31).integers(0, cfg.vocab_size, (2, 12))
    expected = ic.score(ic.relayout(params, cfg, fewer), fewer, tokens)
    np.testing.assert_array_equal(ic.score(params, fewer, tokens), expected)
    prompts = random_prompts(np.random.default_rng(32), cfg.vocab_size, (4, 7))
    assert ic.generate(params, fewer, prompts, 3) == ic.generate(ic.relayout(params, cfg, fewer), fewer, prompts, 3)
    with pytest.raises(ValueError, match=r"makes layers \[1\] F"):
        ic.score(params, cfg.with_pattern("FFFSSF"), tokens)


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A small byte-level BPE trained on seeded random words (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = np.random.default_rng(33)
    words = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 7))) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(words[i:i + 20]) for i in range(0, 400, 20)],
                            trainers.BpeTrainer(vocab_size=200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() <= 256
    return tok


def test_text_in_text_out_equals_the_token_path(tiny_mixed, byte_tokenizer):
    cfg, params = tiny_mixed
    texts = ["def f(x): return x", "hello world"]
    ids = [e.ids for e in byte_tokenizer.encode_batch(texts)]
    new_ids = ic.generate(params, cfg, ids, 4)
    assert ic.generate(params, cfg, texts, 4, tokenizer=byte_tokenizer) == byte_tokenizer.decode_batch(new_ids)
    eng = ic.Engine(params, cfg, max_len=32, max_batch=2)
    out, logits = eng.generate(texts, 4, tokenizer=byte_tokenizer, return_logits=True)
    assert out == byte_tokenizer.decode_batch(new_ids) and [len(x) for x in logits] == [4, 4]
    scores = ic.score(params, cfg, texts, tokenizer=byte_tokenizer)
    for row, s in zip(ids, scores):
        chex.assert_shape(s, (len(row) - 1,))
        np.testing.assert_allclose(s, ic.score(params, cfg, np.asarray([row]))[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pass tokenizer="):
        ic.generate(params, cfg, texts, 2)


@pytest.mark.parametrize("pattern", ["FF", "FS"])
def test_engine_steps_lower_for_cuda_with_the_kernels(pattern, monkeypatch):
    """On a GPU host the decode loop and a prefill chunk run the Pallas kernels over the in-place cache (key
    windows through offsets), the routed GEMV (decode) or the grouped MoE (prefill); this builds both programs for
    CUDA from this CPU host, with the default backend reported as a GPU, so a kernel that cannot lower at the
    engine's shapes fails here."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    cfg = ic.glm47_flash_dsa_30b(num_layers=2, mlp_layer_types=("dense", "sparse"), dtype="bfloat16",
                                 vocab_size=4096).with_pattern(pattern)
    params = jax.eval_shape(lambda: jax.tree.map(lambda x: x.astype(jnp.bfloat16), ic.init_params(cfg)))
    cache = jax.eval_shape(lambda: ic.cache.init_cache(cfg, 2, 8192))
    b = jax.ShapeDtypeStruct((2,), jnp.int32)
    moe_impl = engine_lib.resolve_moe_impl(None)
    assert moe_impl == "grouped"
    settings = (jax.random.key(0), jnp.float32(0), jnp.float32(1), jnp.int32(0))
    loop = engine_lib._decode_loop.trace(params, cache, b, b, *settings, b, jax.ShapeDtypeStruct((1,), jnp.int32),
                                         cfg=cfg, moe_impl=moe_impl, mesh=None, out_len=16)
    prefill = engine_lib._prefill.trace(params, cache, jax.ShapeDtypeStruct((2, 4096), jnp.int32), b, *settings,
                                        cfg=cfg, moe_impl=moe_impl, mesh=None, chunk=2048)
    loop_text, prefill_text = (t.lower(lowering_platforms=("cuda",)).as_text() for t in (loop, prefill))
    for text in (loop_text, prefill_text):
        assert "xla.gpu.triton" in text  # indexer + top-k + sparse MLA
        assert "row_gemv" not in text  # two rows or more: XLA's products
    assert "routed_swiglu_gemv" in loop_text and "mosaic_gpu" not in loop_text  # 2 tokens: the routed GEMV
    assert "mosaic_gpu" in prefill_text and "routed_swiglu_gemv" not in prefill_text  # 4096 tokens: grouped GEMM
    one = jax.ShapeDtypeStruct((1,), jnp.int32)
    cache1 = jax.eval_shape(lambda: ic.cache.init_cache(cfg, 1, 8192))
    loop1 = engine_lib._decode_loop.trace(params, cache1, one, one, *settings, one, one, cfg=cfg, moe_impl=moe_impl,
                                          mesh=None, out_len=16)
    assert "row_gemv" in loop1.lower(lowering_platforms=("cuda",)).as_text()  # batch 1: one-row projections


def _ops_named(module, name: str) -> list:
    """Every operation called `name` in a lowered module, nested regions included, in program order."""
    found = []

    def visit(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.operation.name == name:
                        found.append(child.operation)
                    visit(child.operation)

    visit(module.operation)
    return found


def _kernel_operand_sources(module, callee_part: str) -> list[set[str]]:
    """For each call of a jitted function whose name holds `callee_part` in a lowered module: the ops its operands
    come from, looked through reshapes, converts and function arguments (to every call site); a value carried by a
    loop reads "loop", an argument of the program "entry"."""
    from jax._src.lib.mlir import ir

    calls = _ops_named(module, "func.call")

    def callee(call):
        return str(call.attributes["callee"]).lstrip("@")

    def sources(value) -> set[str]:
        owner = value.owner
        while not isinstance(owner, ir.Block) and owner.name in ("stablehlo.reshape", "stablehlo.convert",
                                                                  "stablehlo.broadcast_in_dim"):
            value = owner.operands[0]
            owner = value.owner
        if not isinstance(owner, ir.Block):
            return {owner.name}
        parent = owner.owner.operation
        if parent.name != "func.func":
            return {"loop"}
        name = str(parent.attributes["sym_name"]).strip('"')
        if name == "main":
            return {"entry"}
        arg = ir.BlockArgument(value).arg_number
        return set().union(*(sources(c.operands[arg]) for c in calls if callee(c) == name))

    return [set().union(*(sources(v) for v in c.operands)) for c in calls if callee_part in callee(c)]


def _loops_taking_a_value_twice(module) -> list[str]:
    """The types of the values that some `stablehlo.while` of a lowered module takes as two of its operands."""
    twice = []
    for loop in _ops_named(module, "stablehlo.while"):
        operands = list(loop.operands)
        twice += [str(v.type) for i, v in enumerate(operands) if any(v == other for other in operands[:i])]
    return twice


@pytest.mark.parametrize("pattern", ["FSSFSS", "FSSS"])
def test_batch_one_decode_kernels_take_whole_weight_stacks(pattern, monkeypatch):
    """In the batch-1 decode loop built for CUDA, no operand of a row GEMV or routed GEMV kernel is a dynamic slice:
    they take the layer stacks the loops carry (XLA copies a slice handed to a Triton kernel out of its stack), and
    no loop takes a stack twice.
    "FSSFSS" is a segment of two groups (S weights at (group, layer) of `[groups, count]` stacks), "FSSS" one group
    whose run of S layers is scanned."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    cfg = ic.glm47_flash_dsa_30b(num_layers=len(pattern), mlp_layer_types=("sparse",) * len(pattern),
                                 dtype="bfloat16", vocab_size=4096).with_pattern(pattern)
    params = jax.eval_shape(lambda: jax.tree.map(lambda x: x.astype(jnp.bfloat16), ic.init_params(cfg)))
    one = jax.ShapeDtypeStruct((1,), jnp.int32)
    cache = jax.eval_shape(lambda: ic.cache.init_cache(cfg, 1, 8192))
    settings = (jax.random.key(0), jnp.float32(0), jnp.float32(1), jnp.int32(0))
    loop = engine_lib._decode_loop.trace(params, cache, one, one, *settings, one, one, cfg=cfg, moe_impl="grouped",
                                         mesh=None, out_len=16)
    module = loop.lower(lowering_platforms=("cuda",)).compiler_ir()
    for kernel in ("_row_gemvs", "_routed_gemv"):
        found = _kernel_operand_sources(module, kernel)
        assert found and all("stablehlo.dynamic_slice" not in s for s in found), (kernel, found)
        assert any("loop" in s for s in found)
    # A stack both scanned over and carried whole would enter a loop twice (XLA may copy one of the two).
    assert _loops_taking_a_value_twice(module) == []


def test_one_row_kernels_stay_off_a_mesh():
    """With Pallas, one token's products take the row and routed GEMV kernels on one device, and XLA's products on a
    mesh of several devices (sharded weights: a custom call would gather them). Read from the traced program."""
    from indexcache_jax.model.model import DSAModel, make_context

    cfg = ic.tiny(pattern="FSFSSF", index_topk=4, kv_lora_rank=32, qk_rope_head_dim=16, index_n_heads=16,
                  backend="pallas")
    params = jax.eval_shape(lambda: ic.init_params(cfg))

    def program(mesh) -> str:
        def one_token(params, tokens):
            ctx = make_context(cfg, jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
            return DSAModel(cfg, "grouped", mesh).apply({"params": params}, tokens, ctx, None, 1)[0]
        return str(jax.make_jaxpr(one_token)(params, jax.ShapeDtypeStruct((1, 1), jnp.int32)))

    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "model"))
    alone, meshed = program(None), program(mesh)
    with jax.sharding.use_abstract_mesh(mesh):  # the mesh set around the call, as `jax.set_mesh` does
        ambient = program(None)
    assert "name=row_gemv" in alone and "name=routed_swiglu_gemv" in alone
    for text in (meshed, ambient):
        assert "name=row_gemv" not in text and "name=routed_swiglu_gemv" not in text
    assert "sparse_mla" in meshed  # the attention kernels still run


def test_batch_one_decode_through_the_pallas_kernels_equals_xla(monkeypatch):
    """At batch 1 every projection is one row, which `backend="pallas"` sends to the row GEMV kernels (the absorbed
    MLA's per-head products to `head_gemv`), and the routed experts of its token, with the shared one, go to the
    routed GEMV (the GPU's default MoE, "grouped"), all reading each layer's weights in place from the whole layer
    stacks (interpret mode here, with the Pallas indexer and sparse MLA): the greedy tokens and logits equal the XLA
    backend's. The schedule has a segment of two groups (S layers at group x layer of `[groups, count]` stacks), a
    one-group segment with a scanned run of two and a dense run of one. The tiny model's widths are made multiples
    of 16, which the kernels need."""
    from pallas_kernels import routed_gemv, row_gemv

    cfg = ic.tiny(num_layers=10, pattern="FSSFSSFSSS", mlp_layer_types=("sparse",) * 9 + ("dense",), index_topk=4,
                  kv_lora_rank=32, qk_rope_head_dim=16, index_n_heads=16)
    assert [s.num_groups for s in cfg.segments] == [2, 1]
    params = random_params(cfg, seed=5)
    prompt = random_prompts(np.random.default_rng(7), cfg.vocab_size, (9,))
    calls, routed = [], []
    real_rows, real_routed = row_gemv.row_gemvs, routed_gemv.routed_experts_gemv
    monkeypatch.setattr(row_gemv, "row_gemvs", lambda x, ws, **kw: calls.append(
        (kw.get("layer") is not None, [w.shape for w in ws])) or real_rows(x, ws, **kw))
    monkeypatch.setattr(routed_gemv, "routed_experts_gemv", lambda x, ids, w, *experts, **kw: routed.append(
        (kw.get("layer") is not None and kw.get("shared") is not None, experts[0].shape))
        or real_routed(x, ids, w, *experts, **kw))
    heads, real_heads = [], row_gemv.head_gemv
    monkeypatch.setattr(row_gemv, "head_gemv", lambda x, w, **kw: heads.append(
        (kw.get("layer") is not None, kw["transposed"], w.shape)) or real_heads(x, w, **kw))
    out = {}
    for backend in ("xla", "pallas"):
        eng = ic.Engine(params, cfg.replace(backend=backend), max_len=32, max_batch=1, chunk=8, moe_impl="grouped")
        out[backend] = eng.generate(prompt, 4, return_logits=True)
    assert out["pallas"][0] == out["xla"][0]
    assert rel_err(out["pallas"][1][0], out["xla"][1][0]) <= 1e-5
    # Traced once per compiled program, so recorded by shape. Every call reads stacks: an F layer's four products
    # of its attention input go in one launch from the [groups, ...] F stacks, and the S layers' experts come from
    # the two-group segment's [groups x count, ...] stacks.
    d, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    assert calls and all(stacked for stacked, _ in calls)
    assert (True, [(2, d, cfg.q_lora_rank), (2, d, cfg.latent_row_dim), (2, d, cfg.index_head_dim),
                   (2, d, cfg.index_n_heads)]) in calls
    assert (True, [(1, d, cfg.intermediate_size), (1, d, cfg.intermediate_size)]) in calls  # the dense run of one
    assert routed and all(stacked for stacked, _ in routed)
    # Each with the shared expert's pairs. F layers [2] and [1]; S layers [2 x 2] in the two-group segment, a run
    # of [2] in the other.
    assert {shape for _, shape in routed} == {(2, e, d, i), (4, e, d, i), (1, e, d, i)}
    # The absorbed MLA's per-head products, q_nope @ W_uk and o_latent @ W_uv^T, from the same stacks.
    h, r = cfg.num_heads, cfg.kv_lora_rank
    assert {(True, False, (2, h, cfg.qk_nope_head_dim, r)), (True, True, (4, h, cfg.v_head_dim, r))} <= set(heads)
    assert all(stacked for stacked, _, _ in heads)


# ------------------------------------------------------------------------------------------------------- sampling
def reference_sampling_probs(logits: np.ndarray, temperature: float, top_p: float, top_k: int) -> np.ndarray:
    """float64 next-token distribution of `engine.sample`'s documented rule, from sorted probabilities."""
    scaled = logits.astype(np.float64) / temperature
    order = np.argsort(-scaled, kind="stable")
    keep = np.zeros(len(scaled), bool)
    limit = len(scaled) if top_k == 0 else top_k
    p = np.exp(scaled[order[:limit]] - scaled[order[0]])
    p /= p.sum()
    before = np.cumsum(p) - p
    keep[order[:limit][before < top_p]] = True
    out = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 1.0, 5), (1.3, 0.8, 0), (1.5, 0.7, 4)])
def test_sample_draws_follow_the_reference_distribution(temperature, top_p, top_k):
    """20000 draws (one batch row each) from fixed logits: only tokens the float64 reference keeps appear, and
    the counts pass a chi-square test against its probabilities (p > 1e-4)."""
    from scipy import stats

    rng = np.random.default_rng(32)
    vocab, draws = 40, 20000
    logits = (rng.standard_normal(vocab) * 2).astype(np.float32)
    ref = reference_sampling_probs(logits, temperature, top_p, top_k)
    batch = jnp.broadcast_to(jnp.asarray(logits), (draws, vocab))
    toks = np.asarray(jax.jit(engine_lib.sample)(batch, jax.random.key(33), jnp.float32(temperature),
                                                 jnp.float32(top_p), jnp.int32(top_k)))
    chex.assert_shape(toks, (draws,))
    counts = np.bincount(toks, minlength=vocab)
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(ref))
    live = ref > 0
    assert 2 <= live.sum() < vocab or top_p == 1 and top_k == 0  # the cut keeps several tokens, not all
    assert stats.chisquare(counts[live], ref[live] * draws).pvalue > 1e-4
    greedy = engine_lib.sample(batch[:2], jax.random.key(0), jnp.float32(0), jnp.float32(1), jnp.int32(0))
    np.testing.assert_array_equal(np.asarray(greedy), [np.argmax(logits)] * 2)
