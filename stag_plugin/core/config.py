"""StagFormerConfig: Megatron's TransformerConfig plus every StagFormer option, validated.

`num_layers` is the depth a token passes through: `num_sections * layers_per_section`. With shared
weights the sections reuse one stack of `layers_per_section` layers, so the unique parameters are
those of a `layers_per_section`-layer model plus the cross-attention sublayers.

`transformer_impl` picks the layers (stag_plugin.core.specs): "local" (Megatron's local layers,
torch norms and SDPA attention; the default here) or "transformer_engine" (Megatron's
Transformer Engine layers, FP8 through Megatron's `fp8*` fields; stag_plugin.core.fp8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from stag_plugin.compat import megatron as compat
from stag_plugin.compat.megatron import import_megatron_core
from stag_plugin.core import fp8
from stag_plugin.errors import StagError

import_megatron_core()
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

WEIGHT_SHARING = ("separate", "shared")
OUTPUT_COMBINATIONS = ("last", "learned")
POSITION_EMBEDDINGS = ("rope", "learned_absolute", "none")
BACKENDS = ("local", "transformer_engine")  # transformer_impl values StagGPTModel builds


@dataclass
class StagFormerConfig(TransformerConfig):
    """Configuration of a StagFormer (arXiv 2501.15665) on Megatron-Core.

    Fields added to TransformerConfig (each also documented where it is declared):
        num_sections: p, the number of time-staggered sections (1 = a plain GPT).
        weight_sharing: "separate" or "shared" layer weights across sections.
        cross_attention_window: None (all earlier memory) or w >= 1 memory slots.
        output_combination: "last" section feeds the head, or a "learned" sum of all sections.
        cross_attention_rope: RoPE on cross-attention queries and memory keys.
        memory_norm: memory = a section's normalised output, or its output before any norm.
        cross_attention_zero_init: cross-attention output projections start at zero.
        position_embedding_type: "rope", "learned_absolute" or "none" (token positions).
        rotary_base, rotary_percent: RoPE base period and fraction of head dims rotated.
        transformer_impl: "local" (default) or "transformer_engine" layers.
        fp8_attention_fallback: "bf16" or "error" where FP8 attention has no TE kernel.
    """

    num_sections: int = 2
    """p: number of sections. Section k (k >= 2) cross-attends to section k-1's output up to the
    previous token. 1 means a plain GPT (no cross-attention): the baseline."""

    weight_sharing: str = "separate"
    """"separate": every section has its own layers. "shared": all sections run the same
    `layers_per_section` layers; sections 2..p also share one set of cross-attention sublayers."""

    cross_attention_window: Optional[int] = None
    """None: query i sees every memory slot 0..i. An int w >= 1: only the last w slots
    max(0, i-w+1)..i, so the decode-time cross cache holds w entries."""

    output_combination: str = "last"
    """"last": the head reads the last section's normalised output. "learned": it reads
    sum_k alpha_k * out_k with alpha initialised to (0, ..., 0, 1)."""

    cross_attention_rope: bool = True
    """Apply RoPE in cross-attention: queries at their position, memory slot j at the position of
    the token it holds (the null slot one position before the first token). Needs
    position_embedding_type="rope". False gives position-free cross-attention (the fallback)."""

    memory_norm: bool = False
    """False: a section before the last ends without a norm, and its memory is that raw
    residual stream; only the last section ends in a final norm (the head reads it). True:
    every section ends in its own final norm, and the memory is the normalised output. With
    the "learned" output combination the earlier sections' terms are these same outputs."""

    cross_attention_zero_init: bool = False
    """True: start every cross-attention output projection (weight and bias) at zero, so that
    at initialisation each section computes what it would without the sections before it.
    False: Megatron's output-layer initialisation, like the self-attention's. Initialisation
    only: a checkpoint computes the same either way."""

    position_embedding_type: str = "rope"
    """Token position encoding: "rope", "learned_absolute" or "none"."""

    rotary_base: int = 10000
    """RoPE base period."""

    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that RoPE rotates (0 < rotary_percent <= 1)."""

    transformer_impl: str = "local"
    """Which layers fill the layer slots: "local" (Megatron's local linear layers, torch norms,
    SDPA attention; CPU and GPU) or "transformer_engine" (Megatron's Transformer Engine layers,
    needs TE and a GPU; FP8 with `fp8`). Megatron's own default is "transformer_engine";
    Megatron-LM's parsed args set it explicitly."""

    fp8_attention_fallback: str = "bf16"
    """When FP8 attention is asked for (`fp8_dot_product_attention`) but Transformer Engine has
    no FP8 kernel for an attention of this model on this GPU (stag_plugin.core.fp8): "bf16" warns
    once and runs that attention in bf16; "error" refuses the config."""

    use_cpu_initialization: bool = field(default_factory=lambda: not torch.cuda.is_available())
    """Initialise weights on the CPU. Defaults to True when no CUDA device is visible, since
    Megatron's GPU initialisation allocates on `torch.cuda.current_device()`."""

    def __post_init__(self):
        _check_sections(self)
        _check_stag_options(self)
        _check_heads(self)
        _check_unsupported(self)
        _check_backend(self)
        if self.pipeline_model_parallel_size > 1 and self.pipeline_dtype is None:
            self.pipeline_dtype = self.params_dtype  # dtype of the tensors between stages
        super().__post_init__()
        _resolve_fp8_attention(self)

    @property
    def layers_per_section(self) -> int:
        """Layers in each section: num_layers // num_sections."""
        return self.num_layers // self.num_sections


