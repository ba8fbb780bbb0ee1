"""StagFormerForCausalLM: the reference StagFormer as a `transformers` causal LM.

This file is shipped verbatim in every inference folder (next to `configuration_stagformer.py` and
a copy of `stag_plugin/reference/model.py`), so `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` works where stag_plugin is not installed. It must import nothing from
stag_plugin outside the fallback below.

No second set of weights or modules: the class derives from the reference `StagFormer` (first
base, so `section_outputs`, `finish`, `combine`, `head` and `stack` are the reference's own) and
from transformers' `PreTrainedModel` and `GenerationMixin`. `__init__` builds a reference StagFormer
from the config and takes over its modules, parameters and `cfg` under the same names, so this
model's state dict is the folder's model.safetensors key for key. Without a cache and without
padding, `forward` is the reference forward itself.

KV cache (`use_cache=True`; transformers' `DynamicCache`): a forward over s new tokens after n
cached ones runs every section once over the new tokens, with the reference blocks' own modules
(norms, q/k/v/o projections, MLPs) and the reference `rope_angles` / `apply_rope`. With
L = layers per section and p sections, the cache holds (2p - 1) * L layers, each
[b, groups, entries, head_dim]:

    self-attention of section k, layer i:        index k * L + i,            entry t = token t
    cross-attention memory of section k > 0, i:  index (p + k - 1) * L + i,  entry 0 = the null
                                                 memory, entry 1 + t = section k-1's output at t

Before section k runs, the entries of the new tokens are appended to its memory (projected by
each layer's cross-attention k/v, RoPE at position + 1). Token t reads entries 0..t (the null
memory and the outputs at tokens < t); with a window w, those at positions > position(t) - w (a
full-length memory with a window mask). So `generate()` decodes incrementally: a new token runs
every section once and adds one memory entry per section.

Padding: `attention_mask` [b, n + s] (1 = token, 0 = padding) covers the cached and the new
tokens. A token's position is the number of tokens before it in its row (cumsum(mask) - 1, as in
transformers' models); no query sees a padded key or a padded token's memory entry. So a
left-padded batch (batched `generate`) and a right-padded one (`labels`, loss) give each row what
it gives alone.

Tied embeddings are structural, as in the reference: a tied model has no `lm_head` parameter, its
head multiplies by `tok_emb.weight`. There is nothing for transformers to tie
(`_tied_weights_keys` stays empty, `config.tie_word_embeddings` mirrors `tie_embeddings`);
`get_output_embeddings()` is `lm_head` for an untied head and None for a tied one.

Not supported, each refused with a clear error rather than ignored:
- `inputs_embeds` (every section embeds the token ids itself).
- `position_ids` other than those the attention mask gives.
- attention / hidden-state outputs.
- a cache other than a `DynamicCache` laid out as above (e.g. a StaticCache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_stagformer import StagFormerConfig

try:  # inside an inference folder: the copy of the reference model next to this file
    from .reference import Attention, StagFormer, apply_rope, rope_angles
except ImportError:  # inside the stag_plugin package
    from stag_plugin.reference.model import Attention, StagFormer, apply_rope, rope_angles

NAME = "StagFormerForCausalLM"
# the output field of the cache: "cache" in current transformers, "past_key_values" before
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ \
    else "past_key_values"


class StagFormerForCausalLM(StagFormer, PreTrainedModel, GenerationMixin):
    config_class = StagFormerConfig
    _input_embed_layer = "tok_emb"  # get_input_embeddings() / set_input_embeddings()
    _no_split_modules = ["Block"]  # device_map="auto" keeps a layer on one device

    def __init__(self, config: StagFormerConfig):
        # PreTrainedModel.__init__, not StagFormer.__init__: the modules come from _adopt below.
        # generation_config.use_cache follows config.use_cache (unset: True).
        PreTrainedModel.__init__(self, config)
        self._adopt(StagFormer(config.to_reference_config()))
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
        # generate() would size a DynamicCache from the config (p * L layers); forward starts
        # the (2p - 1) * L layers it needs instead
        return False

    def get_output_embeddings(self) -> Optional[nn.Module]:
        return None if self.cfg.tie_embeddings else self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        if self.cfg.tie_embeddings:
            raise ValueError("this StagFormer ties its head to tok_emb: set the input embeddings")
        self.lm_head = new_embeddings

    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[Tensor] = None, cache: Optional[Cache] = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                logits_to_keep=0, return_dict: Optional[bool] = None, **kwargs):
        """input_ids [b, s] (the tokens after the cache's n) -> CausalLMOutputWithPast(logits
        [b, s, vocab], loss, cache).

        attention_mask [b, n + s]: 1 = token, 0 = padding (None: no padding). cache: the one an
        earlier call returned, or an empty DynamicCache(); use_cache=True without one starts
        one; with neither, the cache is not kept. labels [b, s], usually input_ids (-100 =
        ignored): loss = mean next-token cross-entropy, labels shifted inside as in every
        transformers causal LM. logits_to_keep: logits of the last N positions only (0 = all;
        generate asks for 1)."""
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        check_inputs(input_ids, kwargs)
        position_ids = kwargs.pop("position_ids", None)
        keep_cache = bool(use_cache) or cache is not None
        if not keep_cache and position_ids is None \
                and (attention_mask is None or bool(attention_mask.bool().all())):
            check_lengths(self.cfg, input_ids, attention_mask, past=0)
            outs = self.section_outputs(input_ids)  # the reference forward
        else:  # through a cache (a fresh one, dropped after the call, for padding)
            cache = DynamicCache() if cache is None else check_cache(self.cfg, cache)
            outs = self.cached_section_outputs(input_ids, attention_mask, cache, position_ids)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.head(self.combine(outs)[:, keep])  # [b, s (or kept), vocab]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1],
                                      **kwargs)
        output = CausalLMOutputWithPast(loss=loss, logits=logits,
                                        **{CACHE_FIELD: cache if keep_cache else None})
        return output if return_dict is not False else output.to_tuple()

    # ------------------------------------------------------------------ forward over a cache

    def cached_section_outputs(self, input_ids: Tensor, attention_mask: Optional[Tensor],
                               cache: Cache, position_ids: Optional[Tensor] = None
                               ) -> List[Tensor]:
        """Outputs [b, s, h] of every section over the s new tokens input_ids [b, s] that follow
        the cache's n; their self K/V and memory entries are appended to the cache."""
        cfg = self.cfg
        past = cache.get_seq_length()
        check_lengths(cfg, input_ids, attention_mask, past)
        span = Span.of(cfg, past, input_ids.shape[1], attention_mask, input_ids.device)
        span.check_position_ids(position_ids)
        x = self.tok_emb(input_ids)  # [b, s, h]
        if cfg.position_embedding_type == "learned_absolute":
            x = x + self.pos_emb(span.positions)
        outs = []
        for k in range(cfg.num_sections):
            memory = self._append_memory(k, outs[-1], cache, span) if k > 0 else None
            outs.append(self._run_section(k, x, cache, span, memory))
        return outs

    def _run_section(self, k: int, x: Tensor, cache: Cache, span: "Span",
                     memory: Optional[List[Tuple[Tensor, Tensor]]]) -> Tensor:
        """Section k over the new tokens x [b, s, h] -> [b, s, h] (Block.forward, step by step):
        their self K/V join the cache; k > 0 cross-attends to `memory` (per layer its keys,
        values)."""
        stack = self.stack(k)
        for i, block in enumerate(stack.blocks):
            h = block.ln_self(x)
            new_keys, new_values = project_keys_values(block.self_attn, h, span.angles)
            keys, values = cache.update(new_keys, new_values, self_layer(self.cfg, k, i))
            x = x + attend(block.self_attn, h, span.angles, keys, values, span.self_visible)
            if memory is not None:
                keys, values = memory[i]
                x = x + attend(block.cross_attn, block.ln_cross(x), span.memory_angles, keys,
                               values, span.memory_visible)
            x = x + block.mlp(block.ln_mlp(x))
        return self.finish(k, x)

    def _append_memory(self, k: int, previous: Tensor, cache: Cache,
                       span: "Span") -> List[Tuple[Tensor, Tensor]]:
        """Section k's memory entries of the new tokens, from section k-1's outputs previous
        [b, s, h], appended to its cross layers (an empty one gets the null memory first).
        Per layer, the keys and values [b, groups, n + s, d] the new tokens can read: every
        entry but the last (the last new token's output, read by later tokens only)."""
        memory = []
        for i, block in enumerate(self.stack(k).blocks):
            index = memory_layer(self.cfg, k, i)
            keys, values = project_keys_values(block.cross_attn, previous, span.memory_angles)
            if cache.get_seq_length(index) == 0:  # entry 0: the null memory, at position 0
                null = self.null_memory.expand(previous.shape[0], 1, -1)  # [b, 1, h]
                null_keys, null_values = project_keys_values(block.cross_attn, null, None)
                keys, values = torch.cat([null_keys, keys], 2), torch.cat([null_values, values], 2)
            keys, values = cache.update(keys, values, index)
            memory.append((keys[:, :, :-1], values[:, :, :-1]))
        return memory


