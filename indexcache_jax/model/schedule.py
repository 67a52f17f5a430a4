"""The IndexCache F/S schedule: resolving, validating, exporting patterns, and planning the layer scan.

A pattern is a str with one character per decoder layer: 'F' (Full) layers run their own lightning indexer,
'S' (Shared) layers reuse the top-k indices of the nearest F layer before them. Layer 0 is always F.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

# Patterns found by the paper's greedy search (IndexCache, arXiv 2603.12201, Appendix B), verbatim.
GLM47_FLASH_DSA_30B_SEARCHED_1_2 = "FSFSFSSSSFSFFFFSFFSSFFSFFFSSFFSSFSSSSFSFFFSFSSF"
GLM47_FLASH_DSA_30B_SEARCHED_1_4 = "FSFSFSSSSFSSSFSSFFSSFSSFSSSSFSSSFSSSSFSSSSSSSSS"
GLM47_FLASH_DSA_30B_SEARCHED_1_8 = "FSSSFSSSSSSSSFSSSFSSSSSFSSSSFSSSSSSSSFSSSSSSSSS"
GLM5_SEARCHED_1_2 = "FFSFSSSFSSFFFSSSFFFSFSSSSSSFFSFFSFFSSFFFFFFSFFFFFSFFSSSSSSFSFFFSFSSSFSFFSFFSSS"
GLM5_SEARCHED_1_4 = "FFSFSSSFSSFSFSSSSSSSFSSSSSSFSSSFSFSSSSFFFFFSSSFFSSSFSSSSSSSSFSSSFSSSSSSFSFSSSS"

SEARCHED_PATTERNS: dict[str, str] = {
    "glm47_flash_dsa_30b/1/2": GLM47_FLASH_DSA_30B_SEARCHED_1_2,
    "glm47_flash_dsa_30b/1/4": GLM47_FLASH_DSA_30B_SEARCHED_1_4,
    "glm47_flash_dsa_30b/1/8": GLM47_FLASH_DSA_30B_SEARCHED_1_8,
    "glm5/1/2": GLM5_SEARCHED_1_2,
    "glm5/1/4": GLM5_SEARCHED_1_4,
}


def validate_pattern(pattern: str, num_layers: int) -> str:
    """Returns `pattern` if it is a valid schedule for `num_layers` layers, else raises ValueError naming the rule."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a str of 'F'/'S', got {type(pattern).__name__}")
    if len(pattern) != num_layers:
        raise ValueError(f"pattern length {len(pattern)} != number of layers {num_layers}: {pattern!r}")
    bad = sorted({c for c in pattern if c not in "FS"})
    if bad:
        raise ValueError(f"pattern may only hold 'F' and 'S', found {bad} in {pattern!r}")
    if not pattern.startswith("F"):
        raise ValueError(f"layer 0 must be 'F' (it seeds the top-k indices), got {pattern!r}")
    return pattern


def freq_pattern(num_layers: int, freq: int, offset: int = 2) -> str:
    """The engines' `index_topk_freq` rule: layer i is F iff `max(i - offset + 1, 0) % freq == 0`.

    `offset=2` is the default of transformers, vLLM and the THUDM patch (F at 0, 1, then every `freq`-th);
    GLM-5.2 ships `offset=3` (F at 0, 1, 2, then every 4th).
    """
    if freq < 1:
        raise ValueError(f"index_topk_freq must be >= 1, got {freq}")
    if offset < 1:
        raise ValueError(f"index_skip_topk_offset must be >= 1 (layer 0 is F), got {offset}")
    return "".join("F" if max(i - offset + 1, 0) % freq == 0 else "S" for i in range(num_layers))


def resolve_pattern(hf_config: Mapping[str, Any], num_layers: int) -> str:
    """Derives the pattern from HF config fields, in the priority order of transformers and SGLang.

    `indexer_types` ("full"/"shared") first, then `index_topk_pattern` ("F"/"S"), then `index_topk_freq` with
    `index_skip_topk_offset` (default 2). With none of them every layer is F.
    """
    types = hf_config.get("indexer_types")
    if types is not None:
        mapping = {"full": "F", "shared": "S"}
        unknown = sorted({t for t in types if t not in mapping})
        if unknown:
            raise ValueError(f"indexer_types may only hold 'full'/'shared', found {unknown}")
        return validate_pattern("".join(mapping[t] for t in types), num_layers)
    pattern = hf_config.get("index_topk_pattern")
    if pattern is not None:
        if not isinstance(pattern, str):
            pattern = "".join(pattern)
        return validate_pattern(pattern, num_layers)
    freq = hf_config.get("index_topk_freq")
    if freq is not None:
        offset = hf_config.get("index_skip_topk_offset", 2)
        # As transformers: a frequency below 1 means no sharing (GLM-5 / 5.1 may declare 0).
        return validate_pattern(freq_pattern(num_layers, max(int(freq), 1), int(offset)), num_layers)
    return "F" * num_layers


