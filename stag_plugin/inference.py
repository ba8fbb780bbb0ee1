"""Staggered decoding of a StagGPTModel (STAGFORMER.md section 4): one process, tensor
parallel ranks, or one section per pipeline rank.

Small named steps around explicit caches, gpt-fast style:

    StagDecoder(model, max_batch_size, max_sequence_length, mode)   allocates the caches
    prefill(prompt [b, s])   -> logits [b, vocab]   sections one after another over the prompt
    step(tokens [b])         -> logits [b, vocab]   every section processes the same new token
    generate(prompt, n, sampler, stop_tokens)       stag_plugin.sampling.generate's loop

Positions are explicit: `self.position` is the position of the next token. Token t sits at
position t in self-attention; in cross-attention its query sits at t + 1 and memory slot j at j
(slot 0 = learned null memory, slot j = output of section k-1 at token j-1), as in
stag_plugin.attention.

Caches (views of buffers allocated once, section-major rows so that the batched mode reads one
[p * b] tensor per layer):
    self  K/V per layer:        [p * b, groups, max_len, head_dim]    rows k*b..k*b+b: section k
    cross K/V per layer:        [(p-1) * b, groups, C, head_dim]      rows of sections 1..p-1
where C = w (the cross-attention window; a ring buffer, slot j at index j % w) or max_len.

Decode step at position t (all sections): section k > 0 cross-attends to its slots 0..t
(only t-w+1..t with a window), then slot t+1 = section k-1's output at t is appended.

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
    "pipeline"    a model built under pipeline parallelism with one whole section per stage
                  (pipeline size = num_sections, tensor parallel size 1; output_combination
                  "last"), one StagDecoder per rank, every rank calling the same methods with the
                  same token ids. Sequential mode restricted to this rank's section, plus
                  point-to-point messages on the pipeline group: prefill runs the stages one
                  after another (stage k receives section k-1's outputs over the prompt, fills
                  its caches, sends its own outputs on); in the step at position t every stage
                  first caches slot t (K/V of section k-1's output at t-1, sent during the
                  previous step), runs token t, projects its output to the next section's
                  cross-attention K/V of slot t + 1 (a copy of those weights is sent once, at
                  setup, by the next stage) and sends them without waiting (isend): the
                  projection moves from the heavier later stage to this one. Only the last
                  stage returns logits (others None); `generate` samples there and broadcasts
                  the token over the pipeline group. `finish()` settles the messages of the
                  last step (generate and prefill call it).

Tensor parallelism (modes sequential / batched / recurrent, pipeline size 1): every TP rank
runs the same steps on its own heads (the caches hold num_query_groups / tp groups); Megatron's
row-parallel projections (linear_proj, linear_fc2) all-reduce, the embedding all-reduces, and the
logits are gathered to the full vocabulary on every rank, so greedy choices agree; a random
choice in `generate` is made on the first TP rank and broadcast.

Every layer is computed with the model's own submodules (norms, linear_qkv, linear_proj,
StagCrossAttention.project_query/project_memory, mlp, final_layernorm, embedding, output_layer).
The plain-PyTorch counterpart (no Megatron) is stag_plugin.reference_decode.ReferenceDecoder.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import torch.distributed as dist

from stag_plugin import megatron_compat as compat
from stag_plugin import sampling
from stag_plugin.attention import cross_attention_mask
from stag_plugin.sampling import Sampler  # noqa: F401  (stag_plugin.inference.Sampler)

MODES = ("sequential", "batched", "recurrent", "pipeline")


# ---------------------------------------------------------------------------- caches


class StagCaches:
    """Preallocated K/V buffers; `for_batch(b)` gives section-major views for a batch of b."""

    def __init__(self, num_layers: int, num_sections: int, max_batch_size: int, groups: int,
                 max_len: int, cross_len: int, head_dim: int, dtype, device,
                 cross_sections: Optional[int] = None):
        """cross_sections: sections with cross-attention caches (default num_sections - 1)."""
        self.num_sections, self.groups, self.head_dim = num_sections, groups, head_dim
        self.max_len, self.cross_len = max_len, cross_len
        if cross_sections is None:
            cross_sections = num_sections - 1
        self.cross_sections = cross_sections
        p, later = num_sections, cross_sections
        shape_self = (p * max_batch_size, groups, max_len, head_dim)
        shape_cross = (later * max_batch_size, groups, cross_len, head_dim)
        new = dict(dtype=dtype, device=device)
        self._self = [(torch.zeros(shape_self, **new), torch.zeros(shape_self, **new))
                      for _ in range(num_layers)]
        self._cross = [(torch.zeros(shape_cross, **new), torch.zeros(shape_cross, **new))
                       for _ in range(num_layers if later else 0)]
        self.self_kv: List[tuple] = []
        self.cross_kv: List[tuple] = []

    def for_batch(self, batch: int) -> None:
        """Point self_kv / cross_kv at the first rows of the buffers, laid out as
        [sections * batch, groups, len, head_dim] (contiguous views, no copy)."""
        def view(buf: Tensor, rows: int) -> Tensor:
            shape = (rows,) + tuple(buf.shape[1:])
            return buf.view(-1)[:rows * buf[0].numel()].view(shape)
        p, later = self.num_sections, self.cross_sections
        self.self_kv = [(view(k, p * batch), view(v, p * batch)) for k, v in self._self]
        self.cross_kv = [(view(k, later * batch), view(v, later * batch))
                         for k, v in self._cross]

    def nbytes(self) -> dict:
        count = lambda pairs: sum(t.numel() * t.element_size() for kv in pairs for t in kv)
        return {"self": count(self._self), "cross": count(self._cross)}


# ---------------------------------------------------------------------------- decoder


class StagDecoder:
    """Staggered incremental decoding of a StagGPTModel (pipeline parallel size 1 and any
    tensor parallel size, or mode "pipeline": one section per pipeline stage, TP 1).

    Args:
        model: a StagGPTModel with every section on this process (its tensor-parallel shard
            under TP; mode "pipeline": this rank's stage of it); put in eval mode here.
        max_batch_size: most sequences decoded together.
        max_sequence_length: most positions (prompt + generated tokens fed back) per sequence.
        mode: "sequential", "batched" (shared weights), "recurrent" (shared weights, p >= 2)
            or "pipeline" (pipeline size = num_sections; see the module docstring). In mode
            "pipeline" build the decoder on every rank at once: the constructor sends each
            stage a copy of the next section's cross-attention K/V projection (2 h^2 per
            layer of extra memory on every stage but the last).
    """

    MODES = MODES

    def __init__(self, model, max_batch_size: int, max_sequence_length: int,
                 mode: str = "sequential"):
        config = model.config
        _check_model(model, config, max_sequence_length, mode)
        if max_batch_size < 1 or max_sequence_length < 1:
            raise ValueError(f"max_batch_size={max_batch_size} and max_sequence_length="
                             f"{max_sequence_length} must both be >= 1. Fix: pass positive sizes")
        self.model = model.eval()
        self.config, self.mode = config, mode
        self.p, self.lps = config.num_sections, config.layers_per_section
        self.max_batch_size, self.max_len = max_batch_size, max_sequence_length
        self.window = config.cross_attention_window
        self.cross_len = max_sequence_length if self.window is None else self.window
        self.rotary = getattr(model, "rotary_pos_emb", None)
        attention = model.sections[0].layers[0].self_attention
        self.head_dim = attention.hidden_size_per_attention_head
        self.softmax_scale = attention.core_attention.softmax_scale
        param = model.embedding.word_embeddings.weight
        self.pipelined = mode == "pipeline"
        self.tp_size = config.tensor_model_parallel_size  # caches hold this rank's heads
        # Sections run on this process (global indices), and their rows in the caches.
        local = model.stage.sections if self.pipelined else tuple(range(self.p))
        self._local = {k: j for j, k in enumerate(local)}
        self._cross = {k: j for j, k in enumerate(k for k in local if k > 0)}
        self.caches = StagCaches(self.lps, len(local), max_batch_size,
                                 attention.num_query_groups_per_partition, max_sequence_length,
                                 self.cross_len, self.head_dim, param.dtype, param.device,
                                 cross_sections=len(self._cross))
        self.device = param.device
        if self.pipelined:
            self._setup_pipeline(local[0])
        if self.tp_size > 1:
            # Megatron's logits gather allocates on the current CUDA device; on a CPU-only
            # machine the project's compatibility layer redirects it (idempotent; no-op on GPU).
            from stag_plugin.cpu_compat import apply_cpu_compat

            apply_cpu_compat()
        self.batch = 0
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
        if batch > self.max_batch_size:
            raise ValueError(f"batch of {batch} prompts exceeds max_batch_size="
                             f"{self.max_batch_size}. Fix: build the StagDecoder with "
                             f"max_batch_size >= {batch}")
        self.check_room(length, "prompt")
        self.finish()
        self.batch, self.position = batch, 0
        self.caches.for_batch(batch)
        x = self._embed(input_ids.to(self.device), start=0)  # [s, b, h]
        rows = lambda k: slice(k * batch, (k + 1) * batch)
        outs, mask = [], cross_attention_mask(length, self.window, self.device)
        if self.pipelined:
            return self._prefill_pipeline(x, mask)
        for k in range(self.p):
            memory = None
            if k > 0:
                memory = self._prefill_memory(k, outs[-1], mask)
            outs.append(self._run_section(k, x, rows(k), start=0, memory=memory))
        self.position = length
        return self._logits(outs)[-1]

    @torch.no_grad()
    def step(self, input_ids: Tensor) -> Tensor:
        """One new token per sequence, ids [b] -> logits [b, vocab] for the token after it
        (mode "pipeline": on the last stage; None elsewhere)."""
        if self.batch == 0:
            raise ValueError("step() reads the caches that prefill fills, and nothing was "
                             "prefilled. Fix: call prefill(prompt) before step()")
        if input_ids.shape != (self.batch,):
            raise ValueError(f"step takes one token per sequence, ids of shape [{self.batch}]; "
                             f"got {tuple(input_ids.shape)}. Fix: pass the last token of each "
                             "of the prefilled sequences")
        self.check_room(self.position + 1, "prompt + generated tokens")
        t = self.position
        x = self._embed(input_ids.to(self.device).view(self.batch, 1), start=t)  # [1, b, h]
        if self.pipelined:
            outs = self._step_pipeline(x, t)
            self.position += 1
            return self._logits(outs)[0] if self.is_last else None
        outs = {"sequential": self._step_sequential, "batched": self._step_batched,
                "recurrent": self._step_recurrent}[self.mode](x, t)
        self._append_slots(outs, slot=t + 1)
        self.position += 1
        return self._logits(outs)[0]

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int,
                 sampler: Optional[Sampler] = None, stop_tokens=None) -> List[List[int]]:
        """Decode up to `max_new_tokens` tokens after each prompt of `prompt_ids` [b, s]
        (stag_plugin.sampling.generate: per-sequence stop tokens, sampler None = greedy).

        Tensor or pipeline parallel: call it on every rank with the same arguments; every rank
        returns the same tokens (chosen on one rank and broadcast where they could differ)."""
        sampler = sampler or Sampler()
        batch = prompt_ids.shape[0]
        tokens = sampling.generate(self, prompt_ids, max_new_tokens, sampler, stop_tokens,
                                   next_tokens=lambda logits: self._next_tokens(logits, sampler,
                                                                                batch))
        self.finish()
        return tokens

    def finish(self) -> None:
        """Mode "pipeline": wait for the messages still in flight (the outputs of the last step
        sent to the next stage); other modes: nothing. Called by prefill and generate; call it
        after a run of `step`s before dropping the decoder."""
        if not self.pipelined:
            return
        if self._pending_recv is not None:
            self._pending_recv[0].wait()
            self._pending_recv = None
        for handle, _ in self._pending_sends:
            handle.wait()
        self._pending_sends = []

    # ------------------------------------------------------------------ pipeline mode

    def _setup_pipeline(self, section: int) -> None:
        from megatron.core import parallel_state

        self.section = section
        self.is_last = section == self.p - 1
        self._group = parallel_state.get_pipeline_model_parallel_group()
        self._next_rank = parallel_state.get_pipeline_model_parallel_next_rank()
        self._prev_rank = parallel_state.get_pipeline_model_parallel_prev_rank()
        self._last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
        self._dtype = self.model.embedding.word_embeddings.weight.dtype
        self._pending_recv = None  # (work, buffer): K/V of this stage's slot from the last step
        self._pending_sends: list = []  # (work, tensor) in flight to the next stage
        self._next_kv = self._share_slot_weights()
        self._slot_rotary = (compat.rotary_embedding(self.config)
                             if self.config.cross_attention_rope else None)

    def _share_slot_weights(self) -> List[tuple]:
        """Each stage sends its layers' cross-attention K/V projection (linear_kv weight, bias)
        to the stage before, once: that stage projects its own output for the new memory slot
        of every step (moving 2h^2 per layer off the next, heavier stage). Returns the next
        section's [(weight [2 * groups * hd, h], bias or None)] per layer (last stage: [])."""
        sends = []
        if self.section > 0:
            for layer in self._block(self.section).layers:
                for tensor in _weight_and_bias(layer.cross_attention.linear_kv):
                    sends.append(dist.isend(tensor.detach().contiguous(), dst=self._prev_rank,
                                            group=self._group))
        received = []
        if not self.is_last:
            rows = 2 * self.config.num_query_groups * self.head_dim
            bias = self.config.add_bias_linear or self.config.add_qkv_bias  # as the module's
            new = lambda *shape: torch.empty(shape, dtype=self._dtype, device=self.device)
            for _ in range(self.lps):
                pair = (new(rows, self.config.hidden_size), new(rows) if bias else None)
                for tensor in pair:
                    if tensor is not None:
                        dist.recv(tensor, src=self._next_rank, group=self._group)
                received.append(pair)
        for work in sends:
            work.wait()
        return received

    def _prefill_pipeline(self, x: Tensor, mask: Tensor) -> Optional[Tensor]:
        """This stage's section over the prompt x [s, b, h]: receive section k-1's outputs
        (k > 0), fill the caches, send this section's outputs on (not on the last stage)."""
        k, length = self.section, x.shape[0]
        memory = None
        if k > 0:
            previous = torch.empty(length, self.batch, self.config.hidden_size,
                                   dtype=self._dtype, device=self.device)
            dist.recv(previous, src=self._prev_rank, group=self._group)
            memory = self._prefill_memory(k, previous, mask)
        out = self._run_section(k, x, self._self_rows(k), start=0, memory=memory)
        if not self.is_last:
            dist.send(out.contiguous(), dst=self._next_rank, group=self._group)
        self.position = length
        return self._logits([out])[-1] if self.is_last else None

    def _step_pipeline(self, x: Tensor, t: int) -> List[Tensor]:
        """Token t on this stage: cache slot t (K/V of section k-1's output at t-1, received
        from the previous step's message), run the section, project the next section's K/V
        of its slot t + 1 from this output and isend them without waiting."""
        k = self.section
        if self._pending_recv is not None:  # none right after prefill: it filled slot t
            work, slot_kv = self._pending_recv  # [layers, 2, 1, b, g, hd]
            work.wait()
            self._pending_recv = None
            for i in range(self.lps):
                self._write_slots(i, k, slot_kv[i, 0].permute(1, 2, 0, 3),
                                  slot_kv[i, 1].permute(1, 2, 0, 3), first_slot=t)
        out = self._run_section(k, x, self._self_rows(k), start=t)
        if not self.is_last:
            self._pending_sends = [(w, o) for w, o in self._pending_sends if not w.is_completed()]
            slot_kv = self._project_next_slot(out, slot=t + 1)
            self._pending_sends.append(
                (dist.isend(slot_kv, dst=self._next_rank, group=self._group), slot_kv))
        if k > 0:  # K/V of section k-1's output at t: slot t + 1, cached by the next step
            shape = (self.lps, 2, 1, self.batch, self.caches.groups, self.head_dim)
            buffer = torch.empty(shape, dtype=self._dtype, device=self.device)
            self._pending_recv = (dist.irecv(buffer, src=self._prev_rank, group=self._group),
                                  buffer)
        return [out]

    def _project_next_slot(self, out: Tensor, slot: int) -> Tensor:
        """This section's output out [1, b, h] as memory slot `slot` of the next section:
        per layer its keys (RoPE at position `slot`) and values, as
        StagCrossAttention.project_memory computes them -> [layers, 2, 1, b, g, hd]."""
        groups, hd = self.caches.groups, self.head_dim
        pairs = []
        for weight, bias in self._next_kv:
            mixed = F.linear(out, weight, bias).view(1, self.batch, groups, 2 * hd)
            key, value = mixed.chunk(2, dim=-1)  # per group: [k | v], each [1, b, g, hd]
            if self._slot_rotary is not None:
                key = compat.apply_rope(key.contiguous(), self._slot_rotary(1, offset=slot),
                                        self.config)
            pairs.append(torch.stack([key, value]))
        return torch.stack(pairs).contiguous()

    def _next_tokens(self, logits: Optional[Tensor], sampler: Sampler, batch: int) -> Tensor:
        """The sampler's choice, the same on every rank: mode "pipeline": made on the last
        stage and broadcast; tensor parallel: the gathered logits are equal on every rank, so
        argmax agrees, and a random choice is made on the first rank and broadcast."""
        if self.pipelined:
            return self._broadcast_choice(logits, sampler, batch, self._last_rank, self._group)
        if self.tp_size > 1 and not sampler.greedy:
            from megatron.core import parallel_state

            return self._broadcast_choice(
                logits, sampler, batch, parallel_state.get_tensor_model_parallel_src_rank(),
                parallel_state.get_tensor_model_parallel_group())
        return sampler(logits)

    def _broadcast_choice(self, logits: Optional[Tensor], sampler: Sampler, batch: int,
                          source: int, group) -> Tensor:
        """Sample on global rank `source`, broadcast the ids [b] over `group`."""
        if dist.get_rank() == source:
            tokens = sampler(logits).to(torch.int64).contiguous()
        else:
            tokens = torch.empty(batch, dtype=torch.int64, device=self.device)
        dist.broadcast(tokens, src=source, group=group)
        return tokens

    # ------------------------------------------------------------------ step variants

    def _step_sequential(self, x: Tensor, t: int) -> List[Tensor]:
        b = self.batch
        return [self._run_section(k, x, slice(k * b, (k + 1) * b), start=t)
                for k in range(self.p)]

    def _step_batched(self, x: Tensor, t: int) -> List[Tensor]:
        """All p passes as one forward over p * b rows (shared weights)."""
        b, p = self.batch, self.p
        h = x.repeat(1, p, 1)  # [1, p*b, h], section-major rows
        for i in range(self.lps):
            layer = self.model.sections[0].layers[i]
            h = h + self._self_attention(layer, i, h, slice(0, p * b), start=t)
            if p > 1:
                cross_layer = self.model.sections[1].layers[i]
                later = h[:, b:]
                later = later + self._cached_cross_attention(cross_layer, i, later,
                                                             slice(0, (p - 1) * b), t)
                h = torch.cat([h[:, :b], later], dim=1)
            h = h + _with_bias(layer.mlp(layer.pre_mlp_layernorm(h)))
        out = self.model.sections[0].final_layernorm(h)  # [1, p*b, h]
        return list(out.split(b, dim=1))

    def _step_recurrent(self, x: Tensor, t: int) -> List[Tensor]:
        """One pass (section p's configuration) reading its own earlier outputs as memory."""
        b, k = self.batch, self.p - 1
        return [self._run_section(k, x, slice(k * b, (k + 1) * b), start=t)]

    # ------------------------------------------------------------------ sections and layers

    def _run_section(self, k: int, x: Tensor, rows: slice, start: int,
                     memory: Optional[tuple] = None) -> Tensor:
        """Section k over tokens x [n, b, h] at positions start..start+n-1 -> output [n, b, h].

        rows: this section's rows of the self caches. Cross-attention (k > 0) reads `memory`
        (prefill: per-layer (keys, values, mask) over the whole prompt) or the cross caches."""
        block = self._block(k)
        cross_rows = self._cross_rows(k) if k > 0 else None
        for i, layer in enumerate(block.layers):
            x = x + self._self_attention(layer, i, x, rows, start)
            if k > 0:
                if memory is None:
                    x = x + self._cached_cross_attention(layer, i, x, cross_rows, start)
                else:
                    x = x + self._prompt_cross_attention(layer, x, *memory[i])
            x = x + _with_bias(layer.mlp(layer.pre_mlp_layernorm(x)))
        return block.final_layernorm(x)

    def _block(self, k: int):
        """Section k's module on this process."""
        return self.model.sections[self._local[k]]

    def _self_rows(self, k: int) -> slice:
        """Section k's rows of the self caches."""
        j = self._local[k]
        return slice(j * self.batch, (j + 1) * self.batch)

    def _cross_rows(self, k: int) -> slice:
        """Section k's (k > 0) rows of the cross caches."""
        j = self._cross[k]
        return slice(j * self.batch, (j + 1) * self.batch)

    def _self_attention(self, layer, i: int, x: Tensor, rows: slice, start: int) -> Tensor:
        """Causal self-attention of x [n, B, h] (positions start..) with cache rows `rows`."""
        n = x.shape[0]
        attention = layer.self_attention
        query, key, value = attention.get_query_key_value_tensors(layer.input_layernorm(x))
        if self.rotary is not None:  # query, key [n, B, heads|groups, hd]
            freqs = self.rotary(n, offset=start)
            query = compat.apply_rope(query, freqs, self.config)
            key = compat.apply_rope(key, freqs, self.config)
        cache_k, cache_v = self.caches.self_kv[i]
        cache_k[rows, :, start:start + n] = key.permute(1, 2, 0, 3)
        cache_v[rows, :, start:start + n] = value.permute(1, 2, 0, 3)
        end = start + n
        mask = None
        if n > 1:  # query j (position start + j) sees positions <= start + j
            mask = (torch.arange(end, device=x.device)[None, :]
                    <= torch.arange(start, end, device=x.device)[:, None])
        context = self._attend(query, cache_k[rows, :, :end], cache_v[rows, :, :end], mask)
        return _with_bias(attention.linear_proj(context))

    def _cached_cross_attention(self, layer, i: int, x: Tensor, rows: slice, t: int) -> Tensor:
        """x [1, B, h] of token t: query at position t + 1 over the cached slots (<= t)."""
        attention = layer.cross_attention
        query = attention.project_query(layer.pre_cross_attn_layernorm(x), first_position=t + 1)
        visible = min(t + 1, self.cross_len)  # ring indices 0..visible-1 hold slots of window
        cache_k, cache_v = self.caches.cross_kv[i]
        context = self._attend(query, cache_k[rows, :, :visible], cache_v[rows, :, :visible],
                               None)
        return _with_bias(attention.linear_proj(context))

    def _prompt_cross_attention(self, layer, x: Tensor, keys: Tensor, values: Tensor,
                                mask: Tensor) -> Tensor:
        """Prefill: x [s, b, h] (queries at positions 1..s) over slots 0..s-1 under `mask`."""
        attention = layer.cross_attention
        query = attention.project_query(layer.pre_cross_attn_layernorm(x), first_position=1)
        context = self._attend(query, keys, values, ~mask[0, 0])
        return _with_bias(attention.linear_proj(context))

    def _attend(self, query: Tensor, keys: Tensor, values: Tensor,
                visible: Optional[Tensor]) -> Tensor:
        """query [n, B, heads, hd], keys/values [B, groups, S, hd], visible [n, S] (True =
        attend) or None (all) -> context [n, B, heads * hd]."""
        n, batch, heads, hd = query.shape
        out = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3), keys, values, attn_mask=visible,
            scale=self.softmax_scale, enable_gqa=keys.shape[1] != heads)  # [B, heads, n, hd]
        return out.permute(2, 0, 1, 3).reshape(n, batch, heads * hd)

    # ------------------------------------------------------------------ memory slots

    def _prefill_memory(self, k: int, previous: Tensor, mask: Tensor) -> list:
        """Section k's memory over the prompt: per layer (keys, values [b, g, s, hd], mask),
        slots 0..s-1 for the prompt; slots 0..s go to the cross caches (last C of them)."""
        length = previous.shape[0]
        null = self.model.null_memory.to(previous.dtype).view(1, 1, -1)
        slots = torch.cat([null.expand(1, self.batch, -1), previous], dim=0)  # [s+1, b, h]
        memory = []
        for i, layer in enumerate(self._block(k).layers):
            key, value = layer.cross_attention.project_memory(slots, first_slot=0)
            key, value = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)  # [b, g, s+1, hd]
            self._write_slots(i, k, key, value, first_slot=0)
            memory.append((key[:, :, :length], value[:, :, :length], mask))
        return memory

    def _append_slots(self, outs: List[Tensor], slot: int) -> None:
        """After a step at position slot-1: slot `slot` of section k = output of section k-1
        (recurrent mode: of the single pass itself)."""
        for k in range(1, self.p):
            source = outs[0] if self.mode == "recurrent" else outs[k - 1]  # [1, b, h]
            if self.mode == "recurrent" and k != self.p - 1:
                continue
            self._append_memory(k, source, slot)

    def _append_memory(self, k: int, source: Tensor, slot: int) -> None:
        """Slot `slot` of section k's cross caches = source [1, b, h] (its memory output)."""
        for i, layer in enumerate(self._block(k).layers):
            key, value = layer.cross_attention.project_memory(source, first_slot=slot)
            self._write_slots(i, k, key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
                              first_slot=slot)

    def _write_slots(self, i: int, k: int, key: Tensor, value: Tensor, first_slot: int) -> None:
        """Store slots first_slot.. (key/value [b, g, n, hd]) of section k, layer i: slot j at
        ring index j % C; only the last C slots are kept, slots >= max_len are never read."""
        n = key.shape[2]
        slots = [j for j in range(first_slot, first_slot + n)
                 if j >= first_slot + n - self.cross_len
                 and (self.window is not None or j < self.max_len)]
        if not slots:
            return
        index = torch.tensor([j % self.cross_len for j in slots], device=key.device)
        source = torch.tensor([j - first_slot for j in slots], device=key.device)
        rows = self._cross_rows(k)
        cache_k, cache_v = self.caches.cross_kv[i]
        cache_k[rows].index_copy_(2, index, key.index_select(2, source))
        cache_v[rows].index_copy_(2, index, value.index_select(2, source))

    # ------------------------------------------------------------------ embedding and head

    def _embed(self, input_ids: Tensor, start: int) -> Tensor:
        """ids [b, n] at positions start.. -> [n, b, h]."""
        batch, n = input_ids.shape
        positions = torch.arange(start, start + n, device=input_ids.device)
        return self.model.embedding(input_ids=input_ids,
                                    position_ids=positions.unsqueeze(0).expand(batch, n))

    def _logits(self, outs: List[Tensor]) -> Tensor:
        """Section outputs [n, b, h] -> logits [n, b, vocab] (learned combination or last)."""
        model = self.model
        if self.config.output_combination == "learned" and self.mode != "recurrent":
            hidden = sum(model.combination_weights[k].to(out.dtype) * out
                         for k, out in enumerate(outs))
        else:
            hidden = outs[-1]
        # Tensor parallel: each rank's vocabulary slice, gathered to the full vocabulary.
        logits, _ = model.output_layer(hidden, weight=model._output_weight(),
                                       runtime_gather_output=True)
        return logits

    def check_room(self, length: int, what: str) -> None:
        """Refuse `length` positions when the caches hold fewer."""
        if length > self.max_len:
            raise ValueError(f"{what} needs {length} positions but the decoder holds "
                             f"max_sequence_length={self.max_len}. Fix: shorten the input, ask "
                             f"for fewer new tokens, or build the StagDecoder with a larger "
                             f"max_sequence_length")


