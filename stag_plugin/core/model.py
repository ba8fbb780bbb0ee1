"""StagGPTModel: a time-staggered decoder (StagFormer, arXiv 2501.15665) on Megatron-Core.

    tokens [b, s] --embedding--> e [s, b, h]
    section 1:     m_1 = Section_1(e)                               (causal self-attention)
    section k > 1: m_k = Section_k(e, memory=shift(m_{k-1}))       (+ cross-attention)
    head:          logits = output_layer(m_p)        or  output_layer(sum_k alpha_k m_k)

Every section is a Megatron TransformerBlock; m_k is both section k's output and section k+1's
memory. The last section ends in a final norm (the head reads it); an earlier one ends without a
norm, so its memory is its raw residual stream, unless `config.memory_norm` gives every section
its own final norm (docs/quality.md compares the two). shift() puts the learned null memory in
slot 0 and m_{k-1} at tokens 0..s-2 in slots 1..s-1: position i never reads its own token's
memory, which is what lets all sections run at once when decoding.

Shared weights: every section runs section 1's layers (self-attention, MLP, norms); sections
2..p also share section 2's cross-attention. Each section keeps its own module object (hooks on
`sections[k]` see section k) holding the shared submodules.

FP8 (Transformer Engine layers): each section's TransformerBlock opens its own FP8 region
(Megatron's get_fp8_context), so a module shared by several sections runs once per region and
its delayed-scaling amax is reduced before the next section uses it (docs/transformer_engine.md).

Pipeline parallelism: `stag_plugin.parallel.layout` decides which layers each stage holds; a stage
builds only those (its sections' layers keep their global names, `sections.{k}.layers.{i}`),
re-embeds the token ids when it starts a section, and passes one packed tensor to the next stage
(`stag_plugin.parallel.pipeline`). Tensor parallelism lives inside Megatron's layers.
"""

from __future__ import annotations

import copy  # noqa: E402
import logging
from typing import Dict, Optional

import torch
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.models.common.embeddings.language_model_embedding import (  # noqa: E402
    LanguageModelEmbedding,
)
from megatron.core.models.common.language_module.language_module import (  # noqa: E402
    LanguageModule,
)
from megatron.core.transformer.enums import ModelType  # noqa: E402
from megatron.core.transformer.transformer_block import (  # noqa: E402
    TransformerBlock,
    TransformerBlockSubmodules,
)
from torch import Tensor

from stag_plugin.compat import megatron as compat
from stag_plugin.core import fp8, state_keys
from stag_plugin.core.attention import cross_attention_mask
from stag_plugin.core.config import StagFormerConfig
from stag_plugin.core.specs import StagLayerSpecs, get_stag_layer_spec
from stag_plugin.errors import NotSupported, StagError
from stag_plugin.parallel import pipeline
from stag_plugin.parallel.layout import Segment, pipeline_stages
from stag_plugin.reference.sharing import owner_section

logger = logging.getLogger(__name__)


