"""DSAConfig.from_hf, presets, schedule resolution (against transformers' own derivation) and bad input."""

import json
import math
import re

import numpy as np
import pytest
from transformers import DeepseekV32Config, GlmMoeDsaConfig

import hf_oracle
import indexcache_jax as ic
from indexcache_jax.model import schedule


@pytest.mark.parametrize("freq,offset", [(1, 2), (2, 2), (4, 2), (4, 3), (3, 1), (5, 4)])
def test_freq_offset_resolution_matches_transformers(freq, offset):
    n = int(np.random.default_rng(freq * 10 + offset).integers(9, 40))
    hf = GlmMoeDsaConfig(num_hidden_layers=n, index_topk_freq=freq, index_skip_topk_offset=offset)
    expected = "".join("F" if t == "full" else "S" for t in hf.indexer_types)
    fields = {"num_hidden_layers": n, "index_topk_freq": freq, "index_skip_topk_offset": offset}
    assert schedule.resolve_pattern(fields, n) == expected


def test_freq_default_offset_matches_transformers_and_sglang_formula():
    hf = GlmMoeDsaConfig(num_hidden_layers=47, index_topk_freq=4)
    expected = "".join("F" if t == "full" else "S" for t in hf.indexer_types)
    assert schedule.resolve_pattern({"index_topk_freq": 4}, 47) == expected
    # The THUDM patch's `skip = max(l - 1, 0) % freq != 0`: F at 0, 1, 5, 9, ...
    assert expected == "".join("S" if max(i - 1, 0) % 4 else "F" for i in range(47))
    assert expected.count("F") == 13


def test_resolution_priority_indexer_types_then_pattern_then_freq():
    types = ["full", "shared", "shared", "full", "full", "shared"]
    fields = {"indexer_types": types, "index_topk_pattern": "FFFFFF", "index_topk_freq": 2}
    assert schedule.resolve_pattern(fields, 6) == "FSSFFS"
    assert schedule.resolve_pattern({"index_topk_pattern": "FSFSSS", "index_topk_freq": 2}, 6) == "FSFSSS"
    hf = GlmMoeDsaConfig(num_hidden_layers=6, index_topk_pattern="FSFSSS")
    assert "".join("F" if t == "full" else "S" for t in hf.indexer_types) == "FSFSSS"
    assert schedule.resolve_pattern({}, 6) == "FFFFFF"


def test_glm5_2_preset_is_indexshare():
    cfg = ic.glm5_2()
    full = [i for i, c in enumerate(cfg.pattern) if c == "F"]
    assert full == [0, 1, 2] + list(range(6, 78, 4)) and len(full) == 21
    hf = GlmMoeDsaConfig(num_hidden_layers=78, index_topk_freq=4, index_skip_topk_offset=3)
    assert cfg.pattern == "".join("F" if t == "full" else "S" for t in hf.indexer_types)


def test_presets_derived_constants():
    ds = ic.deepseek_v32()
    assert math.isclose(ds.softmax_scale, 0.135234, rel_tol=1e-5)
    assert math.isclose(ds.indexer_weight_scale, 0.0110485, rel_tol=1e-4)
    assert not ds.indexer_rope_interleave and ds.n_group == 8 and ds.num_layers == 61
    g5 = ic.glm5()
    assert math.isclose(g5.softmax_scale, 0.0625) and math.isclose(g5.indexer_weight_scale, 0.015625)
    assert g5.indexer_rope_interleave and g5.pattern == "F" * 78
    flash = ic.glm47_flash_dsa_30b()
    assert (flash.num_layers, flash.num_heads, flash.index_n_heads, flash.index_topk) == (47, 20, 32, 2048)
    assert flash.with_pattern(ic.SEARCHED_PATTERNS["glm47_flash_dsa_30b/1/4"]).pattern.count("F") == 12
    assert ic.glm5().with_pattern(ic.SEARCHED_PATTERNS["glm5/1/4"]).pattern.count("F") == 22