def _weight_and_bias(linear) -> List[Tensor]:
    """A Megatron linear layer's weight and (if it has one) bias."""
    bias = getattr(linear, "bias", None)
    return [linear.weight] + ([bias] if isinstance(bias, Tensor) else [])


def _with_bias(output_and_bias) -> Tensor:
    """Megatron modules return (output, bias or None); bias-dropout-add in eval adds both."""
    output, bias = output_and_bias
    return output if bias is None else output + bias


def _check_model(model, config, max_sequence_length: int, mode: str) -> None:
    """Refuse what this engine cannot decode, saying what to do instead."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}. Fix: pick one of them")
    if mode == "pipeline":
        _check_pipeline_layout(config)
    elif config.pipeline_model_parallel_size != 1:
        raise ValueError(
            f"mode={mode!r} decodes a model with every section on this process (pipeline_model_"
            f"parallel_size=1, any tensor_model_parallel_size); this one has pipeline_model_"
            f"parallel_size={config.pipeline_model_parallel_size}. Fix: use mode='pipeline' "
            f"(pipeline size = num_sections), or load the checkpoint into a model built with "
            "pipeline_model_parallel_size=1 (distributed checkpoints reshard on load)")
    sampling.check_mode(mode, config.weight_sharing, config.num_sections)
    unsupported = {"apply_residual_connection_post_layernorm":
                   config.apply_residual_connection_post_layernorm,
                   "sequence_parallel": config.sequence_parallel}
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(f"StagDecoder does not implement {bad}. Fix: set them to False")
    if (config.position_embedding_type == "learned_absolute"
            and max_sequence_length > model.max_sequence_length):
        raise ValueError(f"max_sequence_length={max_sequence_length} exceeds the model's "
                         f"learned positions ({model.max_sequence_length}). Fix: use at most "
                         f"{model.max_sequence_length}")


def _check_pipeline_layout(config) -> None:
    """mode="pipeline": one whole section per pipeline stage, no tensor parallelism."""
    p, pp = config.num_sections, config.pipeline_model_parallel_size
    tp = config.tensor_model_parallel_size
    if pp == 1:
        raise ValueError(
            "mode='pipeline' decodes a model built under pipeline parallelism with one section "
            "per stage; this model has a single pipeline stage (pipeline_model_parallel_size=1)."
            " Fix: use mode='sequential' (or 'batched' with shared weights), or launch "
            f"{p} processes (torchrun) and build the model with pipeline_model_parallel_size="
            f"num_sections={p}")
    if pp != p:
        raise ValueError(
            f"mode='pipeline' needs one whole section per pipeline stage "
            f"(pipeline_model_parallel_size == num_sections = {p}); this model has "
            f"pipeline_model_parallel_size={pp}. Fix: build the model with "
            f"pipeline_model_parallel_size={p} (distributed checkpoints reshard on load), or "
            "load it with both parallel sizes 1 and use mode='sequential'")
    if tp != 1:
        raise ValueError(
            f"mode='pipeline' needs tensor_model_parallel_size=1; this model has {tp}. Fix: "
            f"build the model with tensor_model_parallel_size=1, pipeline_model_parallel_size="
            f"{p} (distributed checkpoints reshard on load)")
    if config.output_combination != "last":
        raise ValueError(
            f"mode='pipeline' needs output_combination='last' (the last stage alone makes the "
            f"logits); this model has output_combination={config.output_combination!r}. Fix: "
            "load it with both parallel sizes 1 and use mode='sequential'")
