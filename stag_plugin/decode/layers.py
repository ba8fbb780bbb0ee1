"""The layer math of staggered decoding on a Megatron StagGPTModel's own modules, shared by both
engines: StagDecoder's prefill and mode "sequential" (engine.py), and PipelineDecoder
(pipeline.py). StagDecoder's modes "batched" and "recurrent" step through fused.py instead,
which computes the same layers in tensor ops on stacked weights; the caches are this file's.

Layouts: hidden states [n, B, h] (Megatron's sequence-first); per-head tensors from Megatron's
projections [n, B, heads, hd]; cache entries [B, groups, positions, hd] (stag_plugin.reference's
KVCache). Positions are explicit: token t sits at position t in self-attention; in
cross-attention its query sits at t + 1 and memory slot j at j (slot 0 = the learned null memory,
slot j = section k-1's output at token j-1), as in stag_plugin.core.attention.

Every layer is computed with the model's own submodules (norms, linear_qkv, linear_proj,
StagCrossAttention.project_query / project_memory, mlp, final_layernorm, embedding,
output_layer), so tensor-parallel shards decode as they train: row-parallel projections
all-reduce inside Megatron's modules. Either backend: with Transformer Engine layers the norm
slots are IdentityOp and each norm runs inside the linear layer after it; attention over the
caches is torch's SDPA in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from stag_plugin.compat import megatron as compat
from stag_plugin.core.attention import softmax_scale
from stag_plugin.reference.kv_cache import KVCache


class Caches:
    """The self- and cross-attention caches of the sections one engine runs.

    self_kv[i]: layer i's self K/V for every local section, [len(sections) * B, g, max_len, hd]
    cross_kv[i]: layer i's cross K/V for the local sections k > 0, [.. * B, g, C, hd] with
    C = the cross-attention window w (a ring) or max_len. Rows are section-major.

    `spare`: a ring of w + 1 entries, so that a step writing memory slot t + 1 never overwrites
    one it reads (slots t-w+1..t): a fixed-shape step run twice then leaves the caches as run
    once (stag_plugin.reference.step_runner); its reads mask the extra entry."""

    def __init__(self, sections: Sequence[int], layers: int, max_batch_size: int, groups: int,
                 head_dim: int, max_len: int, window: Optional[int], dtype, device,
                 spare: bool = False):
        self.sections = tuple(sections)
        self._self_index = {k: j for j, k in enumerate(self.sections)}
        self._cross_index = {k: j for j, k in enumerate(k for k in self.sections if k > 0)}
        self.groups, self.head_dim = groups, head_dim
        self.cross_len = max_len if window is None else min(window + spare, max_len)
        rows = max_batch_size
        new = lambda count, size: KVCache(count * rows, groups, size, head_dim, max_len, dtype,
                                          device)
        self.self_kv = [new(len(self.sections), max_len) for _ in range(layers)]
        self.cross_kv = ([new(len(self._cross_index), self.cross_len) for _ in range(layers)]
                         if self._cross_index else [])
        self.batch = 0  # sequences of the current prefill

    def self_rows(self, k: int) -> slice:
        j = self._self_index[k]
        return slice(j * self.batch, (j + 1) * self.batch)

    def cross_rows(self, k: int) -> slice:
        j = self._cross_index[k]
        return slice(j * self.batch, (j + 1) * self.batch)

    def nbytes(self) -> dict:
        return {"self": sum(c.nbytes() for c in self.self_kv),
                "cross": sum(c.nbytes() for c in self.cross_kv)}


@dataclass(frozen=True)
class LayerMath:
    """What the layer functions need besides the layer: the config, RoPE and softmax scale."""

    config: object
    rotary: Optional[torch.nn.Module]  # the model's RoPE module, None without RoPE
    softmax_scale: float

    @classmethod
    def of(cls, model) -> "LayerMath":
        return cls(model.config, getattr(model, "rotary_pos_emb", None),
                   softmax_scale(model.config))


# ---------------------------------------------------------------------------- a section


def run_section(math: LayerMath, block, k: int, x: Tensor, first: int, caches: Caches,
                memory: Optional[list] = None) -> Tensor:
    """Section k (its module `block`) over tokens x [n, b, h] at positions first.. -> [n, b, h].

    Cross-attention (k > 0) reads `memory` (prefill: per layer the keys, values and mask over
    the prompt's slots) or, in a step, the cross caches."""
    for i, layer in enumerate(block.layers):
        x = x + self_attention(math, layer, x, caches.self_kv[i], caches.self_rows(k), first)
        if k > 0:
            if memory is None:
                x = x + cached_cross_attention(math, layer, x, caches.cross_kv[i],
                                               caches.cross_rows(k), first)
            else:
                x = x + prompt_cross_attention(math, layer, x, *memory[i])
        x = x + mlp(layer, x)
    return x if block.final_layernorm is None else block.final_layernorm(x)


def self_attention(math: LayerMath, layer, x: Tensor, cache: KVCache, rows: slice,
                   first: int) -> Tensor:
    """Causal self-attention of x [n, B, h] at positions first.. through `cache`."""
    n = x.shape[0]
    attention = layer.self_attention
    query, key, value = attention.get_query_key_value_tensors(layer.input_layernorm(x))
    if math.rotary is not None:  # query, key [n, B, heads|groups, hd]
        freqs = math.rotary(n, offset=first)
        query = compat.apply_rope(query, freqs, math.config)
        key = compat.apply_rope(key, freqs, math.config)
    cache.update(rows, first, key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3))
    keys, values = cache.read(rows, first + n)  # positions 0..first+n-1
    visible = None
    if n > 1:  # query j (position first + j) sees positions <= first + j
        visible = (torch.arange(first + n, device=x.device)[None, :]
                   <= torch.arange(first, first + n, device=x.device)[:, None])
    return _with_bias(attention.linear_proj(attend(math, query, keys, values, visible)))


