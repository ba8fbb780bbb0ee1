"""The fused decode step: a StagGPTModel's layer weights as stacked plain tensors, and one token
of several sections run through every layer as one batched computation (gpt-fast style).

    StackedWeights.of(model, max_len)   per layer, the tensors of every section stacked once:
                                        [P, ...] with P = p (separate weights) or P = 1 (shared
                                        weights, and p = 1), plus the final norms and RoPE tables
    run_layers(w, x [S, b, h], ...)     S section passes of one token through every layer
    finish(w, x [S, b, h])              -> the outputs of sections p-S+1..p [S, b, h]
    append_memory(w, sources [T, b, h], ...)   memory slot t + 1 of T sections
    embed, logits                       the model's own embedding and LM head

One linear layer of the S passes is one kernel: a batched matmul over the leading section dim
(P = S weights) or one matmul over S * b rows (P = 1: one weight read for every section).
Attention is one SDPA call over S * b rows, each row reading its own cache row (rows are
section-major, as stag_plugin.decode.layers.Caches lays them out). Cross-attention runs on the
passes of sections k > 0 only.

The math is Megatron's, on its tensors: LayerNorm / RMSNorm, the fused qkv projection with its
per-query-group layout [g, (heads/g + 2) * d] (SelfAttention.get_query_key_value_tensors), q/k
norms, RoPE through compat.apply_rope (the cross-attention query and the memory slot of token t
at position t + 1), the MLP activation as Megatron's MLP computes it in eval (gated linear
units, the tanh GELU of its fused kernels), biases where the layers have them. What it does not
compute (check_fusable: e.g. zero-centred gamma, FP8 parameters) is refused, naming mode
'sequential', which runs the model's own modules.
Transformer Engine layers fuse the pre-norms into the linear layer after them; their weights are
read from it (`layer_norm_weight`, `layer_norm_bias`). Under tensor parallelism each rank stacks
its own shards and all-reduces the row-parallel outputs (attention and MLP output projections)
over the tensor-parallel group before adding their bias.

Positions (`At`): an eager step knows its position t as an int and reads the filled cache
entries only; a fixed-shape step (torch.compile, CUDA graphs) reads whole caches under a mask
built from the position tensor, so no shape depends on t. Both write in place at the position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from stag_plugin.compat import megatron as compat
from stag_plugin.core.attention import softmax_scale
from stag_plugin.errors import StagError
from stag_plugin.reference.kv_cache import KVCache

FIX = "decode with mode='sequential' (the model's own modules)"


@dataclass(frozen=True)
class At:
    """Where a step runs: `index` [1] int64, the position as a tensor (RoPE, learned positions,
    cache writes, masks), and `t`, the same as an int in an eager step (reads only the filled
    cache entries) or None in a fixed-shape step (reads whole caches under a mask)."""

    index: Tensor
    t: Optional[int] = None


# ---------------------------------------------------------------------------- stacked weights


@dataclass(frozen=True)
class Norm:
    """LayerNorm / RMSNorm of P sections: weight, bias [P, d] (bias None: RMSNorm)."""

    weight: Tensor
    bias: Optional[Tensor]


@dataclass(frozen=True)
class Linear:
    """A linear layer of P sections: weight [P, out, in], bias [P, out] or None. `reduce`: a
    row-parallel layer (its output is all-reduced over the tensor-parallel group, then biased)."""

    weight: Tensor
    bias: Optional[Tensor]
    reduce: bool = False


@dataclass(frozen=True)
class Cross:
    """The cross-attention sublayers of P' sections (P' = p - 1, or 1 with shared weights)."""

    norm: Norm
    query: Linear  # [P', heads * d, h]
    memory: Linear  # [P', g * 2 * d, h]: per group [k | v]
    proj: Linear


@dataclass(frozen=True)
class Layer:
    """Layer i of every weight slot (P of them; P' for the cross-attention)."""

    input_norm: Norm
    qkv: Linear  # [P, g * (heads / g + 2) * d, h]: per group [q.. | k | v]
    q_norm: Optional[Norm]  # [P, d] (qk_layernorm)
    k_norm: Optional[Norm]
    proj: Linear
    cross: Optional[Cross]  # None when p = 1
    mlp_norm: Norm
    fc1: Linear
    fc2: Linear


@dataclass(frozen=True)
class Dims:
    """What the math needs besides weights (heads and groups of this tensor-parallel rank)."""

    heads: int
    groups: int
    head_dim: int
    eps: float
    rms: bool
    scale: float  # softmax scale
    window: Optional[int]  # cross_attention_window
    activation: Callable[[Tensor], Tensor]
    config: object  # for compat.apply_rope
    tp_group: object  # None without tensor parallelism


@dataclass(frozen=True)
class StackedWeights:
    """Everything the fused step reads besides the caches and the model's embedding and head."""

    layers: List[Layer]
    final_norm: Norm  # of every section (memory_norm), else of the last section alone
    memory_norm: bool
    dims: Dims
    self_freqs: Optional[Tensor]  # RoPE of positions 0..max_len: [max_len + 1, 1, 1, d_rot]
    cross_freqs: Optional[Tensor]  # the same for cross-attention (cross_attention_rope)

    @classmethod
    def of(cls, model, max_len: int) -> "StackedWeights":
        """Stack `model`'s layer weights once. Separate weights: each layer's p tensors become
        one [p, ...] tensor and the model's parameters become views of its slices (the weights
        are held once; in-place updates such as load_state_dict still reach the decoder, but a
        buffer that held the parameters before, e.g. Megatron DDP's, no longer does: build the
        decoder on a model that is done training). Shared weights and p = 1: views [1, ...] of
        the one copy."""
        config = model.config
        check_fusable(config)
        single = config.weight_sharing == "shared" or config.num_sections == 1
        blocks = list(model.sections)[:1] if single else list(model.sections)
        cross_blocks = list(model.sections)[1:2] if single else list(model.sections)[1:]
        layers = [_layer([b.layers[i] for b in blocks], [b.layers[i] for b in cross_blocks])
                  for i in range(config.layers_per_section)]
        normed = [b for b in model.sections if b.final_layernorm is not None]
        final = _stack_norm([(b.final_layernorm, None) for b in normed[-len(blocks):]])
        return cls(layers, final, config.memory_norm, _dims(model),
                   *_rope_tables(model, max_len))


def check_fusable(config) -> None:
    """Refuse what the fused step does not compute as the model's modules do."""
    bad = [name for name in ("fp8_param", "attention_output_gate", "qk_l2_norm",
                             "use_te_activation_func", "fp32_residual_connection",
                             "layernorm_zero_centered_gamma")
           if getattr(config, name, False)]
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        bad.append(f"softmax_type={config.softmax_type!r}")
    if config.normalization not in ("LayerNorm", "RMSNorm"):
        bad.append(f"normalization={config.normalization!r}")
    if bad:
        raise StagError(f"the fused decode step (modes 'batched', 'recurrent') does not "
                        f"implement {bad}", FIX)


def stack(tensors: Sequence[Tensor]) -> Tensor:
    """[P, ...] from P same-shaped tensors, held once: one tensor becomes a view [1, ...];
    several are stacked and each original then holds a view of its slice."""
    if all(t is tensors[0] for t in tensors):
        return tensors[0].detach().unsqueeze(0)
    stacked = torch.stack([t.detach() for t in tensors])
    for k, t in enumerate(tensors):
        t.data = stacked[k]
    return stacked


def _layer(layers: list, cross_layers: list) -> Layer:
    """One layer from the TransformerLayer of each weight slot (and of each cross slot)."""
    attention = [layer.self_attention for layer in layers]
    mlp = [layer.mlp for layer in layers]
    qk_norms = layers[0].config.qk_layernorm
    return Layer(
        input_norm=_stack_norm([(x.input_layernorm, a.linear_qkv)
                                for x, a in zip(layers, attention)]),
        qkv=_stack_linear([a.linear_qkv for a in attention]),
        q_norm=_stack_norm([(a.q_layernorm, None) for a in attention]) if qk_norms else None,
        k_norm=_stack_norm([(a.k_layernorm, None) for a in attention]) if qk_norms else None,
        proj=_stack_linear([a.linear_proj for a in attention], reduce=True),
        cross=_cross(cross_layers) if cross_layers else None,
        mlp_norm=_stack_norm([(x.pre_mlp_layernorm, m.linear_fc1) for x, m in zip(layers, mlp)]),
        fc1=_stack_linear([m.linear_fc1 for m in mlp]),
        fc2=_stack_linear([m.linear_fc2 for m in mlp], reduce=True),
    )


def _cross(layers: list) -> Cross:
    attention = [layer.cross_attention for layer in layers]
    return Cross(
        norm=_stack_norm([(x.pre_cross_attn_layernorm, a.linear_q)
                          for x, a in zip(layers, attention)]),
        query=_stack_linear([a.linear_q for a in attention]),
        memory=_stack_linear([a.linear_kv for a in attention]),
        proj=_stack_linear([a.linear_proj for a in attention], reduce=True),
    )


def _stack_norm(sources: list) -> Norm:
    """sources: (norm module, linear layer after it) per slot; a Transformer Engine linear layer
    with the norm fused in holds it as layer_norm_weight / layer_norm_bias."""
    found = [_norm_tensors(norm, linear) for norm, linear in sources]
    bias = None if found[0][1] is None else stack([b for _, b in found])
    return Norm(stack([w for w, _ in found]), bias)


def _norm_tensors(norm, linear) -> Tuple[Tensor, Optional[Tensor]]:
    if linear is not None and isinstance(getattr(linear, "layer_norm_weight", None), Tensor):
        return linear.layer_norm_weight, _present(getattr(linear, "layer_norm_bias", None))
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, Tensor):
        raise StagError(f"the fused decode step cannot read the weights of a "
                        f"{type(norm).__name__} norm slot", FIX)
    return weight, _present(getattr(norm, "bias", None))


