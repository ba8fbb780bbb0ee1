"""StagGPTModel: a time-staggered decoder (StagFormer, arXiv 2501.15665) on Megatron-Core.

    tokens [b, s] --embedding--> e [s, b, h]
    section 1:     m_1 = Section_1(e)                               (causal self-attention)
    section k > 1: m_k = Section_k(e, memory=shift(m_{k-1}))       (+ cross-attention)
    head:          logits = output_layer(m_p)        or  output_layer(sum_k alpha_k m_k)

Every section is a Megatron TransformerBlock ending in its own final norm, so m_k is normalised;
it is both section k's output and section k+1's memory. shift() puts the learned null memory in
slot 0 and m_{k-1} at tokens 0..s-2 in slots 1..s-1: position i never reads its own token's
memory, which is what lets all sections run at once when decoding.

Shared weights: every section runs section 1's layers (self-attention, MLP, norms); sections
2..p also share section 2's cross-attention. Each section keeps its own module object (hooks on
`sections[k]` see section k) holding the shared submodules.

This file is single-device model code; tensor parallelism lives inside Megatron's layers.
"""

from __future__ import annotations

import logging
from typing import List, Optional

import torch
from torch import Tensor

from stag_plugin import megatron_compat as compat
from stag_plugin.attention import cross_attention_mask
from stag_plugin.config import StagFormerConfig
from stag_plugin.specs import StagLayerSpecs, get_stag_layer_spec

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

logger = logging.getLogger(__name__)


class StagGPTModel(LanguageModule):
    """GPT-style language model whose layers form `config.num_sections` staggered sections.

    Args:
        config: the StagFormerConfig (every StagFormer option lives there).
        vocab_size: vocabulary size (divisible by the tensor-parallel size).
        max_sequence_length: longest sequence (sizes learned position embeddings).
        transformer_layer_spec: StagLayerSpecs; None builds `get_stag_layer_spec()`.
        pre_process, post_process: pipeline-stage flags (only True/True is supported yet).
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
        _check_arguments(config, vocab_size, max_sequence_length, transformer_layer_spec,
                         pre_process, post_process)
        _ensure_parallel_state()
        super().__init__(config=config)
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.parallel_output = parallel_output
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's schedules
        specs = transformer_layer_spec or get_stag_layer_spec(qk_layernorm=config.qk_layernorm)

        # 1. Token (and optional position) embedding, shared by all sections.
        self.embedding = LanguageModelEmbedding(
            config=config, vocab_size=vocab_size, max_sequence_length=max_sequence_length,
            position_embedding_type=config.position_embedding_type, tp_group=self.tp_group,
        )
        if config.position_embedding_type == "rope":
            self.rotary_pos_emb = compat.rotary_embedding(config)

        # 2. Sections: one TransformerBlock each, each ending in its own final norm.
        self.sections = SectionList(
            [self._build_section(specs.for_section(k)) for k in range(config.num_sections)]
        )
        if config.weight_sharing == "shared":
            share_section_weights(self.sections)

        # 3. Cross-section parameters: the null memory slot and the output combination.
        if config.num_sections > 1:
            self.null_memory = torch.nn.Parameter(
                torch.zeros(config.hidden_size, dtype=config.params_dtype))
        if config.output_combination == "learned":
            alpha = torch.zeros(config.num_sections, dtype=config.params_dtype)
            alpha[-1] = 1.0
            self.combination_weights = torch.nn.Parameter(alpha)

        # 4. LM head (weights tied to the embedding unless asked otherwise).
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method,
            bias=False, skip_bias_add=False, gather_output=not parallel_output,
            skip_weight_param_allocation=share_embeddings_and_output_weights,
            tp_group=self.tp_group,
        )
        self.setup_embeddings_and_output_layer()

    def _build_section(self, layer_spec) -> TransformerBlock:
        layers = self.config.layers_per_section
        return TransformerBlock(
            config=self.config,
            spec=TransformerBlockSubmodules(layer_specs=[layer_spec] * layers,
                                            layer_norm=layer_spec.submodules.input_layernorm),
            post_layer_norm=True, pre_process=True, post_process=True,
        )

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
    ) -> Tensor:
        """input_ids, position_ids [b, s]; attention_mask None (causal) or bool [b|1, 1, s, s]
        with True = masked. Returns logits [b, s, vocab/tp], or the per-token loss [b, s]
        when `labels` [b, s] is given."""
        embedded = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h]
        outputs = self.run_sections(embedded, attention_mask)
        hidden = self.combine_outputs(outputs)  # [s, b, h]
        output_weight = (self.shared_embedding_or_output_weight()
                         if self.share_embeddings_and_output_weights else None)
        logits, _ = self.output_layer(hidden, weight=output_weight,
                                      runtime_gather_output=runtime_gather_output)
        if labels is None:
            return logits.transpose(0, 1).contiguous()  # [b, s, vocab/tp]
        return self.compute_language_model_loss(labels, logits)  # [b, s]

    def run_sections(self, embedded: Tensor, attention_mask: Optional[Tensor]) -> List[Tensor]:
        """Teacher-forced pass: every section over the whole sequence. Returns each section's
        normalised output [s, b, h]."""
        seq_len = embedded.shape[0]
        rotary = self.rotary_pos_emb(seq_len) if hasattr(self, "rotary_pos_emb") else None
        cross_mask = None
        if self.config.num_sections > 1:
            cross_mask = cross_attention_mask(seq_len, self.config.cross_attention_window,
                                              embedded.device, attention_mask)
        outputs: List[Tensor] = []
        for k, section in enumerate(self.sections):
            memory = self.shift_memory(outputs[-1]) if k > 0 else None
            outputs.append(section(
                hidden_states=embedded, attention_mask=attention_mask, context=memory,
                context_mask=cross_mask if k > 0 else None, rotary_pos_emb=rotary,
            ))
        return outputs

    def shift_memory(self, section_output: Tensor) -> Tensor:
        """[s, b, h] section output -> [s, b, h] memory: slot 0 = null, slot j = output j-1."""
        _, batch, hidden = section_output.shape
        null = self.null_memory.to(section_output.dtype).view(1, 1, hidden).expand(1, batch, hidden)
        return torch.cat([null, section_output[:-1]], dim=0)

    def combine_outputs(self, outputs: List[Tensor]) -> Tensor:
        """The head's input: the last section's output, or sum_k alpha_k * out_k."""
        if self.config.output_combination == "last":
            return outputs[-1]
        alpha = self.combination_weights.to(outputs[0].dtype)
        return sum(alpha[k] * out for k, out in enumerate(outputs))

    # ------------------------------------------------------------------ Megatron plumbing

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline hook called by Megatron's schedules; one stage holds the whole model."""
        tensors = input_tensor if isinstance(input_tensor, list) else [input_tensor]
        if len(tensors) != 1 or tensors[0] is not None:
            raise NotImplementedError("StagGPTModel does not support pipeline parallelism yet")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None):
        """Distributed-checkpoint view: every parameter once, under a global, stable name.

        Layers are saved one key per layer (`sections.{k}.layers.{i}.…`, i counted within the
        section); a weight shared between sections is saved under its first owner only.
        """
        metadata = dict(metadata or {}, non_homogeneous_layers=True)
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        return drop_shared_duplicates(state)

    def load_state_dict(self, state_dict, strict: bool = True):
        """torch's load_state_dict, accepting a shared weight under its first owner's key only.

        `sharded_state_dict()` saves each shared tensor once, so a loaded checkpoint lacks the
        other sections' aliases; they are filled in from the owner (same tensor object).
        """
        return super().load_state_dict(self._with_shared_aliases(state_dict), strict)

    def _with_shared_aliases(self, state_dict):
        owners = {}  # id(tensor) -> a key present in state_dict
        aliases = []  # (missing key, tensor id)
        for key, tensor in self.state_dict(keep_vars=True).items():
            if not isinstance(tensor, Tensor):
                continue
            if key in state_dict:
                owners.setdefault(id(tensor), key)
            else:
                aliases.append((key, id(tensor)))
        filled = dict(state_dict)
        for key, tensor_id in aliases:
            if tensor_id in owners:
                filled[key] = state_dict[owners[tensor_id]]
        return filled


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


