"""Pallas GPU kernels for DeepSeek Sparse Attention.

Stands alone: imports jax only, never `indexcache_jax`. Every kernel has a pure-JAX reference next to it.
`interpret=None` everywhere means Pallas on GPU and interpret mode on CPU.
"""

from pallas_kernels.indexer import indexer_logits, indexer_logits_reference, indexer_topk, indexer_topk_reference
from pallas_kernels.topk import topk, topk_reference
from pallas_kernels.sparse_mla import sparse_mla, sparse_mla_reference
# The module `pallas_kernels.grouped_matmul` keeps its name: its products are exported under their own names.
from pallas_kernels.grouped_matmul import grouped_swiglu, moe_experts, plan_rows

__all__ = [
    "indexer_logits",
    "indexer_logits_reference",
    "indexer_topk",
    "indexer_topk_reference",
    "topk",
    "topk_reference",
    "sparse_mla",
    "sparse_mla_reference",
    "grouped_swiglu",
    "moe_experts",
    "plan_rows",
]
