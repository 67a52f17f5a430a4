"""Tiny random transformers models (float32, eager attention) as the parity oracle."""

from __future__ import annotations

import numpy as np
import torch


def glm_config(**kw):
    from transformers import GlmMoeDsaConfig

    base = dict(
        vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=12,
        qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=2, index_n_heads=16,
        index_head_dim=16, index_topk=5, rms_norm_eps=1e-5, max_position_embeddings=256,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, tie_word_embeddings=False,
    )
    base.update(kw)
    return GlmMoeDsaConfig(**base)


def deepseek_config(**kw):
    from transformers import DeepseekV32Config

    base = dict(
        vocab_size=89, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=12,
        qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, index_n_heads=16,
        index_head_dim=16, index_topk=6, rms_norm_eps=1e-6, max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
        tie_word_embeddings=False,
    )
    base.update(kw)
    return DeepseekV32Config(**base)


def build(config, seed: int):
    """A random model whose router biases and norm weights are non-trivial, so every code path matters."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("k_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("k_norm.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn(buf.shape, generator=gen))
    return model


def hub_tensors(model) -> dict[str, np.ndarray]:
    """The tensors exactly as `save_pretrained` writes them to the hub layout (per-expert keys)."""
    import glob
    import tempfile

    from safetensors.numpy import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(glob.glob(f"{tmp}/*.safetensors")):
            tensors.update(load_file(shard))
    return tensors


def hf_logits_and_indices(model, tokens: np.ndarray):
    """Logits `[B, T, V]` and each full layer's top-k `[B, T, k]` from an eager transformers forward."""
    captured: dict[int, np.ndarray] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        indexer = getattr(layer.self_attn, "indexer", None)
        if indexer is not None:
            hooks.append(indexer.register_forward_hook(
                lambda mod, args, out, i=i: captured.__setitem__(i, out.detach().numpy())))
    with torch.no_grad():
        out = model(torch.as_tensor(tokens, dtype=torch.long), use_cache=False)
    for h in hooks:
        h.remove()
    return out.logits.float().numpy(), captured
