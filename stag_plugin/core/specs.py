"""Megatron-Core layer specs for StagFormer sections.

A StagFormer layer is Megatron's TransformerLayer with slots filled:

    section 1:      input_layernorm -> self_attention -> pre_mlp_layernorm -> mlp
    sections 2..p:  input_layernorm -> self_attention
                    -> pre_cross_attn_layernorm -> cross_attention (StagCrossAttention)
                    -> pre_mlp_layernorm -> mlp

The backend (which linear, norm and core-attention modules fill the slots) is chosen in
`get_backend`, the one place that knows about backends:

    "local"               Megatron's local linear layers, torch norms, SDPA core attention
    "transformer_engine"  Megatron's Transformer Engine layers, as its GPT TE spec
                          (get_gpt_layer_with_transformer_engine_spec) builds them: each pre-norm
                          fused into the linear layer after it (TELayerNormColumnParallelLinear:
                          input_layernorm into linear_qkv, pre_mlp_layernorm into linear_fc1, and
                          here pre_cross_attn_layernorm into the cross-attention's linear_q, the
                          norm slots left IdentityOp), TEDotProductAttention, TENorm; the
                          cross-attention's core attention is StagTEDotProductAttention
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from megatron.core.extensions.transformer_engine_spec_provider import (  # noqa: E402
    TESpecProvider,
)
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

from stag_plugin.compat import megatron as compat
from stag_plugin.core.attention import SDPAttention, StagCrossAttention, StagTEDotProductAttention
from stag_plugin.core.config import BACKENDS
from stag_plugin.errors import StagError


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

    def cross_core_attention(self) -> type:
        """The cross-attention's core attention: SDPA under the mask StagGPTModel builds."""
        return SDPAttention

    def cross_attn_mask_type(self) -> AttnMaskType:
        return AttnMaskType.arbitrary


class StagTESpecProvider(TESpecProvider):
    """Megatron's Transformer Engine backend, plus the cross-attention's core attention."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, **options) -> type:
        if for_qk and not compat.transformer_engine_available():
            # Megatron asks Transformer Engine's version here (FusedLayerNorm before TE 1.9);
            # without TE (specs inspected on a CPU) it is the class any TE 2.x gives.
            return super().layer_norm(rms_norm=rms_norm, **options)
        return super().layer_norm(rms_norm=rms_norm, for_qk=for_qk, **options)

    def cross_core_attention(self) -> type:
        """TE's core attention with the causal mask and the cross-attention's own window."""
        return StagTEDotProductAttention

    def cross_attn_mask_type(self) -> AttnMaskType:
        return AttnMaskType.causal


def get_backend(name: str = "local") -> BackendSpecProvider:
    """The backend that fills the layer slots: "local" or "transformer_engine" (the values of
    Megatron's `transformer_impl`; the latter needs Transformer Engine installed)."""
    if name == "local":
        return StagLocalSpecProvider()
    if name == "transformer_engine":
        compat.require_transformer_engine("the Transformer Engine backend "
                                          "(transformer_impl='transformer_engine')")
        return StagTESpecProvider()
    raise StagError(f"unknown StagFormer backend {name!r}", f"use one of {BACKENDS}")


@dataclass(frozen=True)
class StagLayerSpecs:
    """The two layer specs of a StagFormer, section 1's and the one every later section uses,
    and the norm ending each section (its TransformerBlock's final_layernorm)."""

    first_section: ModuleSpec
    later_sections: ModuleSpec
    final_layernorm: type

    def for_section(self, index: int) -> ModuleSpec:
        """Spec for the layers of section `index` (0-based)."""
        return self.first_section if index == 0 else self.later_sections


def get_stag_layer_spec(backend: str = "local", qk_layernorm: bool = False) -> StagLayerSpecs:
    """Layer specs for StagGPTModel: self-attention only in section 1, self-attention then
    cross-attention then MLP in later sections. `backend` is the config's transformer_impl."""
    provider = get_backend(backend)
    return StagLayerSpecs(
        first_section=_layer_spec(provider, qk_layernorm, with_cross_attention=False),
        later_sections=_layer_spec(provider, qk_layernorm, with_cross_attention=True),
        final_layernorm=provider.layer_norm(),
    )


def _layer_spec(provider, qk_layernorm: bool, with_cross_attention: bool) -> ModuleSpec:
    # A backend that fuses norms into the next linear layer leaves the norm slots empty.
    pre_norm = IdentityOp if provider.fuse_layernorm_and_linear() else provider.layer_norm()
    cross = {}
    if with_cross_attention:
        cross = dict(
            pre_cross_attn_layernorm=pre_norm,
            cross_attention=_cross_attention_spec(provider),
            cross_attn_bda=get_bias_dropout_add,
        )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=pre_norm,
            self_attention=_self_attention_spec(provider, qk_layernorm),
            self_attn_bda=get_bias_dropout_add,
            **cross,
            pre_mlp_layernorm=pre_norm,
            mlp=get_mlp_module_spec_for_backend(provider),  # Megatron's own dense MLP spec
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _normed_linear(provider) -> type:
    """The column-parallel linear layer after a pre-norm: with the norm fused in, if the
    backend fuses (TELayerNormColumnParallelLinear)."""
    if provider.fuse_layernorm_and_linear():
        return provider.column_parallel_layer_norm_linear()
    return provider.column_parallel_linear()


def _self_attention_spec(provider, qk_layernorm: bool) -> ModuleSpec:
    qk_norm = provider.layer_norm(for_qk=True) if qk_layernorm else IdentityOp
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=_normed_linear(provider),
            core_attention=provider.core_attention(),
            linear_proj=provider.row_parallel_linear(),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def _cross_attention_spec(provider) -> ModuleSpec:
    return ModuleSpec(
        module=StagCrossAttention,
        params={"attn_mask_type": provider.cross_attn_mask_type()},
        submodules=CrossAttentionSubmodules(
            linear_q=_normed_linear(provider),
            linear_kv=provider.column_parallel_linear(),  # the memory is normalised already
            core_attention=provider.cross_core_attention(),
            linear_proj=provider.row_parallel_linear(),
        ),
    )

