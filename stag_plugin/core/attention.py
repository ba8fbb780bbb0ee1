"""Attention modules: StagFormer cross-attention, and the core attentions that compute it.

    SDPAttention                the local backend's core attention (torch SDPA, CPU and GPU)
    StagTEDotProductAttention   the Transformer Engine backend's core attention of the
                                cross-attention: TE's, with the causal mask and its own window
    StagCrossAttention          the cross-attention module (either backend fills its slots)

Layouts (Megatron's): hidden states [s, b, h]; per-head tensors [s, b, heads, head_dim].

The memory a section cross-attends to is the previous section's output shifted by one token:
slot 0 holds the learned null memory, slot j >= 1 holds m_{j-1} (section k-1's output at token
j-1). Query i may read slots max(0, i-w+1)..i, so it never sees the token it is computing. For
RoPE, slot j sits at position j and query i at position i+1: the relative distance from query i
to the slot holding m_t is i - t, the same as between tokens i and t; the null slot is one step
further than token 0.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import Attention, CrossAttentionSubmodules  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.utils import divide  # noqa: E402
from torch import Tensor

from stag_plugin.compat import megatron as compat
from stag_plugin.core import fp8


def cross_attention_mask(
    seq_len: int,
    window: Optional[int],
    device: torch.device,
    self_attention_mask: Optional[Tensor] = None,
) -> Tensor:
    """Mask between queries and shifted-memory slots, True = masked (Megatron's convention).

    Query i sees slots j with i - w < j <= i (all j <= i without a window). When the
    self-attention mask hides token t from query i (e.g. document boundaries), the slot holding
    m_t (j = t + 1) is hidden too; the null slot stays visible.

    Returns [1, 1, s, s], or [b, 1, s, s] when `self_attention_mask` is per-sample.
    """
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    masked = j > i
    if window is not None:
        masked = masked | (j <= i - window)
    masked = masked[None, None]
    if self_attention_mask is not None:
        hidden = self_attention_mask[..., :, :-1]  # query i vs token j-1, for slots j >= 1
        null_column = torch.zeros_like(self_attention_mask[..., :, :1])
        masked = masked | torch.cat([null_column, hidden], dim=-1)
    return masked


def bottom_right_causal_mask(queries: int, keys: int, device: torch.device) -> Tensor:
    """[1, 1, sq, sk], True = masked: the last `queries` of `keys` positions, causal (query i
    sees keys 0..i + sk - sq)."""
    i = torch.arange(queries, device=device)[:, None] + (keys - queries)
    return (torch.arange(keys, device=device)[None, :] > i)[None, None]


class SDPAttention(MegatronModule):
    """Core attention on torch.nn.functional.scaled_dot_product_attention (CPU and GPU).

    Drop-in for Megatron's DotProductAttention, whose buffers live on the current CUDA device.
    query [sq, b, np, hn], key/value [sk, b, ng, hn] (np / ng query heads per key/value group)
    -> context [sq, b, np * hn]. Masks: the tensor when one is given (True = masked), else the
    mask type's: `causal` (SDPA's is_causal), `causal_bottom_right` (the queries are the last
    sq of the sk positions), anything else none.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        head_dim = config.kv_channels
        self.softmax_scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor bias")
        sq, b, heads, head_dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        mask_type = attn_mask_type or self.attn_mask_type
        if attention_mask is None and mask_type == AttnMaskType.causal_bottom_right:
            if sq == key.shape[0]:
                mask_type = AttnMaskType.causal
            else:
                attention_mask = bottom_right_causal_mask(sq, key.shape[0], query.device)
        sdpa_mask = None if attention_mask is None else ~attention_mask  # True = attend
        # No tensor: SDPA's own causal mask, whose kernels skip the key blocks it hides.
        is_causal = attention_mask is None and mask_type == AttnMaskType.causal
        dropout_p = self.dropout_p if self.training else 0.0
        with compat.model_parallel_rng() if dropout_p > 0 else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != heads,
            )  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * head_dim)


def softmax_scale(config) -> float:
    """The attention scale Megatron's modules use: config.softmax_scale, else 1/sqrt(head dim)."""
    if config.softmax_scale is not None:
        return config.softmax_scale
    return config.kv_channels**-0.5


# ---------------------------------------------------------------------------- Transformer Engine