def _stack_linear(linears: list, reduce: bool = False) -> Linear:
    biases = [_present(getattr(linear, "bias", None)) for linear in linears]
    bias = None if biases[0] is None else stack(biases)
    return Linear(stack([linear.weight for linear in linears]), bias, reduce)


def _present(bias) -> Optional[Tensor]:
    """A bias tensor, or None (a Transformer Engine layer without bias holds an empty one)."""
    return bias if isinstance(bias, Tensor) and bias.numel() else None


def _dims(model) -> Dims:
    config = model.config
    attention = model.sections[0].layers[0].self_attention
    tp_group = None
    if config.tensor_model_parallel_size > 1:
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
    return Dims(attention.num_attention_heads_per_partition,
                attention.num_query_groups_per_partition,
                attention.hidden_size_per_attention_head, config.layernorm_epsilon,
                config.normalization == "RMSNorm",
                softmax_scale(config), config.cross_attention_window, activation(config),
                config, tp_group)


def _rope_tables(model, max_len: int) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """RoPE frequencies of positions 0..max_len for self- and cross-attention (None without)."""
    rotary = getattr(model, "rotary_pos_emb", None)
    self_freqs = None if rotary is None else rotary(max_len + 1)  # [max_len + 1, 1, 1, d]
    cross_freqs = None
    if model.config.num_sections > 1:
        cross_rotary = model.sections[1].layers[0].cross_attention.rotary
        cross_freqs = None if cross_rotary is None else cross_rotary(max_len + 1)
    return self_freqs, cross_freqs