@pytest.mark.parametrize("bad,rule", [
    ("FSF", "length"),
    ("FSFSX", "only hold"),
    ("fsfsf", "only hold"),
    ("SFFFF", "layer 0"),
    ("", "length"),
])
def test_with_pattern_rejects_bad_patterns(bad, rule):
    with pytest.raises(ValueError, match=rule):
        ic.tiny(num_layers=5, mlp_layer_types=("dense",) * 5).with_pattern(bad)


def test_uniform_patterns_and_hf_export_round_trip():
    assert ic.uniform_pattern(9, "1/4") == "FSSSFSSSF"
    assert ic.uniform_pattern(6, 0.5) == "FSFSFS"
    assert ic.uniform_pattern(10, "1/8").count("F") == 2
    with pytest.raises(ValueError, match="1/r"):
        ic.uniform_pattern(8, "3/4")
    pattern = ic.SEARCHED_PATTERNS["glm47_flash_dsa_30b/1/2"]
    fields = ic.pattern_to_hf(pattern)
    hf = GlmMoeDsaConfig(num_hidden_layers=len(pattern), indexer_types=fields["indexer_types"])
    assert ic.DSAConfig.from_hf({**hf.to_dict(), "architectures": ["GlmMoeDsaForCausalLM"]}).pattern == pattern
    hf2 = GlmMoeDsaConfig(num_hidden_layers=len(pattern), index_topk_pattern=fields["index_topk_pattern"])
    assert hf2.indexer_types == fields["indexer_types"]


def test_from_hf_accepts_dict_file_and_directory(tmp_path):
    hf_cfg = hf_oracle.deepseek_config()
    d = hf_cfg.to_dict()
    (tmp_path / "config.json").write_text(json.dumps(d))
    a = ic.DSAConfig.from_hf(d)
    assert a == ic.DSAConfig.from_hf(tmp_path / "config.json") == ic.DSAConfig.from_hf(str(tmp_path))
    assert a.rope.rope_type == "yarn" and a.rope.factor == 8.0
    assert ic.DSAConfig.from_dict(json.loads(a.to_json())) == a
    assert ic.DSAConfig.from_hf(d, dtype="bfloat16").dtype == "bfloat16"


def test_from_hf_reads_routing_and_dense_fields():
    hf_cfg = hf_oracle.glm_config(num_hidden_layers=6, first_k_dense_replace=4, n_group=4, topk_group=3,
                                  routed_scaling_factor=1.7, norm_topk_prob=False, tie_word_embeddings=True)
    cfg = ic.DSAConfig.from_hf(hf_cfg.to_dict())
    assert cfg.mlp_layer_types == ("dense",) * 4 + ("sparse",) * 2
    assert (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, cfg.norm_topk_prob) == (4, 3, 1.7, False)
    assert cfg.tie_word_embeddings and cfg.indexer_rope_interleave


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.update(architectures=["LlamaForCausalLM"], model_type="llama"), "unsupported architecture"),
    (lambda d: d.update(index_head_dim=4), "index_head_dim"),
    (lambda d: d.update(n_group=3), "divisible"),
    (lambda d: d.update(qk_rope_head_dim=7), "even"),
    (lambda d: d.update(indexer_types=None, index_topk_pattern="FSF"), "length"),
    (lambda d: d.update(indexer_types=["full", "sharde", "full", "full", "full"]), "full'/'shared"),
    (lambda d: d.pop("kv_lora_rank"), "kv_lora_rank"),
    (lambda d: d.update(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "RoPE type"),
])
def test_from_hf_rejects_bad_configs(mutate, msg):
    d = hf_oracle.glm_config().to_dict()
    d.setdefault("architectures", ["GlmMoeDsaForCausalLM"])
    mutate(d)
    with pytest.raises(ValueError, match=msg):
        ic.DSAConfig.from_hf(d)