# ---------------------------------------------------------------------------- the cache's layout


def self_layer(cfg, k: int, i: int) -> int:
    """Cache layer of section k's self-attention in its layer i."""
    return k * cfg.layers_per_section + i


def memory_layer(cfg, k: int, i: int) -> int:
    """Cache layer of section k's (k > 0) cross-attention memory in its layer i."""
    return (cfg.num_sections + k - 1) * cfg.layers_per_section + i


@dataclass
class Span:
    """The s new tokens of a forward after n cached ones: their positions and what each reads.
    rows = b, or 1 without an attention mask (every row alike). Masks: True = attend, None =
    everything."""

    positions: Tensor  # [rows, s]
    real: Optional[Tensor]  # [b, s], False at padding; None: no attention mask
    self_visible: Optional[Tensor]  # [rows, 1, s, n + s] over tokens 0..n+s-1
    memory_visible: Optional[Tensor]  # [rows, 1, s, n + s] over memory entries 0..n+s-1
    angles: Optional[Tensor]  # [rows, 1, s, r/2] RoPE at positions (None: no RoPE)
    memory_angles: Optional[Tensor]  # [rows, 1, s, r/2] at positions + 1 (queries, new entries)

    @classmethod
    def of(cls, cfg, past: int, s: int, attention_mask: Optional[Tensor], device) -> "Span":
        if attention_mask is None:
            every = torch.arange(past + s, device=device)[None]  # [1, n + s] token positions
            valid = None
        else:
            valid = attention_mask.bool()  # [b, n + s]
            every = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [b, n + s]
        positions, real = every[:, past:], None if valid is None else valid[:, past:]
        token = torch.arange(past, past + s, device=device)[:, None]  # [s, 1] query's token
        key = torch.arange(past + s, device=device)[None]  # [1, n + s] key's token / entry
        causal = (key <= token)[None]  # [1, s, n + s]
        # self: token t reads tokens <= t; memory: entry e (token e-1's output) when e - 1 < t
        self_visible, memory_visible = causal, causal
        if valid is not None:  # a padded query sees itself (no fully masked row)
            self_visible = (causal & valid[:, None]) | (key == token)  # [b, s, n + s]
            entry_valid = torch.cat([torch.ones_like(valid[:, :1]), valid[:, :-1]], dim=1)
            memory_visible = causal & entry_valid[:, None]
        window = cfg.cross_attention_window
        if window is not None:  # entry positions: null 0, token u's output positions[u] + 1
            entry_positions = torch.cat([torch.zeros_like(every[:, :1]), every[:, :-1] + 1], 1)
            memory_visible = memory_visible & (entry_positions[:, None] > positions[..., None]
                                               - window)
        if valid is not None:  # a padded query reads the null memory
            memory_visible = memory_visible | ((key == 0) & ~real[..., None])
        if valid is None and s == 1:  # one new token per row sees every token
            self_visible = None
            memory_visible = None if window is None else memory_visible
        angles, memory_angles = rotations(cfg, positions)
        return cls(positions, real, None if self_visible is None else self_visible[:, None],
                   None if memory_visible is None else memory_visible[:, None], angles,
                   memory_angles)

    def check_position_ids(self, position_ids: Optional[Tensor]) -> None:
        """Refuse position_ids other than the ones the attention mask gives (at tokens)."""
        if position_ids is None:
            return
        same = position_ids.to(self.positions.device) == self.positions
        if self.real is not None:
            same = same | ~self.real
        if not bool(same.all()):
            raise ValueError(f"{NAME}: a token's position is the number of tokens before it in "
                             "its row (cumsum(attention_mask) - 1); other position_ids are not "
                             "supported. Fix: pass no position_ids")


