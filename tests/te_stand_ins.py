"""Torch stand-ins for megatron-core's Transformer Engine layers, so that the Transformer Engine
backend's wiring runs on a CPU without Transformer Engine.

Each stand-in is called as megatron-core calls the TE class it replaces and computes what TE
computes, in plain torch:

    TELayerNormColumnParallelLinear   norm (LayerNorm / RMSNorm per config) fused into a
                                      ColumnParallelLinear; its norm parameters are
                                      `layer_norm_weight` / `layer_norm_bias`, as TE names them
    TEColumnParallelLinear            ColumnParallelLinear
    TERowParallelLinear               RowParallelLinear
    TENorm                            torch's LayerNorm / RMSNorm
    TEDotProductAttention             TE's masks: `causal` (top-left), `causal_bottom_right`,
                                      `no_mask`, `padding`/`arbitrary` from the mask tensor; the
                                      window from config.window_size, (left, right) around the
                                      diagonal; a causal type ignores the mask tensor, as TE does

`install(monkeypatch)` puts them where the plugin and Megatron look the TE classes up, and
reports Transformer Engine as available. What they cannot show: TE's kernels, FP8, and
TE-specific module state (`_extra_state` of FP8 metadata).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from stag_plugin.core.specs import TorchNorm


class LayerNormColumnParallelLinear(ColumnParallelLinear):
    def __init__(self, input_size, output_size, *, config, init_method, gather_output, bias,
                 skip_bias_add, is_expert, skip_weight_param_allocation=False,
                 tp_comm_buffer_name=None, tp_group=None, stride=1, **kwargs):
        super().__init__(input_size, output_size, config=config, init_method=init_method,
                         bias=bias, gather_output=gather_output, skip_bias_add=skip_bias_add,
                         is_expert=is_expert, tp_comm_buffer_name=tp_comm_buffer_name,
                         tp_group=tp_group, stride=stride, **kwargs)
        self.rms = config.normalization == "RMSNorm"
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size,
                                                               dtype=config.params_dtype))
        if not self.rms:
            self.layer_norm_bias = torch.nn.Parameter(torch.zeros(input_size,
                                                                  dtype=config.params_dtype))

    def forward(self, x, **kwargs):
        if self.rms:
            normed = F.rms_norm(x, x.shape[-1:], self.layer_norm_weight, self.eps)
        else:
            normed = F.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias,
                                  self.eps)
        return super().forward(normed, **kwargs)


class DotProductAttention(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, k_channels=None, v_channels=None,
                 num_splits=None, cp_comm_type="p2p", pg_collection=None):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.window = config.window_size  # (what megatron-core passes TE: skip freq None)
        self.scale = config.kv_channels**-0.5 if softmax_scale is None else softmax_scale
        self.calls = []  # (mask type, window) of each forward, for the tests

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, num_splits=None):
        mask_type = attn_mask_type or self.attn_mask_type
        self.calls.append((mask_type, self.window))
        sq, b, heads, hd = query.shape
        visible = self._visible(mask_type, sq, key.shape[0], attention_mask, query.device)
        out = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
            attn_mask=visible, scale=self.scale, enable_gqa=key.shape[2] != heads)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hd)

    def _visible(self, mask_type, sq, sk, attention_mask, device):
        i = torch.arange(sq, device=device)[:, None]
        j = torch.arange(sk, device=device)[None, :]
        if mask_type in (AttnMaskType.padding, AttnMaskType.arbitrary):
            return ~attention_mask
        diagonal = i + (sk - sq if mask_type == AttnMaskType.causal_bottom_right else 0)
        visible = torch.ones(sq, sk, dtype=torch.bool, device=device)
        if mask_type in (AttnMaskType.causal, AttnMaskType.causal_bottom_right):
            visible = j <= diagonal
        if self.window is not None:
            left, right = self.window
            visible = visible & (j >= diagonal - left) & (j <= diagonal + right)
        return visible


STAND_INS = {
    "TELayerNormColumnParallelLinear": LayerNormColumnParallelLinear,
    "TEColumnParallelLinear": ColumnParallelLinear,
    "TERowParallelLinear": RowParallelLinear,
    "TENorm": TorchNorm,
    "TEDotProductAttention": DotProductAttention,
}


def install(monkeypatch) -> None:
    """The stand-ins in place of megatron-core's TE classes; Transformer Engine reported
    available (TE >= 1.9 for the spec provider's version question)."""
    from megatron.core.extensions import transformer_engine, transformer_engine_spec_provider

    from stag_plugin.compat import megatron as compat

    for name, stand_in in STAND_INS.items():
        monkeypatch.setattr(transformer_engine_spec_provider, name, stand_in)
        monkeypatch.setattr(transformer_engine, name, stand_in)
    monkeypatch.setattr(transformer_engine_spec_provider, "is_te_min_version",
                        lambda *args, **kwargs: True)
    monkeypatch.setattr(compat, "transformer_engine_available", lambda: True)