@pytest.mark.parametrize("field,value,shown", [
    ("num_hidden_layers", "8", "'num_hidden_layers' must be an int >= 1, got '8' (str)"),
    ("hidden_size", 64.0, "'hidden_size' must be an int >= 1, got 64.0 (float)"),
    ("index_topk", True, "'index_topk' must be an int >= 1, got True (bool)"),
    ("n_routed_experts", -2, "'n_routed_experts' must be an int >= 0, got -2"),
    ("rms_norm_eps", "1e-5", "'rms_norm_eps' must be a number, got '1e-5' (str)"),
    ("norm_topk_prob", "false", "'norm_topk_prob' must be true or false, got 'false' (str)"),
    ("eos_token_id", "2", "'eos_token_id' must be an int >= 0 or a list of them"),
    ("mlp_layer_types", "dense", "'mlp_layer_types' must be a list of strings"),
    ("rope_parameters", {"rope_type": "yarn", "factor": "8", "original_max_position_embeddings": 16},
     "'rope_parameters.factor' must be a number, got '8' (str)"),
])
def test_from_hf_names_a_field_of_the_wrong_type(field, value, shown):
    d = hf_oracle.glm_config().to_dict()
    d[field] = value
    with pytest.raises(ValueError, match="HF config field " + re.escape(shown)):
        ic.DSAConfig.from_hf(d)


@pytest.mark.parametrize("hf_class,arch", [(GlmMoeDsaConfig, "GlmMoeDsaForCausalLM"),
                                           (DeepseekV32Config, "DeepseekV32ForCausalLM")])
def test_from_hf_fills_absent_fields_with_the_transformers_defaults(hf_class, arch):
    """A config.json holding only the dims gets, for every other field, what transformers' class would use."""
    dims = hf_oracle.glm_config().to_dict() if arch.startswith("Glm") else hf_oracle.deepseek_config().to_dict()
    keep = ("num_hidden_layers", "vocab_size", "hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim", "index_topk")
    minimal = {"architectures": [arch], **{k: dims[k] for k in keep}}
    cfg = ic.DSAConfig.from_hf(minimal)
    ref = hf_class(**{k: dims[k] for k in keep})
    assert cfg.rms_norm_eps == ref.rms_norm_eps and cfg.max_position_embeddings == ref.max_position_embeddings
    assert (cfg.n_routed_experts, cfg.n_shared_experts, cfg.num_experts_per_tok) == (
        ref.n_routed_experts, ref.n_shared_experts, ref.num_experts_per_tok)
    assert (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, cfg.norm_topk_prob) == (
        ref.n_group, ref.topk_group, ref.routed_scaling_factor, ref.norm_topk_prob)
    assert (cfg.intermediate_size, cfg.moe_intermediate_size) == (ref.intermediate_size, ref.moe_intermediate_size)
    n_dense = min(ref.first_k_dense_replace, ref.num_hidden_layers)
    assert cfg.mlp_layer_types == ("dense",) * n_dense + ("sparse",) * (ref.num_hidden_layers - n_dense)
    assert cfg.rope.theta == ref.rope_parameters["rope_theta"] and cfg.rope.rope_type == "default"
    assert cfg.indexer_rope_interleave == arch.startswith("Glm")


def test_dtype_fields_accept_dtypes_and_names():
    import jax.numpy as jnp

    for dtype in ("bfloat16", jnp.bfloat16, np.dtype(jnp.bfloat16), jnp.dtype("bfloat16")):
        assert ic.tiny(dtype=dtype).dtype == "bfloat16"
    for dtype in ("float32", jnp.float32, np.float32, np.dtype("float32")):
        assert ic.tiny(dtype=dtype).dtype == "float32"
        assert ic.tiny(dtype="bfloat16").replace(dtype=dtype) == ic.tiny()
    for bad in ("bf16", None, 3):
        with pytest.raises(ValueError, match="dtype"):
            ic.tiny(dtype=bad)


def test_presets_share_dims_with_the_model_they_derive_from():
    glm5, flash = ic.glm5(), ic.glm47_flash_dsa_30b()
    for name in ("vocab_size", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank",
                 "index_n_heads", "index_head_dim", "index_topk", "rope", "rms_norm_eps", "eos_token_id"):
        assert getattr(flash, name) == getattr(glm5, name), name
    assert ic.glm5_2().replace(pattern=glm5.pattern) == glm5
    with pytest.raises(TypeError):
        ic.DSAConfig()  # no model's numbers hide in the dataclass defaults
    with pytest.raises(ValueError, match=r"fields \['hidden_size'\] are missing"):
        ic.DSAConfig.from_dict({k: v for k, v in ic.tiny().to_dict().items() if k != "hidden_size"})


