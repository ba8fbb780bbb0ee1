"""The shared-weights ownership rule, written once (Megatron-free).

With `weight_sharing="shared"` every section runs the same layers. Section 1 (index 0) has no
cross-attention, so the sublayers are owned by two sections:

    section 0 owns   every layer's self-attention, MLP and norms, and the final norm (with
                     memory_norm; otherwise the last section alone has a final norm)
    section 1 owns   every layer's cross-attention sublayers (pre_cross_attn_layernorm,
                     cross_attention), which sections 2..p-1 reuse

The model ties sections by this rule (stag_plugin.core.sharing), a checkpoint stores each shared
tensor under its owner's name (stag_plugin.core.state_keys), and the name map reads Megatron's
keys with it (stag_plugin.reference.name_map).
"""

from __future__ import annotations

CROSS_MODULES = ("pre_cross_attn_layernorm", "cross_attention")


def owner_section(module: str) -> int:
    """The section owning a layer's submodule `module` ("self_attention.linear_qkv",
    "cross_attention", "final_layernorm", ...) under shared weights."""
    return 1 if module.startswith(CROSS_MODULES) else 0