class StagGPTModel(LanguageModule):
    """GPT-style language model whose layers form `config.num_sections` staggered sections.

    Args:
        config: the StagFormerConfig (every StagFormer option lives there).
        vocab_size: vocabulary size (divisible by the tensor-parallel size).
        max_sequence_length: longest sequence (sizes learned position embeddings).
        transformer_layer_spec: StagLayerSpecs; None builds `get_stag_layer_spec` for
            config.transformer_impl.
        pre_process, post_process: Megatron's pipeline-stage flags: this rank is the first /
            last pipeline stage (checked against Megatron's parallel state).
        share_embeddings_and_output_weights: tie the LM head to the word embeddings.
        parallel_output: keep logits split over tensor-parallel ranks ([b, s, vocab / tp]).
    """

    def __init__(
        self,
        config: StagFormerConfig,
        vocab_size: int,
        max_sequence_length: int,
        transformer_layer_spec: Optional[StagLayerSpecs] = None,
        pre_process: bool = True,
        post_process: bool = True,
        share_embeddings_and_output_weights: bool = True,
        parallel_output: bool = True,
    ):
        _check_arguments(config, vocab_size, max_sequence_length, transformer_layer_spec)
        _ensure_parallel_state()
        super().__init__(config=config)
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.parallel_output = parallel_output
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's schedules
        self.stages = pipeline_stages(config.num_sections, config.layers_per_section,
                                      config.pipeline_model_parallel_size,
                                      config.output_combination == "learned", config.memory_norm)
        self.stage = self.stages[parallel_state.get_pipeline_model_parallel_rank()]
        _check_stage_flags(self.stage, len(self.stages), pre_process, post_process)
        self.pre_process, self.post_process = pre_process, post_process
        self.input_tensor = None
        specs = transformer_layer_spec or get_stag_layer_spec(config.transformer_impl,
                                                              config.qk_layernorm)

        # 1. Token (and optional position) embedding, on every stage that starts a section.
        if self.stage.embeds:
            self.embedding = LanguageModelEmbedding(
                config=config, vocab_size=vocab_size, max_sequence_length=max_sequence_length,
                position_embedding_type=config.position_embedding_type, tp_group=self.tp_group,
            )
        if config.position_embedding_type == "rope":
            self.rotary_pos_emb = compat.rotary_embedding(config)

        # 2. Sections (this stage's part of them): TransformerBlocks, the last section (or, with
        #    memory_norm, every section) ending in its final norm.
        self.sections = SectionList(
            [SectionBlock(config, specs.for_section(seg.section), specs.final_layernorm, seg)
             for seg in self.stage.segments])
        if config.weight_sharing == "shared":
            share_section_weights(self.sections)

        # 3. Cross-section parameters: the null memory slot and the output combination.
        if config.num_sections > 1 and any(k > 0 for k in self.stage.sections):
            self.null_memory = torch.nn.Parameter(
                torch.zeros(config.hidden_size, dtype=config.params_dtype))
        if config.output_combination == "learned" and any(
                seg.ends_section for seg in self.stage.segments):
            alpha = torch.zeros(config.num_sections, dtype=config.params_dtype)
            alpha[-1] = 1.0
            self.combination_weights = torch.nn.Parameter(alpha)
            # Scales sequence-parallel activations: its gradient is summed over TP ranks.
            self.combination_weights.sequence_parallel = config.sequence_parallel

        # 4. LM head on the last stage (tied to the embedding unless asked otherwise; a last
        #    stage that does not embed holds a pipeline replica of the word embeddings).
        if self.post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, vocab_size, config=config, init_method=config.init_method,
                bias=False, skip_bias_add=False, gather_output=not parallel_output,
                skip_weight_param_allocation=share_embeddings_and_output_weights
                and self.stage.embeds,
                tp_group=self.tp_group,
            )
        self.setup_embeddings_and_output_layer()

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
        loss_mask: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        """input_ids, position_ids [b, s]; attention_mask None (causal) or bool [b|1, 1, s, s]
        with True = masked. Returns logits [b, s, vocab/tp], or the per-token loss [b, s]
        when `labels` [b, s] is given; on a stage before the last, the packed boundary tensor
        for the next stage.

        `loss_mask` and `packed_seq_params` are GPTModel's, so Megatron-LM's `forward_step`
        calls this model unchanged: the per-token loss is returned unmasked (Megatron-LM's
        loss function applies the mask), and packed sequences are refused."""
        if packed_seq_params is not None:
            raise NotSupported("StagGPTModel does not take packed sequences (packed_seq_params, "
                               "e.g. Megatron-LM's --sft)", "train on unpacked sequences")
        _check_fp8_region(self.config)
        carry = (pipeline.unpack(self.input_tensor, self.stage.receives)
                 if self.stage.receives else {})
        embedded = (self.embedding(input_ids=input_ids, position_ids=position_ids)
                    if self.stage.embeds else None)  # [s, b, h]
        carry = self.run_stage(carry, embedded, attention_mask)
        if not self.post_process:
            return pipeline.pack(carry, self.stage.sends)
        hidden = carry["combined" if self.config.output_combination == "learned" else "memory"]
        logits, _ = self.output_layer(hidden, weight=self._output_weight(),
                                      runtime_gather_output=runtime_gather_output)
        if labels is None:
            return logits.transpose(0, 1).contiguous()  # [b, s, vocab/tp]
        return self.compute_language_model_loss(labels, logits)  # [b, s]

    def run_stage(self, carry: Dict[str, Tensor], embedded: Optional[Tensor],
                  attention_mask: Optional[Tensor]) -> Dict[str, Tensor]:
        """Teacher-forced pass of this stage's layers over the whole sequence.

        `carry` holds the streams of `stag_plugin.parallel.layout` (hidden / memory / combined)
        coming in; the streams after the stage's last layer come out. A finished section leaves its
        output as `memory` (the next section's cross-attention memory)."""
        seq_len = self._sequence_length(embedded if embedded is not None else
                                        next(iter(carry.values())))
        rotary = self.rotary_pos_emb(seq_len) if hasattr(self, "rotary_pos_emb") else None
        cross_mask = None
        if any(k > 0 for k in self.stage.sections):
            device = (embedded if embedded is not None else carry["memory"]).device
            cross_mask = self._cross_mask(seq_len, device, attention_mask)
        for seg, block in zip(self.stage.segments, self.sections):
            later = seg.section > 0
            out = block(
                hidden_states=embedded if seg.starts_section else carry["hidden"],
                attention_mask=attention_mask, rotary_pos_emb=rotary,
                context=self.shift_memory(carry["memory"]) if later else None,
                context_mask=cross_mask if later else None,
            )
            carry = self._advance(carry, seg, out)
        return carry

    def _cross_mask(self, seq_len: int, device: torch.device,
                    attention_mask: Optional[Tensor]) -> Optional[Tensor]:
        """The cross-attention mask [*, 1, s, s] (True = masked), or None where it is the
        causal one (no window, no per-sample self-attention mask): the attention kernel then
        masks by itself and skips the hidden blocks, which a mask tensor would make it compute."""
        if self.config.cross_attention_window is None and attention_mask is None:
            return None
        return cross_attention_mask(seq_len, self.config.cross_attention_window, device,
                                    attention_mask)

    def _advance(self, carry: Dict[str, Tensor], seg: Segment, out: Tensor):
        if not seg.ends_section:
            return {**carry, "hidden": out}
        advanced = {"memory": out}
        if self.config.output_combination == "learned":
            term = self.combination_weights[seg.section].to(out.dtype) * out
            advanced["combined"] = carry["combined"] + term if "combined" in carry else term
        return advanced

    def shift_memory(self, section_output: Tensor) -> Tensor:
        """[s, b, h] section output -> [s, b, h] memory: slot 0 = null, slot j = output j-1.

        With sequence parallelism the shift runs on the gathered sequence and each rank keeps
        its own slots again."""
        if not self.config.sequence_parallel:
            return self._shift(section_output)
        full = tensor_parallel.gather_from_sequence_parallel_region(
            section_output, tensor_parallel_output_grad=False)
        return tensor_parallel.scatter_to_sequence_parallel_region(self._shift(full))

    def _shift(self, section_output: Tensor) -> Tensor:
        _, batch, hidden = section_output.shape
        null = self.null_memory.to(section_output.dtype).view(1, 1, hidden).expand(1, batch, hidden)
        return torch.cat([null, section_output[:-1]], dim=0)

    def _sequence_length(self, local: Tensor) -> int:
        """Full sequence length of an [s or s/tp, b, ...] activation."""
        if self.config.sequence_parallel:
            return local.shape[0] * self.config.tensor_model_parallel_size
        return local.shape[0]

    def _output_weight(self) -> Optional[Tensor]:
        if not self.share_embeddings_and_output_weights:
            return None
        if self.stage.embeds:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight

    # ------------------------------------------------------------------ Megatron plumbing

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline hook called by Megatron's schedules: the packed tensor from the stage
        before (None on the first stage)."""
        tensors = input_tensor if isinstance(input_tensor, list) else [input_tensor]
        if len(tensors) != 1:
            raise ValueError(f"StagGPTModel takes one boundary tensor, got {len(tensors)}")
        self.input_tensor = tensors[0]

    def setup_embeddings_and_output_layer(self) -> None:
        """Mark embedding/head weights for Megatron, and tie pipeline replicas.

        With one stage this is Megatron's tying (one tensor, used twice). With several, every
        parameter held by more than one stage is a pipeline replica (stag_plugin.parallel.pipeline):
        copies start equal and their gradients are summed over the holders."""
        if self.stage.embeds:
            self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        if self.post_process and self.output_layer.weight is not None:
            self.output_layer.weight.is_embedding_or_output_parameter = True
        if len(self.stages) == 1:
            if self.share_embeddings_and_output_weights:
                self.embedding.word_embeddings.weight.zero_out_wgrad = True
            return
        holders = self.replica_holders()
        pipeline.create_replica_groups(holders.values())
        for name, param in self.named_parameters():
            stages = holders.get(self.checkpoint_key(name))
            if stages is not None:
                pipeline.mark_replica(param, stages, self.stage.index)
        pipeline.broadcast_replicas(self)

    def shared_embedding_or_output_weight(self) -> Optional[Tensor]:
        """Megatron's accessor for the tied embedding. None under pipeline parallelism: the
        copies are pipeline replicas kept equal by stag_plugin.parallel.pipeline, so Megatron's own
        first/last-stage embedding reduction must leave them alone."""
        if len(self.stages) > 1:
            return None
        return self.embedding.word_embeddings.weight

    @property
    def position_embeddings(self):
        """Megatron's finalize_model_grads looks position embeddings up on the model."""
        return getattr(getattr(self, "embedding", None), "position_embeddings", None)

    # ------------------------------------------------------------------ checkpoint names

    def checkpoint_key(self, local_name: str, owner: bool = True) -> str:
        """Global, layout-independent name of parameter `local_name` (core.state_keys)."""
        return state_keys.checkpoint_key(self, local_name, owner)

    def replica_holders(self) -> Dict[str, tuple]:
        """Checkpoint key -> stages holding a copy, for every parameter held by several."""
        return state_keys.replica_holders(self)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None):
        """Distributed-checkpoint view: every tensor once, under its global name
        (stag_plugin.core.state_keys), one key per layer whatever the pipeline layout."""
        metadata = dict(metadata or {}, non_homogeneous_layers=True)
        state = super(LanguageModule, self).sharded_state_dict(prefix, sharded_offsets, metadata)
        return state_keys.globally_named(self, state, prefix)

    def load_state_dict(self, state_dict, strict: bool = True):
        """torch's load_state_dict, accepting a shared weight under its owner's key only (a
        checkpoint stores it once; the other sections' aliases are the same tensor)."""
        return super().load_state_dict(state_keys.with_shared_aliases(self, state_dict), strict)


