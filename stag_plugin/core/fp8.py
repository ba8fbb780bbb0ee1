"""Which attention of a StagFormer can run FP8 on this GPU, decided once when the config is made.

Megatron's FP8 settings are config fields (`fp8` = --fp8-format, `fp8_recipe`, and FP8
attention: `fp8_dot_product_attention`, `fp8_multi_head_attention`); Megatron's TransformerBlock
opens the FP8 region around each section's layers (megatron.core.fp8_utils.get_fp8_context),
so every Transformer Engine linear layer of the section runs its GEMMs in FP8. FP8 *attention*
also needs a fused FP8 attention kernel, which Transformer Engine has for some settings only;
without one it stops the first forward with "No dot product attention backend is available".
These rules say so before that:

    rule                                              attention it concerns
    compute capability below 9.0                      all: FP8 fused attention starts at Hopper
    fp8_recipe "blockwise"                            all: no FP8 attention kernel for it
    fp8_recipe other than "delayed" below sm100       all: current scaling / MXFP8 attention
                                                      kernels need Blackwell
    head dim other than 128                           all: FP8 attention trains at head dim 128
    cross_attention_window set, below sm100           the cross-attention: no FP8 kernel with a
                                                      sliding window before Blackwell

`StagFormerConfig.fp8_attention_fallback` chooses what a finding does: "bf16" (default) warns once
and runs that attention in bf16, its linear layers staying FP8 (a finding for all attention turns
`fp8_dot_product_attention` / `fp8_multi_head_attention` off in the config; a cross-attention
finding keeps the cross-attention's core attention out of the FP8 region, see
stag_plugin.core.attention.StagTEDotProductAttention); "error" refuses the config. Without CUDA
(capability None) the rules that depend on the GPU are not checked: nothing runs FP8 there.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

FALLBACKS = ("bf16", "error")
FP8_ATTENTION_HEAD_DIM = 128
BLACKWELL = (10, 0)
HOPPER = (9, 0)


class FP8AttentionWarning(UserWarning):
    """An attention that was asked to run FP8 runs in bf16 (no Transformer Engine kernel)."""


@dataclass(frozen=True)
class Finding:
    """Why FP8 attention cannot run: for `scope` "all" attention or just the "cross"-attention."""

    scope: str
    reason: str

    def message(self) -> str:
        which = ("every attention of the model" if self.scope == "all"
                 else "the cross-section attention")
        return (f"FP8 attention: {self.reason}; {which} runs in bf16 (the linear layers stay "
                "FP8). To refuse instead: fp8_attention_fallback='error' "
                "(--stag-fp8-attention-fallback error)")


def wants_fp8_attention(config) -> bool:
    """FP8 training with FP8 attention asked for (Megatron's fp8_dot_product_attention or
    fp8_multi_head_attention)."""
    return bool(config.fp8) and bool(config.fp8_dot_product_attention
                                     or config.fp8_multi_head_attention)


def recipe_name(config) -> str:
    """config.fp8_recipe as a string (Megatron keeps a str or its Fp8Recipe enum)."""
    return str(getattr(config.fp8_recipe, "value", config.fp8_recipe))


def attention_findings(config, capability: Optional[Tuple[int, int]]) -> List[Finding]:
    """Every rule above that applies to `config` on a GPU of `capability` (None: no GPU)."""
    if not wants_fp8_attention(config):
        return []
    found = []
    recipe = recipe_name(config)
    before_blackwell = capability is not None and tuple(capability) < BLACKWELL
    if capability is not None and tuple(capability) < HOPPER:
        found.append(Finding("all", f"compute capability {capability[0]}.{capability[1]} has "
                                    "no FP8 fused attention (Hopper, 9.0, and newer have)"))
    if recipe == "blockwise":
        found.append(Finding("all", "fp8_recipe='blockwise' has no FP8 attention kernel"))
    elif recipe != "delayed" and before_blackwell:
        found.append(Finding("all", f"fp8_recipe={recipe!r}: below compute capability 10.0 FP8 "
                                    "attention runs with the 'delayed' recipe only"))
    head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
    if head_dim != FP8_ATTENTION_HEAD_DIM:
        found.append(Finding("all", f"head dim {head_dim}: Transformer Engine's FP8 attention "
                                    f"trains with head dim {FP8_ATTENTION_HEAD_DIM} only"))
    if (config.cross_attention_window is not None and config.num_sections > 1
            and before_blackwell):
        found.append(Finding("cross", f"cross_attention_window={config.cross_attention_window}"
                                      ": below compute capability 10.0 Transformer Engine has "
                                      "no FP8 attention with a sliding window"))
    return found


def warn(findings: List[Finding]) -> None:
    """Say each finding (Python's warnings show a given message once per process)."""
    for finding in findings:
        warnings.warn(finding.message(), FP8AttentionWarning, stacklevel=3)


def cross_attention_in_bf16(config, capability: Optional[Tuple[int, int]]) -> bool:
    """Whether the cross-attention's core attention must leave the FP8 region: FP8 attention
    is on, and a rule concerning the cross-attention alone applies."""
    return any(f.scope == "cross" for f in attention_findings(config, capability))
