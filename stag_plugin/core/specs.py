"""Megatron-Core layer specs for StagFormer sections.

A StagFormer layer is Megatron's TransformerLayer with slots filled:

    section 1:      input_layernorm -> self_attention -> pre_mlp_layernorm -> mlp
    sections 2..p:  input_layernorm -> self_attention
                    -> pre_cross_attn_layernorm -> cross_attention (StagCrossAttention)
                    -> pre_mlp_layernorm -> mlp

The backend (which linear, norm and core-attention modules fill the slots) is chosen in
`get_backend`, the one place that knows about backends.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add  # noqa: E402
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import (  # noqa: E402
    get_mlp_module_spec_for_backend,
)
from megatron.core.transformer.attention import (  # noqa: E402
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: E402
from megatron.core.transformer.transformer_layer import (  # noqa: E402
    TransformerLayer,
    TransformerLayerSubmodules,
)

from stag_plugin.compat.megatron import require_optional
from stag_plugin.core.attention import SDPAttention, StagCrossAttention
from stag_plugin.errors import NotSupported, StagError

BACKENDS = ("local",)


class TorchNorm:
    """Megatron's WrappedTorchNorm (torch LayerNorm / RMSNorm), usable with sequence parallelism.

    Under sequence parallelism each tensor-parallel rank normalises its own slice of the
    sequence with the same weights; the weights are marked `sequence_parallel` so Megatron's
    finalize_model_grads sums their gradients over the tensor-parallel ranks (what Megatron's
    fused norms do).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        sequence_parallel = config.sequence_parallel
        if sequence_parallel:
            config = copy.copy(config)
            config.sequence_parallel = False
        norm = WrappedTorchNorm(config, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm


class StagLocalSpecProvider(LocalSpecProvider):
    """Megatron's local backend with an SDPA core attention and torch norms: runs on CPU and GPU.

    (Megatron's local DotProductAttention allocates on the current CUDA device; apex's fused
    LayerNorm needs CUDA and has no RMSNorm. torch's LayerNorm/RMSNorm serve both devices.)
    """

    def core_attention(self) -> type:
        return SDPAttention

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, **options) -> type:
        return TorchNorm  # (options: megatron-core 0.19 adds `has_residual`, unused by torch norms)


def get_backend(name: str = "local") -> BackendSpecProvider:
    """The backend that fills the layer slots. Only "local" exists so far."""
    if name == "local":
        return StagLocalSpecProvider()
    if name == "transformer_engine":
        require_optional("transformer_engine", "the Transformer Engine backend")
        raise NotSupported("the Transformer Engine backend (FP8 cross-attention) is not "
                           "implemented yet", "use backend='local'")
    raise StagError(f"unknown StagFormer backend {name!r}", f"use one of {BACKENDS}")


@dataclass(frozen=True)
class StagLayerSpecs:
    """The two layer specs of a StagFormer: section 1's, and the one every later section uses."""

    first_section: ModuleSpec
    later_sections: ModuleSpec

    def for_section(self, index: int) -> ModuleSpec:
        """Spec for the layers of section `index` (0-based)."""
        return self.first_section if index == 0 else self.later_sections


def get_stag_layer_spec(backend: str = "local", qk_layernorm: bool = False) -> StagLayerSpecs:
    """Layer specs for StagGPTModel: self-attention only in section 1, self-attention then
    cross-attention then MLP in later sections."""
    provider = get_backend(backend)
    return StagLayerSpecs(
        first_section=_layer_spec(provider, qk_layernorm, with_cross_attention=False),
        later_sections=_layer_spec(provider, qk_layernorm, with_cross_attention=True),
    )


def _layer_spec(provider, qk_layernorm: bool, with_cross_attention: bool) -> ModuleSpec:
    norm = provider.layer_norm()
    cross = {}
    if with_cross_attention:
        cross = dict(
            pre_cross_attn_layernorm=norm,
            cross_attention=_cross_attention_spec(provider),
            cross_attn_bda=get_bias_dropout_add,
        )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=_self_attention_spec(provider, qk_layernorm),
            self_attn_bda=get_bias_dropout_add,
            **cross,
            pre_mlp_layernorm=norm,
            mlp=get_mlp_module_spec_for_backend(provider),  # Megatron's own dense MLP spec
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _self_attention_spec(provider, qk_layernorm: bool) -> ModuleSpec:
    qk_norm = provider.layer_norm(for_qk=True) if qk_layernorm else IdentityOp
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=provider.column_parallel_linear(),
            core_attention=provider.core_attention(),
            linear_proj=provider.row_parallel_linear(),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def _cross_attention_spec(provider) -> ModuleSpec:
    return ModuleSpec(
        module=StagCrossAttention,
        params={"attn_mask_type": AttnMaskType.arbitrary},
        submodules=CrossAttentionSubmodules(
            linear_q=provider.column_parallel_linear(),
            linear_kv=provider.column_parallel_linear(),
            core_attention=provider.core_attention(),
            linear_proj=provider.row_parallel_linear(),
        ),
    )

