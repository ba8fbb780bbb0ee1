"""PipelineDecoder: staggered decoding with one whole section per pipeline rank, all sections at
once.

A StagGPTModel built under pipeline parallelism with pipeline size = num_sections (tensor
parallel size 1, output_combination "last") holds one section per rank. Every rank builds a
PipelineDecoder and calls the same methods with the same token ids:

    prefill(prompt [b, s])  the stages one after another: stage k receives section k-1's
                            outputs over the prompt, fills its caches, sends its own outputs on
    step(tokens [b])        every stage first caches slot t (the K/V of section k-1's output at
                            t-1, sent during the previous step), runs token t, projects its own
                            output to the next section's cross-attention K/V of slot t + 1 (a
                            copy of those weights is sent once, when the decoders are built) and
                            sends them without waiting (isend): that projection moves from the
                            heavier later stage to this one
    generate(...)           the one token loop; the last stage samples, and broadcasts the ids
                            over the pipeline group
    finish()                settles the messages of the last step (generate and prefill call it)

Only the last stage returns logits (the others None). The layer math is
stag_plugin.decode.layers, as in StagDecoder.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from stag_plugin.compat import megatron as compat
from stag_plugin.core.attention import cross_attention_mask
from stag_plugin.decode import layers
from stag_plugin.decode.engine import (
    broadcast_choice,
    check_batch,
    check_model,
    check_room,
    check_step,
    new_caches,
)
from stag_plugin.errors import StagError
from stag_plugin.reference import sampling
from stag_plugin.reference.sampling import Sampler


class PipelineDecoder:
    """This pipeline rank's part of staggered decoding (see the module docstring).

    Args:
        model: this rank's stage of a StagGPTModel built with pipeline_model_parallel_size =
            num_sections; put in eval mode here. Build the decoder on every rank at once: the
            constructor sends each stage a copy of the next section's cross-attention K/V
            projection (2 h^2 per layer of extra memory on every stage but the last).
        max_batch_size, max_sequence_length: as for StagDecoder.
    """

    MODES = ("pipeline",)
    mode = "pipeline"

    def __init__(self, model, max_batch_size: int, max_sequence_length: int):
        from megatron.core import parallel_state as ps

        check_model(model, max_batch_size, max_sequence_length)
        check_pipeline_layout(model.config)
        self.model, self.config = model.eval(), model.config
        self.max_batch_size, self.max_len = max_batch_size, max_sequence_length
        self.math = layers.LayerMath.of(model)
        (self.section,) = model.stage.sections
        self.block = model.sections[0]
        self.is_last = self.section == self.config.num_sections - 1
        self.caches = new_caches(model, (self.section,), max_batch_size, max_sequence_length)
        self.device = model.embedding.word_embeddings.weight.device
        self.dtype = model.embedding.word_embeddings.weight.dtype
        self.group = ps.get_pipeline_model_parallel_group()
        self.next_rank, self.prev_rank = (ps.get_pipeline_model_parallel_next_rank(),
                                          ps.get_pipeline_model_parallel_prev_rank())
        self.last_rank = ps.get_pipeline_model_parallel_last_rank()
        self.next_kv = self._share_slot_weights()
        self.slot_rotary = (compat.rotary_embedding(self.config)
                            if self.config.cross_attention_rope else None)
        self._pending_recv = None  # (work, buffer): K/V of this stage's slot from the last step
        self._pending_sends: list = []  # (work, tensor) in flight to the next stage
        self.position = 0

    def cache_bytes(self) -> dict:
        return self.caches.nbytes()

    def check_room(self, length: int, what: str) -> None:
        check_room(length, self.max_len, what)

    # ------------------------------------------------------------------ public steps

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> Optional[Tensor]:
        """This stage's section over the prompt [b, s]: receive section k-1's outputs (k > 0),
        fill the caches, send this section's outputs on. Logits [b, vocab] on the last stage."""
        batch, length = input_ids.shape
        check_batch(batch, self.max_batch_size)
        self.check_room(length, "prompt")
        self.finish()
        self.caches.batch, self.position = batch, 0
        x = layers.embed(self.model, input_ids.to(self.device), first=0)  # [s, b, h]
        memory = None
        if self.section > 0:
            previous = self._receive((length, batch, self.config.hidden_size), self.prev_rank)
            mask = cross_attention_mask(length, self.config.cross_attention_window, self.device)
            memory = layers.prompt_memory(self.block, self.section, self.model.null_memory,
                                          previous, mask, self.caches)
        out = layers.run_section(self.math, self.block, self.section, x, 0, self.caches, memory)
        if not self.is_last:
            dist.send(out.contiguous(), dst=self.next_rank, group=self.group)
        self.position = length
        return layers.logits(self.model, [out], combine=False)[-1] if self.is_last else None

    @torch.no_grad()
    def step(self, input_ids: Tensor) -> Optional[Tensor]:
        """Token t on this stage: cache slot t, run the section, send the next section its slot
        t + 1. Logits [b, vocab] on the last stage, None elsewhere."""
        check_step(input_ids, self.caches.batch)
        self.check_room(self.position + 1, "prompt + generated tokens")
        t = self.position
        self._cache_received_slot(t)
        x = layers.embed(self.model, input_ids.to(self.device).view(-1, 1), first=t)  # [1, b, h]
        out = layers.run_section(self.math, self.block, self.section, x, t, self.caches)
        if not self.is_last:
            self._send_next_slot(out, slot=t + 1)
        if self.section > 0:  # K/V of section k-1's output at t: slot t + 1, cached next step
            shape = (self.config.layers_per_section, 2, 1, self.caches.batch,
                     self.caches.groups, self.caches.head_dim)
            buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
            self._pending_recv = (dist.irecv(buffer, src=self.prev_rank, group=self.group),
                                  buffer)
        self.position += 1
        return layers.logits(self.model, [out], combine=False)[0] if self.is_last else None

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int,
                 sampler: Optional[Sampler] = None, stop_tokens=None) -> List[List[int]]:
        """As StagDecoder.generate; call it on every pipeline rank with the same arguments."""
        sampler = sampler or Sampler()
        batch = prompt_ids.shape[0]
        choose = lambda logits: broadcast_choice(logits, sampler, batch, self.last_rank,
                                                 self.group, self.device)
        try:
            return sampling.generate(self, prompt_ids, max_new_tokens, sampler, stop_tokens,
                                     next_tokens=choose)
        finally:
            self.finish()

    def finish(self) -> None:
        """Wait for the messages still in flight (the last step's outputs sent to the next
        stage). Called by prefill and generate; call it after a run of `step`s."""
        if self._pending_recv is not None:
            self._pending_recv[0].wait()
            self._pending_recv = None
        for handle, _ in self._pending_sends:
            handle.wait()
        self._pending_sends = []

    # ------------------------------------------------------------------ messages

    def _receive(self, shape, source: int) -> Tensor:
        buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
        dist.recv(buffer, src=source, group=self.group)
        return buffer

    def _cache_received_slot(self, t: int) -> None:
        """Slot t of this section: the K/V the previous stage sent during the last step (none
        right after prefill, which filled slot t)."""
        if self._pending_recv is None:
            return
        work, slot_kv = self._pending_recv  # [layers, 2, 1, b, g, hd]
        work.wait()
        self._pending_recv = None
        rows = self.caches.cross_rows(self.section)
        for i, cache in enumerate(self.caches.cross_kv):
            cache.update(rows, t, slot_kv[i, 0].permute(1, 2, 0, 3),
                         slot_kv[i, 1].permute(1, 2, 0, 3))

    def _send_next_slot(self, out: Tensor, slot: int) -> None:
        """This section's output out [1, b, h] as memory slot `slot` of the next section: per
        layer its keys (RoPE at `slot`) and values as StagCrossAttention.project_memory computes
        them, [layers, 2, 1, b, g, hd], sent without waiting."""
        batch, groups, hd = self.caches.batch, self.caches.groups, self.caches.head_dim
        pairs = []
        for weight, bias in self.next_kv:
            mixed = F.linear(out, weight, bias).view(1, batch, groups, 2 * hd)
            key, value = mixed.chunk(2, dim=-1)  # per group: [k | v], each [1, b, g, hd]
            if self.slot_rotary is not None:
                key = compat.apply_rope(key.contiguous(), self.slot_rotary(1, offset=slot),
                                        self.config)
            pairs.append(torch.stack([key, value]))
        slot_kv = torch.stack(pairs).contiguous()
        self._pending_sends = [(w, o) for w, o in self._pending_sends if not w.is_completed()]
        self._pending_sends.append(
            (dist.isend(slot_kv, dst=self.next_rank, group=self.group), slot_kv))

    def _share_slot_weights(self) -> List[tuple]:
        """Each stage sends its layers' cross-attention K/V projection (linear_kv weight, bias)
        to the stage before, once. Returns the next section's [(weight [2 g hd, h], bias or
        None)] per layer (the last stage: [])."""
        sends = []
        if self.section > 0:
            for layer in self.block.layers:
                for tensor in layers.weight_and_bias(layer.cross_attention.linear_kv):
                    sends.append(dist.isend(tensor.detach().contiguous(), dst=self.prev_rank,
                                            group=self.group))
        received = []
        if not self.is_last:
            config = self.config
            rows = 2 * config.num_query_groups * config.kv_channels
            bias = config.add_bias_linear or config.add_qkv_bias  # as the module's
            for _ in range(config.layers_per_section):
                weight = self._receive((rows, config.hidden_size), self.next_rank)
                received.append((weight, self._receive((rows,), self.next_rank) if bias else None))
        for work in sends:
            work.wait()
        return received


