"""Upcycling recipes: a p = 1 GPT's weights -> a p-section StagFormer's, in reference names.

Both models are named as stag_plugin.reference.model names them (`stacks.{k}.blocks.{i}.…`; the GPT
is the single stack 0, with n layers). Each recipe is a table of rules, tried in order; the
first whose pattern matches a target key says where the tensor comes from:

    ("copy", template)   the GPT tensor named by template ({src} = source layer, {rest}, {param})
    ("zero",)            zeros
    ("init",)            the target model's own fresh initialisation (Megatron's init methods)

duplicate (depth per section = n; function-preserving):
    every section's layer i = GPT layer i; every final norm = the GPT's final norm;
    cross-attention output projections (weight and bias) = 0 and null memory = 0, so every
    cross-attention adds exactly zero and each section computes the GPT: the converted model's
    logits equal the GPT's. The other cross-attention weights (norm, q, k, v) get a fresh init.
    Shared weights: the one stack is the GPT's layers (sections differ only once trained).

split (depth per section = n / p; NOT function-preserving):
    section k, layer i = GPT layer k * n/p + i; every final norm = the GPT's final norm;
    cross-attention (output projection included) freshly initialised. Needs n % p == 0 and
    separate weights.

Hard checks: every target tensor matches exactly one rule's source, every GPT tensor is used, and
the result has every key, shape and dtype of the target reference model.
"""

from __future__ import annotations

import re
from typing import Dict

import torch

from stag_plugin.convert.common import ConvertError

RECIPES = ("duplicate", "split")

_EMBEDDINGS = r"(?P<key>tok_emb\.weight|pos_emb\.weight|lm_head\.weight)"
_LAYER = r"stacks\.(?P<k>\d+)\.blocks\.(?P<i>\d+)\."
RULES = {
    "duplicate": (
        (_EMBEDDINGS, ("copy", "{key}")),
        (r"null_memory", ("zero",)),
        (r"alpha", ("init",)),  # (0, ..., 0, 1): the head reads the last section
        (r"stacks\.(?P<k>\d+)\.ln_out\.(?P<param>\w+)", ("copy", "stacks.0.ln_out.{param}")),
        (_LAYER + r"cross_attn\.o\.(?P<param>\w+)", ("zero",)),
        (_LAYER + r"(ln_cross|cross_attn)\..+", ("init",)),
        (_LAYER + r"(?P<rest>.+)", ("copy", "stacks.0.blocks.{src}.{rest}")),
    ),
    "split": (
        (_EMBEDDINGS, ("copy", "{key}")),
        (r"null_memory", ("zero",)),
        (r"alpha", ("init",)),
        (r"stacks\.(?P<k>\d+)\.ln_out\.(?P<param>\w+)", ("copy", "stacks.0.ln_out.{param}")),
        (_LAYER + r"(ln_cross|cross_attn)\..+", ("init",)),
        (_LAYER + r"(?P<rest>.+)", ("copy", "stacks.0.blocks.{src}.{rest}")),
    ),
}


def check_recipe(recipe: str, source_layers: int, sections: int, sharing: str) -> int:
    """Layers per section of the upcycled model (clear errors for impossible requests)."""
    if recipe not in RECIPES:
        raise ConvertError(f"unknown recipe {recipe!r}", f"use one of {RECIPES}")
    if sections < 2:
        raise ConvertError(f"--stag-num-sections {sections}: upcycling needs at least 2 "
                           "sections", "pass --stag-num-sections 2 or more")
    if recipe == "duplicate":
        return source_layers
    if sharing == "shared":
        raise ConvertError("--recipe split with shared weights would keep only one block of "
                           "the GPT's layers", "use --recipe duplicate for shared weights, or "
                           "--stag-weight-sharing separate")
    if source_layers % sections:
        raise ConvertError(f"--recipe split needs the GPT's {source_layers} layers to divide "
                           f"into {sections} sections of equal depth",
                           f"use a number of sections that divides {source_layers}, or "
                           "--recipe duplicate")
    return source_layers // sections


def upcycle(recipe: str, gpt: Dict[str, torch.Tensor], init: Dict[str, torch.Tensor],
            layers_per_section: int) -> Dict[str, torch.Tensor]:
    """Target reference state: one value for every key of `init` (the target model's fresh
    reference state), taken from `gpt` (the p = 1 reference state) by the recipe's rules."""
    out, used = {}, set()
    for key, fresh in init.items():
        action, fields = _rule(recipe, key)
        if action[0] == "zero":
            out[key] = torch.zeros_like(fresh)
        elif action[0] == "init":
            out[key] = fresh
        else:
            source_key = action[1].format(src=_source_layer(recipe, fields, layers_per_section),
                                          **fields)
            if source_key not in gpt:
                raise ConvertError(f"recipe {recipe}: {key} needs {source_key}, which the GPT "
                                   "lacks", "report this as a bug, with the command line")
            out[key] = gpt[source_key].clone()
            used.add(source_key)
    unused = sorted(set(gpt) - used)
    if unused:
        raise ConvertError(f"recipe {recipe} leaves GPT tensors unused ({unused[:3]})",
                           "report this as a bug, with the command line")
    return out


def _rule(recipe: str, key: str):
    for pattern, action in RULES[recipe]:
        match = re.fullmatch(pattern, key)
        if match:
            return action, {k: v for k, v in match.groupdict().items() if v is not None}
    raise ConvertError(f"recipe {recipe} has no rule for {key}",
                       "report this as a bug, with the command line")


def _source_layer(recipe: str, fields: dict, layers_per_section: int):
    if "i" not in fields:
        return None
    k, i = int(fields["k"]), int(fields["i"])
    return i if recipe == "duplicate" else k * layers_per_section + i
