"""Name map between StagGPTModel state dicts (tensor-parallel size 1) and the reference model.

Declarative: one table per level, `{k}` = section index, `{i}` = layer index within the section.

    Megatron (StagGPTModel)                            reference (stag_plugin.reference.model)
    embedding.word_embeddings.weight                   tok_emb.weight
    embedding.position_embeddings.weight               pos_emb.weight        (learned_absolute)
    null_memory                                        null_memory           (p > 1)
    combination_weights                                alpha                 ("learned")
    output_layer.weight                                lm_head.weight        (untied head)
    sections.{k}.final_layernorm.*                     stacks.{k'}.ln_out.*
    sections.{k}.layers.{i}.input_layernorm.*          stacks.{k'}.blocks.{i}.ln_self.*
      .self_attention.linear_qkv.*                       .self_attn.{q,k,v}.*  (split per group)
      .self_attention.linear_proj.*                      .self_attn.o.*
      .pre_cross_attn_layernorm.*                        .ln_cross.*
      .cross_attention.linear_q.*                        .cross_attn.q.*
      .cross_attention.linear_kv.*                       .cross_attn.{k,v}.*   (split per group)
      .cross_attention.linear_proj.*                     .cross_attn.o.*
      .pre_mlp_layernorm.*                               .ln_mlp.*
      .mlp.linear_fc1.*                                  .mlp.up.*  or  .mlp.{gate,up}.* (GLU)
      .mlp.linear_fc2.*                                  .mlp.down.*

k' = k for separate weights. With shared weights the reference has one stack (k' = 0): it takes
the self-attention/MLP/norm weights from Megatron section 0 and the cross-attention from
section 1; Megatron's other copies are aliases, checked equal and not stored twice. Without
`memory_norm` only the last section (Megatron's sections.{p-1}) has a final norm, and it is
stored under that name.
Megatron's fused layouts: linear_qkv rows are grouped per key/value group as
[q heads of the group | k | v]; linear_kv rows as [k | v] per group; linear_fc1 as [gate | up].
`_extra_state` entries (None for the local backend, FP8 metadata for Transformer Engine layers)
carry no weights and are skipped.

Transformer Engine layers fuse each pre-norm into the linear layer after it; their keys name the
norm inside that layer (TE_FUSED_NORMS), e.g. `self_attention.linear_qkv.layer_norm_weight` for
`input_layernorm.weight`. Every function here takes either spelling (`local_key`), and
checkpoints store the local one (stag_plugin.core.state_keys), so both backends read and write
the same names.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch

from stag_plugin.reference.sharing import owner_section

MODEL_KEYS = {
    "embedding.word_embeddings.weight": "tok_emb.weight",
    "embedding.position_embeddings.weight": "pos_emb.weight",
    "null_memory": "null_memory",
    "combination_weights": "alpha",
    "output_layer.weight": "lm_head.weight",
}
SECTION_KEYS = {"final_layernorm": "ln_out"}
LAYER_MODULES = {
    "input_layernorm": "ln_self",
    "self_attention.linear_qkv": ("self_attn.q", "self_attn.k", "self_attn.v"),
    "self_attention.linear_proj": "self_attn.o",
    "pre_cross_attn_layernorm": "ln_cross",
    "cross_attention.linear_q": "cross_attn.q",
    "cross_attention.linear_kv": ("cross_attn.k", "cross_attn.v"),
    "cross_attention.linear_proj": "cross_attn.o",
    "pre_mlp_layernorm": "ln_mlp",
    "mlp.linear_fc1": "mlp.up",  # ("mlp.gate", "mlp.up") for a gated linear unit
    "mlp.linear_fc2": "mlp.down",
}
TE_FUSED_NORMS = {  # Transformer Engine layer key -> local layer key, within a layer
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "cross_attention.linear_q.layer_norm_weight": "pre_cross_attn_layernorm.weight",
    "cross_attention.linear_q.layer_norm_bias": "pre_cross_attn_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
_LAYER_RE = re.compile(r"^sections\.(\d+)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_SECTION_RE = re.compile(r"^sections\.(\d+)\.(final_layernorm)\.(weight|bias)$")
_SECTION_PREFIX_RE = re.compile(r"^sections\.(\d+)\.")


# ----------------------------------------------------------------- fused-layout transforms

def split_groups(fused: torch.Tensor, groups: int, sizes: List[int]) -> List[torch.Tensor]:
    """Rows grouped as groups x [part_0 | part_1 | ...] -> one tensor per part, groups kept."""
    per_group = fused.reshape(groups, sum(sizes), *fused.shape[1:])
    parts = torch.split(per_group, sizes, dim=1)
    return [p.reshape(groups * size, *fused.shape[1:]) for p, size in zip(parts, sizes)]


def join_groups(parts: List[torch.Tensor], groups: int) -> torch.Tensor:
    """Inverse of split_groups."""
    per_group = [p.reshape(groups, -1, *p.shape[1:]) for p in parts]
    joined = torch.cat(per_group, dim=1)
    return joined.reshape(-1, *parts[0].shape[1:])


def _layouts(cfg) -> Dict[str, Tuple[int, List[int]]]:
    """Megatron module -> (groups, row sizes per group) of its fused layout."""
    d, groups = cfg.head_dim, cfg.num_query_groups
    heads_per_group = cfg.num_attention_heads // groups
    layouts = {
        "self_attention.linear_qkv": (groups, [heads_per_group * d, d, d]),
        "cross_attention.linear_kv": (groups, [d, d]),
    }
    if cfg.gated_linear_unit:
        layouts["mlp.linear_fc1"] = (1, [cfg.ffn_hidden_size, cfg.ffn_hidden_size])
    return layouts


def _reference_modules(cfg, module: str):
    if module == "mlp.linear_fc1" and cfg.gated_linear_unit:
        return ("mlp.gate", "mlp.up")
    return LAYER_MODULES[module]


# ----------------------------------------------------------------- key bookkeeping

_IN_LAYER_RE = re.compile(r"^(.*\blayers\.\d+\.)(.+)$")


def local_key(key: str) -> str:
    """`key` with a Transformer Engine fused-norm name replaced by the local backend's
    (`...layers.{i}.mlp.linear_fc1.layer_norm_weight` -> `...layers.{i}.pre_mlp_layernorm.weight`);
    any other key unchanged."""
    match = _IN_LAYER_RE.match(key)
    if match is None or match.group(2) not in TE_FUSED_NORMS:
        return key
    return match.group(1) + TE_FUSED_NORMS[match.group(2)]


def _stack(cfg, section: int) -> int:
    return 0 if cfg.weight_sharing == "shared" else section


def owner_key(cfg, key: str) -> str:
    """The key a weight is stored under: its owner's with shared weights, else `key` itself
    (local-backend names either way)."""
    key = local_key(key)
    return _alias_owner(cfg, key) or key


def _alias_owner(cfg, key: str) -> Optional[str]:
    """With shared weights, the owner of an aliased key (stag_plugin.reference.sharing); None
    for keys that own their tensor."""
    key = local_key(key)
    match = _SECTION_PREFIX_RE.match(key)
    if cfg.weight_sharing != "shared" or match is None:
        return None
    rest = key[match.end():]  # "layers.{i}.<module>.<param>" or "final_layernorm.<param>"
    if rest.startswith("final_layernorm.") and not cfg.memory_norm:
        return None  # the last section's alone
    module = rest.split(".", 2)[2] if rest.startswith("layers.") else rest
    owner = owner_section(module)
    return None if int(match.group(1)) == owner else f"sections.{owner}.{rest}"


def reference_names(cfg, key: str) -> Tuple[List[str], Optional[Tuple[int, List[int]]]]:
    """Reference keys holding Megatron `key` (an owner key, not an alias), and the fused layout
    (groups, row sizes) when one Megatron tensor splits into several reference tensors."""
    key = local_key(key)
    if key in MODEL_KEYS:
        return [MODEL_KEYS[key]], None
    section, layer = _SECTION_RE.match(key), _LAYER_RE.match(key)
    if section:
        k = int(section.group(1))
        module, param = SECTION_KEYS[section.group(2)], section.group(3)
        return [f"stacks.{_stack(cfg, k)}.{module}.{param}"], None
    if not layer or layer.group(3) not in LAYER_MODULES:
        raise KeyError(f"no reference name for Megatron key {key!r}")
    k, i, module, param = int(layer.group(1)), layer.group(2), layer.group(3), layer.group(4)
    prefix = f"stacks.{_stack(cfg, k)}.blocks.{i}."
    targets = _reference_modules(cfg, module)
    if isinstance(targets, str):
        return [f"{prefix}{targets}.{param}"], None
    return [f"{prefix}{target}.{param}" for target in targets], _layouts(cfg)[module]


def megatron_to_reference(state_dict: Dict[str, torch.Tensor], cfg) -> Dict[str, torch.Tensor]:
    """StagGPTModel state dict (TP=1) -> reference StagFormer state dict, with hard checks."""
    out: Dict[str, torch.Tensor] = {}
    by_local_name = {local_key(key): key for key in state_dict}
    for key, value in state_dict.items():
        if key.endswith("_extra_state"):
            continue
        owner = _alias_owner(cfg, key)
        if owner is not None:
            _check_alias(key, value, owner, state_dict.get(by_local_name.get(owner, owner)))
            continue
        names, layout = reference_names(cfg, key)
        parts = [value] if layout is None else split_groups(value, *layout)
        for name, part in zip(names, parts):
            if name in out:
                raise ValueError(f"reference key {name!r} produced twice (from {key!r})")
            out[name] = part
    check_against_reference(out, cfg)
    return out


def _check_alias(key, value, owner_key, owner):
    if owner is None or owner.shape != value.shape or not torch.equal(owner, value):
        raise ValueError(f"shared-weights checkpoint: {key!r} should equal {owner_key!r}")


def reference_to_megatron(state_dict: Dict[str, torch.Tensor], cfg,
                          megatron_keys: List[str]) -> Dict[str, torch.Tensor]:
    """Reference state dict -> a value for every key in `megatron_keys` (aliases included)."""
    check_against_reference(state_dict, cfg)
    out: Dict[str, torch.Tensor] = {}
    for key in megatron_keys:
        if key.endswith("_extra_state"):
            continue
        names, layout = reference_names(cfg, _alias_owner(cfg, key) or key)
        parts = [state_dict[name] for name in names]
        out[key] = parts[0] if layout is None else join_groups(parts, layout[0])
    return out


def check_against_reference(state_dict: Dict[str, torch.Tensor], cfg,
                            dtype: Optional[torch.dtype] = None) -> None:
    """Every key of the reference model present exactly once, with its shape (and `dtype` when
    given); nothing extra."""
    from stag_plugin.reference.model import StagFormer

    with torch.device("meta"):
        expected = StagFormer(cfg).state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise KeyError(f"state dict does not match the reference model: missing {missing[:5]}"
                       f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}")
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{key}: shape {tuple(state_dict[key].shape)}, "
                             f"expected {tuple(tensor.shape)}")
        if dtype is not None and state_dict[key].dtype != dtype:
            raise ValueError(f"{key}: dtype {state_dict[key].dtype}, expected {dtype}")


# ----------------------------------------------------------------- the map read backwards

_REF_LAYER_RE = re.compile(r"^stacks\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
_REF_SECTION_RE = re.compile(r"^stacks\.(\d+)\.ln_out\.(weight|bias)$")


def megatron_key(cfg, reference_key: str) -> str:
    """The Megatron owner key that holds reference tensor `reference_key` (the inverse of
    `reference_names`; with shared weights, the owner section of the weight)."""
    model_keys = {ref: meg for meg, ref in MODEL_KEYS.items()}
    if reference_key in model_keys:
        return model_keys[reference_key]
    section = _REF_SECTION_RE.match(reference_key)
    if section:
        owner = section.group(1) if cfg.memory_norm else cfg.num_sections - 1
        return f"sections.{owner}.final_layernorm.{section.group(2)}"
    layer = _REF_LAYER_RE.match(reference_key)
    modules = _megatron_modules(cfg)
    if not layer or layer.group(3) not in modules:
        raise KeyError(f"no Megatron name for reference key {reference_key!r}")
    stack, i, module, param = layer.groups()
    module = modules[module]
    if cfg.weight_sharing == "shared":
        stack = str(owner_section(module))
    return f"sections.{stack}.layers.{i}.{module}.{param}"


def _megatron_modules(cfg) -> Dict[str, str]:
    """Reference module (e.g. "self_attn.k") -> the Megatron module holding it."""
    inverse = {}
    for module in LAYER_MODULES:
        targets = _reference_modules(cfg, module)
        for target in (targets,) if isinstance(targets, str) else targets:
            inverse[target] = module
    return inverse


def megatron_shapes(cfg) -> Dict[str, Tuple[int, ...]]:
    """Every tensor a StagGPTModel checkpoint holds for `cfg`: owner key -> global (TP = 1)
    shape; no aliases of shared weights, no `_extra_state`. Derived from the reference model
    through this map, and checked to invert `reference_names` exactly."""
    from stag_plugin.reference.model import StagFormer

    with torch.device("meta"):
        reference = StagFormer(cfg).state_dict()
    grouped: Dict[str, List[str]] = {}
    for name in reference:
        grouped.setdefault(megatron_key(cfg, name), []).append(name)
    shapes = {}
    for key, names in grouped.items():
        parts, _ = reference_names(cfg, key)
        if sorted(parts) != sorted(names):
            raise AssertionError(f"name map is not invertible at {key!r}: {parts} vs {names}")
        first = tuple(reference[parts[0]].shape)
        shapes[key] = (sum(reference[p].shape[0] for p in parts),) + first[1:]  # fused rows
    return shapes