def cached_cross_attention(math: LayerMath, layer, x: Tensor, cache: KVCache, rows: slice,
                           t: int) -> Tensor:
    """x [1, B, h] of token t: query at position t + 1 over the cached slots (<= t)."""
    attention = layer.cross_attention
    query = attention.project_query(layer.pre_cross_attn_layernorm(x), first_position=t + 1)
    keys, values = cache.read(rows, min(t + 1, cache.size))  # the window's slots, as a ring
    return _with_bias(attention.linear_proj(attend(math, query, keys, values, None)))


def prompt_cross_attention(math: LayerMath, layer, x: Tensor, keys: Tensor, values: Tensor,
                           mask: Tensor) -> Tensor:
    """Prefill: x [s, b, h] (queries at positions 1..s) over slots 0..s-1 under `mask`
    ([1, 1, s, s], True = hidden)."""
    attention = layer.cross_attention
    query = attention.project_query(layer.pre_cross_attn_layernorm(x), first_position=1)
    return _with_bias(attention.linear_proj(attend(math, query, keys, values, ~mask[0, 0])))


def mlp(layer, x: Tensor) -> Tensor:
    return _with_bias(layer.mlp(layer.pre_mlp_layernorm(x)))


def attend(math: LayerMath, query: Tensor, keys: Tensor, values: Tensor,
           visible: Optional[Tensor]) -> Tensor:
    """query [n, B, heads, hd], keys/values [B, groups, S, hd], visible [n, S] (True =
    attend) or None (all) -> context [n, B, heads * hd]."""
    n, batch, heads, hd = query.shape
    out = F.scaled_dot_product_attention(
        query.permute(1, 2, 0, 3), keys, values, attn_mask=visible,
        scale=math.softmax_scale, enable_gqa=keys.shape[1] != heads)  # [B, heads, n, hd]
    return out.permute(2, 0, 1, 3).reshape(n, batch, heads * hd)


# ---------------------------------------------------------------------------- memory slots


def prompt_memory(block, k: int, null: Tensor, previous: Tensor, mask: Tensor,
                  caches: Caches) -> list:
    """Section k's memory over the prompt from section k-1's outputs previous [s, b, h]: per
    layer (keys, values [b, g, s, hd] of slots 0..s-1, mask). Slots 0..s (slot s: the last
    prompt token's output, read by the first step) go to the cross caches."""
    length, batch = previous.shape[0], previous.shape[1]
    null = null.to(previous.dtype).view(1, 1, -1).expand(1, batch, -1)
    slots = torch.cat([null, previous], dim=0)  # [s+1, b, h]: slot j = previous[j-1]
    memory = []
    for i, layer in enumerate(block.layers):
        key, value = layer.cross_attention.project_memory(slots, first_slot=0)
        key, value = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)  # [b, g, s+1, hd]
        caches.cross_kv[i].update(caches.cross_rows(k), 0, key, value)
        memory.append((key[:, :, :length], value[:, :, :length], mask))
    return memory


def append_memory(block, k: int, source: Tensor, slot: int, caches: Caches) -> None:
    """Slot `slot` of section k's cross caches = source [1, b, h] (section k-1's output)."""
    for i, layer in enumerate(block.layers):
        key, value = layer.cross_attention.project_memory(source, first_slot=slot)
        caches.cross_kv[i].update(caches.cross_rows(k), slot, key.permute(1, 2, 0, 3),
                                  value.permute(1, 2, 0, 3))


# ---------------------------------------------------------------------------- ends


def embed(model, input_ids: Tensor, first: int) -> Tensor:
    """ids [b, n] at positions first.. -> [n, b, h]."""
    batch, n = input_ids.shape
    positions = torch.arange(first, first + n, device=input_ids.device)
    return model.embedding(input_ids=input_ids,
                           position_ids=positions.unsqueeze(0).expand(batch, n))


def logits(model, outs: List[Tensor], combine: bool) -> Tensor:
    """Section outputs [n, b, h] -> logits [n, b, vocab]: the learned combination of all of
    them when `combine` (output_combination "learned"), else the last one's. Under tensor
    parallelism each rank's vocabulary slice is gathered to the full vocabulary."""
    if combine:
        hidden = sum(model.combination_weights[k].to(out.dtype) * out
                     for k, out in enumerate(outs))
    else:
        hidden = outs[-1]
    out, _ = model.output_layer(hidden, weight=model._output_weight(),
                                runtime_gather_output=True)
    return out


def weight_and_bias(linear) -> List[Tensor]:
    """A Megatron linear layer's weight and (if it has one) bias. (A Transformer Engine layer
    without bias holds an empty tensor as its `bias`.)"""
    bias = getattr(linear, "bias", None)
    return [linear.weight] + ([bias] if isinstance(bias, Tensor) and bias.numel() else [])


def _with_bias(output_and_bias) -> Tensor:
    """Megatron modules return (output, bias or None); bias-dropout-add in eval adds both."""
    output, bias = output_and_bias
    return output if bias is None else output + bias
