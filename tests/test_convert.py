"""HF checkpoint -> converted directory -> `indexcache_jax.load`: parity with transformers, FP8, shared layers, mesh."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_oracle
import indexcache_jax as ic
from checkpoints_convert import HFCheckpoint, convert, fp8, plan_conversion
from checkpoints_convert.cli import main as cli_main

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def save_hf(model, directory, shard_size="40KB") -> str:
    model.save_pretrained(directory, max_shard_size=shard_size)
    return str(directory)


def add_mtp_shard(directory: str, cfg_layers: int, hidden: int, seed: int) -> int:
    """Appends an extra shard with MTP-layer tensors (layer index = num_hidden_layers) to the index."""
    rng = np.random.default_rng(seed)
    p = f"model.layers.{cfg_layers}."
    tensors = {p + "enorm.weight": torch.tensor(rng.normal(size=hidden), dtype=torch.bfloat16),
               p + "eh_proj.weight": torch.tensor(rng.normal(size=(hidden, 2 * hidden)), dtype=torch.bfloat16),
               p + "self_attn.q_a_proj.weight": torch.tensor(rng.normal(size=(8, hidden)), dtype=torch.float32)}
    save_file(tensors, os.path.join(directory, "model-mtp.safetensors"))
    index_path = os.path.join(directory, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["weight_map"].update({k: "model-mtp.safetensors" for k in tensors})
    with open(index_path, "w") as f:
        json.dump(index, f)
    return len(tensors)


@pytest.fixture(scope="module", params=["glm", "deepseek"])
def tiny_ckpt(request, tmp_path_factory):
    """(transformers model, HF dir with an MTP shard, tokens, reference logits) for each architecture."""
    hf_cfg = hf_oracle.glm_config() if request.param == "glm" else hf_oracle.deepseek_config()
    model = hf_oracle.build(hf_cfg, seed=11)
    src = save_hf(model, tmp_path_factory.mktemp(request.param) / "hf")
    add_mtp_shard(src, hf_cfg.num_hidden_layers, hf_cfg.hidden_size, seed=5)
    tokens = np.random.default_rng(3).integers(0, hf_cfg.vocab_size, (2, 11))
    ref, _ = hf_oracle.hf_logits_and_indices(model, tokens)
    return model, src, tokens, ref


def test_cli_convert_then_load_matches_transformers(tiny_ckpt, tmp_path, caplog, capsys):
    model, src, tokens, ref = tiny_ckpt
    dst = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="checkpoints_convert"):
        assert cli_main([src, str(dst), "--dtype", "float32"]) == 0
    mtp_lines = [r.getMessage() for r in caplog.records if "MTP" in r.getMessage()]
    assert mtp_lines == [f"skipping MTP layer {model.config.num_hidden_layers} (3 tensors)"]
    assert "B/s" in capsys.readouterr().err  # tqdm's byte-rate progress bar
    cfg, params = ic.load(dst)
    assert cfg.dtype == "float32" and cfg.pattern == "F" * model.config.num_hidden_layers
    with open(dst / "dsa_config.json") as f:
        assert json.load(f)["pattern"] == cfg.pattern
    assert rel_err(ic.forward(params, cfg, tokens), ref) <= 1e-4
    # the leaves match the in-memory mapping of the same transformers weights, exactly
    expected = ic.params_from_hf(cfg, hf_oracle.hub_tensors(model))
    np.testing.assert_equal(jax.tree_util.tree_map(np.asarray, params),
                            jax.tree_util.tree_map(np.asarray, expected))


def test_load_hf_directory_on_the_fly(tiny_ckpt):
    model, src, tokens, ref = tiny_ckpt
    cfg, params = ic.load(src, dtype="float32")
    assert rel_err(ic.forward(params, cfg, tokens), ref) <= 1e-4
    cfg16, params16 = ic.load(src)  # default bfloat16: float32 weights rounded once to bfloat16
    assert cfg16.dtype == "bfloat16"
    want = ic.params_from_hf(cfg16, hf_oracle.hub_tensors(model), dtype=ml_dtypes.bfloat16)
    assert all(x.dtype == np.dtype(ml_dtypes.bfloat16) for x in jax.tree_util.tree_leaves(params16))
    np.testing.assert_equal(jax.tree_util.tree_map(np.asarray, params16), jax.tree_util.tree_map(np.asarray, want))


def test_dtype_accepts_jax_and_numpy_dtypes(tiny_ckpt, tmp_path):
    _, src, tokens, ref = tiny_ckpt
    for dtype, name in ((jnp.float32, "float32"), (np.dtype(ml_dtypes.bfloat16), "bfloat16"), ("float32", "float32")):
        assert plan_conversion(src, dtype=dtype).cfg.dtype == name
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'bfloat16'"):
        plan_conversion(src, dtype=jnp.float16)
    cfg = convert(src, tmp_path / "out", dtype=np.float32)
    assert cfg.dtype == "float32"
    loaded_cfg, params = ic.load(tmp_path / "out")
    assert loaded_cfg == cfg and rel_err(ic.forward(params, cfg, tokens), ref) <= 1e-4


def test_save_roundtrip_and_overwrite(tiny_ckpt, tmp_path):
    _, src, tokens, ref = tiny_ckpt
    cfg, params = ic.load(src, dtype="float32")
    dst = tmp_path / "saved"
    ic.save(dst, cfg, params)
    with pytest.raises(FileExistsError, match="already exists"):
        ic.save(dst, cfg, params)
    ic.save(dst, cfg, params, overwrite=True)
    cfg2, params2 = ic.load(dst)
    assert cfg2 == cfg
    assert rel_err(ic.forward(params2, cfg2, tokens), ref) <= 1e-4
    assert sorted(os.listdir(tmp_path)) == ["saved"]  # no temporary or old copies left


# --------------------------------------------------------------------------------------------- shared (S) layers
SHARED_TYPES = ["full", "shared", "shared", "full", "shared"]


@pytest.fixture(scope="module")
def glm_shared(tmp_path_factory):
    hf_cfg = hf_oracle.glm_config(indexer_types=SHARED_TYPES)
    model = hf_oracle.build(hf_cfg, seed=23)
    src = save_hf(model, tmp_path_factory.mktemp("shared") / "hf")
    tokens = np.random.default_rng(8).integers(0, hf_cfg.vocab_size, (2, 12))
    ref, _ = hf_oracle.hf_logits_and_indices(model, tokens)
    return model, src, tokens, ref


def test_glm_shared_layers_without_indexer_weights(glm_shared, tmp_path):
    _, src, tokens, ref = glm_shared
    names = set(HFCheckpoint(src).tensors)
    assert not [n for n in names if ".indexer." in n and n.split(".")[2] in ("1", "2", "4")]
    assert cli_main([src, str(tmp_path / "out"), "--dtype", "float32"]) == 0
    for path in (tmp_path / "out", src):
        cfg, params = ic.load(path, dtype="float32")
        assert cfg.pattern == "FSSFS"
        assert rel_err(ic.forward(params, cfg, tokens), ref) <= 1e-4


def test_pattern_asking_for_missing_indexer_names_the_layer(glm_shared, tmp_path, capsys):
    _, src, _, _ = glm_shared
    with pytest.raises(ValueError, match="layer 2 is F"):
        ic.load(src, pattern="FSFFS")
    assert cli_main([src, str(tmp_path / "out"), "--pattern", "FFSFS"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: layer 1 is F")
    assert not (tmp_path / "out").exists()
    assert cli_main([src, str(tmp_path / "conv"), "--dtype", "float32"]) == 0
    with pytest.raises(ValueError, match="layer 1 is F"):
        ic.load(tmp_path / "conv", pattern="FFSFS")


def test_pattern_override_drops_indexers(tiny_ckpt, tmp_path):
    """An all-F checkpoint loaded with S layers: the same leaves as mapping the weights for that pattern in memory,
    and (GLM; transformers' DeepseekV32 ignores `indexer_types`) the logits of transformers built with it."""
    model, src, tokens, _ = tiny_ckpt
    n = model.config.num_hidden_layers
    pattern = "FS" + "S" * (n - 3) + "F"
    ref = None
    if model.config.model_type == "glm_moe_dsa":
        hf_cfg = type(model.config)(**{**model.config.to_dict(), **ic.pattern_to_hf(pattern)})
        shared_model = hf_oracle.build(hf_cfg, seed=0)
        missing, _ = shared_model.load_state_dict(model.state_dict(), strict=False)
        assert not missing
        ref, _ = hf_oracle.hf_logits_and_indices(shared_model, tokens)
    assert cli_main([src, str(tmp_path / "all_f"), "--dtype", "float32"]) == 0
    for path in (src, tmp_path / "all_f"):  # streaming from HF, and re-stacking a converted all-F checkpoint
        cfg, params = ic.load(path, dtype="float32", pattern=pattern)
        assert cfg.pattern == pattern
        want = ic.params_from_hf(cfg, hf_oracle.hub_tensors(model))
        np.testing.assert_equal(jax.tree_util.tree_map(np.asarray, params), jax.tree_util.tree_map(np.asarray, want))
        if ref is not None:
            assert rel_err(ic.forward(params, cfg, tokens), ref) <= 1e-4


# ------------------------------------------------------------------------------------------------------------ FP8
QUANTIZED = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "indexer.wq_b", "indexer.wk",
             "gate_proj", "up_proj", "down_proj")


