"""StagFormerForCausalLM: the reference StagFormer as a `transformers` causal LM.

This file is shipped verbatim in every inference folder (next to `configuration_stagformer.py` and
a copy of `stag_plugin/reference/model.py`), so `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` works where stag_plugin is not installed. It must import nothing from
stag_plugin outside the fallback below.

No second implementation of the architecture: the class derives from the reference `StagFormer`
(first base, so `section_outputs`, `combine`, `head` and `stack` are the reference's own) and
from transformers' `PreTrainedModel` and `GenerationMixin`. `__init__` builds a reference
StagFormer from the config and takes over its modules, parameters and `cfg` under the same
names, so this model's state dict is the folder's model.safetensors key for key.

Tied embeddings are structural, as in the reference: a tied model has no `lm_head` parameter, its
head multiplies by `tok_emb.weight`. There is nothing for transformers to tie
(`_tied_weights_keys` stays empty, `config.tie_word_embeddings` mirrors `tie_embeddings`);
`get_output_embeddings()` is `lm_head` for an untied head and None for a tied one.

Not supported, each refused with a clear error rather than ignored:
- a KV cache: `generate()` recomputes the whole sequence at every step (`use_cache=False`, the
  config's default). The staggered decoder with caches lives in stag_plugin (`stag generate`).
- padding: an attention mask with zeros (left or right padding); batch prompts of equal length.
- `inputs_embeds`, `position_ids` other than 0..s-1, attention / hidden-state outputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_stagformer import StagFormerConfig

try:  # inside an inference folder: the copy of the reference model next to this file
    from .reference import StagFormer
except ImportError:  # inside the stag_plugin package
    from stag_plugin.reference.model import StagFormer


class StagFormerForCausalLM(StagFormer, PreTrainedModel, GenerationMixin):
    config_class = StagFormerConfig
    _input_embed_layer = "tok_emb"  # get_input_embeddings() / set_input_embeddings()
    _no_split_modules = ["Block"]  # device_map="auto" keeps a layer on one device

    def __init__(self, config: StagFormerConfig):
        # PreTrainedModel.__init__, not StagFormer.__init__: the modules come from _adopt below.
        PreTrainedModel.__init__(self, config)
        self._adopt(StagFormer(config.to_reference_config()))
        if self.generation_config is not None:  # no KV cache (config.json also says so)
            self.generation_config.use_cache = False
        self.post_init()

    def _adopt(self, reference: StagFormer) -> None:
        """Make the reference model's modules, parameters, buffers and plain attributes (`cfg`)
        this model's own, under the same names."""
        for name, module in reference.named_children():
            self.add_module(name, module)
        for name, param in reference.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in reference.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        internals = set(vars(nn.Module()))
        for name, value in vars(reference).items():
            if name not in internals:
                setattr(self, name, value)

    def _init_weights(self, module: nn.Module) -> None:
        """The reference's own initialisation, for weights that a checkpoint does not provide:
        PyTorch's default per module, null memory 0, alpha = (0, ..., 0, 1)."""
        if module is self:
            with torch.no_grad():
                for name, param in self.named_parameters(recurse=False):
                    if not getattr(param, "_is_hf_initialized", False):
                        param.zero_()
                        if name == "alpha":
                            param[-1] = 1.0
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no KV cache: generate() must not build one

    def get_output_embeddings(self) -> Optional[nn.Module]:
        return None if self.cfg.tie_embeddings else self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        if self.cfg.tie_embeddings:
            raise ValueError("this StagFormer ties its head to tok_emb: set the input embeddings")
        self.lm_head = new_embeddings

    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                return_dict: Optional[bool] = None, **kwargs):
        """input_ids [b, s] -> CausalLMOutput(logits [b, s, vocab], loss): loss is the mean
        next-token cross-entropy, labels shifted inside as in every transformers causal LM
        (labels [b, s], usually input_ids; -100 = ignored)."""
        check_inputs(self.cfg, input_ids, attention_mask, use_cache, kwargs)
        logits = super().forward(input_ids)  # the reference forward, [b, s, vocab]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1],
                                      **kwargs)
        output = CausalLMOutput(loss=loss, logits=logits)
        return output if return_dict is not False else output.to_tuple()


def check_inputs(cfg, input_ids, attention_mask, use_cache, kwargs: dict) -> None:
    """Refuse, with the fix, what the reference forward cannot honour."""
    name = "StagFormerForCausalLM"
    if input_ids is None or kwargs.get("inputs_embeds") is not None:
        raise ValueError(f"{name} needs input_ids; inputs_embeds is not supported (every section "
                         "embeds the token ids itself)")
    if use_cache or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError(f"{name} has no KV cache: it recomputes the whole sequence each step. "
                         "Fix: use_cache=False (the config's default); for cached staggered "
                         "decoding use `stag generate`")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"{name}: attention_mask must be [batch, seq] like input_ids, got "
                             f"{tuple(attention_mask.shape)} for {tuple(input_ids.shape)}")
        if not bool(attention_mask.bool().all()):
            raise ValueError(f"{name} does not support padding (the attention_mask has zeros). "
                             "Fix: batch prompts of equal length, or generate one at a time")
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        expected = torch.arange(input_ids.shape[1], device=position_ids.device)
        if not bool((position_ids == expected).all()):
            raise ValueError(f"{name}: positions are always 0..s-1; position_ids is not supported")
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag):
            raise ValueError(f"{name}: {flag}=True is not supported")
    if cfg.position_embedding_type == "learned_absolute" \
            and input_ids.shape[1] > cfg.max_sequence_length:
        raise ValueError(f"{name}: {input_ids.shape[1]} tokens exceed the learned position "
                         f"embeddings (max_sequence_length={cfg.max_sequence_length}). Fix: "
                         "shorten the prompt or max_new_tokens")
