"""Incremental decoding of the plain-PyTorch reference StagFormer: no Megatron, one device.

Small named steps around explicit caches, gpt-fast style:

    ReferenceDecoder(model, max_batch_size, max_sequence_length, mode)   allocates the caches
    prefill(ids [b, s]) -> logits [b, vocab]   the sections one after another over the prompt
    step(ids [b])       -> logits [b, vocab]   every section on the same new token
    generate(prompt, max_new_tokens, sampler, stop_tokens)   stag_plugin.reference.sampling's loop
    cache_bytes()       -> {"self": bytes, "cross": bytes}

It decodes a `stag_plugin.reference.model.StagFormer`, e.g. a converted inference folder
(`stag_plugin.convert.inference_folder.load_inference_folder`). It is written from the architecture
(docs/design.md, decoding) on the reference model's own modules, not from the Megatron engine
(stag_plugin.decode.engine.StagDecoder), so the two check each other. Batch-first like the
reference: hidden states [b, s, h], per-head tensors [b, heads, s, d].

Positions: token t sits at position t (self-attention, learned positions). Section k > 0 reads a
memory of slots: slot 0 = the learned null memory, slot j = section k-1's output at token j-1.
In cross-attention the query of token t sits at position t + 1 and slot j at position j; token
t reads slots max(0, t-w+1)..t (w = the window, all slots without one).

Caches, allocated once; rows are section-major (section k's b sequences at rows k*b..k*b+b):
    self  K/V, one KVCache per layer:  [p * B, groups, max_len, d]      entry t = token t
    cross K/V, one KVCache per layer:  [(p-1) * B, groups, C, d]        rows of sections 2..p
C = min(w, max_len) with a window (a ring: slot j at index j % C), else max_len.

A step at position t: every section runs token t (self-attention over its tokens 0..t; section
k > 0 cross-attends to its cached slots); then slot t + 1 of section k = section k-1's output
at token t is projected to K/V and cached.

Modes:
    "sequential"  the sections one after another in each step.
    "batched"     shared weights: the p passes of a step as one pass over p * b rows;
                  cross-attention on the rows of sections 2..p.
    "recurrent"   shared weights, p >= 2: prefill as in training; then one pass per token (the
                  last section's) whose own output at token t becomes its slot t + 1. Logits read
                  that pass alone, also at prefill (no learned combination). Not the
                  teacher-forced forward, by design.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from stag_plugin.errors import StagError
from stag_plugin.reference import sampling
from stag_plugin.reference.kv_cache import KVCache
from stag_plugin.reference.model import Attention, Block, StagFormer, apply_rope, rope_angles
from stag_plugin.reference.sampling import Sampler

MODES = ("sequential", "batched", "recurrent")


# ---------------------------------------------------------------------------- attention


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[b, s, heads * d] -> [b, heads, s, d]."""
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)


def project_queries(attn: Attention, x: Tensor, angles: Optional[Tensor]) -> Tensor:
    """x [b, s, h] -> queries [b, heads, s, d], rotated by angles [s, r] (None: no RoPE)."""
    q = split_heads(attn.q(x), attn.cfg.num_attention_heads)
    return q if angles is None else apply_rope(q, angles)


