"""StagDecoder: staggered decoding of a StagGPTModel in one process, at any tensor-parallel size.

Small named steps around explicit caches, gpt-fast style:

    StagDecoder(model, max_batch_size, max_sequence_length, mode, compile=, cuda_graph=, dtype=)
                             allocates the caches (and stacks the weights of the fused step)
    prefill(prompt [b, s])   -> logits [b, vocab]   sections one after another over the prompt
    step(tokens [b])         -> logits [b, vocab]   every section processes the same new token
    generate(prompt, n, sampler, stop_tokens)       the one token loop of
                                                    stag_plugin.reference.sampling

`self.position` is the position of the next token. A step at position t runs token t through
every section (section k > 0 cross-attends to its slots 0..t, only t-w+1..t with a window),
then caches slot t+1 of section k = section k-1's output at t. Prefill and mode "sequential" run
the model's own modules (stag_plugin.decode.layers, shared with stag_plugin.decode.pipeline);
modes "batched" and "recurrent" run the fused step of stag_plugin.decode.fused on stacked weights.

Modes:
    "sequential"  sections one after another inside each step, on the model's modules (the
                  reference decode; eager only).
    "batched"     the p section passes of a step as one computation (the fast path; any weight
                  sharing, p >= 1): every linear layer is one batched matmul over the stacked
                  [p, ...] weights of separate sections, or one matmul over p * b rows with shared
                  weights (one weight read); attention is one SDPA call over p * b rows;
                  cross-attention runs on the passes of sections 2..p. A step costs the kernels
                  of one l/p-layer model. p = 1 (a plain GPT) decodes through the same step.
    "recurrent"   shared weights only, p >= 2: prefill as in training, then one pass per token
                  (the last section's configuration) that cross-attends to its own outputs of
                  earlier steps (prompt slots stay section p-1's outputs from prefill). Its
                  logits read that pass alone (no learned combination). Not equal to the
                  teacher-forced forward, by design.

Fixed-shape steps (`compile`, `cuda_graph`; modes batched and recurrent): the position is a
tensor, the caches are written in place at it (index_copy_; a ring entry for a windowed memory)
and attention reads the whole caches under a mask made from it, so the step keeps its shapes and
runs under torch.compile or as a replayed CUDA graph (stag_plugin.reference.step_runner). Eager
steps read only the filled cache entries. Both are the same functions of fused.py.

Precision: `dtype` (e.g. torch.bfloat16) casts the model in place before decoding; None decodes
in the model's dtype. bf16 logits stay within 5% of the largest fp32 logit on the test models
(tests/test_fused_decode.py).

Tensor parallelism: every TP rank runs the same steps on its own heads (the caches hold
num_query_groups / tp groups; the fused step stacks this rank's shards and all-reduces the
row-parallel outputs); the logits are gathered to the full vocabulary on every rank, so greedy
choices agree, and a random choice in `generate` is made on the first TP rank and broadcast.
The plain-PyTorch counterpart (no Megatron) is stag_plugin.reference.decode.ReferenceDecoder.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from stag_plugin.core.attention import cross_attention_mask
from stag_plugin.decode import fused, layers
from stag_plugin.errors import StagError
from stag_plugin.reference import sampling
from stag_plugin.reference.decode import parse_dtype
from stag_plugin.reference.sampling import Sampler
from stag_plugin.reference.step_runner import StepRunner

MODES = ("sequential", "batched", "recurrent")


class StagDecoder:
    """Staggered incremental decoding of a StagGPTModel with every section on this process
    (pipeline parallel size 1, any tensor parallel size).

    Args:
        model: a StagGPTModel (its tensor-parallel shard under TP); put in eval mode here. For
            the fused modes with separate weights, its layer parameters become views of the
            stacked weights (values unchanged; the weights are held once).
        max_batch_size: most sequences decoded together.
        max_sequence_length: most positions (prompt + generated tokens fed back) per sequence.
        mode: "sequential", "batched" (the fast path, any weights) or "recurrent" (shared
            weights, p >= 2).
        compile: run the step as a fixed-shape function under torch.compile (modes batched,
            recurrent).
        cuda_graph: capture the fixed-shape step as a CUDA graph per batch size and replay it
            (modes batched, recurrent; CUDA only). With `compile`, the compiled step is captured.
        dtype: the dtype to decode in (torch.bfloat16, "bf16", ...): the model is cast in place
            to it; None keeps the model's dtype.
    """

    MODES = MODES

    def __init__(self, model, max_batch_size: int, max_sequence_length: int,
                 mode: str = "sequential", compile: bool = False, cuda_graph: bool = False,
                 dtype=None):
        check_model(model, max_batch_size, max_sequence_length)
        check_mode(model.config, mode)
        check_step_options(model.config, mode, compile, cuda_graph)
        cast(model, dtype)
        self.model, self.config, self.mode = model.eval(), model.config, mode
        self.p = self.config.num_sections
        self.max_batch_size, self.max_len = max_batch_size, max_sequence_length
        self.math = layers.LayerMath.of(model)
        self.caches = new_caches(model, range(self.p), max_batch_size, max_sequence_length,
                                 spare=compile or cuda_graph)
        self.device = model.embedding.word_embeddings.weight.device
        self.dtype = model.embedding.word_embeddings.weight.dtype
        self.weights = (None if mode == "sequential"
                        else fused.StackedWeights.of(model, max_sequence_length))
        self._runner = (StepRunner(self._fixed_step, compile, cuda_graph, self.device)
                        if compile or cuda_graph else None)
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
        t, ids = self.position, input_ids.to(self.device)
        if self.mode == "sequential":
            logits = self._step_sequential(ids, t)
        else:
            index = torch.tensor([t], device=self.device)
            logits = (self._runner(ids, index) if self._runner is not None
                      else self._fused_step(ids, fused.At(index, t)))
        self.position += 1
        return logits

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

    def _step_sequential(self, ids: Tensor, t: int) -> Tensor:
        """The sections one after another on the model's modules; then slot t+1 of section k =
        section k-1's output."""
        x = layers.embed(self.model, ids.view(-1, 1), first=t)  # [1, b, h]
        outs = [layers.run_section(self.math, self.model.sections[k], k, x, t, self.caches)
                for k in range(self.p)]
        for k in range(1, self.p):
            layers.append_memory(self.model.sections[k], k, outs[k - 1], t + 1, self.caches)
        return self._logits(outs)[0]

    def _fused_step(self, ids: Tensor, at: fused.At) -> Tensor:
        """ids [b] at position `at` -> logits [b, vocab] (modes batched, recurrent); writes the
        self K/V at `at` and memory slot at + 1."""
        p, w, caches = self.p, self.weights, self.caches
        x = fused.embed(self.model, ids, at.index)  # [1, b, h]
        if self.mode == "recurrent":  # one pass: section p's rows, reading its own outputs
            rows = caches.cross_rows(p - 1)
            raw = fused.run_layers(w, x, caches, caches.self_rows(p - 1), rows, 0, at)
            out = fused.finish(w, raw)
            # its own output (its memory: normalised or not) -> slot at + 1
            fused.append_memory(w, out if w.memory_norm else raw, caches, rows, at)
            return fused.logits(self.model, out, combine=False)
        cross = span(caches.cross_rows, 1, p - 1) if p > 1 else None
        outs = fused.finish(w, fused.run_layers(w, x.expand(p, -1, -1), caches,
                                                span(caches.self_rows, 0, p - 1), cross, 1,
                                                at))  # [p, b, h]
        if p > 1:  # slot at + 1 of sections 2..p = the outputs of sections 1..p-1
            fused.append_memory(w, outs[:-1], caches, cross, at)
        return fused.logits(self.model, outs, self.config.output_combination == "learned")

    def _fixed_step(self, ids: Tensor, index: Tensor) -> Tensor:
        """The fused step with shapes independent of the position (StepRunner's function)."""
        return self._fused_step(ids, fused.At(index))

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