def rotations(cfg, positions: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """RoPE angles [rows, 1, s, r/2] of self-attention at positions [rows, s] and of the
    cross-attention queries and new memory entries at positions + 1 (None where not used)."""
    rows, s = positions.shape
    if cfg.position_embedding_type != "rope" and not cfg.cross_attention_rope:
        return None, None
    both = rope_angles(cfg, torch.cat([positions, positions + 1], dim=1).reshape(-1))
    both = both.view(rows, 1, 2 * s, -1)
    return (both[:, :, :s] if cfg.position_embedding_type == "rope" else None,
            both[:, :, s:] if cfg.cross_attention_rope else None)


# ---------------------------------------------------------------------------- attention


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[b, s, heads * d] -> [b, heads, s, d]."""
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)


def project_keys_values(attn: Attention, source: Tensor,
                        angles: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """source [b, s, h] -> keys, values [b, groups, s, d]; keys rotated by angles."""
    groups = attn.cfg.num_query_groups
    keys, values = split_heads(attn.k(source), groups), split_heads(attn.v(source), groups)
    return (keys if angles is None else apply_rope(keys, angles)), values


def attend(attn: Attention, x: Tensor, angles: Optional[Tensor], keys: Tensor, values: Tensor,
           visible: Optional[Tensor]) -> Tensor:
    """attn's queries of x [b, s, h] (rotated by angles) over keys, values [b, groups, S, d]
    where visible [rows, 1, s, S] (None: all) -> attn's output [b, s, h]."""
    cfg = attn.cfg
    b, s, _ = x.shape
    q = split_heads(attn.q(x), cfg.num_attention_heads)  # [b, heads, s, d]
    if angles is not None:
        q = apply_rope(q, angles)
    repeat = cfg.num_attention_heads // cfg.num_query_groups  # query heads per key/value group
    if repeat > 1:
        keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, 1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)  # [b, heads, s, d]
    return attn.o(out.transpose(1, 2).reshape(b, s, -1))