class SectionList(torch.nn.ModuleList):
    """The sections, visible to Megatron's sharded_state_dict traversal.

    Megatron treats a child without `sharded_state_dict` (a plain ModuleList) as replicated, so
    tensor-parallel shards would be saved as if whole; this delegates to each TransformerBlock.
    """

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        state = {}
        for k, section in enumerate(self):
            state.update(section.sharded_state_dict(f"{prefix}{k}.", sharded_offsets, metadata))
        return state


class SectionBlock(TransformerBlock):
    """The layers of one section that live on this pipeline stage (all of them without
    pipeline parallelism), ending in the section's final norm when the section ends here and
    has one (`segment.final_norm`).

    Built with a pipeline-size-1 view of the config, so Megatron numbers the layers from the
    block's first layer instead of its own even split of `num_layers` over stages; global
    checkpoint names are set by StagGPTModel.checkpoint_key.
    """

    def __init__(self, config: StagFormerConfig, layer_spec, final_layernorm, segment: Segment):
        block_config = copy.copy(config)
        block_config.pipeline_model_parallel_size = 1
        super().__init__(
            config=block_config,
            spec=TransformerBlockSubmodules(layer_specs=[layer_spec] * segment.num_layers,
                                            layer_norm=final_layernorm),
            post_layer_norm=segment.final_norm, pre_process=True,
            post_process=segment.ends_section,
        )
        self.segment = segment