class ConfigError(StagError):
    """A StagFormerConfig field with a value the model cannot take; `field` names it."""

    def __init__(self, field_name: str, problem: str, fix: str):
        super().__init__(problem, fix)
        self.field = field_name


def _fail(field_name: str, value, problem: str, fix: str):
    raise ConfigError(field_name, f"StagFormerConfig.{field_name}={value!r}: {problem}", fix)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sections(cfg: StagFormerConfig) -> None:
    if not _is_int(cfg.num_sections) or cfg.num_sections < 1:
        _fail("num_sections", cfg.num_sections, "must be an integer >= 1",
              "use 1 for a plain GPT, 2 or more for a StagFormer")
    if not _is_int(cfg.num_layers) or cfg.num_layers < cfg.num_sections:
        _fail("num_layers", cfg.num_layers,
              f"must be an integer >= num_sections ({cfg.num_sections})",
              "give every section at least one layer")
    if cfg.num_layers % cfg.num_sections:
        _fail("num_layers", cfg.num_layers,
              f"is not divisible by num_sections={cfg.num_sections}; every section needs the "
              "same number of layers",
              f"use a multiple of {cfg.num_sections}, e.g. "
              f"{cfg.num_sections * max(1, round(cfg.num_layers / cfg.num_sections))}")


def _check_stag_options(cfg: StagFormerConfig) -> None:
    if cfg.weight_sharing not in WEIGHT_SHARING:
        _fail("weight_sharing", cfg.weight_sharing, "unknown weight sharing",
              f"use one of {WEIGHT_SHARING}")
    if cfg.output_combination not in OUTPUT_COMBINATIONS:
        _fail("output_combination", cfg.output_combination, "unknown output combination",
              f"use one of {OUTPUT_COMBINATIONS}")
    window = cfg.cross_attention_window
    if window is not None and (not _is_int(window) or window < 1):
        _fail("cross_attention_window", window, "must be None (full memory) or an integer >= 1",
              "use None, or w >= 1 to see the last w memory slots")
    if cfg.position_embedding_type not in POSITION_EMBEDDINGS:
        _fail("position_embedding_type", cfg.position_embedding_type, "unknown position embedding",
              f"use one of {POSITION_EMBEDDINGS}")
    for name in ("cross_attention_rope", "memory_norm", "cross_attention_zero_init"):
        if not isinstance(getattr(cfg, name), bool):
            _fail(name, getattr(cfg, name), "must be a bool", "use True/False")
    if cfg.cross_attention_rope and cfg.position_embedding_type != "rope":
        _fail("cross_attention_rope", True,
              f"needs position_embedding_type='rope' (got {cfg.position_embedding_type!r})",
              "set cross_attention_rope=False, or position_embedding_type='rope'")
    if not 0.0 < cfg.rotary_percent <= 1.0:
        _fail("rotary_percent", cfg.rotary_percent, "must be in (0, 1]", "use e.g. 1.0 or 0.5")


def _check_heads(cfg: StagFormerConfig) -> None:
    heads, tp = cfg.num_attention_heads, cfg.tensor_model_parallel_size
    if not _is_int(heads) or heads < 1:
        _fail("num_attention_heads", heads, "must be an integer >= 1", "set the head count")
    if heads % tp:
        _fail("num_attention_heads", heads,
              f"is not divisible by tensor_model_parallel_size={tp}; each rank holds "
              "num_attention_heads / tp heads",
              "use a tensor-parallel size that divides the head count")
    if cfg.kv_channels is None and cfg.hidden_size % heads:
        _fail("hidden_size", cfg.hidden_size,
              f"is not divisible by num_attention_heads={heads}",
              "choose hidden_size = heads * head_dim, or set kv_channels explicitly")
    groups = heads if cfg.num_query_groups is None else cfg.num_query_groups
    if not _is_int(groups) or groups < 1 or heads % groups:
        _fail("num_query_groups", cfg.num_query_groups,
              f"must divide num_attention_heads={heads} (grouped-query attention shares each "
              "key/value head among num_attention_heads / num_query_groups query heads)",
              "use a divisor of the head count, or None for multi-head attention")
    if groups % tp:
        _fail("num_query_groups", cfg.num_query_groups,
              f"is not divisible by tensor_model_parallel_size={tp}; each rank must hold "
              "whole key/value groups",
              "use at least tp query groups, a multiple of tp")


