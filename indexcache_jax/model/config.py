"""`DSAConfig`: every number that changes the math of a DSA model (DeepSeek-V3.2, GLM-5, GLM-5.2), plus presets."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from indexcache_jax.model import schedule

SUPPORTED_ARCHITECTURES = {
    "GlmMoeDsaForCausalLM": "glm_moe_dsa",
    "DeepseekV32ForCausalLM": "deepseek_v32",
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE frequencies over the `qk_rope_head_dim` dims, as HF `rope_parameters` describe them.

    `rope_type` is "default" or "yarn". For YaRN, `factor`, `original_max_position_embeddings`, `beta_fast`,
    `beta_slow`, `mscale`, `mscale_all_dim` and `attention_factor` follow transformers' `_compute_yarn_parameters`.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in ("default", "yarn"):
            raise ValueError(f"unsupported rope_type {self.rope_type!r}: only 'default' and 'yarn' are implemented")
        if self.theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.theta}")
        if self.rope_type == "yarn" and self.original_max_position_embeddings is None:
            raise ValueError("yarn RoPE needs original_max_position_embeddings")
        if self.rope_type == "yarn" and (self.factor is None or self.factor <= 0):
            raise ValueError(f"yarn RoPE needs a factor > 0, got {self.factor}")


def dtype_name(dtype: Any) -> str:
    """The name ("float32", "bfloat16", ...) of a dtype given as a string, `jnp.float32` / `jnp.bfloat16`, a numpy
    dtype or scalar type; ValueError for anything else."""
    import jax.numpy as jnp

    try:
        if dtype is None:
            raise TypeError
        return jnp.dtype(dtype).name
    except TypeError:
        raise ValueError(f"dtype must be a dtype or its name (e.g. 'bfloat16', jnp.bfloat16), got {dtype!r}") from None


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction `0.1 * mscale * ln(scale) + 1` for a context extension by `scale` (1 when
    `scale <= 1`), as transformers' `get_mscale`."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True)
class DSAConfig:
    """A DSA model: MLA attention with a lightning indexer per F layer, a sigmoid-routed MoE, and the F/S pattern.

    Frozen and hashable, so it can be a static argument of `jax.jit`. `dtype` is the compute dtype of activations
    ("float32" or "bfloat16"); softmax, norms and routing always run in float32. `backend` picks the indexer and
    sparse-attention kernels: "pallas", "xla", or "auto" (Pallas on GPU, XLA elsewhere). `indexer_quant` picks the
    indexer's numerics: "none" computes it in the compute dtype (as transformers, MLX and MaxText do); "fp8" follows
    DeepSeek's official inference (docs/math.md, "FP8 indexer"): Hadamard-rotated q and k quantised to float8_e4m3fn with
    one power-of-two scale per (token, head) and per token, an FP8 indexer key cache, and the FP8 logits kernel.
    """

    # The model's dimensions have no defaults: the presets below (and `from_hf`) are the one place that states a
    # model's numbers. The defaults that follow are neutral choices (no MoE, no group routing, HF's RoPE default),
    # not another model's values.
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    rms_norm_eps: float
    max_position_embeddings: int
    intermediate_size: int = 0
    moe_intermediate_size: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    mlp_layer_types: tuple[str, ...] = ()  # () -> the first 3 layers dense, the rest MoE (HF first_k_dense_replace)
    indexer_rope_interleave: bool | None = None  # None -> the architecture's: GLM interleaved, DeepSeek split-half
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    pattern: str = ""
    dtype: str = "float32"
    backend: str = "auto"
    indexer_quant: str = "none"
    eos_token_id: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.indexer_rope_interleave is None:
            object.__setattr__(self, "indexer_rope_interleave", self.architecture == "glm_moe_dsa")
        if not self.mlp_layer_types:
            n_dense = min(3, self.num_layers)
            object.__setattr__(self, "mlp_layer_types", ("dense",) * n_dense + ("sparse",) * (self.num_layers - n_dense))
        object.__setattr__(self, "mlp_layer_types", tuple(self.mlp_layer_types))
        if not self.pattern:
            object.__setattr__(self, "pattern", "F" * self.num_layers)
        eos = self.eos_token_id
        object.__setattr__(self, "eos_token_id", (eos,) if isinstance(eos, int) else tuple(eos))
        self._validate()

    def _validate(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"invalid DSAConfig: {msg}")

        need(self.architecture in SUPPORTED_ARCHITECTURES.values(),
             f"architecture {self.architecture!r} not in {sorted(SUPPORTED_ARCHITECTURES.values())}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "q_lora_rank", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim",
                     "index_topk", "max_position_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be an int >= 1, got {value!r}")
        for name in ("intermediate_size", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
                     "num_experts_per_tok", "n_group", "topk_group"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                 f"{name} must be an int >= 0, got {value!r}")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        need(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.eos_token_id),
             f"eos_token_id must hold ints >= 0, got {self.eos_token_id!r}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(self.index_head_dim >= self.qk_rope_head_dim,
             f"index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim ({self.qk_rope_head_dim}): "
             "the indexer applies RoPE to its first qk_rope_head_dim dims")
        need(len(self.mlp_layer_types) == self.num_layers,
             f"mlp_layer_types has {len(self.mlp_layer_types)} entries for {self.num_layers} layers")
        bad = sorted(set(self.mlp_layer_types) - {"dense", "sparse"})
        need(not bad, f"mlp_layer_types may only hold 'dense'/'sparse', found {bad}")
        if "sparse" in self.mlp_layer_types:
            need(self.n_routed_experts >= 1 and self.moe_intermediate_size >= 1, "MoE layers need experts")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok {self.num_experts_per_tok} not in [1, n_routed_experts={self.n_routed_experts}]")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts {self.n_routed_experts} not divisible by n_group {self.n_group}")
            need(1 <= self.topk_group <= self.n_group, f"topk_group {self.topk_group} not in [1, n_group={self.n_group}]")
            if self.n_group > 1:
                need(self.n_routed_experts // self.n_group >= 2, "group-limited routing needs >= 2 experts per group")
                need(self.topk_group * (self.n_routed_experts // self.n_group) >= self.num_experts_per_tok,
                     "topk_group groups hold fewer experts than num_experts_per_tok")
        if "dense" in self.mlp_layer_types:
            need(self.intermediate_size >= 1, "dense MLP layers need intermediate_size >= 1")
        need(self.dtype in ("float32", "bfloat16"), f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        need(self.backend in ("auto", "pallas", "xla"), f"backend must be 'auto', 'pallas' or 'xla', got {self.backend!r}")
        need(self.indexer_quant in ("none", "fp8"), f"indexer_quant must be 'none' or 'fp8', got {self.indexer_quant!r}")
        if self.indexer_quant == "fp8":
            d = self.index_head_dim
            need(d <= 128 and d & (d - 1) == 0,
                 f"indexer_quant='fp8' needs index_head_dim a power of two <= 128 (one Hadamard block and one FP8 "
                 f"scale per vector), got {d}")
        schedule.validate_pattern(self.pattern, self.num_layers)

    # ----------------------------------------------------------------------------------------------- derived values
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_row_dim(self) -> int:
        """Width of one MLA cache row and of the absorbed attention head: the latent beside the shared RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """`qk_head_dim^-0.5`, times YaRN's mscale(factor, mscale_all_dim)^2 when RoPE is YaRN."""
        scale = self.qk_head_dim ** -0.5
        if self.rope.rope_type != "default" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def indexer_weight_scale(self) -> float:
        """The constant folded into the indexer head weights: `H_I^-0.5 * d_I^-0.5`."""
        return self.index_n_heads ** -0.5 * self.index_head_dim ** -0.5

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.pattern) if c == "F")

    @property
    def segments(self) -> tuple[schedule.SegmentSpec, ...]:
        return schedule.plan_segments(self.pattern, self.mlp_layer_types)

    def with_pattern(self, pattern: str) -> "DSAConfig":
        """A copy with another F/S pattern; ValueError names the rule a bad pattern breaks."""
        schedule.validate_pattern(pattern, self.num_layers)
        return dataclasses.replace(self, pattern=pattern)

    def replace(self, **changes: Any) -> "DSAConfig":
        return dataclasses.replace(self, **changes)

    def to_hf_fields(self) -> dict[str, Any]:
        """Config fields that hand this pattern to transformers, vLLM and SGLang."""
        return schedule.pattern_to_hf(self.pattern)

    # ----------------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mlp_layer_types"] = list(self.mlp_layer_types)
        d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DSAConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DSAConfig fields {unknown}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise ValueError(f"DSAConfig fields {missing} are missing")
        if isinstance(d.get("rope"), Mapping):
            d["rope"] = RopeConfig(**d["rope"])
        d["mlp_layer_types"] = tuple(d.get("mlp_layer_types", ()))
        d["eos_token_id"] = tuple(d.get("eos_token_id", ()))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> "DSAConfig":
        """Reads an HF `config.json` of `GlmMoeDsaForCausalLM` or `DeepseekV32ForCausalLM`.

        `path_or_dict` is the parsed dict, the file, or the checkpoint directory holding it. `overrides` replace
        fields of the result (e.g. `dtype="bfloat16"`).
        """
        hf = _read_hf_config(path_or_dict)
        arch = _architecture(hf)
        # Fields the file leaves out take the architecture's transformers class default, which is its flagship
        # model's value, i.e. our preset's; an explicit null means "not used" (no experts, no groups).
        preset = ARCHITECTURE_PRESETS[arch]()
        n_layers = _hf_int(hf, "num_hidden_layers")
        mlp_types = hf.get("mlp_layer_types")
        if mlp_types is None:
            first_k = _hf_int(hf, "first_k_dense_replace", 3, minimum=0)
            freq = _hf_int(hf, "moe_layer_freq", 1)
            if freq != 1:
                raise ValueError(f"moe_layer_freq={freq} is not supported (every model of this family uses 1)")
            n_dense = min(first_k, n_layers)
            mlp_types = ["dense"] * n_dense + ["sparse"] * (n_layers - n_dense)
        elif not isinstance(mlp_types, list) or not all(isinstance(t, str) for t in mlp_types):
            raise ValueError(f"HF config field 'mlp_layer_types' must be a list of strings, got {mlp_types!r}")
        # `num_key_value_heads` is not read: MLA keys and values come from one shared latent, so every head has
        # its own key and value (transformers only uses the field for a repeat that is 1 in every valid config).
        if hf.get("q_lora_rank") in (None, 0):
            raise ValueError("q_lora_rank is required: the DSA indexer reads the normalised q latent")
        if hf.get("attention_bias", False):
            raise ValueError("attention_bias=True is not supported by DSA checkpoints")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(f"scoring_func {hf.get('scoring_func')!r} is not supported (only sigmoid)")
        if hf.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError(f"topk_method {hf.get('topk_method')!r} is not supported (only noaux_tc)")
        eos = hf.get("eos_token_id")
        eos = [] if eos is None else (eos if isinstance(eos, list) else [eos])
        if not all(_is_int(t) and t >= 0 for t in eos):
            raise ValueError(f"HF config field 'eos_token_id' must be an int >= 0 or a list of them, "
                             f"got {hf.get('eos_token_id')!r}")

        def optional_int(key: str, field: str, unused: int) -> int:
            if key in hf and hf[key] is None:
                return unused
            return _hf_int(hf, key, getattr(preset, field), minimum=0)

        fields: dict[str, Any] = dict(
            architecture=arch,
            vocab_size=_hf_int(hf, "vocab_size"),
            hidden_size=_hf_int(hf, "hidden_size"),
            intermediate_size=optional_int("intermediate_size", "intermediate_size", 0),
            moe_intermediate_size=optional_int("moe_intermediate_size", "moe_intermediate_size", 0),
            num_layers=n_layers,
            num_heads=_hf_int(hf, "num_attention_heads"),
            q_lora_rank=_hf_int(hf, "q_lora_rank"),
            kv_lora_rank=_hf_int(hf, "kv_lora_rank"),
            qk_nope_head_dim=_hf_int(hf, "qk_nope_head_dim"),
            qk_rope_head_dim=_hf_int(hf, "qk_rope_head_dim"),
            v_head_dim=_hf_int(hf, "v_head_dim"),
            n_routed_experts=optional_int("n_routed_experts", "n_routed_experts", 0),
            n_shared_experts=optional_int("n_shared_experts", "n_shared_experts", 0),
            num_experts_per_tok=optional_int("num_experts_per_tok", "num_experts_per_tok", 0),
            n_group=optional_int("n_group", "n_group", 1),
            topk_group=optional_int("topk_group", "topk_group", 1),
            routed_scaling_factor=_hf_float(hf, "routed_scaling_factor", preset.routed_scaling_factor),
            norm_topk_prob=_hf_bool(hf, "norm_topk_prob", preset.norm_topk_prob),
            mlp_layer_types=tuple(mlp_types),
            index_n_heads=_hf_int(hf, "index_n_heads"),
            index_head_dim=_hf_int(hf, "index_head_dim"),
            index_topk=_hf_int(hf, "index_topk"),
            # transformers' GLM indexer is always interleaved and its DeepSeek-V3.2 indexer always split-half;
            # an explicit `indexer_rope_interleave` (GLM-5 ships it) overrides the architecture's default.
            indexer_rope_interleave=_hf_bool(hf, "indexer_rope_interleave", preset.indexer_rope_interleave),
            rope=_rope_from_hf(hf),
            rms_norm_eps=_hf_float(hf, "rms_norm_eps", preset.rms_norm_eps),
            max_position_embeddings=_hf_int(hf, "max_position_embeddings", preset.max_position_embeddings),
            tie_word_embeddings=_hf_bool(hf, "tie_word_embeddings", preset.tie_word_embeddings),
            pattern=schedule.resolve_pattern(hf, n_layers),
            eos_token_id=tuple(eos),
        )
        fields.update(overrides)
        return cls(**fields)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The parsed content of a JSON file; FileNotFoundError names `what` and the path, ValueError says the file is
    not valid JSON (or not UTF-8 text)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _read_hf_config(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    hf = read_json(path, "HF config")
    if not isinstance(hf, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(hf).__name__}")
    return hf


def _architecture(hf: Mapping[str, Any]) -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[a]
    model_type = hf.get("model_type")
    if not archs and model_type in SUPPORTED_ARCHITECTURES.values():
        return model_type
    raise ValueError(f"unsupported architecture {archs or model_type!r}; expected one of "
                     f"{sorted(SUPPORTED_ARCHITECTURES)}")


_REQUIRED = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hf_int(hf: Mapping[str, Any], key: str, default: Any = _REQUIRED, *, minimum: int = 1) -> int:
    """`hf[key]` as an int >= minimum (`default` when absent); ValueError naming the field otherwise."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"HF config lacks required field {key!r}")
        return default
    if not _is_int(value) or value < minimum:
        raise ValueError(f"HF config field {key!r} must be an int >= {minimum}, got {value!r} "
                         f"({type(value).__name__})")
    return value


def _hf_float(hf: Mapping[str, Any], key: str, default: float) -> float:
    """`hf[key]` as a float (ints accepted; `default` when absent or null); ValueError naming the field otherwise."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"HF config field {key!r} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _hf_bool(hf: Mapping[str, Any], key: str, default: bool) -> bool:
    """`hf[key]` as a bool (`default` when absent or null); ValueError naming the field otherwise."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"HF config field {key!r} must be true or false, got {value!r} ({type(value).__name__})")
    return value


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(key) or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"HF config field {key!r} must be an object, got {params!r}")
    named = {f"{key}.{k}": v for k, v in params.items()}  # errors name e.g. 'rope_parameters.factor'

    def number(name: str, default: Any) -> Any:
        if f"{key}.{name}" in named and named[f"{key}.{name}"] is not None:
            return _hf_float(named, f"{key}.{name}", default)
        return default

    theta = number("rope_theta", _hf_float(hf, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type != "yarn":
        raise ValueError(f"unsupported RoPE type {rope_type!r}: only 'default' and 'yarn'")
    orig = params.get("original_max_position_embeddings")
    orig = (_hf_int(named, f"{key}.original_max_position_embeddings") if orig is not None else
            _hf_int(hf, "original_max_position_embeddings", None) or _hf_int(hf, "max_position_embeddings"))
    factor = number("factor", None)
    if factor is None:
        factor = _hf_int(hf, "max_position_embeddings") / orig
    return RopeConfig(
        theta=theta, rope_type="yarn", factor=factor, original_max_position_embeddings=orig,
        beta_fast=number("beta_fast", None) or 32.0, beta_slow=number("beta_slow", None) or 1.0,
        mscale=number("mscale", None), mscale_all_dim=number("mscale_all_dim", None),
        attention_factor=number("attention_factor", None), truncate=bool(params.get("truncate", True)),
    )


# ----------------------------------------------------------------------------------------------------------- presets
def deepseek_v32(**overrides: Any) -> DSAConfig:
    """DeepSeek-V3.2(-Exp): 61 layers, 128 heads, YaRN x40, 64x128 split-half indexer, 256 experts in 8 groups."""
    base = dict(
        architecture="deepseek_v32", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_layers=61, num_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        mlp_layer_types=("dense",) * 3 + ("sparse",) * 58, index_n_heads=64, index_head_dim=128, index_topk=2048,
        indexer_rope_interleave=False,
        rope=RopeConfig(theta=10000.0, rope_type="yarn", factor=40.0, original_max_position_embeddings=4096,
                        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        rms_norm_eps=1e-6, max_position_embeddings=163840, eos_token_id=(1,),
    )
    base.update(overrides)
    return DSAConfig(**base)


def glm5(**overrides: Any) -> DSAConfig:
    """GLM-5 (744B): 78 layers, 64 heads, plain RoPE theta 1e6, 32x128 interleaved indexer, every layer F."""
    base = dict(
        architecture="glm_moe_dsa", vocab_size=154880, hidden_size=6144, intermediate_size=12288,
        moe_intermediate_size=2048, num_layers=78, num_heads=64, q_lora_rank=2048, kv_lora_rank=512,
        qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        mlp_layer_types=("dense",) * 3 + ("sparse",) * 75, index_n_heads=32, index_head_dim=128, index_topk=2048,
        indexer_rope_interleave=True, rope=RopeConfig(theta=1e6), rms_norm_eps=1e-5,
        max_position_embeddings=202752, eos_token_id=(154820, 154827, 154829),
    )
    base.update(overrides)
    return DSAConfig(**base)


def glm5_2(**overrides: Any) -> DSAConfig:
    """GLM-5.2 (IndexShare): GLM-5 dims, F at layers 0, 1, 2 and every 4th after (freq 4, offset 3): 21 F, 57 S."""
    overrides.setdefault("pattern", schedule.freq_pattern(78, 4, offset=3))
    return glm5(**overrides)


def glm47_flash_dsa_30b(**overrides: Any) -> DSAConfig:
    """The paper's 30B DSA model: GLM-4.7-Flash dims (47 layers, 20 heads, 64 experts) with GLM-5's head dims,
    32x128 indexer, RoPE, vocabulary and norms."""
    base = dict(
        hidden_size=2048, intermediate_size=10240, moe_intermediate_size=1536, num_layers=47, num_heads=20,
        q_lora_rank=768, n_routed_experts=64, num_experts_per_tok=4, routed_scaling_factor=1.8,
        mlp_layer_types=("dense",) + ("sparse",) * 46,
    )
    base.update(overrides)
    return glm5(**base)


def tiny(**overrides: Any) -> DSAConfig:
    """A tiny random-weight GLM-style model for demos and tests: 6 layers, 2 dense, index_topk 8."""
    base = dict(
        architecture="glm_moe_dsa", vocab_size=256, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_layers=6, num_heads=4, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        mlp_layer_types=("dense",) * 2 + ("sparse",) * 4, index_n_heads=8, index_head_dim=16, index_topk=8,
        indexer_rope_interleave=True, rope=RopeConfig(theta=10000.0), rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    )
    base.update(overrides)
    return DSAConfig(**base)


# The transformers class default of each architecture is its flagship model: `from_hf` fills absent fields from it.
ARCHITECTURE_PRESETS = {"glm_moe_dsa": glm5, "deepseek_v32": deepseek_v32}

PRESETS = {
    "deepseek_v32": deepseek_v32,
    "glm5": glm5,
    "glm5_2": glm5_2,
    "glm47_flash_dsa_30b": glm47_flash_dsa_30b,
    "tiny": tiny,
}
