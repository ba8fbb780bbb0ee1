"""StagGPTModel on Megatron-LM's model-config path (Megatron-LM 0.19+).

From 0.19 Megatron-LM's pretrain_gpt.py builds its model from a `ModelConfig` inside the
PretrainConfigContainer (`gpt_config_from_args` -> `GPTModelConfig`, built by the class its
`builder` names) instead of a `model_provider`. The StagFormer counterparts:

    StagGPTModelConfig    a GPTModelConfig whose `transformer` is a StagFormerConfig
    StagGPTModelBuilder   builds one pipeline stage's StagGPTModel; wrapping for distributed
                          training (mixed precision, DDP) is GPTModelBuilder's
    stag_model_config     Megatron-LM's parsed args -> StagGPTModelConfig

Importing this module imports `megatron.training.models` (Megatron-LM >= 0.19).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig
from megatron.training.vocab_utils import calculate_padded_vocab_size

from stag_plugin.core.config import StagFormerConfig
from stag_plugin.core.model import StagGPTModel
from stag_plugin.errors import StagError
from stag_plugin.integrations.megatron_lm.config import (
    check_loaded_stag_options,
    check_megatron_lm_args,
    stag_config_from_megatron_args,
)
from stag_plugin.integrations.megatron_lm.model import build_stage, refuse_virtual_stage


@dataclass(kw_only=True)
class StagGPTModelConfig(GPTModelConfig):
    """GPTModelConfig for a StagGPTModel: `transformer` is a StagFormerConfig (every
    StagFormer option lives there); the GPT fields (vocabulary, sequence length, tied head)
    keep their meaning. `transformer_layer_spec` must stay None: StagGPTModel builds its own
    specs (stag_plugin.core.specs)."""

    builder: ClassVar[str] = (
        "stag_plugin.integrations.megatron_lm.model_config.StagGPTModelBuilder")
    transformer: StagFormerConfig

    def finalize(self) -> None:
        if not isinstance(self.transformer, StagFormerConfig):
            raise StagError(f"StagGPTModelConfig.transformer is a "
                            f"{type(self.transformer).__name__}, not a StagFormerConfig",
                            "build it with stag_plugin.integrations.megatron_lm."
                            "stag_model_config(args)")
        if self.transformer_layer_spec is not None:
            raise StagError("StagGPTModelConfig.transformer_layer_spec is set",
                            "leave it None: StagGPTModel builds its own layer specs")
        super().finalize()


class StagGPTModelBuilder(GPTModelBuilder):
    """Megatron-LM's GPT builder with `build_model` giving a StagGPTModel stage."""

    def build_model(self, pg_collection, pre_process: bool | None = None,
                    post_process: bool | None = None,
                    vp_stage: int | None = None) -> StagGPTModel:
        """One pipeline stage. `pg_collection` must be Megatron's global parallel_state
        groups (pretrain()'s default): StagGPTModel reads those."""
        from megatron.core.pipeline_parallel.utils import is_pp_first_stage, is_pp_last_stage

        refuse_virtual_stage(vp_stage)
        cfg = self._model_config
        if cfg.vocab_size is None:
            raise StagError("StagGPTModelConfig.vocab_size is not set",
                            "set it (stag_model_config does, from the tokenizer)")
        vocab = (calculate_padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by,
                                             cfg.transformer.tensor_model_parallel_size)
                 if cfg.should_pad_vocab else cfg.vocab_size)
        if pre_process is None:
            pre_process = is_pp_first_stage(pg_collection.pp)
        if post_process is None:
            post_process = is_pp_last_stage(pg_collection.pp)
        return build_stage(cfg.transformer, vocab, cfg.seq_length, pre_process, post_process,
                           tied=cfg.share_embeddings_and_output_weights,
                           parallel_output=cfg.parallel_output)


def stag_model_config(args) -> StagGPTModelConfig:
    """The model config pretrain_cfg_container_from_args takes, from Megatron-LM's parsed
    args (parsed with `add_stag_args`): the StagFormerConfig of the args inside
    Megatron-LM's own `gpt_config_from_args`."""
    from megatron.training.argument_utils import gpt_config_from_args

    check_megatron_lm_args(args)
    check_loaded_stag_options(args)
    return gpt_config_from_args(args, config=stag_config_from_megatron_args(args),
                                model_config_cls=StagGPTModelConfig)
