"""Incremental decoding of the plain-PyTorch reference StagFormer: no Megatron, one device.

Small named steps around explicit caches, gpt-fast style:

    ReferenceDecoder(model, max_batch_size, max_sequence_length, mode, compile=False,
                     cuda_graph=False, dtype=None)   stacks the weights, allocates the caches
    prefill(ids [b, s]) -> logits [b, vocab]   the sections one after another over the prompt
    step(ids [b])       -> logits [b, vocab]   every section on the same new token
    generate(prompt, max_new_tokens, sampler, stop_tokens)   stag_plugin.reference.sampling's loop
    cache_bytes()       -> {"self": bytes, "cross": bytes}

It decodes a `stag_plugin.reference.model.StagFormer`, e.g. a converted inference folder
(`stag_plugin.convert.inference_folder.load_inference_folder`). It is written from the architecture
(docs/design.md, decoding) on the reference model's weights, not from the Megatron engine
(stag_plugin.decode.engine.StagDecoder), so the two check each other.

Weights: built once, per layer the tensors of every section stacked on a leading dim, [P, ...]:
P = p with separate weights, P = 1 with shared weights (and for p = 1). q/k/v are one projection
([P, (heads + 2 groups) * d, h]), as are the memory's k/v and the MLP's gate/up. Cross-attention
weights exist for sections 2..p only (P = p - 1 separate, 1 shared). The decoder holds this copy,
in `dtype`; the model itself is left as it is.

One layer math for every call: the hidden state is [S, b, n, h], S section passes of b
sequences over n tokens (prefill: S = 1, n = s; a step: n = 1). A linear layer is one batched
matmul over the S passes' own weights (P = S), or one matmul over S * b * n rows (P = 1: one
read of the shared weights). Attention is one SDPA call over S * b rows, each reading its own
cache row. Cross-attention runs on the passes of sections 2..p.

Positions: token t sits at position t (self-attention, learned positions). Section k > 0 reads a
memory of slots: slot 0 = the learned null memory, slot j = section k-1's output at token j-1.
In cross-attention the query of token t sits at position t + 1 and slot j at position j; token
t reads slots max(0, t-w+1)..t (w = the window, all slots without one).

Caches, allocated once; rows are section-major (section k's b sequences at rows k*b..k*b+b):
    self  K/V, one KVCache per layer:  [p * B, groups, max_len, d]      entry t = token t
    cross K/V, one KVCache per layer:  [(p-1) * B, groups, C, d]        rows of sections 2..p
a ring: slot j at entry j % C. C = W = min(w, max_len) (w: the window, max_len without one),
plus one spare entry in a decoder built for fixed-shape steps (below).

A step at position t: every section runs token t (self-attention over its tokens 0..t; section
k > 0 cross-attends to its cached slots); then slot t + 1 of section k = section k-1's output
at token t is projected to K/V and cached. The position is a tensor and the cache writes go in
place at it (KVCache.write). An eager step reads the filled cache entries only; a fixed-shape
step (`compile`, `cuda_graph`; stag_plugin.reference.step_runner) reads the whole caches under
a mask made from the position tensor, so no shape depends on t. A CUDA graph capture runs the
step more than once on the same inputs, so the fixed-shape step is idempotent: with the spare
entry (C = W + 1), the slot t + 1 it writes lands on the entry of slot t - W, which no step at t
reads (also slot max_len, written by the step at the last position).

Modes:
    "sequential"  the sections one after another in each step (S = 1 per pass).
    "batched"     the p passes of a step as one pass (S = p) over the stacked weights: the
                  kernels of one l/p-layer model. Any weight sharing; p = 1 (a plain GPT) runs
                  the same step.
    "recurrent"   shared weights, p >= 2: prefill as in training; then one pass per token (the
                  last section's) whose own output at token t becomes its slot t + 1. Logits read
                  that pass alone, also at prefill (no learned combination). Not the
                  teacher-forced forward, by design.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stag_plugin.errors import StagError
from stag_plugin.reference import sampling
from stag_plugin.reference.kv_cache import KVCache
from stag_plugin.reference.model import ACTIVATIONS, StagFormer, apply_rope, rope_angles
from stag_plugin.reference.sampling import Sampler
from stag_plugin.reference.step_runner import StepRunner

MODES = ("sequential", "batched", "recurrent")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


# ---------------------------------------------------------------------------- stacked weights


@dataclass(frozen=True)
class Norm:
    """LayerNorm (bias) or RMSNorm (bias None) of P sections: weight, bias [P, h]."""

    weight: Tensor
    bias: Optional[Tensor]
    eps: float

    @classmethod
    def of(cls, norms: Sequence[nn.Module], dtype) -> "Norm":
        bias = None if getattr(norms[0], "bias", None) is None else stack(
            [n.bias for n in norms], dtype)
        return cls(stack([n.weight for n in norms], dtype), bias, norms[0].eps)


@dataclass(frozen=True)
class Linear:
    """A linear layer of P sections: weight [P, out, in], bias [P, out] or None."""

    weight: Tensor
    bias: Optional[Tensor]

    @classmethod
    def of(cls, per_section: Sequence[Sequence[nn.Linear]], dtype) -> "Linear":
        """Per section, the nn.Linear layers fused along their outputs (e.g. q, k, v)."""
        weight = stack([torch.cat([m.weight for m in mods]) for mods in per_section], dtype)
        if per_section[0][0].bias is None:
            return cls(weight, None)
        return cls(weight, stack([torch.cat([m.bias for m in mods]) for mods in per_section],
                                 dtype))


@dataclass(frozen=True)
class Layer:
    """One layer of every section; the cross-attention parts (None when p = 1) hold sections
    2..p (separate weights) or the one shared set."""

    ln_self: Norm
    qkv: Linear  # [P, (heads + 2 * groups) * d, h]
    o: Linear
    ln_cross: Optional[Norm]
    cross_q: Optional[Linear]
    cross_kv: Optional[Linear]  # [P', 2 * groups * d, h]: the memory slots' keys and values
    cross_o: Optional[Linear]
    ln_mlp: Norm
    up: Linear  # gated: [P, 2 * ffn, h], the gate's rows first
    down: Linear

    @classmethod
    def of(cls, blocks: Sequence[nn.Module], crossing: Sequence[nn.Module], dtype) -> "Layer":
        """blocks: layer i of each stored section; crossing: of those with cross-attention."""
        attns, mlps = [b.self_attn for b in blocks], [b.mlp for b in blocks]
        cross = [b.cross_attn for b in crossing]
        return cls(
            ln_self=Norm.of([b.ln_self for b in blocks], dtype),
            qkv=Linear.of([(a.q, a.k, a.v) for a in attns], dtype),
            o=Linear.of([(a.o,) for a in attns], dtype),
            ln_cross=Norm.of([b.ln_cross for b in crossing], dtype) if cross else None,
            cross_q=Linear.of([(a.q,) for a in cross], dtype) if cross else None,
            cross_kv=Linear.of([(a.k, a.v) for a in cross], dtype) if cross else None,
            cross_o=Linear.of([(a.o,) for a in cross], dtype) if cross else None,
            ln_mlp=Norm.of([b.ln_mlp for b in blocks], dtype),
            up=Linear.of([(m.gate, m.up) if m.gated else (m.up,) for m in mlps], dtype),
            down=Linear.of([(m.down,) for m in mlps], dtype))


def stack(tensors: Sequence[Tensor], dtype) -> Tensor:
    """[P, ...] from P tensors, in `dtype`, detached from autograd."""
    return torch.stack([t.detach() for t in tensors]).to(dtype)


def pick(stacked: Tensor, first: int, count: int) -> Tensor:
    """Sections first..first+count-1 of a [P, ...] tensor (P = 1: the one shared entry)."""
    return stacked if stacked.shape[0] == 1 else stacked[first:first + count]


# ---------------------------------------------------------------------------- layer math


def norm(w: Norm, x: Tensor, first: int) -> Tensor:
    """x [S, b, n, h] of sections first.. -> normalized by each section's own norm."""
    h = x.shape[-1]
    if w.weight.shape[0] == 1:  # one norm for every pass
        if w.bias is None:
            return F.rms_norm(x, (h,), w.weight[0], w.eps)
        return F.layer_norm(x, (h,), w.weight[0], w.bias[0], w.eps)
    weight = pick(w.weight, first, x.shape[0])[:, None, None]  # [S, 1, 1, h]
    if w.bias is None:
        return F.rms_norm(x, (h,), eps=w.eps) * weight
    bias = pick(w.bias, first, x.shape[0])[:, None, None]
    return torch.addcmul(bias, F.layer_norm(x, (h,), eps=w.eps), weight)