def quantize_128(w: np.ndarray):
    """Real-format 128x128 block quantization: (e4m3 torch tensor, fp32 scale_inv, float64 dequantized weight)."""
    out, inp = w.shape
    nb0, nb1 = -(-out // 128), -(-inp // 128)
    scale = np.empty((nb0, nb1), np.float32)
    for i in range(nb0):
        for j in range(nb1):
            scale[i, j] = max(np.abs(w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]).max(), 1e-6) / 448.0
    rows, cols = np.arange(out) // 128, np.arange(inp) // 128
    full_scale = scale.astype(np.float64)[rows[:, None], cols[None, :]]
    q = torch.tensor(w / full_scale, dtype=torch.float32).to(torch.float8_e4m3fn)
    deq = q.to(torch.float64).numpy() * full_scale
    return q, torch.tensor(scale), deq


def fp8_checkpoint(model, root) -> tuple[str, dict, dict, object]:
    """Writes `model` as an FP8 checkpoint in the DeepSeek-V3.2 format (two shards + index, quantization_config).

    Returns (FP8 dir, stored tensors, float64 values the checkpoint holds, reference transformers model loaded by
    `from_pretrained` from those values written as float32).
    """
    model.save_pretrained(root / "hub")
    hub = load_file(root / "hub" / "model.safetensors")
    stored, reference = {}, {}
    for name, value in hub.items():
        w = value.double().numpy()
        if name.endswith(".weight") and any(f".{q}." in name for q in QUANTIZED):
            q, scale, deq = quantize_128(w)
            stored[name], stored[name + "_scale_inv"] = q, scale
            reference[name] = deq
            continue
        if name == "lm_head.weight":
            t = torch.tensor(w, dtype=torch.float16)
        elif "k_norm" in name or "e_score_correction_bias" in name:
            t = torch.tensor(w, dtype=torch.float32)
        else:  # embeddings, norms, router, indexer weights_proj
            t = torch.tensor(w, dtype=torch.bfloat16)
        stored[name] = t
        reference[name] = t.double().numpy()
    src = root / "fp8"
    os.makedirs(src)
    names = sorted(stored)
    index = {}
    for shard, part in (("model-00001-of-00002.safetensors", names[::2]),
                        ("model-00002-of-00002.safetensors", names[1::2])):
        save_file({k: stored[k].contiguous() for k in part}, src / shard)
        index.update({k: shard for k in part})
    with open(src / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": index}, f)
    with open(root / "hub" / "config.json") as f:
        config = json.load(f)
    with open(src / "config.json", "w") as f:
        json.dump({**config, "quantization_config": FP8_CONFIG}, f)
    save_file({k: torch.tensor(v, dtype=torch.float32) for k, v in reference.items()},
              root / "hub" / "model.safetensors")
    ref_model, info = AutoModelForCausalLM.from_pretrained(root / "hub", attn_implementation="eager",
                                                           dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return str(src), stored, reference, ref_model.eval()


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    """DeepSeek-V3.2-style FP8 checkpoint with dims >= 128, several not multiples of 128 (kv_a rows 152, ...)."""
    hf_cfg = hf_oracle.deepseek_config(
        vocab_size=300, hidden_size=200, intermediate_size=288, moe_intermediate_size=136, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=144,
        kv_lora_rank=136, qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=40, index_n_heads=4,
        index_head_dim=32, index_topk=5)
    model = hf_oracle.build(hf_cfg, seed=31)
    src, stored, reference, ref_model = fp8_checkpoint(model, tmp_path_factory.mktemp("fp8"))
    tokens = np.random.default_rng(4).integers(0, hf_cfg.vocab_size, (2, 10))
    ref, _ = hf_oracle.hf_logits_and_indices(ref_model, tokens)
    return src, stored, reference, tokens, ref


def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(fp8_ckpt, tmp_path):
    src, stored, reference, tokens, ref = fp8_ckpt
    kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert stored[kv_a].dtype == torch.float8_e4m3fn and tuple(stored[kv_a].shape) == (152, 200)
    assert tuple(stored[kv_a + "_scale_inv"].shape) == (2, 2)
    assert cli_main([src, str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    cfg, params = ic.load(tmp_path / "f32")
    assert rel_err(ic.forward(params, cfg, tokens), ref) <= 1e-4
    wkv_a = np.asarray(params["segment_0"]["full"]["mla"]["wkv_a"][0])
    np.testing.assert_allclose(wkv_a, reference[kv_a].T, rtol=1e-6, atol=0)

    assert cli_main([src, str(tmp_path / "bf16")]) == 0
    cfg16, params16 = ic.load(tmp_path / "bf16")
    assert cfg16.dtype == "bfloat16"
    experts = np.asarray(params16["segment_1"]["full"]["mlp"]["experts_down"][0, 3], np.float64)  # layer 1, expert 3
    want = reference["model.layers.1.mlp.experts.3.down_proj.weight"].T
    np.testing.assert_allclose(experts, want, rtol=2 ** -8, atol=0)


def test_fp8_dequantize_non_divisible_blocks():
    rng = np.random.default_rng(7)
    for shape, block in (((576, 300), (128, 128)), ((130, 129), (128, 64)), ((5, 7), (128, 128))):
        codes = rng.integers(0, 256, shape, dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes
        w = codes.view(ml_dtypes.float8_e4m3fn)
        scale = rng.uniform(0.1, 2.0, (-(-shape[0] // block[0]), -(-shape[1] // block[1]))).astype(np.float32)
        want = np.empty(shape)
        for i in range(shape[0]):
            for j in range(shape[1]):
                want[i, j] = float(w[i, j]) * float(scale[i // block[0], j // block[1]])
        np.testing.assert_allclose(fp8.dequantize(w, scale, block, np.float32), want, rtol=1e-7)
    per_tensor = fp8.dequantize(w, np.array([3.0], np.float32), None, np.float32)
    np.testing.assert_allclose(per_tensor, w.astype(np.float64) * 3.0, rtol=1e-7)


def test_safetensors_reader_matches_torch_writer(tmp_path):
    g = torch.Generator().manual_seed(2)
    tensors = {"a": torch.randn(3, 5, generator=g).to(torch.float8_e4m3fn),
               "b": torch.randn(4, generator=g).to(torch.bfloat16),
               "c": torch.randn(2, 3, 2, generator=g).to(torch.float16),
               "d": torch.randn(7, 1, generator=g)}
    save_file(tensors, tmp_path / "model.safetensors")
    with open(tmp_path / "config.json", "w") as f:
        json.dump({}, f)
    with HFCheckpoint(tmp_path) as ckpt:
        assert {k: ckpt.tensors[k].dtype for k in tensors} == {"a": "F8_E4M3", "b": "BF16", "c": "F16", "d": "F32"}
        for k, t in tensors.items():
            got = ckpt.read(k)
            assert got.shape == tuple(t.shape)
            np.testing.assert_array_equal(got.astype(np.float64), t.double().numpy())


# ----------------------------------------------------------------------------------------------------------- mesh
MESH_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    import indexcache_jax as ic
    from indexcache_jax.inference.sharding import make_mesh, param_shardings
    assert jax.device_count() == 8
    ref_path, tokens_path = sys.argv[1], sys.argv[2]
    ref, tokens = np.load(ref_path), np.load(tokens_path)
    mesh = make_mesh(2, 4)
    for path in sys.argv[3:]:
        cfg, params = ic.load(path, dtype="float32", mesh=mesh)
        want = param_shardings(cfg, mesh)
        leaves = jax.tree_util.tree_leaves_with_path(params)
        for (p, x), s in zip(leaves, jax.tree_util.tree_leaves(want)):
            assert x.sharding.is_equivalent_to(s, x.ndim), (jax.tree_util.keystr(p), x.sharding, s)
        wq_b = params["segment_0"]["full"]["mla"]["wq_b"]
        experts = params["segment_1"]["full"]["mlp"]["experts_gate"]
        assert wq_b.sharding.spec[-2] == "model" and experts.sharding.spec[-3] == "model"
        assert wq_b.addressable_shards[0].data.shape[-2] == wq_b.shape[-2] // 4
        logits = np.asarray(ic.forward(params, cfg, tokens))
        rel = np.abs(logits - ref).max() / np.abs(ref).max()
        assert rel <= 1e-4, rel
    print("MESH_OK")
""")


def test_load_with_mesh_places_heads_and_experts(tmp_path):
    hf_cfg = hf_oracle.glm_config(num_hidden_layers=3, first_k_dense_replace=1)
    model = hf_oracle.build(hf_cfg, seed=41)
    src = save_hf(model, tmp_path / "hf")
    assert cli_main([src, str(tmp_path / "conv"), "--dtype", "float32"]) == 0
    tokens = np.random.default_rng(9).integers(0, hf_cfg.vocab_size, (2, 7))
    ref, _ = hf_oracle.hf_logits_and_indices(model, tokens)
    np.save(tmp_path / "ref.npy", ref)
    np.save(tmp_path / "tokens.npy", tokens)
    (tmp_path / "mesh.py").write_text(MESH_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(tmp_path / "mesh.py"), str(tmp_path / "ref.npy"),
                           str(tmp_path / "tokens.npy"), str(tmp_path / "conv"), src],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "MESH_OK" in proc.stdout, proc.stderr[-3000:]