def uniform_pattern(num_layers: int, keep: Fraction | float | str | int) -> str:
    """Every r-th layer F, starting at layer 0, where `keep = 1/r` (e.g. "1/4", 0.25 or Fraction(1, 4))."""
    r = _keep_ratio(keep)
    return "".join("F" if i % r == 0 else "S" for i in range(num_layers))


def _keep_ratio(keep: Fraction | float | str | int) -> int:
    def bad() -> ValueError:
        shown = str(keep) if isinstance(keep, Fraction) else repr(keep)  # Fraction(1, 3) reads as 1/3
        return ValueError(f"keep must be 1/r for an integer r >= 1 (e.g. 1/2, 1/4, 1/8), got {shown}")

    if isinstance(keep, bool) or not isinstance(keep, (Fraction, float, str, int)):
        raise bad()
    try:
        frac = Fraction(keep) if not isinstance(keep, float) else Fraction(keep).limit_denominator(1000)
    except (ValueError, ZeroDivisionError):
        raise bad() from None
    if frac <= 0 or frac > 1 or frac.numerator != 1:
        raise bad()
    return frac.denominator


def n_full_for_keep(num_layers: int, keep: Fraction | float | str | int) -> int:
    """`ceil(N / r)` F layers for `keep = 1/r`."""
    return math.ceil(num_layers / _keep_ratio(keep))


def pattern_to_hf(pattern: str) -> dict[str, Any]:
    """HF config fields that hand `pattern` to transformers (`indexer_types`), SGLang/vLLM (`index_topk_pattern`)."""
    return {
        "indexer_types": ["full" if c == "F" else "shared" for c in pattern],
        "index_topk_pattern": pattern,
        "use_index_cache": "S" in pattern,
    }


def source_layers(pattern: str) -> list[int]:
    """For each layer, the F layer whose indices it uses: itself if F, else the nearest F before it."""
    out, last = [], 0
    for i, c in enumerate(pattern):
        if c == "F":
            last = i
        out.append(last)
    return out


@dataclasses.dataclass(frozen=True)
class SegmentSpec:
    """A run of consecutive layer groups of identical shape, scanned with stacked params.

    A group is one F layer followed by its S layers. `kinds` gives the MLP kind ("dense"/"sparse") of each layer in
    the group, F first. `shared_runs` splits the S layers into runs of equal kind, each scanned on its own.
    """

    first_layer: int
    num_groups: int
    kinds: tuple[str, ...]

    @property
    def group_size(self) -> int:
        return len(self.kinds)

    @property
    def shared_runs(self) -> tuple[tuple[str, int], ...]:
        runs: list[list] = []
        for kind in self.kinds[1:]:
            if runs and runs[-1][0] == kind:
                runs[-1][1] += 1
            else:
                runs.append([kind, 1])
        return tuple((k, n) for k, n in runs)

    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_groups * self.group_size)


def plan_segments(pattern: str, mlp_kinds: Sequence[str]) -> tuple[SegmentSpec, ...]:
    """Splits the layers into groups (F + its S layers) and merges consecutive equal groups into segments."""
    starts = [i for i, c in enumerate(pattern) if c == "F"] + [len(pattern)]
    groups = [(starts[g], tuple(mlp_kinds[starts[g]:starts[g + 1]])) for g in range(len(starts) - 1)]
    segments: list[SegmentSpec] = []
    for first, kinds in groups:
        if segments and segments[-1].kinds == kinds:
            last = segments[-1]
            segments[-1] = dataclasses.replace(last, num_groups=last.num_groups + 1)
        else:
            segments.append(SegmentSpec(first_layer=first, num_groups=1, kinds=kinds))
    return tuple(segments)