def _check_unsupported(cfg: StagFormerConfig) -> None:
    if cfg.sequence_parallel and cfg.tensor_model_parallel_size == 1:
        _fail("sequence_parallel", True, "needs tensor parallelism (it splits activations over "
              "the tensor-parallel ranks)", "set sequence_parallel=False or "
              "tensor_model_parallel_size > 1")
    if not _is_int(cfg.pipeline_model_parallel_size) or cfg.pipeline_model_parallel_size < 1:
        _fail("pipeline_model_parallel_size", cfg.pipeline_model_parallel_size,
              "must be an integer >= 1", "use 1, or a divisor of num_layers")
    if cfg.num_layers % cfg.pipeline_model_parallel_size:
        _fail("pipeline_model_parallel_size", cfg.pipeline_model_parallel_size,
              f"does not divide num_layers={cfg.num_layers} ({cfg.num_sections} sections x "
              f"{cfg.layers_per_section} layers): pipeline stage boundaries must fall on layer "
              "boundaries",
              f"use a divisor of {cfg.num_layers}, e.g. {cfg.num_sections} for one section per "
              "stage")
    if cfg.virtual_pipeline_model_parallel_size is not None:
        _fail("virtual_pipeline_model_parallel_size", cfg.virtual_pipeline_model_parallel_size,
              "StagGPTModel runs Megatron's non-interleaved 1F1B schedule; virtual "
              "(interleaved) pipeline stages are not supported",
              "leave it None (no --num-layers-per-virtual-pipeline-stage)")
    if cfg.context_parallel_size != 1:
        _fail("context_parallel_size", cfg.context_parallel_size,
              "context parallelism is not supported by StagGPTModel", "set it to 1")
    if cfg.num_moe_experts is not None:
        _fail("num_moe_experts", cfg.num_moe_experts, "MoE layers are not supported yet",
              "set num_moe_experts=None")
    if cfg.multi_latent_attention:
        _fail("multi_latent_attention", True, "MLA is not supported", "set it to False")
    if cfg.window_size is not None:
        _fail("window_size", cfg.window_size,
              "sliding-window self-attention is not supported (the decoders' self-attention "
              "caches hold every position)",
              "set window_size=None (the cross-attention window is cross_attention_window)")


def _check_backend(cfg: StagFormerConfig) -> None:
    if cfg.transformer_impl not in BACKENDS:
        _fail("transformer_impl", cfg.transformer_impl, "StagGPTModel builds no such layers",
              f"use one of {BACKENDS}")
    if cfg.fp8 and cfg.transformer_impl != "transformer_engine":
        _fail("fp8", cfg.fp8, "FP8 runs through Transformer Engine's layers, and "
              f"transformer_impl={cfg.transformer_impl!r}",
              "set transformer_impl='transformer_engine' (--transformer-impl transformer_engine)")
    if cfg.fp8_attention_fallback not in fp8.FALLBACKS:
        _fail("fp8_attention_fallback", cfg.fp8_attention_fallback, "unknown fallback",
              f"use one of {fp8.FALLBACKS}")
    if cfg.first_last_layers_bf16 and (cfg.num_sections > 1
                                       or cfg.pipeline_model_parallel_size > 1):
        _fail("first_last_layers_bf16", True, "Megatron picks the bf16 layers by their number "
              "in one TransformerBlock, and StagGPTModel numbers the layers of each section "
              "(and pipeline stage) from 1", "drop it (--first-last-layers-bf16); it works for a "
              "one-section model on one pipeline stage")


def _resolve_fp8_attention(cfg: StagFormerConfig) -> None:
    """FP8 attention where Transformer Engine has a kernel for it (stag_plugin.core.fp8):
    refused, or kept in bf16 with one warning."""
    found = fp8.attention_findings(
        cfg, compat.cuda_capability() if fp8.wants_fp8_attention(cfg) else None)
    if not found:
        return
    if cfg.fp8_attention_fallback == "error":
        _fail("fp8_dot_product_attention", True,
              "Transformer Engine has no FP8 attention kernel for this model here: "
              + "; ".join(f.reason for f in found),
              "drop FP8 attention (--fp8-dot-product-attention, --fp8-multi-head-attention), "
              "or set fp8_attention_fallback='bf16' (--stag-fp8-attention-fallback bf16) to run "
              "that attention in bf16")
    fp8.warn(found)
    if any(f.scope == "all" for f in found):
        cfg.fp8_dot_product_attention = False
        cfg.fp8_multi_head_attention = False