def share_section_weights(sections: torch.nn.ModuleList) -> None:
    """Make every section run its owner's modules (stag_plugin.reference.sharing): section 1's
    self-attention, MLP and norms, section 2's cross-attention.

    Submodules are shared by object, so parameters are shared too; the discarded copies are
    freed. Under pipeline parallelism a stage may not hold the owner section: the first section
    on the stage that can hold the module stands in, and the copies on different stages are
    pipeline replicas (StagGPTModel.replica_holders)."""
    for block in sections:
        seg = block.segment
        for i, layer in enumerate(block.layers):
            for name, _ in list(layer.named_children()):
                owner = owner_section(name)
                if seg.section > owner:  # (section 0's cross-attention slots stay empty)
                    source = _stage_owner(sections, seg.first_layer + i, owner)
                    setattr(layer, name, getattr(source, name))
        if block.final_layernorm is not None:
            block.final_layernorm = next(b.final_layernorm for b in sections
                                         if b.final_layernorm is not None)


def _stage_owner(sections, layer_index: int, owner: int):
    """Layer `layer_index` of the first section >= `owner` on this stage holding it."""
    for block in sections:
        seg = block.segment
        holds = seg.first_layer <= layer_index < seg.first_layer + seg.num_layers
        if seg.section >= owner and holds:
            return block.layers[layer_index - seg.first_layer]
    raise AssertionError(f"no section on this stage holds layer {layer_index}")