def project_keys_values(attn: Attention, source: Tensor,
                        angles: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """source [b, s, h] -> keys, values [b, groups, s, d]; keys rotated by angles [s, r]."""
    groups = attn.cfg.num_query_groups
    k, v = split_heads(attn.k(source), groups), split_heads(attn.v(source), groups)
    return (k if angles is None else apply_rope(k, angles)), v


def attend(q: Tensor, k: Tensor, v: Tensor, visible: Optional[Tensor]) -> Tensor:
    """q [b, heads, n, d] over k, v [b, groups, S, d]; visible [n, S] (True = attend) or None
    (all) -> [b, n, heads * d]."""
    b, heads, n, _ = q.shape
    repeat = heads // k.shape[1]  # query heads per key/value group
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # [b, heads, n, d]
    return out.transpose(1, 2).reshape(b, n, -1)


# ---------------------------------------------------------------------------- decoder


class ReferenceDecoder:
    """Staggered incremental decoding of a reference StagFormer on one device.

    Args:
        model: a stag_plugin.reference.model.StagFormer (put in eval mode here), fp32 or bf16.
        max_batch_size: most sequences decoded together.
        max_sequence_length: most positions (prompt + generated tokens fed back) per sequence.
        mode: "sequential", "batched" (shared weights) or "recurrent" (shared weights, p >= 2).
    """

    MODES = MODES

    def __init__(self, model: StagFormer, max_batch_size: int, max_sequence_length: int,
                 mode: str = "sequential"):
        _check_arguments(model, max_batch_size, max_sequence_length, mode)
        self.model, self.cfg, self.mode = model.eval(), model.cfg, mode
        self.p = self.cfg.num_sections
        self.max_batch_size, self.max_len = max_batch_size, max_sequence_length
        self.window = self.cfg.cross_attention_window
        weight = model.tok_emb.weight
        self.device = weight.device
        # RoPE angles of every position a query or key can take (0..max_len): [max_len+1, r]
        self.angles = rope_angles(self.cfg, torch.arange(max_sequence_length + 1,
                                                         device=self.device))
        self.self_caches, self.cross_caches = self._allocate(weight.dtype)
        self._step = {"sequential": self._step_sequential, "batched": self._step_batched,
                      "recurrent": self._step_recurrent}[mode]
        self.batch = 0  # sequences in the current prefill; 0 = nothing prefilled
        self.position = 0  # position of the next token; cross caches hold slots 0..position

    def _allocate(self, dtype) -> Tuple[List[KVCache], List[KVCache]]:
        cfg, rows = self.cfg, self.max_batch_size

        def cache(sections: int, size: int) -> KVCache:
            return KVCache(sections * rows, cfg.num_query_groups, size, cfg.head_dim,
                           self.max_len, dtype, self.device)

        cross_size = self.max_len if self.window is None else min(self.window, self.max_len)
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
        x = self._embed(input_ids.to(self.device), first=0)  # [b, s, h]
        outs = []
        for k in range(self.p):
            memory = self._prompt_memory(k, outs[-1]) if k > 0 else None
            outs.append(self._run_section(k, x, first=0, memory=memory))
        self.position = length
        return self._logits(outs)[:, -1]

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
        t = self.position
        x = self._embed(input_ids.to(self.device).view(self.batch, 1), first=t)  # [b, 1, h]
        outs = self._step(x, t)
        self._append_slots(outs, slot=t + 1)
        self.position = t + 1
        return self._logits(outs)[:, -1]

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

    # ------------------------------------------------------------------ step variants

    def _step_sequential(self, x: Tensor, t: int) -> List[Tensor]:
        """Every section on token t, one after another -> outputs [b, 1, h] per section."""
        return [self._run_section(k, x, first=t) for k in range(self.p)]

    def _step_batched(self, x: Tensor, t: int) -> List[Tensor]:
        """Shared weights: the p passes as one over p * b rows (section-major)."""
        b, p = self.batch, self.p
        stack = self.model.stack(0)
        h = x.repeat(p, 1, 1)  # [p * b, 1, h]
        for i, block in enumerate(stack.blocks):
            h = h + self._self_attention(block, i, h, slice(0, p * b), first=t)
            if p > 1:  # sections 2..p: rows b.., cross rows 0..(p-1)*b
                later = h[b:] + self._cross_attention(block, i, h[b:], slice(0, (p - 1) * b),
                                                      first=t)
                h = torch.cat([h[:b], later])
            h = h + block.mlp(block.ln_mlp(h))
        return list(stack.ln_out(h).split(b))

    def _step_recurrent(self, x: Tensor, t: int) -> List[Tensor]:
        """The last section alone; its memory holds its own earlier outputs."""
        return [self._run_section(self.p - 1, x, first=t)]

    # ------------------------------------------------------------------ sections and layers

    def _run_section(self, k: int, x: Tensor, first: int,
                     memory: Optional[list] = None) -> Tensor:
        """Section k over x [b, n, h] (tokens at positions first..first+n-1) -> [b, n, h].

        Cross-attention (k > 0) reads `memory` (prefill: per layer the keys, values and
        visibility over the prompt's slots) or, in a step, the cross caches."""
        stack = self.model.stack(k)
        for i, block in enumerate(stack.blocks):
            x = x + self._self_attention(block, i, x, self._rows(k), first)
            if k > 0:
                x = x + self._cross_attention(block, i, x, self._cross_rows(k), first,
                                              None if memory is None else memory[i])
            x = x + block.mlp(block.ln_mlp(x))
        return stack.ln_out(x)

    def _rows(self, k: int) -> slice:
        """Section k's rows of the self caches."""
        return slice(k * self.batch, (k + 1) * self.batch)

    def _cross_rows(self, k: int) -> slice:
        """Section k's (k > 0) rows of the cross caches."""
        return slice((k - 1) * self.batch, k * self.batch)

    def _self_attention(self, block: Block, i: int, x: Tensor, rows: slice,
                        first: int) -> Tensor:
        """Causal self-attention of x [b, n, h] at positions first.., through cache i."""
        n = x.shape[1]
        h = block.ln_self(x)
        angles = self._self_angles(first, n)
        q = project_queries(block.self_attn, h, angles)  # [b, heads, n, d]
        k, v = project_keys_values(block.self_attn, h, angles)  # [b, groups, n, d]
        cache = self.self_caches[i]
        cache.update(rows, first, k, v)
        keys, values = cache.read(rows, first + n)  # tokens 0..first+n-1
        visible = None
        if n > 1:  # query j (position first + j) sees tokens <= first + j
            visible = (torch.arange(first + n, device=x.device)[None, :]
                       <= torch.arange(first, first + n, device=x.device)[:, None])
        return block.self_attn.o(attend(q, keys, values, visible))

    def _cross_attention(self, block: Block, i: int, x: Tensor, rows: slice, first: int,
                         memory: Optional[tuple] = None) -> Tensor:
        """x [b, n, h] (queries at positions first+1..) over the memory: `memory` = (keys,
        values, visible) of the prompt, or (a step, n = 1) the cached slots of the window."""
        n = x.shape[1]
        q = project_queries(block.cross_attn, block.ln_cross(x), self._cross_angles(first + 1, n))
        if memory is None:
            cache = self.cross_caches[i]
            keys, values = cache.read(rows, min(first + 1, cache.size))  # slots <= first
            visible = None
        else:
            keys, values, visible = memory
        return block.cross_attn.o(attend(q, keys, values, visible))

    # ------------------------------------------------------------------ memory slots

    def _prompt_memory(self, k: int, previous: Tensor) -> list:
        """Section k's memory over the prompt from section k-1's outputs previous [b, s, h]:
        per layer (keys, values [b, groups, s, d] of slots 0..s-1, visible [s, s]). Slots
        0..s (slot s: the last prompt token's output, read by the first step) are cached."""
        length = previous.shape[1]
        null = self.model.null_memory.to(previous.dtype).expand(self.batch, 1, -1)
        slots = torch.cat([null, previous], dim=1)  # [b, s+1, h]: slot j = previous[j-1]
        angles = self._cross_angles(0, length + 1)
        visible = self._window_mask(length)
        memory = []
        for i, block in enumerate(self.model.stack(k).blocks):
            keys, values = project_keys_values(block.cross_attn, slots, angles)
            self.cross_caches[i].update(self._cross_rows(k), 0, keys, values)
            memory.append((keys[:, :, :length], values[:, :, :length], visible))
        return memory

    def _window_mask(self, length: int) -> Tensor:
        """[s, s], True where query i may read slot j: j <= i and (window w) j > i - w."""
        i = torch.arange(length, device=self.device)[:, None]
        j = torch.arange(length, device=self.device)[None, :]
        visible = j <= i
        if self.window is not None:
            visible = visible & (j > i - self.window)
        return visible

    def _append_slots(self, outs: List[Tensor], slot: int) -> None:
        """After the step at position slot-1: cache slot `slot` of every section k > 0 =
        section k-1's output (recurrent mode: the last section's own output)."""
        if self.mode == "recurrent":
            self._append_slot(self.p - 1, outs[-1], slot)
            return
        for k in range(1, self.p):
            self._append_slot(k, outs[k - 1], slot)

    def _append_slot(self, k: int, source: Tensor, slot: int) -> None:
        """Slot `slot` of section k = source [b, 1, h], projected per layer and cached."""
        angles = self._cross_angles(slot, 1)
        for i, block in enumerate(self.model.stack(k).blocks):
            keys, values = project_keys_values(block.cross_attn, source, angles)
            self.cross_caches[i].update(self._cross_rows(k), slot, keys, values)

    # ------------------------------------------------------------------ positions, ends

    def _self_angles(self, first: int, n: int) -> Optional[Tensor]:
        if self.cfg.position_embedding_type != "rope":
            return None
        return self.angles[first:first + n]

    def _cross_angles(self, first: int, n: int) -> Optional[Tensor]:
        if not self.cfg.cross_attention_rope:
            return None
        return self.angles[first:first + n]

    def _embed(self, input_ids: Tensor, first: int) -> Tensor:
        """ids [b, n] at positions first.. -> [b, n, h]."""
        x = self.model.tok_emb(input_ids)
        if self.cfg.position_embedding_type == "learned_absolute":
            positions = torch.arange(first, first + input_ids.shape[1], device=self.device)
            x = x + self.model.pos_emb(positions)
        return x

    def _logits(self, outs: List[Tensor]) -> Tensor:
        """Section outputs [b, n, h] -> logits [b, n, vocab] (recurrent: the last pass)."""
        hidden = outs[-1] if self.mode == "recurrent" else self.model.combine(outs)
        return self.model.head(hidden)


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