def test_from_hf_rejects_corrupt_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ic.DSAConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError):
        ic.DSAConfig.from_hf(tmp_path / "missing")


def test_params_from_hf_errors_name_the_key():
    hf_cfg = hf_oracle.glm_config(num_hidden_layers=3, indexer_types=["full", "shared", "full"])
    model = hf_oracle.build(hf_cfg, 2)
    tensors = hf_oracle.hub_tensors(model)
    cfg = ic.DSAConfig.from_hf(hf_cfg.to_dict())
    assert not any(k.startswith("model.layers.1.self_attn.indexer") for k in tensors)
    ic.params_from_hf(cfg, tensors)  # shared layers without indexer weights are fine

    missing = dict(tensors)
    del missing["model.layers.2.mlp.experts.3.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight"):
        ic.params_from_hf(cfg, missing)

    bad_shape = dict(tensors)
    bad_shape["model.layers.0.self_attn.q_a_proj.weight"] = np.ones((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"q_a_proj.weight.*shape"):
        ic.params_from_hf(cfg, bad_shape)

    extra = dict(tensors)
    extra["model.layers.0.self_attn.surprise.weight"] = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="unexpected.*surprise"):
        ic.params_from_hf(cfg, extra)

    with pytest.raises(ValueError, match=r"layers \[1\] F"):
        ic.params_from_hf(cfg.with_pattern("FFF"), tensors)

    mtp = dict(tensors)
    mtp["model.layers.3.eh_proj.weight"] = np.ones((4, 4), np.float32)
    ic.params_from_hf(cfg, mtp)  # the MTP layer is skipped


def test_helpers_reject_bad_values():
    for keep in ("1/0", True, 2, "3/4", None):
        with pytest.raises(ValueError, match="1/r"):
            ic.uniform_pattern(8, keep)
    with pytest.raises(ValueError, match="offset"):
        ic.freq_pattern(8, 4, offset=0)
    with pytest.raises(ValueError, match="freq"):
        ic.freq_pattern(8, 0)
    hf = GlmMoeDsaConfig(num_hidden_layers=6, index_topk_freq=0)
    assert schedule.resolve_pattern({"index_topk_freq": 0}, 6) == "".join(
        "F" if t == "full" else "S" for t in hf.indexer_types) == "FFFFFF"


@pytest.mark.parametrize("field,value", [
    ("index_topk", 8.5), ("n_shared_experts", -1), ("rms_norm_eps", 0.0), ("max_position_embeddings", 0),
    ("eos_token_id", ("a", "b")), ("dtype", "float16"), ("backend", "cuda"),
])
def test_config_field_validation(field, value):
    with pytest.raises(ValueError, match=field):
        ic.tiny(**{field: value})


def test_yarn_needs_a_factor():
    with pytest.raises(ValueError, match="factor"):
        ic.RopeConfig(rope_type="yarn", original_max_position_embeddings=64)


def test_forward_rejects_wrong_layout_and_lengths():
    cfg = ic.tiny(num_layers=4, mlp_layer_types=("sparse",) * 4, max_position_embeddings=32)
    params = ic.init_params(cfg)
    tokens = np.random.default_rng(31).integers(0, cfg.vocab_size, (1, 8))
    with pytest.raises(ValueError, match="relayout"):
        ic.forward(params, cfg.with_pattern("FSFS"), tokens)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ic.forward(params, cfg, np.zeros((1, 33), np.int32) + 1)
    with pytest.raises(ValueError, match="at least one"):
        ic.forward(params, cfg, np.zeros((1, 0), np.int32))
    moved = ic.relayout(params, cfg, cfg.with_pattern("FSFS").replace(dtype="bfloat16"))
    assert "indexer" not in moved["segment_0"]["shared_0"]