def _check_arguments(config, vocab_size, max_sequence_length, spec):
    if not isinstance(config, StagFormerConfig):
        raise TypeError(f"StagGPTModel needs a StagFormerConfig, got {type(config).__name__}; "
                        "build one with StagFormerConfig(num_layers=..., ...)")
    tp = config.tensor_model_parallel_size
    if not isinstance(vocab_size, int) or vocab_size < 1 or vocab_size % tp:
        raise StagError(f"vocab_size={vocab_size!r} must be a positive integer divisible by "
                        f"tensor_model_parallel_size={tp}", "pad the vocabulary to a multiple")
    if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
        raise StagError(f"max_sequence_length={max_sequence_length!r} must be an integer >= 1",
                        "pass the longest sequence the model will see")
    if spec is not None and not isinstance(spec, StagLayerSpecs):
        raise TypeError("transformer_layer_spec must be StagLayerSpecs (see "
                        f"stag_plugin.get_stag_layer_spec), got {type(spec).__name__}")


def _check_stage_flags(stage, num_stages: int, pre_process: bool, post_process: bool) -> None:
    first, last = stage.index == 0, stage.index == num_stages - 1
    if (pre_process, post_process) != (first, last):
        raise StagError(
            f"pre_process={pre_process}, post_process={post_process} do not match pipeline "
            f"stage {stage.index} of {num_stages} (Megatron's parallel state)", "pass "
            "pre_process=is_pipeline_first_stage(), post_process=is_pipeline_last_stage()")


def _check_fp8_region(config) -> None:
    """Refuse a forward inside an FP8 region opened by the caller when shared weights would
    then run one module several times in it: with delayed scaling Transformer Engine records one
    amax per module per region, so later calls would overwrite the earlier ones before the
    reduction (TE's autocast documentation). Each section's own region avoids that."""
    if (config.fp8 and config.weight_sharing == "shared" and config.num_sections > 1
            and fp8.recipe_name(config) == "delayed" and compat.fp8_region_open()):
        raise NotSupported(
            "StagGPTModel.forward runs inside an FP8 region (fp8_autocast) the caller opened: "
            "with shared weights each shared module would run once per section in that one "
            "region, and delayed scaling keeps one amax per module per region",
            "call the model outside fp8_autocast: with config.fp8 set, each section's "
            "TransformerBlock opens its own FP8 region (Megatron's get_fp8_context)")


def _ensure_parallel_state() -> None:
    if parallel_state.model_parallel_is_initialized():
        return
    if torch.distributed.is_initialized():
        raise RuntimeError("torch.distributed is initialised but Megatron's parallel state is "
                           "not: call megatron.core.parallel_state.initialize_model_parallel(...) "
                           "before building StagGPTModel")
    logger.warning("StagGPTModel: no distributed setup found; initialising a single-process "
                   "(world size 1) Megatron parallel state")
    compat.initialize_single_process()