def activation(config) -> Callable[[Tensor], Tensor]:
    """The MLP activation of fc1's output (bias added), as Megatron's MLP computes it in eval:
    config.activation_func (GELU in its tanh approximation where Megatron fuses bias and
    activation), gated with gated_linear_unit: act(first half) * (second half + offset)."""
    act = config.activation_func
    if config.bias_activation_fusion and act is F.gelu:
        act = _tanh_gelu
    if not config.gated_linear_unit:
        return act
    clamp, offset = config.activation_func_clamp_value, config.glu_linear_offset

    def glu(y: Tensor) -> Tensor:
        gate, linear = torch.chunk(y, 2, dim=-1)
        if clamp is not None:
            gate, linear = gate.clamp(max=clamp), linear.clamp(min=-clamp, max=clamp)
        return act(gate) * (linear + offset)

    return glu


def _tanh_gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# ---------------------------------------------------------------------------- tensor math


def linear(w: StackedWeights, layer: Linear, x: Tensor) -> Tensor:
    """x [S, b, in] -> [S, b, out]: pass s uses weight slot s (P = S) or the one slot (P = 1)."""
    weight, bias = layer.weight, layer.bias
    late_bias = layer.reduce and bias is not None  # row-parallel: bias after the all-reduce
    if weight.shape[0] == 1:
        out = F.linear(x, weight[0], None if late_bias or bias is None else bias[0])
    elif bias is None or late_bias:
        out = torch.bmm(x, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    if layer.reduce and w.dims.tp_group is not None:
        dist.all_reduce(out, group=w.dims.tp_group)
    return out + bias.unsqueeze(1) if late_bias else out


def norm(w: StackedWeights, layer: Norm, x: Tensor) -> Tensor:
    """x [S, ..., d] normalised over d with slot s's weights for pass s (or the one slot)."""
    d, dims = x.shape[-1], w.dims
    weight, bias = layer.weight, layer.bias  # [P, d]
    if weight.shape[0] == 1:
        if dims.rms:
            return F.rms_norm(x, (d,), weight[0], dims.eps)
        return F.layer_norm(x, (d,), weight[0], None if bias is None else bias[0], dims.eps)
    shape = (weight.shape[0],) + (1,) * (x.dim() - 2) + (d,)
    if dims.rms:
        return F.rms_norm(x, (d,), None, dims.eps) * weight.view(shape)
    normed = F.layer_norm(x, (d,), None, None, dims.eps)
    if bias is None:
        return normed * weight.view(shape)
    return torch.addcmul(bias.view(shape), normed, weight.view(shape))


def rope(w: StackedWeights, freqs: Optional[Tensor], t: Tensor, index: Tensor) -> Tensor:
    """t [S, b, n, d] of one token rotated to position `index` [1] (freqs None: unchanged)."""
    if freqs is None:
        return t
    shape = t.shape
    rotated = compat.apply_rope(t.reshape(1, -1, *shape[2:]), freqs.index_select(0, index),
                                w.dims.config)  # [1 position, S * b, n, d]
    return rotated.view(shape)


def attend(w: StackedWeights, query: Tensor, keys: Tensor, values: Tensor,
           visible: Optional[Tensor]) -> Tensor:
    """query [S, b, heads, d] over keys / values [S * b, groups, L, d]; visible [1, L] (True =
    attend) or None (all) -> context [S, b, heads * d]."""
    passes, b, heads, d = query.shape
    out = F.scaled_dot_product_attention(
        query.reshape(passes * b, heads, 1, d), keys, values, attn_mask=visible,
        scale=w.dims.scale, enable_gqa=keys.shape[1] != heads)  # [S * b, heads, 1, d]
    return out.reshape(passes, b, heads * d)


def _rows_first(t: Tensor) -> Tensor:
    """[S, b, g, d] of one position -> cache layout [S * b, g, 1, d]."""
    return t.reshape(-1, t.shape[2], 1, t.shape[3])


# ---------------------------------------------------------------------------- caches


def store_and_read(cache: KVCache, rows: slice, at: At, key: Tensor,
                   value: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Store key / value [R, g, 1, d] at position `at` in `rows`, then read positions 0..at:
    (keys, values [R, g, L, d], visible [1, L] or None)."""
    if at.t is not None:
        cache.update(rows, at.t, key, value)
        return (*cache.read(rows, at.t + 1), None)
    cache.write(rows, at.index, key, value)
    return cache.k[rows], cache.v[rows], _visible(cache, at)


def read_memory(cache: KVCache, rows: slice, at: At,
                window: Optional[int]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The memory slots a query at token `at` reads: at-window+1..at (0..at without a window);
    in a ring of `size` entries, slot j sits at entry j % size. An eager step reads the ring of
    exactly `window` entries (layers.Caches without `spare`) with no mask."""
    if at.t is not None:
        return (*cache.read(rows, min(at.t + 1, cache.size)), None)
    return cache.k[rows], cache.v[rows], _visible(cache, at, window)


def _visible(cache: KVCache, at: At, window: Optional[int] = None) -> Tensor:
    """[1, size]: the entries holding positions at-window+1..at (0..at without a window) once
    positions 0..at are written; entry i holds the last position <= at that is i mod size."""
    entry = torch.arange(cache.size, device=at.index.device)
    held = at.index - torch.remainder(at.index - entry, cache.size)  # < 0: not written yet
    visible = held >= 0
    if window is not None:
        visible = visible & (held > at.index - window)
    return visible.view(1, -1)


def store_memory(cache: KVCache, rows: slice, at: At, key: Tensor, value: Tensor) -> None:
    """Store key / value [R, g, 1, d] as memory slot at + 1 (entry (at + 1) % size). Slot
    `limit` (after the last position) is never read; a fixed-shape step keeps the entry it would
    overwrite (with the spare ring entry of layers.Caches, a step run twice then leaves the
    caches as running it once)."""
    if at.t is not None:
        cache.update(rows, at.t + 1, key, value)
        return
    slot = at.index + 1
    entry = slot % cache.size
    past = slot >= cache.limit  # [1]
    for store, new in ((cache.k[rows], key), (cache.v[rows], value)):
        store.index_copy_(2, entry, torch.where(past, store.index_select(2, entry), new))


# ---------------------------------------------------------------------------- a step


def self_attention(w: StackedWeights, layer: Layer, x: Tensor, cache: KVCache, rows: slice,
                   at: At) -> Tensor:
    """Causal self-attention of x [S, b, h] (one token per pass) over cache rows `rows`."""
    passes, b, _ = x.shape
    d, g, heads = w.dims.head_dim, w.dims.groups, w.dims.heads
    per_group = heads // g
    qkv = linear(w, layer.qkv, norm(w, layer.input_norm, x))  # [S, b, g * (heads/g + 2) * d]
    qkv = qkv.view(passes, b, g, (per_group + 2) * d)
    query, key, value = torch.split(qkv, [per_group * d, d, d], dim=-1)
    query = query.reshape(passes, b, heads, d)  # [S, b, heads, d]; key, value [S, b, g, d]
    if layer.q_norm is not None:
        query, key = norm(w, layer.q_norm, query), norm(w, layer.k_norm, key)
    query, key = rope(w, w.self_freqs, query, at.index), rope(w, w.self_freqs, key, at.index)
    keys, values, visible = store_and_read(cache, rows, at, _rows_first(key), _rows_first(value))
    return linear(w, layer.proj, attend(w, query, keys, values, visible))


def cross_attention(w: StackedWeights, cross: Cross, x: Tensor, cache: KVCache, rows: slice,
                    at: At) -> Tensor:
    """x [S', b, h] of token t: queries at position t + 1 over the cached memory slots."""
    passes, b, _ = x.shape
    query = linear(w, cross.query, norm(w, cross.norm, x)).view(passes, b, w.dims.heads, -1)
    query = rope(w, w.cross_freqs, query, at.index + 1)
    keys, values, visible = read_memory(cache, rows, at, w.dims.window)
    return linear(w, cross.proj, attend(w, query, keys, values, visible))


def mlp(w: StackedWeights, layer: Layer, x: Tensor) -> Tensor:
    return linear(w, layer.fc2, w.dims.activation(linear(w, layer.fc1,
                                                         norm(w, layer.mlp_norm, x))))


def run_layers(w: StackedWeights, x: Tensor, caches, self_rows: slice,
               cross_rows: Optional[slice], cross_from: int, at: At) -> Tensor:
    """S section passes x [S, b, h] of one token through every layer -> [S, b, h], before the
    final norms (`finish`). Pass s reads self-cache rows self_rows (s * b ..); passes
    cross_from.. cross-attend to their memory in cross_rows of the cross caches."""
    for i, layer in enumerate(w.layers):
        x = x + self_attention(w, layer, x, caches.self_kv[i], self_rows, at)
        if layer.cross is not None and cross_rows is not None:
            later = x[cross_from:]
            later.add_(cross_attention(w, layer.cross, later, caches.cross_kv[i], cross_rows,
                                       at))
        x = x + mlp(w, layer, x)
    return x


def finish(w: StackedWeights, x: Tensor) -> Tensor:
    """The outputs of the S passes x [S, b, h] from run_layers, the last pass being the last
    section's: through every section's final norm (memory_norm), else the last one's alone."""
    if w.memory_norm:
        return norm(w, w.final_norm, x)
    return torch.cat([x[:-1], norm(w, w.final_norm, x[-1:])])


def append_memory(w: StackedWeights, sources: Tensor, caches, rows: slice, at: At) -> None:
    """Memory slot at + 1 of T sections (cross-cache rows `rows`) = sources [T, b, h] (the
    output at `at` of the section before each), projected by those sections' key/value
    projections; keys at position at + 1."""
    passes, b, _ = sources.shape
    g, d = w.dims.groups, w.dims.head_dim
    for i, layer in enumerate(w.layers):
        mixed = linear(w, layer.cross.memory, sources).view(passes, b, g, 2 * d)
        key, value = torch.chunk(mixed, 2, dim=-1)  # per group [k | v]
        key = rope(w, w.cross_freqs, key, at.index + 1)
        store_memory(caches.cross_kv[i], rows, at, _rows_first(key), _rows_first(value))


# ---------------------------------------------------------------------------- ends


def embed(model, ids: Tensor, index: Tensor) -> Tensor:
    """ids [b] at position index [1] -> [1, b, h] (the model's embedding)."""
    batch = ids.shape[0]
    return model.embedding(input_ids=ids.view(batch, 1),
                           position_ids=index.view(1, 1).expand(batch, 1))


def logits(model, outs: Tensor, combine: bool) -> Tensor:
    """Section outputs [S, b, h] -> logits [b, vocab] (gathered over tensor-parallel ranks):
    of the learned combination of all of them when `combine`, else of the last one."""
    if combine:
        alpha = model.combination_weights.to(outs.dtype).view(-1, 1, 1)
        hidden = (alpha * outs).sum(dim=0, keepdim=True)
    else:
        hidden = outs[-1:]
    out, _ = model.output_layer(hidden, weight=model._output_weight(),
                                runtime_gather_output=True)
    return out[0]