def new_caches(model, sections, max_batch_size: int, max_len: int,
               spare: bool = False) -> layers.Caches:
    """Caches for `sections` of `model` (this rank's heads under tensor parallelism; `spare`:
    see layers.Caches)."""
    attention = model.sections[0].layers[0].self_attention
    weight = model.embedding.word_embeddings.weight
    return layers.Caches(sections, model.config.layers_per_section, max_batch_size,
                         attention.num_query_groups_per_partition,
                         attention.hidden_size_per_attention_head, max_len,
                         model.config.cross_attention_window, weight.dtype, weight.device, spare)


def span(rows_of, first: int, last: int) -> slice:
    """The cache rows of sections first..last (section-major, contiguous)."""
    return slice(rows_of(first).start, rows_of(last).stop)


def cast(model, dtype) -> None:
    """Cast `model` in place to `dtype` (reference.decode.parse_dtype's forms); None: keep."""
    dtype = parse_dtype(dtype)
    if dtype is not None and model.embedding.word_embeddings.weight.dtype != dtype:
        model.to(dtype)


def check_step_options(config, mode: str, compile: bool, cuda_graph: bool) -> None:
    """The fused step (modes batched, recurrent) computes this model; compile / cuda_graph run
    it, and mode sequential runs the model's modules."""
    if mode != "sequential":
        fused.check_fusable(config)
    elif compile or cuda_graph:
        asked = " and ".join(n for n, on in (("compile", compile), ("cuda_graph", cuda_graph))
                             if on)
        raise StagError(f"{asked} runs the fixed-shape fused step of modes 'batched' and "
                        "'recurrent'; mode='sequential' runs the model's own modules eagerly",
                        "use mode='batched' (the same logits, every section in one pass), or "
                        f"drop {asked}")


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