def check_pipeline_layout(config) -> None:
    """One whole section per pipeline stage, no tensor parallelism, the last section's logits."""
    p, pp = config.num_sections, config.pipeline_model_parallel_size
    if pp == 1:
        raise StagError(
            "PipelineDecoder decodes a model built under pipeline parallelism with one section "
            "per stage; this model has a single pipeline stage (pipeline_model_parallel_size=1)",
            f"use StagDecoder (mode 'sequential' or 'batched'), or launch "
            f"{p} processes (torchrun) and build the model with pipeline_model_parallel_size="
            f"num_sections={p}")
    if pp != p:
        raise StagError(
            f"PipelineDecoder needs one whole section per pipeline stage "
            f"(pipeline_model_parallel_size == num_sections = {p}); this model has "
            f"pipeline_model_parallel_size={pp}",
            f"build the model with pipeline_model_parallel_size={p} (distributed checkpoints "
            "reshard on load), or load it with both parallel sizes 1 and use StagDecoder")
    if config.tensor_model_parallel_size != 1:
        raise StagError(
            f"PipelineDecoder needs tensor_model_parallel_size=1; this model has "
            f"{config.tensor_model_parallel_size}",
            f"build the model with tensor_model_parallel_size=1, pipeline_model_parallel_size="
            f"{p} (distributed checkpoints reshard on load)")
    if config.output_combination != "last":
        raise StagError(
            "PipelineDecoder needs output_combination='last' (the last stage alone makes the "
            f"logits); this model has output_combination={config.output_combination!r}",
            "load it with both parallel sizes 1 and use StagDecoder")