def te_window(window: Optional[int]) -> Optional[tuple]:
    """cross_attention_window w -> Transformer Engine's window_size (w - 1, 0): query i sees
    slots i-w+1..i. None (every earlier slot) stays None."""
    return None if window is None else (window - 1, 0)


def cross_mask_type(queries: int, slots: int) -> AttnMaskType:
    """TE mask of the cross-attention for `queries` queries over `slots` memory slots.

    Queries and slots at the same positions (training, prefill): `causal`, query i sees slots
    0..i. Fewer queries, the last ones (a step against a cache): `causal_bottom_right`, the
    diagonal aligned to the last slot (TE's top-left `causal` would hide all but slot 0)."""
    return AttnMaskType.causal if queries == slots else AttnMaskType.causal_bottom_right


def cross_core_config(config):
    """The config TE's core attention of the cross-attention reads. TEDotProductAttention takes
    its window from `config.window_size` (gated by `window_attn_skip_freq`), which StagFormer
    keeps None for self-attention; this copy carries the cross-attention's own window."""
    core = copy.copy(config)
    core.window_size = te_window(config.cross_attention_window)
    core.window_attn_skip_freq = None
    return core


class StagTEDotProductAttention:
    """The cross-attention's core attention in the Transformer Engine backend: megatron-core's
    TEDotProductAttention with mask `causal` (query i sees slots 0..i; `causal_bottom_right` for
    queries at the end of a cache, see `cross_mask_type`) and window (w - 1, 0) from
    `cross_attention_window`. The mask tensor StagCrossAttention passes is not needed.

    Under FP8 with FP8 attention on, it runs in FP8 where Transformer Engine has a kernel for it
    (stag_plugin.core.fp8); where it has none, this attention alone leaves the FP8 region
    (computed in bf16) while the projections around it stay FP8.

    A factory like Megatron's TENorm: the module it returns is an instance of a subclass of
    TEDotProductAttention, made when first built (without Transformer Engine, megatron-core's
    TEDotProductAttention is a stand-in that cannot be subclassed usefully)."""

    def __new__(cls, config, layer_number: int, attn_mask_type: AttnMaskType,
                attention_type: str, **kwargs):
        base = compat.transformer_engine_layers().TEDotProductAttention
        return _te_cross_attention_class(base)(config, layer_number, attention_type, **kwargs)


@functools.lru_cache(maxsize=None)
def _te_cross_attention_class(base: type) -> type:
    class TECrossCoreAttention(base):
        __doc__ = StagTEDotProductAttention.__doc__

        def __init__(self, config, layer_number: int, attention_type: str, **kwargs):
            super().__init__(config=cross_core_config(config), layer_number=layer_number,
                             attn_mask_type=AttnMaskType.causal, attention_type=attention_type,
                             **kwargs)
            self.bf16_in_fp8 = fp8.cross_attention_in_bf16(config, compat.cuda_capability())

        def forward(self, query: Tensor, key: Tensor, value: Tensor,
                    attention_mask: Optional[Tensor] = None,
                    attn_mask_type: Optional[AttnMaskType] = None, **kwargs) -> Tensor:
            """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn]."""
            mask_type = cross_mask_type(query.shape[0], key.shape[0])
            region = compat.fp8_disabled() if self.bf16_in_fp8 else contextlib.nullcontext()
            with region:
                return super().forward(query, key, value, None, attn_mask_type=mask_type,
                                       **kwargs)

    return TECrossCoreAttention


# ---------------------------------------------------------------------------- cross-attention


