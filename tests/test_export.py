"""Export to Hugging Face: our params -> HF directory -> transformers' `from_pretrained` and our own importer."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_oracle
import indexcache_jax as ic
from checkpoints_convert import export, export_checkpoint, fp8
from checkpoints_convert.cli import export_main
from checkpoints_convert.cli import main as convert_main
from checkpoints_convert.export import FP8_WEIGHTS
from indexcache_jax.model.model import param_shapes

TOKENIZER = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "a"}}


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def hub_files(directory) -> dict[str, str]:
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"]


def read_hub(directory) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(set(hub_files(directory).values())):
        with safe_open(os.path.join(directory, shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def from_pretrained(directory):
    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager",
                                                       output_loading_info=True)
    return model.eval(), info


def random_params(cfg, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray((0.15 * rng.standard_normal(x.shape)).astype(dtype)),
                                  param_shapes(cfg))


@pytest.fixture(scope="module", params=["glm", "deepseek"])
def converted(request, tmp_path_factory):
    """(architecture, HF dir with a tokenizer, converted float32 dir, tokens longer than index_topk)."""
    hf_cfg = hf_oracle.glm_config() if request.param == "glm" else hf_oracle.deepseek_config()
    model = hf_oracle.build(hf_cfg, seed=13)
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "hf", max_shard_size="40KB")
    (root / "hf" / "tokenizer.json").write_text(json.dumps(TOKENIZER))
    assert convert_main([str(root / "hf"), str(root / "conv"), "--dtype", "float32"]) == 0
    tokens = np.random.default_rng(21).integers(0, hf_cfg.vocab_size, (2, 14))
    return request.param, root / "hf", root / "conv", tokens


def mixed_pattern(n: int) -> str:
    return "FSS" + "FS" * ((n - 3) // 2) + "F" * ((n - 3) % 2)


def test_mixed_pattern_export_loads_in_transformers(converted, tmp_path):
    arch, _, conv, tokens = converted
    cfg, params = ic.load(conv)
    pattern = mixed_pattern(cfg.num_layers)
    mixed_cfg = cfg.with_pattern(pattern)
    mixed = ic.relayout(params, cfg, mixed_cfg)
    dst = tmp_path / "hf_out"
    export(mixed, mixed_cfg, dst, dtype="float32", source=conv, max_shard_bytes=30_000)

    assert len(set(hub_files(dst).values())) > 1
    names = set(hub_files(dst))
    s_layers = [i for i, c in enumerate(pattern) if c == "S"]
    assert not [n for n in names if ".indexer." in n and int(n.split(".")[2]) in s_layers]
    assert all(f"model.layers.{i}.self_attn.indexer.wk.weight" in names for i in mixed_cfg.full_layers)
    config = json.loads((dst / "config.json").read_text())
    assert config["index_topk_pattern"] == pattern
    assert config["indexer_types"] == ["full" if c == "F" else "shared" for c in pattern]
    assert (dst / "tokenizer.json").read_text() == json.dumps(TOKENIZER)
    assert sorted(os.listdir(tmp_path)) == ["hf_out"]
    assert ic.DSAConfig.from_hf(dst, dtype="float32") == mixed_cfg

    model, info = from_pretrained(dst)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = np.asarray(ic.forward(mixed, mixed_cfg, tokens))
    ref, _ = hf_oracle.hf_logits_and_indices(model, tokens)
    if arch == "glm":
        assert not info["missing_keys"]
        assert rel_err(ours, ref) <= 1e-4
        # the shared layers matter at this length: the all-F model gives other logits
        assert rel_err(ic.forward(params, cfg, tokens), ref) > 1e-3
    else:  # transformers' DeepseekV32 has no shared layers: it builds an indexer everywhere and misses those
        assert info["missing_keys"] == {f"model.layers.{i}.self_attn.indexer.{w}" for i in s_layers
                                        for w in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias",
                                                  "weights_proj.weight")}
    # our importer reads the export back to the same leaves
    back_cfg, back = ic.load(dst, dtype="float32")
    assert back_cfg == mixed_cfg
    np.testing.assert_equal(jax.tree_util.tree_map(np.asarray, back), jax.tree_util.tree_map(np.asarray, mixed))


def test_cli_export_all_full_matches_transformers(converted, tmp_path, capsys):
    """The CLI on the converted directory (all F) and on the HF directory with --pattern: transformers' logits
    equal ours for both architectures."""
    arch, hf_dir, conv, tokens = converted
    assert export_main([str(conv), str(tmp_path / "full"), "--dtype", "float32"]) == 0
    assert "wrote" in capsys.readouterr().err
    cfg, params = ic.load(conv)
    model, info = from_pretrained(tmp_path / "full")
    assert not any(info.values())
    ref, _ = hf_oracle.hf_logits_and_indices(model, tokens)
    assert rel_err(ic.forward(params, cfg, tokens), ref) <= 1e-4
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["use_index_cache"] is False and config["dtype"] == "float32"

    pattern = mixed_pattern(cfg.num_layers)
    assert export_main([str(hf_dir), str(tmp_path / "from_hf"), "--pattern", pattern]) == 0
    hub = read_hub(tmp_path / "from_hf")
    assert {t.dtype for k, t in hub.items() if "e_score_correction_bias" not in k} == {torch.bfloat16}
    want = ic.relayout(params, cfg, cfg.with_pattern(pattern))
    back_cfg, back = ic.load(tmp_path / "from_hf")
    assert back_cfg.pattern == pattern and back_cfg.dtype == "bfloat16"
    np.testing.assert_equal(jax.tree_util.tree_map(np.asarray, back),
                            jax.tree_util.tree_map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), want))


@pytest.mark.parametrize("dtype", ["float32", jnp.bfloat16])
def test_round_trip_is_exact(tmp_path, dtype):
    """Random params (tied embeddings, a layout with shared runs) -> export -> our importer: the same values."""
    cfg = ic.tiny(tie_word_embeddings=True, pattern="FSSFSF")
    np_dtype = np.dtype(jnp.dtype(dtype))
    params = random_params(cfg, seed=5, dtype=np_dtype)
    export(params, cfg, tmp_path / "out", dtype=dtype)
    hub = read_hub(tmp_path / "out")
    assert "lm_head.weight" not in hub
    stored = {torch.float32: np.float32, torch.bfloat16: ml_dtypes.bfloat16}
    assert {stored[t.dtype] for t in hub.values()} <= {np_dtype.type, np.float32}
    want = ic.params_from_hf(cfg, {k: t.float().numpy() for k, t in hub.items()}, dtype=np_dtype)
    np.testing.assert_equal(jax.tree_util.tree_map(np.asarray, want), jax.tree_util.tree_map(np.asarray, params))
    back_cfg, back = ic.load(tmp_path / "out", dtype=np_dtype.name)
    assert back_cfg == cfg.replace(dtype=np_dtype.name)
    np.testing.assert_equal(jax.tree_util.tree_map(np.asarray, back), jax.tree_util.tree_map(np.asarray, params))


def test_float8_export_round_trips_to_the_dequantized_values(tmp_path):
    """Dims >= 128 that are not multiples of 128, so blocks are partial: the scales are the blocks' amax / 448
    (numpy float64), the codes dequantize to within e4m3's rounding of the weights, and our importer reads back
    exactly codes * scale."""
    cfg = ic.deepseek_v32(vocab_size=300, hidden_size=200, intermediate_size=288, moe_intermediate_size=136,
                          num_layers=3, mlp_layer_types=("dense", "sparse", "sparse"), num_heads=2, q_lora_rank=144,
                          kv_lora_rank=136, qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=40,
                          n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, index_n_heads=4,
                          index_head_dim=32, index_topk=5, pattern="FSF")
    params = random_params(cfg, seed=9)
    export(params, cfg, tmp_path / "fp8", dtype=jnp.float8_e4m3fn, max_shard_bytes=200_000)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert config["quantization_config"]["quant_method"] == "fp8" and config["dtype"] == "bfloat16"
    hub = read_hub(tmp_path / "fp8")
    reference = {}
    for name, t in hub.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale = hub[name + "_scale_inv"].double().numpy()
            rows, cols = np.arange(t.shape[0]) // 128, np.arange(t.shape[1]) // 128
            reference[name] = t.double().numpy() * scale[rows[:, None], cols[None, :]]
        else:
            assert t.dtype == (torch.float32 if "e_score_correction_bias" in name else torch.bfloat16), name
            assert not name.endswith(FP8_WEIGHTS), name
            reference[name] = t.double().numpy()
    quantized = [k for k, t in hub.items() if t.dtype == torch.float8_e4m3fn]
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in quantized
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in quantized
    assert not [k for k in quantized if ".indexer." in k and k.split(".")[2] == "1"]
    # scales and dequantized values against the original weights
    kv_a = np.asarray(params["segment_0"]["full"]["mla"]["wkv_a"][0], np.float64).T  # layer 0, [152, 200]
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    amax = np.array([[np.abs(kv_a[i:i + 128, j:j + 128]).max() for j in (0, 128)] for i in (0, 128)])
    np.testing.assert_allclose(hub[name + "_scale_inv"].double().numpy(), amax / 448, rtol=1e-6)
    np.testing.assert_allclose(reference[name], kv_a, rtol=0, atol=np.abs(kv_a).max() / 8)
    assert np.abs(reference[name] - kv_a).max() > 0
    # our importer: exactly the dequantized values
    back_cfg, back = ic.load(tmp_path / "fp8", dtype="float32")
    assert back_cfg.pattern == "FSF"
    want = ic.params_from_hf(cfg, reference)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-7, atol=0),
                           back, want)


def test_quantize_blocks_inverts_dequantize():
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((300, 130)) * rng.uniform(0.01, 10, (300, 1))).astype(np.float32)
    w[128:256, :128] = 0.0  # an all-zero block
    codes, scale = fp8.quantize_blocks(w, (128, 128))
    assert codes.dtype == ml_dtypes.float8_e4m3fn and scale.shape == (3, 2) and scale[1, 0] == 1.0
    deq = np.asarray(fp8.dequantize(codes, scale, (128, 128), np.float32), np.float64)
    full = np.repeat(np.repeat(scale.astype(np.float64), 128, 0)[:300], 128, 1)[:, :130]
    assert np.abs(deq - w).max() <= (full * 448 * 2 ** -4).max()  # e4m3: 3 mantissa bits
    assert np.all(np.abs(deq - w) <= full * 16 + 1e-12)  # within half a step at the top binade
    assert np.array_equal(np.abs(codes.astype(np.float32)).reshape(-1).max(), np.float32(448))


def test_bad_input(tmp_path, capsys):
    cfg = ic.tiny(num_layers=3, mlp_layer_types=("dense",) * 3)
    params = random_params(cfg, seed=2)
    with pytest.raises(ValueError, match="export dtype must be one of"):
        export(params, cfg, tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="export dtype must be one of"):
        export(params, cfg, tmp_path / "x", dtype=jnp.float16)
    shared = cfg.with_pattern("FSF")
    with pytest.raises(ValueError, match="does not fit the params of pattern 'FSF'"):
        export(params, shared, tmp_path / "x")
    with pytest.raises(ValueError, match="max_shard_bytes must be > 0"):
        export(params, cfg, tmp_path / "x", max_shard_bytes=0)
    partial = {k: v for k, v in params.items() if k != "final_norm"}
    with pytest.raises(ValueError, match="params lack leaves \\['final_norm/scale'\\]"):
        export(partial, cfg, tmp_path / "x")
    assert os.listdir(tmp_path) == []
    ic.save(tmp_path / "conv", shared, ic.relayout(params, cfg, shared))
    with pytest.raises(ValueError, match="layer 1 is F in pattern 'FFF'"):
        export_checkpoint(tmp_path / "conv", tmp_path / "x", pattern="FFF")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export(params, cfg, tmp_path / "taken")
    capsys.readouterr()
    assert export_main([str(tmp_path / "conv"), str(tmp_path / "x"), "--pattern", "FFS"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: layer 1 is F"), err
    assert export_main([str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert sorted(os.listdir(tmp_path)) == ["conv", "taken"]