def share_section_weights(sections: torch.nn.ModuleList) -> None:
    """Make every section use section 1's layer weights and section 2's cross-attention.

    Submodules are shared by object, so parameters are shared too; the discarded copies are
    freed. A slot is shared only between modules of the same type: section 1's cross-attention
    slots hold IdentityOp, so section 2 keeps its own cross-attention, which sections 3..p
    then take from section 2.
    """
    for k in range(1, len(sections)):
        owner = sections[0] if k == 1 else sections[1]
        for layer, owner_layer in zip(sections[k].layers, owner.layers):
            for name, child in list(layer.named_children()):
                source = getattr(owner_layer, name)
                if type(source) is type(child):
                    setattr(layer, name, source)
        sections[k].final_layernorm = sections[0].final_layernorm


def drop_shared_duplicates(state: dict) -> dict:
    """Keep the first sharded entry for each underlying tensor (shared weights appear once)."""
    seen, kept = set(), {}
    for key, value in state.items():
        data = getattr(value, "data", None)
        if isinstance(data, Tensor):
            if id(data) in seen:
                continue
            seen.add(id(data))
        kept[key] = value
    return kept


def _check_arguments(config, vocab_size, max_sequence_length, spec, pre_process, post_process):
    if not isinstance(config, StagFormerConfig):
        raise TypeError(f"StagGPTModel needs a StagFormerConfig, got {type(config).__name__}; "
                        "build one with StagFormerConfig(num_layers=..., ...)")
    tp = config.tensor_model_parallel_size
    if not isinstance(vocab_size, int) or vocab_size < 1 or vocab_size % tp:
        raise ValueError(f"vocab_size={vocab_size!r} must be a positive integer divisible by "
                         f"tensor_model_parallel_size={tp}; pad the vocabulary to a multiple")
    if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
        raise ValueError(f"max_sequence_length={max_sequence_length!r} must be an integer >= 1")
    if spec is not None and not isinstance(spec, StagLayerSpecs):
        raise TypeError("transformer_layer_spec must be StagLayerSpecs (see "
                        f"stag_plugin.get_stag_layer_spec), got {type(spec).__name__}")
    if not (pre_process and post_process) or config.pipeline_model_parallel_size != 1:
        raise NotImplementedError("StagGPTModel does not support pipeline parallelism yet: use "
                                  "pipeline_model_parallel_size=1, pre_process=post_process=True")


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