def linear(w: Linear, x: Tensor, first: int) -> Tensor:
    """x [S, b, n, in] of sections first.. -> [S, b, n, out]: one matmul over every row (P = 1)
    or one batched matmul over the S sections' weights."""
    if w.weight.shape[0] == 1:
        return F.linear(x, w.weight[0], None if w.bias is None else w.bias[0])
    S, b, n, _ = x.shape
    rows = x.reshape(S, b * n, -1)
    weight = pick(w.weight, first, S).transpose(1, 2)  # [S, in, out]
    if w.bias is None:
        out = torch.bmm(rows, weight)
    else:
        out = torch.baddbmm(pick(w.bias, first, S)[:, None], rows, weight)
    return out.view(S, b, n, -1)


def mlp(layer: Layer, x: Tensor, first: int, activation, gated: bool) -> Tensor:
    """The MLP of sections first.. on x [S, b, n, h] (its pre-norm included)."""
    hidden = linear(layer.up, norm(layer.ln_mlp, x, first), first)
    if gated:
        gate, up = hidden.chunk(2, dim=-1)
        hidden = activation(gate) * up
    else:
        hidden = activation(hidden)
    return linear(layer.down, hidden, first)


def to_heads(x: Tensor, heads: int) -> Tensor:
    """[S, b, n, heads * d] -> [S * b, heads, n, d]."""
    S, b, n, _ = x.shape
    return x.reshape(S * b, n, heads, -1).transpose(1, 2)


