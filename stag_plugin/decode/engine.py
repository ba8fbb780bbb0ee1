"""StagDecoder: staggered decoding of a StagGPTModel in one process, at any tensor-parallel size.

Small named steps around explicit caches, gpt-fast style:

    StagDecoder(model, max_batch_size, max_sequence_length, mode)   allocates the caches
    prefill(prompt [b, s])   -> logits [b, vocab]   sections one after another over the prompt
    step(tokens [b])         -> logits [b, vocab]   every section processes the same new token
    generate(prompt, n, sampler, stop_tokens)       the one token loop of
                                                    stag_plugin.reference.sampling

`self.position` is the position of the next token. A step at position t runs token t through
every section (section k > 0 cross-attends to its slots 0..t, only t-w+1..t with a window),
then caches slot t+1 of section k = section k-1's output at t. The layer math is in
stag_plugin.decode.layers; one section per pipeline rank is stag_plugin.decode.pipeline.

Modes:
    "sequential"  sections one after another inside each step (the reference decode).
    "batched"     shared weights only: the p section passes of a step run as one forward over
                  p * b rows (one weight read per step); cross-attention runs on the rows of
                  sections 2..p, which share its weights.
    "recurrent"   shared weights only, p >= 2: prefill as in training, then one pass per token
                  (the last section's configuration) that cross-attends to its own outputs of
                  earlier steps (prompt slots stay section p-1's outputs from prefill). Its
                  logits read that pass alone (no learned combination). Not equal to the
                  teacher-forced forward, by design.

Tensor parallelism: every TP rank runs the same steps on its own heads (the caches hold
num_query_groups / tp groups); the logits are gathered to the full vocabulary on every rank, so
greedy choices agree, and a random choice in `generate` is made on the first TP rank and
broadcast. The plain-PyTorch counterpart (no Megatron) is
stag_plugin.reference.decode.ReferenceDecoder.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from stag_plugin.core.attention import cross_attention_mask
from stag_plugin.decode import layers
from stag_plugin.errors import StagError
from stag_plugin.reference import sampling
from stag_plugin.reference.sampling import Sampler

MODES = ("sequential", "batched", "recurrent")


class StagDecoder:
    """Staggered incremental decoding of a StagGPTModel with every section on this process
    (pipeline parallel size 1, any tensor parallel size).

    Args:
        model: a StagGPTModel (its tensor-parallel shard under TP); put in eval mode here.
        max_batch_size: most sequences decoded together.
        max_sequence_length: most positions (prompt + generated tokens fed back) per sequence.
        mode: "sequential", "batched" (shared weights) or "recurrent" (shared weights, p >= 2).
    """

    MODES = MODES

    def __init__(self, model, max_batch_size: int, max_sequence_length: int,
                 mode: str = "sequential"):
        check_model(model, max_batch_size, max_sequence_length)
        check_mode(model.config, mode)
        self.model, self.config, self.mode = model.eval(), model.config, mode
        self.p = self.config.num_sections
        self.max_batch_size, self.max_len = max_batch_size, max_sequence_length
        self.math = layers.LayerMath.of(model)
        self.caches = new_caches(model, range(self.p), max_batch_size, max_sequence_length)
        self.device = model.embedding.word_embeddings.weight.device
        self._step = {"sequential": self._step_sequential, "batched": self._step_batched,
                      "recurrent": self._step_recurrent}[mode]
        if self.config.tensor_model_parallel_size > 1:
            # Megatron's logits gather allocates on the current CUDA device; on a CPU-only
            # machine the compatibility layer redirects it (idempotent; a no-op on GPU).
            from stag_plugin.compat.cpu import apply_cpu_compat

            apply_cpu_compat()
        self.position = 0  # position of the next token; cross caches hold slots 0..position

    def cache_bytes(self) -> dict:
        """Bytes held by the preallocated caches: {"self": ..., "cross": ...}."""
        return self.caches.nbytes()

    # ------------------------------------------------------------------ public steps

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> Tensor:
        """Prompt [b, s] -> logits [b, vocab] at its last position; (re)fills every cache.
        Sections run one after another over the whole prompt (as in training)."""
        batch, length = input_ids.shape
        check_batch(batch, self.max_batch_size)
        self.check_room(length, "prompt")
        self.caches.batch, self.position = batch, 0
        x = layers.embed(self.model, input_ids.to(self.device), first=0)  # [s, b, h]
        mask = cross_attention_mask(length, self.config.cross_attention_window, self.device)
        outs = []
        for k in range(self.p):
            block = self.model.sections[k]
            memory = (layers.prompt_memory(block, k, self.model.null_memory, outs[-1], mask,
                                           self.caches) if k > 0 else None)
            outs.append(layers.run_section(self.math, block, k, x, 0, self.caches, memory))
        self.position = length
        return self._logits(outs)[-1]

    @torch.no_grad()
    def step(self, input_ids: Tensor) -> Tensor:
        """One new token per sequence, ids [b] -> logits [b, vocab] for the token after it."""
        check_step(input_ids, self.caches.batch)
        self.check_room(self.position + 1, "prompt + generated tokens")
        t = self.position
        x = layers.embed(self.model, input_ids.to(self.device).view(-1, 1), first=t)  # [1, b, h]
        outs = self._step(x, t)
        self._append_slots(outs, slot=t + 1)
        self.position += 1
        return self._logits(outs)[0]

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int,
                 sampler: Optional[Sampler] = None, stop_tokens=None) -> List[List[int]]:
        """Up to `max_new_tokens` new tokens after each prompt of `prompt_ids` [b, s] (sampler
        None = greedy; per-sequence stop tokens). Under tensor parallelism call it on every
        rank with the same arguments; every rank returns the same tokens."""
        sampler = sampler or Sampler()
        return sampling.generate(self, prompt_ids, max_new_tokens, sampler, stop_tokens,
                                 next_tokens=lambda logits: self._choose(logits, sampler))

    def check_room(self, length: int, what: str) -> None:
        """Refuse `length` positions when the caches hold fewer."""
        check_room(length, self.max_len, what)

    # ------------------------------------------------------------------ step variants

    def _step_sequential(self, x: Tensor, t: int) -> List[Tensor]:
        return [layers.run_section(self.math, self.model.sections[k], k, x, t, self.caches)
                for k in range(self.p)]

    def _step_batched(self, x: Tensor, t: int) -> List[Tensor]:
        """All p passes as one forward over p * b rows (shared weights)."""
        b, p, math, caches = self.caches.batch, self.p, self.math, self.caches
        h = x.repeat(1, p, 1)  # [1, p*b, h], section-major rows
        for i, layer in enumerate(self.model.sections[0].layers):
            h = h + layers.self_attention(math, layer, h, caches.self_kv[i], slice(0, p * b), t)
            if p > 1:  # sections 2..p: rows b.., their cross rows 0..(p-1)*b
                cross_layer = self.model.sections[1].layers[i]
                later = h[:, b:] + layers.cached_cross_attention(
                    math, cross_layer, h[:, b:], caches.cross_kv[i], slice(0, (p - 1) * b), t)
                h = torch.cat([h[:, :b], later], dim=1)
            h = h + layers.mlp(layer, h)
        return list(self.model.sections[0].final_layernorm(h).split(b, dim=1))

    def _step_recurrent(self, x: Tensor, t: int) -> List[Tensor]:
        """One pass (section p's configuration) reading its own earlier outputs as memory."""
        k = self.p - 1
        return [layers.run_section(self.math, self.model.sections[k], k, x, t, self.caches)]

    def _append_slots(self, outs: List[Tensor], slot: int) -> None:
        """After the step at position slot-1: slot `slot` of section k = section k-1's output
        (recurrent mode: the single pass's own output, for the last section)."""
        if self.mode == "recurrent":
            layers.append_memory(self.model.sections[-1], self.p - 1, outs[0], slot,
                                 self.caches)
            return
        for k in range(1, self.p):
            layers.append_memory(self.model.sections[k], k, outs[k - 1], slot, self.caches)

    def _logits(self, outs: List[Tensor]) -> Tensor:
        combine = self.config.output_combination == "learned" and self.mode != "recurrent"
        return layers.logits(self.model, outs, combine)

    def _choose(self, logits: Tensor, sampler: Sampler) -> Tensor:
        """The next ids [b], the same on every TP rank: the gathered logits are equal on every
        rank, so argmax agrees; a random choice is made on the first rank and broadcast."""
        if self.config.tensor_model_parallel_size == 1 or sampler.greedy:
            return sampler(logits)
        from megatron.core import parallel_state

        return broadcast_choice(logits, sampler, self.caches.batch,
                                parallel_state.get_tensor_model_parallel_src_rank(),
                                parallel_state.get_tensor_model_parallel_group(), self.device)


# ---------------------------------------------------------------------------- shared helpers


def new_caches(model, sections, max_batch_size: int, max_len: int) -> layers.Caches:
    """Caches for `sections` of `model` (this rank's heads under tensor parallelism)."""
    attention = model.sections[0].layers[0].self_attention
    weight = model.embedding.word_embeddings.weight
    return layers.Caches(sections, model.config.layers_per_section, max_batch_size,
                         attention.num_query_groups_per_partition,
                         attention.hidden_size_per_attention_head, max_len,
                         model.config.cross_attention_window, weight.dtype, weight.device)


def broadcast_choice(logits: Optional[Tensor], sampler: Sampler, batch: int, source: int,
                     group, device) -> Tensor:
    """Sample on global rank `source` (the only rank that needs logits), broadcast ids [b]."""
    if dist.get_rank() == source:
        tokens = sampler(logits).to(torch.int64).contiguous()
    else:
        tokens = torch.empty(batch, dtype=torch.int64, device=device)
    dist.broadcast(tokens, src=source, group=group)
    return tokens


def check_model(model, max_batch_size: int, max_sequence_length: int) -> None:
    """What every Megatron engine needs of the model and sizes."""
    config = model.config
    if max_batch_size < 1 or max_sequence_length < 1:
        raise StagError(f"max_batch_size={max_batch_size} and max_sequence_length="
                        f"{max_sequence_length} must both be >= 1", "pass positive sizes")
    bad = [name for name in ("apply_residual_connection_post_layernorm", "sequence_parallel")
           if getattr(config, name)]
    if bad:
        raise StagError(f"the decode engines do not implement {bad}", "set them to False")
    if (config.position_embedding_type == "learned_absolute"
            and max_sequence_length > model.max_sequence_length):
        raise StagError(f"max_sequence_length={max_sequence_length} exceeds the model's "
                        f"learned positions ({model.max_sequence_length})",
                        f"use at most {model.max_sequence_length}")


def check_mode(config, mode: str) -> None:
    """StagDecoder's modes, on a model with every section on this process."""
    if mode == "pipeline":
        raise StagError("mode='pipeline' is stag_plugin.decode.pipeline.PipelineDecoder's",
                        "build a PipelineDecoder on every pipeline rank")
    if mode not in MODES:
        raise StagError(f"mode={mode!r} is not one of {MODES}", "pick one of them")
    if config.pipeline_model_parallel_size != 1:
        raise StagError(
            f"mode={mode!r} decodes a model with every section on this process (pipeline_model_"
            f"parallel_size=1, any tensor_model_parallel_size); this one has pipeline_model_"
            f"parallel_size={config.pipeline_model_parallel_size}",
            "decode it with stag_plugin.decode.pipeline.PipelineDecoder (pipeline size = "
            "num_sections), or load the checkpoint into a model built with "
            "pipeline_model_parallel_size=1 (distributed checkpoints reshard on load)")
    sampling.check_mode(mode, config.weight_sharing, config.num_sections)


def check_batch(batch: int, max_batch_size: int) -> None:
    if not 1 <= batch <= max_batch_size:
        raise StagError(f"a batch of {batch} prompts does not fit max_batch_size="
                        f"{max_batch_size}", f"pass 1 to {max_batch_size} prompts, or build "
                        f"the decoder with max_batch_size >= {batch}")


def check_step(input_ids: Tensor, batch: int) -> None:
    if batch == 0:
        raise StagError("step() reads the caches that prefill fills, and nothing was "
                        "prefilled", "call prefill(prompt) before step()")
    if tuple(input_ids.shape) != (batch,):
        raise StagError(f"step takes one token per sequence, ids of shape [{batch}]; got "
                        f"{tuple(input_ids.shape)}", "pass the last token of each of the "
                        "prefilled sequences")


def check_room(length: int, max_len: int, what: str) -> None:
    if length > max_len:
        raise StagError(f"{what} needs {length} positions but the decoder holds "
                        f"max_sequence_length={max_len}", "shorten the input, ask for fewer "
                        "new tokens, or build the decoder with a larger max_sequence_length")
