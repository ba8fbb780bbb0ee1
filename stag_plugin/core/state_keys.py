"""Global, layout-independent checkpoint names of a StagGPTModel's tensors.

A pipeline stage builds only its layers and numbers them from 0; a shared-weights model holds
one tensor under several module paths; a pipeline replica (a parameter several stages hold)
exists once per holder. A distributed checkpoint must nevertheless hold every tensor once,
under one name that does not depend on the layout, so that any TP / PP layout loads any other:

    sections.{k}.layers.{i}.<module>.<param>    i counted within section k, whatever the stage
    a shared weight                             under its owner section (stag_plugin.reference
                                                .sharing), once
    the tied LM head                            under embedding.word_embeddings.weight
    a pipeline replica                          written by its first holder stage only
    a norm fused into a linear layer            under the local backend's norm name
    (Transformer Engine)                        (stag_plugin.reference.name_map.TE_FUSED_NORMS)

The functions take the model (its config, pipeline stage and layout) and return names; the
model's own methods (`checkpoint_key`, `sharded_state_dict`, `load_state_dict`) call them.
"""

from __future__ import annotations

from typing import Dict

from torch import Tensor

from stag_plugin.parallel.layout import replica_stages, shared_layer_stages
from stag_plugin.reference import name_map
from stag_plugin.reference.name_map import owner_key
from stag_plugin.reference.sharing import owner_section


def checkpoint_key(model, local_name: str, owner: bool = True) -> str:
    """Global name of parameter `local_name` of this stage: sections and layers by their index
    in the model, shared weights under their owner (unless `owner=False`), the tied head under
    the word embeddings, Transformer Engine's fused norms under the local backend's names."""
    if local_name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    if not local_name.startswith("sections."):
        return local_name
    _, index, rest = local_name.split(".", 2)
    seg = model.stage.segments[int(index)]
    if rest.startswith("layers."):
        _, layer, tail = rest.split(".", 2)
        rest = f"layers.{seg.first_layer + int(layer)}.{tail}"
    name = name_map.local_key(f"sections.{seg.section}.{rest}")
    return owner_key(model.config, name) if owner else name


def replica_holders(model) -> Dict[str, tuple]:
    """Checkpoint key -> stages holding a copy, for every parameter held by several stages."""
    kinds = replica_stages(model.stages, model.share_embeddings_and_output_weights)
    holders = {"embedding.word_embeddings.weight": kinds["word_embeddings"],
               "embedding.position_embeddings.weight": kinds["position_embeddings"],
               "null_memory": kinds["null_memory"],
               "combination_weights": kinds["combination_weights"]}
    if model.config.weight_sharing == "shared":
        shared = shared_layer_stages(model.stages)
        for name, _ in model.named_parameters():
            key = checkpoint_key(model, name)
            holders.setdefault(key, _shared_holders(key, shared))
    return {k: v for k, v in holders.items() if v is not None and len(v) > 1}


def globally_named(model, state: dict, prefix: str) -> dict:
    """Megatron's sharded state dict of this stage, each tensor once, under its global name;
    pipeline copies of a replica marked as non-main (only the first holder writes it)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    state = drop_shared_duplicates(state)
    holders = replica_holders(model) if len(model.stages) > 1 else {}
    for local_key, entry in state.items():
        if not hasattr(entry, "key"):
            continue
        # Tensors go under their owner's name; per-module extra state stays per section.
        key = checkpoint_key(model, local_key[len(prefix):],
                             owner=isinstance(entry, ShardedTensor))
        entry.key = prefix + key
        stages = holders.get(key) or holders.get(key.rsplit(".", 1)[0] + ".weight")
        if stages is not None and stages[0] != model.stage.index:
            entry.replica_id = _non_main(entry.replica_id)
    return state


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


def with_shared_aliases(model, state_dict: dict) -> dict:
    """`state_dict` with every alias of a shared tensor filled in from the key it is saved
    under (a checkpoint stores each shared tensor once, under its owner)."""
    owners = {}  # id(tensor) -> a key present in state_dict
    aliases = []  # (missing key, tensor id)
    for key, tensor in model.state_dict(keep_vars=True).items():
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


def _shared_holders(key: str, shared: dict):
    """Stages holding shared-weight `key` (a checkpoint key), from layout.shared_layer_stages."""
    parts = key.split(".")
    if parts[0] != "sections":
        return None
    if parts[2] == "final_layernorm":
        return shared.get(("final_norm", 0))
    module = ".".join(parts[4:])
    kind = "cross" if owner_section(module) == 1 else "layer"
    return shared.get((kind, int(parts[3])))


def _non_main(replica_id):
    """A replica id marking a pipeline copy (not the one written to the checkpoint)."""
    if isinstance(replica_id, int):
        return (1, replica_id)
    return (1,) + tuple(replica_id[1:])