# ---------------------------------------------------------------------------- checks


def check_inputs(input_ids, kwargs: dict) -> None:
    """Refuse, with the fix, what this model cannot honour."""
    if input_ids is None or kwargs.get("inputs_embeds") is not None:
        raise ValueError(f"{NAME} needs input_ids; inputs_embeds is not supported (every section "
                         "embeds the token ids itself)")
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag):
            raise ValueError(f"{NAME}: {flag}=True is not supported")


def check_lengths(cfg, input_ids: Tensor, attention_mask: Optional[Tensor], past: int) -> None:
    """The attention mask covers the cached and the new tokens; learned positions have room."""
    b, s = input_ids.shape
    if attention_mask is not None and tuple(attention_mask.shape) != (b, past + s):
        raise ValueError(f"{NAME}: attention_mask must be [batch, cached + new tokens] = "
                         f"[{b}, {past + s}], got {tuple(attention_mask.shape)}")
    if cfg.position_embedding_type == "learned_absolute" and past + s > cfg.max_sequence_length:
        raise ValueError(f"{NAME}: {past + s} tokens exceed the learned position embeddings "
                         f"(max_sequence_length={cfg.max_sequence_length}). Fix: shorten the "
                         "prompt or max_new_tokens")


def check_cache(cfg, cache) -> Cache:
    """A DynamicCache with this model's layout (or one that grows its layers on first use)."""
    layers = (2 * cfg.num_sections - 1) * cfg.layers_per_section
    fits = isinstance(cache, Cache) \
        and all(type(layer) is DynamicLayer for layer in cache.layers) \
        and (getattr(cache, "layer_class_to_replicate", None) is DynamicLayer
             or len(cache.layers) == layers)
    if not fits:
        raise ValueError(f"{NAME} keeps its keys and values in a DynamicCache of {layers} layers "
                         "(self-attention of every section, then the cross-attention memory of "
                         f"sections 2..p); got {cache!r}. Fix: pass the cache a previous call "
                         "returned, an empty DynamicCache(), or none (use_cache=True)")
    return cache