class StagCrossAttention(Attention):
    """Cross-attention from a section's hidden states to the previous section's shifted memory.

    Unlike Megatron's CrossAttention it supports grouped-query attention (num_query_groups
    key/value heads), applies RoPE at memory positions, and exposes the query and memory
    projections separately so a decoder can cache memory keys/values slot by slot.

    Slots: linear_q (with the pre-cross-attention norm fused in, where the backend fuses norms),
    linear_kv, core_attention, linear_proj. `attn_mask_type` says how the core attention masks:
    `arbitrary` (the local backend: the mask tensor from StagGPTModel when there is one) or
    `causal` (Transformer Engine: the mask is the kernel's own; the tensor is not passed on).
    Mask None means the causal mask over the slots, made by the kernel (query i sees slots
    0..i; with fewer queries than slots, the last queries): the mask of a model without a
    window or per-sample self-attention mask, which StagGPTModel then does not build.

    forward(hidden [sq, b, h], mask [*, 1, sq, sk] or None, memory [sk, b, h])
        -> (out [sq, b, h], bias)

    With `config.cross_attention_zero_init` linear_proj starts at zero (after Megatron's own
    initialisation has run, so the random draws of every other weight stay the same).
    """

    def __init__(
        self,
        config,
        submodules: CrossAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.arbitrary,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        name: Optional[str] = None,
    ):
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type="cross",
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
            **compat.name_kwargs(name),
        )
        bias = config.add_bias_linear or config.add_qkv_bias
        projection = dict(config=config, init_method=config.init_method, gather_output=False,
                          bias=bias, skip_bias_add=False, is_expert=False, tp_group=self.tp_group)
        self.linear_q = submodules.linear_q(config.hidden_size, self.query_projection_size,
                                            **projection, **compat.name_kwargs(name, ".linear_q"))
        self.linear_kv = submodules.linear_kv(config.hidden_size, 2 * self.kv_projection_size,
                                              **projection,
                                              **compat.name_kwargs(name, ".linear_kv"))
        self.rotary = compat.rotary_embedding(config) if config.cross_attention_rope else None
        self.groups_per_partition = divide(config.num_query_groups, self.world_size)
        if config.cross_attention_zero_init:
            zero_parameters(self.linear_proj)

    def project_query(self, hidden_states: Tensor, first_position: int) -> Tensor:
        """[sq, b, h] -> queries [sq, b, np, hn], RoPE from `first_position` on."""
        query, _ = self.linear_q(hidden_states)
        query = query.view(*query.shape[:-1], self.num_attention_heads_per_partition,
                           self.hidden_size_per_attention_head)
        return self._rope(query, first_position)

    def project_memory(self, memory: Tensor, first_slot: int) -> tuple[Tensor, Tensor]:
        """Memory slots [sk, b, h] -> keys, values [sk, b, ng, hn]; RoPE keys from `first_slot`."""
        mixed, _ = self.linear_kv(memory)
        mixed = mixed.view(*mixed.shape[:-1], self.groups_per_partition,
                           2 * self.hidden_size_per_attention_head)
        key, value = torch.chunk(mixed, 2, dim=-1)  # per group: [k | v]
        # (RoPE writes a new contiguous tensor; without it the view is copied)
        key = key.contiguous() if self.rotary is None else self._rope(key, first_slot)
        return key, value.contiguous()

    def _rope(self, t: Tensor, first_position: int) -> Tensor:
        if self.rotary is None:
            return t
        return compat.apply_rope(t, self.rotary(t.shape[0], offset=first_position), self.config)

    def get_query_key_value_tensors(self, hidden_states, key_value_states, output_gate=False,
                                    split_qkv=True):
        """Teacher-forced layout: query i at position i+1, memory slot j at position j."""
        if output_gate or not split_qkv:
            raise NotImplementedError("StagCrossAttention has no output gate or fused qkv")
        query = self.project_query(hidden_states, first_position=1)
        key, value = self.project_memory(key_value_states, first_slot=0)
        return query, key, value

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor],
        key_value_states: Optional[Tensor] = None,
        inference_context=None,
    ):
        if key_value_states is None:
            raise ValueError("StagCrossAttention needs the previous section's shifted memory "
                             "(TransformerBlock's `context` argument)")
        if inference_context is not None:
            raise NotImplementedError("Megatron inference contexts are not supported by "
                                      "StagCrossAttention; decode with stag_plugin's own engine")
        query, key, value = self.get_query_key_value_tensors(hidden_states, key_value_states)
        if self.attn_mask_type == AttnMaskType.causal:
            attention_mask = None
        mask_type = (self.attn_mask_type if attention_mask is not None
                     else cross_mask_type(query.shape[0], key.shape[0]))
        if self.checkpoint_core_attention and self.training:
            context = self._checkpointed_attention_forward(query, key, value, attention_mask,
                                                           attn_mask_type=mask_type)
        else:
            context = self.core_attention(query, key, value, attention_mask,
                                          attn_mask_type=mask_type)
        return self.linear_proj(context)  # (output [sq, b, h], bias)


def zero_parameters(module: torch.nn.Module) -> None:
    """Set every parameter of `module` to zero (in place)."""
    with torch.no_grad():
        for param in module.parameters():
            param.zero_()