def from_heads(x: Tensor, passes: int) -> Tensor:
    """[S * b, heads, n, d] -> [S, b, n, heads * d]."""
    rows, _, n, _ = x.shape
    return x.transpose(1, 2).reshape(passes, rows // passes, n, -1)


def attend(q: Tensor, k: Tensor, v: Tensor, visible: Optional[Tensor]) -> Tensor:
    """q [B, heads, n, d] over k, v [B, groups, m, d]; visible [n, m] (True = attend) or None
    (all) -> [B, heads, n, d]. One SDPA call; grouped keys are read, not repeated."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible,
                                          enable_gqa=k.shape[1] != q.shape[1])


@dataclass(frozen=True)
class At:
    """Where the n tokens of a call sit: `index` [n] int64, their positions as a tensor (RoPE,
    learned positions, cache writes, fixed-shape masks), and `first`, the first of them as an
    int when the caller knows it (prefill, eager steps: read the filled cache entries only) or
    None in a fixed-shape step (read whole caches under a mask from `index`)."""

    index: Tensor
    first: Optional[int] = None


# ---------------------------------------------------------------------------- decoder


class ReferenceDecoder:
    """Staggered incremental decoding of a reference StagFormer on one device.

    Args:
        model: a stag_plugin.reference.model.StagFormer (put in eval mode here, otherwise left
            as it is: the decoder reads its weights once, into its own stacked copy).
        max_batch_size: most sequences decoded together.
        max_sequence_length: most positions (prompt + generated tokens fed back) per sequence.
        mode: "sequential", "batched" (the fast step, any weights) or "recurrent" (shared
            weights, p >= 2).
        compile: run the step as a fixed-shape function under torch.compile (any mode).
        cuda_graph: capture the fixed-shape step as a CUDA graph per batch size and replay it
            (CUDA only; with `compile`, the compiled step is captured).
        dtype: the dtype to decode in (a torch dtype or "fp32" / "bf16" / "fp16"): the weights
            and caches are cast to it. None: the model's dtype.
    """

    MODES = MODES

    def __init__(self, model: StagFormer, max_batch_size: int, max_sequence_length: int,
                 mode: str = "sequential", compile: bool = False, cuda_graph: bool = False,
                 dtype=None):
        _check_arguments(model, max_batch_size, max_sequence_length, mode)
        self.model, self.cfg, self.mode = model.eval(), model.cfg, mode
        self.p = self.cfg.num_sections
        self.max_batch_size, self.max_len = max_batch_size, max_sequence_length
        self.window = self.cfg.cross_attention_window
        self.window_slots = min(self.window or max_sequence_length, max_sequence_length)  # W
        self.fixed_shape = compile or cuda_graph  # the step StepRunner runs (spare ring entry)
        self.device = model.tok_emb.weight.device
        self.dtype = parse_dtype(dtype) or model.tok_emb.weight.dtype
        self._load_weights(model)
        # RoPE angles of every position a query or key can take (0..max_len): [max_len+1, r]
        self.angles = rope_angles(self.cfg, torch.arange(max_sequence_length + 1,
                                                         device=self.device))
        self.self_caches, self.cross_caches = self._allocate()
        self._runner = (StepRunner(self._fixed_step, compile, cuda_graph, self.device)
                        if self.fixed_shape else None)
        self.batch = 0  # sequences in the current prefill; 0 = nothing prefilled
        self.position = 0  # position of the next token; cross caches hold slots 0..position

    def _load_weights(self, model: StagFormer) -> None:
        """The decoder's copy of the weights, in self.dtype: layers stacked over sections."""
        cfg, dtype = self.cfg, self.dtype
        stacks = list(model.stacks)  # p stacks (separate weights) or 1 (shared)
        crossing = [] if self.p == 1 else stacks[1:] if len(stacks) > 1 else stacks
        self.layers = [Layer.of([s.blocks[i] for s in stacks], [s.blocks[i] for s in crossing],
                                dtype) for i in range(cfg.layers_per_section)]
        # the final norms: of every section, or (without memory_norm) of the last one
        self.ln_out = Norm.of([s.ln_out for s in stacks if hasattr(s, "ln_out")], dtype)
        self.tok_emb = model.tok_emb.weight.detach().to(dtype)  # [vocab, h]
        self.head_weight = (self.tok_emb if cfg.tie_embeddings
                            else model.lm_head.weight.detach().to(dtype))
        self.pos_emb = (model.pos_emb.weight.detach().to(dtype)
                        if cfg.position_embedding_type == "learned_absolute" else None)
        self.null_memory = model.null_memory.detach().to(dtype) if self.p > 1 else None  # [h]
        self.alpha = (model.alpha.detach().to(dtype) if cfg.output_combination == "learned"
                      else None)  # [p]

    def _allocate(self) -> Tuple[List[KVCache], List[KVCache]]:
        cfg, rows = self.cfg, self.max_batch_size

        def cache(sections: int, size: int) -> KVCache:
            return KVCache(sections * rows, cfg.num_query_groups, size, cfg.head_dim,
                           self.max_len, self.dtype, self.device)

        cross_size = self.window_slots + (1 if self.fixed_shape else 0)
        layers = range(cfg.layers_per_section)
        self_caches = [cache(self.p, self.max_len) for _ in layers]
        cross_caches = [cache(self.p - 1, cross_size) for _ in layers] if self.p > 1 else []
        return self_caches, cross_caches

    def cache_bytes(self) -> dict:
        """Bytes held by the preallocated caches: {"self": ..., "cross": ...}."""
        return {"self": sum(c.nbytes() for c in self.self_caches),
                "cross": sum(c.nbytes() for c in self.cross_caches)}

    # ------------------------------------------------------------------ public steps

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> Tensor:
        """Prompt [b, s] -> logits [b, vocab] at its last position; (re)fills every cache.
        The sections run one after another over the whole prompt, as in training."""
        batch, length = input_ids.shape
        if not 1 <= batch <= self.max_batch_size:
            raise StagError(f"a batch of {batch} prompts does not fit max_batch_size="
                             f"{self.max_batch_size}", f"pass 1 to {self.max_batch_size} "
                             f"prompts, or build the ReferenceDecoder with max_batch_size >= "
                             f"{batch}")
        self.check_room(length, "the prompt")
        self.batch, self.position = batch, 0
        at = At(torch.arange(length, device=self.device), first=0)
        x = self._embed(input_ids.to(self.device), at)[None]  # [1, b, s, h]
        outs = []
        for k in range(self.p):
            memory = self._prompt_memory(k, outs[-1]) if k > 0 else None
            outs.append(self._run(x, k, at, memory))
        self.position = length
        return self._logits(torch.cat(outs)[:, :, -1:])[:, -1]

    @torch.no_grad()
    def step(self, input_ids: Tensor) -> Tensor:
        """One new token per sequence, ids [b] -> logits [b, vocab] of the next position."""
        if self.batch == 0:
            raise StagError("step() reads the caches that prefill fills, and nothing was "
                             "prefilled", "call prefill(prompt) before step()")
        if tuple(input_ids.shape) != (self.batch,):
            raise StagError(f"step takes one token per prefilled sequence, ids of shape "
                             f"[{self.batch}]; got {tuple(input_ids.shape)}", "pass the "
                             "last token of each sequence")
        self.check_room(self.position + 1, "the prompt + generated tokens")
        t, ids = self.position, input_ids.to(self.device)
        index = torch.tensor([t], device=self.device)
        if self._runner is not None:
            logits = self._runner(ids, index)
        else:
            logits = self._step(ids, At(index, first=t))
        self.position = t + 1
        return logits

    def generate(self, prompt_ids: Tensor, max_new_tokens: int,
                 sampler: Optional[Sampler] = None, stop_tokens=None) -> List[List[int]]:
        """Up to `max_new_tokens` new tokens per prompt of `prompt_ids` [b, s]; sampler None
        is greedy; stop_tokens as in stag_plugin.reference.sampling.generate."""
        return sampling.generate(self, prompt_ids, max_new_tokens, sampler, stop_tokens)

    def check_room(self, length: int, what: str) -> None:
        """Refuse `length` positions when the caches hold fewer."""
        if length > self.max_len:
            raise StagError(f"{what} needs {length} positions but the decoder holds "
                             f"max_sequence_length={self.max_len}", "shorten the input, ask "
                             "for fewer new tokens, or build the ReferenceDecoder with a larger "
                             "max_sequence_length")

    # ------------------------------------------------------------------ the step

    def _fixed_step(self, ids: Tensor, index: Tensor) -> Tensor:
        """The step with shapes independent of the position (StepRunner's function)."""
        return self._step(ids, At(index))

    def _step(self, ids: Tensor, at: At) -> Tensor:
        """ids [b] at position at.index [1] -> logits [b, vocab]; writes the self K/V at the
        position and memory slot position + 1."""
        b, p = ids.shape[0], self.p
        x = self._embed(ids[:, None], at)[None]  # [1, b, 1, h]
        if self.mode == "recurrent":  # section p's pass; its own output -> its slot t + 1
            raw = self._layers(x, p - 1, at)  # [1, b, 1, h]
            out = self._finish(raw, p - 1)
            memory = out if self.cfg.memory_norm else raw
            self._append_slots(memory, p - 2, self._cross_rows(p - 1, 1, b), at)
            return self._logits(out)[:, -1]
        if self.mode == "batched":
            outs = self._run(x.expand(p, -1, -1, -1), 0, at)  # [p, b, 1, h]
        else:
            outs = torch.cat([self._run(x, k, at) for k in range(p)])
        if p > 1:  # slot t + 1 of sections 2..p = the outputs of sections 1..p-1
            self._append_slots(outs[:-1], 0, self._cross_rows(1, p - 1, b), at)
        return self._logits(outs)[:, -1]

    # ------------------------------------------------------------------ sections and layers

    def _run(self, x: Tensor, first: int, at: At, memory: Optional[list] = None) -> Tensor:
        """Sections first..first+S-1 over x [S, b, n, h] (tokens at positions at.index) ->
        their outputs [S, b, n, h]. Cross-attention (the passes of sections k > 0) reads
        `memory` (prefill: per layer the keys, values and visibility of the prompt's slots)
        or, in a step, the cross caches."""
        return self._finish(self._layers(x, first, at, memory), first)

    def _finish(self, x: Tensor, first: int) -> Tensor:
        """The outputs of sections first.. from their last layers' x [S, b, n, h]: through
        each section's final norm, or (without memory_norm) the last section's alone."""
        if self.cfg.memory_norm:
            return norm(self.ln_out, x, first)
        if first + x.shape[0] < self.p:  # the last section is not among them
            return x
        return torch.cat([x[:-1], norm(self.ln_out, x[-1:], 0)])

    def _layers(self, x: Tensor, first: int, at: At, memory: Optional[list] = None) -> Tensor:
        """The layers of `_run`, without the final norms."""
        S, b = x.shape[0], x.shape[1]
        skip = 1 if first == 0 else 0  # section 1 (when it runs) has no cross-attention
        rows = slice(first * b, (first + S) * b)
        cross_rows = self._cross_rows(first + skip, S - skip, b)
        activation = ACTIVATIONS[self.cfg.activation]
        for i, layer in enumerate(self.layers):
            x = x + self._self_attention(layer, i, x, first, rows, at)
            if S > skip:  # in place: x is this layer's own tensor (made by the add above)
                x[skip:].add_(self._cross_attention(
                    layer, i, x[skip:], first + skip - 1, cross_rows, at,
                    None if memory is None else memory[i]))
            x = x + mlp(layer, x, first, activation, self.cfg.gated_linear_unit)
        return x

    def _cross_rows(self, first: int, count: int, b: int) -> slice:
        """The cross-cache rows of sections first..first+count-1 (first >= 1)."""
        return slice((first - 1) * b, (first - 1 + count) * b)

    def _self_attention(self, layer: Layer, i: int, x: Tensor, first: int, rows: slice,
                        at: At) -> Tensor:
        """Causal self-attention of x [S, b, n, h] (sections first..) through cache i."""
        cfg, S = self.cfg, x.shape[0]
        heads, groups, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
        qkv = linear(layer.qkv, norm(layer.ln_self, x, first), first)
        q, k, v = qkv.split([heads * d, groups * d, groups * d], dim=-1)
        q, k, v = to_heads(q, heads), to_heads(k, groups), to_heads(v, groups)  # [S*b, ., n, d]
        if cfg.position_embedding_type == "rope":
            angles = self.angles[at.index]  # [n, r]
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        cache = self.self_caches[i]
        cache.write(rows, at.index, k, v)
        if at.first is None:  # every entry, those after the position masked
            keys, values = cache.k[rows], cache.v[rows]
            visible = torch.arange(cache.size, device=x.device)[None] <= at.index[:, None]
        else:  # entries 0..first+n-1; query j sees tokens <= first + j
            n = x.shape[2]
            keys, values = cache.read(rows, at.first + n)
            visible = None if n == 1 else (
                torch.arange(at.first + n, device=x.device)[None] <= at.index[:, None])
        return linear(layer.o, from_heads(attend(q, keys, values, visible), S), first)

    def _cross_attention(self, layer: Layer, i: int, x: Tensor, first: int, rows: slice,
                         at: At, memory: Optional[tuple]) -> Tensor:
        """x [S, b, n, h] of the sections whose cross weights start at index `first`, queries
        at positions at.index + 1, over `memory` (keys, values, visible of the prompt) or, in a
        step (n = 1), the cached slots of the window (cache rows `rows`)."""
        S = x.shape[0]
        q = linear(layer.cross_q, norm(layer.ln_cross, x, first), first)
        q = to_heads(q, self.cfg.num_attention_heads)  # [S*b, heads, n, d]
        if self.cfg.cross_attention_rope:
            q = apply_rope(q, self.angles[at.index + 1])
        if memory is not None:
            keys, values, visible = memory
        elif at.first is None:  # every ring entry, those outside slots t-W+1..t masked
            cache = self.cross_caches[i]
            keys, values = cache.k[rows], cache.v[rows]
            visible = self._ring_visible(at.index, cache.size)
        else:
            cache = self.cross_caches[i]
            keys, values = cache.read(rows, min(at.first + 1, cache.size))  # slots <= t
            visible = None
        return linear(layer.cross_o, from_heads(attend(q, keys, values, visible), S), first)

    # ------------------------------------------------------------------ memory slots

    def _slot_keys_values(self, layer: Layer, source: Tensor, first: int,
                          positions: Tensor) -> Tuple[Tensor, Tensor]:
        """Memory slots source [T, b, m, h] at `positions` [m], for the sections whose cross
        weights start at index `first` -> keys, values [T * b, groups, m, d]."""
        k, v = linear(layer.cross_kv, source, first).chunk(2, dim=-1)
        groups = self.cfg.num_query_groups
        k, v = to_heads(k, groups), to_heads(v, groups)
        if self.cfg.cross_attention_rope:
            k = apply_rope(k, self.angles[positions])
        return k, v

    def _prompt_memory(self, k: int, previous: Tensor) -> list:
        """Section k's memory over the prompt from section k-1's outputs previous [1, b, s, h]:
        per layer (keys, values [b, groups, s, d] of slots 0..s-1, visible [s, s]). Slots
        0..s (slot s: the last prompt token's output, read by the first step) are cached."""
        length = previous.shape[2]
        null = self.null_memory.expand(1, self.batch, 1, -1)
        slots = torch.cat([null, previous], dim=2)  # [1, b, s+1, h]: slot j = previous[j-1]
        positions = torch.arange(length + 1, device=self.device)
        visible = self._window_mask(length)
        rows = self._cross_rows(k, 1, self.batch)
        memory = []
        for i, layer in enumerate(self.layers):
            keys, values = self._slot_keys_values(layer, slots, k - 1, positions)
            self.cross_caches[i].update(rows, 0, keys, values)
            memory.append((keys[:, :, :length], values[:, :, :length], visible))
        return memory

    def _ring_visible(self, index: Tensor, size: int) -> Tensor:
        """[1, size]: the ring entries a query at token index [1] reads, those of slots
        t-W+1..t that exist (entry e holds slot t - age, age = (t - e) mod size)."""
        t = index[:, None]
        age = torch.remainder(t - torch.arange(size, device=index.device)[None], size)
        return (age < self.window_slots) & (age <= t)

    def _window_mask(self, length: int) -> Tensor:
        """[s, s], True where query i may read slot j: j <= i and (window w) j > i - w."""
        i = torch.arange(length, device=self.device)[:, None]
        j = torch.arange(length, device=self.device)[None, :]
        visible = j <= i
        if self.window is not None:
            visible = visible & (j > i - self.window)
        return visible

    def _append_slots(self, sources: Tensor, first: int, rows: slice, at: At) -> None:
        """Slot t + 1 (t = at.index) of the sections whose cross weights start at index
        `first` = sources [T, b, 1, h], projected per layer and written to cache rows `rows`."""
        slot = at.index + 1
        for i, layer in enumerate(self.layers):
            keys, values = self._slot_keys_values(layer, sources, first, slot)
            self.cross_caches[i].write(rows, slot, keys, values)

    # ------------------------------------------------------------------ ends

    def _embed(self, input_ids: Tensor, at: At) -> Tensor:
        """ids [b, n] at positions at.index [n] -> [b, n, h]."""
        x = F.embedding(input_ids, self.tok_emb)
        return x if self.pos_emb is None else x + self.pos_emb[at.index]

    def _logits(self, outs: Tensor) -> Tensor:
        """Section outputs [S, b, n, h] -> logits [b, n, vocab]: the last section's, or the
        learned combination of all p (not in recurrent mode)."""
        hidden = outs[-1]
        if self.alpha is not None and self.mode != "recurrent":
            hidden = (self.alpha[:, None, None, None] * outs).sum(dim=0)
        return hidden @ self.head_weight.t()



def parse_dtype(dtype) -> Optional[torch.dtype]:
    """None, a floating-point torch dtype, or one of DTYPES' names -> the torch dtype (None)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise StagError(f"dtype={dtype!r} is not a floating-point torch dtype nor one of "
                    f"{sorted(DTYPES)}", "pass e.g. torch.bfloat16 or 'bf16', or None (the "
                    "model's dtype)")


def _check_arguments(model, max_batch_size: int, max_sequence_length: int, mode: str) -> None:
    """Refuse what this decoder cannot do, naming the fix."""
    if not isinstance(model, StagFormer):
        raise TypeError(f"ReferenceDecoder decodes a stag_plugin.reference.model.StagFormer, got "
                        f"{type(model).__name__}. Fix: decode a StagGPTModel with "
                        "stag_plugin.decode.engine.StagDecoder, or load the reference model")
    if mode not in MODES:
        raise StagError(f"mode={mode!r} is not one of {MODES}", "pick one of them "
                         "(pipeline decoding needs StagDecoder on a pipelined Megatron model)")
    if max_batch_size < 1 or max_sequence_length < 1:
        raise StagError(f"max_batch_size={max_batch_size} and max_sequence_length="
                         f"{max_sequence_length} must both be >= 1", "pass positive sizes")
    cfg = model.cfg
    sampling.check_mode(mode, cfg.weight_sharing, cfg.num_sections)
    if (cfg.position_embedding_type == "learned_absolute"
            and max_sequence_length > cfg.max_sequence_length):
        raise StagError(f"max_sequence_length={max_sequence_length} exceeds the model's "
                         f"{cfg.max_sequence_length} learned positions", f"use at most "
                         f"{cfg.max_sequence_length}")
