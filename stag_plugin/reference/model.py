"""A StagFormer in plain PyTorch: the reference every Megatron path is held to.

No Megatron import: this file is written from the architecture (docs/design.md), not from the
Megatron model, and serves as the standalone inference model (copied into inference folders).
Tensors are batch-first here, [b, s, h]. `stag_plugin.reference.name_map` maps Megatron state dicts
onto it.

    e = tok_emb(x) (+ pos_emb)
    out_1 = Stack_1(e)                                 each Stack: Blocks (then a final norm)
    out_k = Stack_k(e, memory=[null, out_{k-1}[:-1]])  Blocks with cross-attention
    logits = head(out_p)  or  head(sum_k alpha_k out_k)

The last section's output is normalised by its final norm; an earlier section's output (its
memory) is its raw residual stream, or with `memory_norm` normalised by its own final norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


@dataclass
class ReferenceConfig:
    vocab_size: int
    max_sequence_length: int
    num_layers: int  # total depth: num_sections * layers per section
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    head_dim: int
    num_sections: int = 2
    weight_sharing: str = "separate"
    cross_attention_window: Optional[int] = None
    output_combination: str = "last"
    cross_attention_rope: bool = True
    memory_norm: bool = True  # True where a config.json does not name it
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    normalization: str = "LayerNorm"
    norm_eps: float = 1e-5
    linear_bias: bool = True  # output projections and MLP
    qkv_bias: bool = True  # q/k/v projections (self and cross)
    gated_linear_unit: bool = False
    activation: str = "gelu"
    tie_embeddings: bool = True

    @property
    def layers_per_section(self) -> int:
        return self.num_layers // self.num_sections

    @classmethod
    def from_megatron(cls, config, vocab_size: int, max_sequence_length: int,
                      tie_embeddings: bool = True) -> "ReferenceConfig":
        """Read a StagFormerConfig (by attribute; nothing is imported from Megatron)."""
        activation = {fn: name for name, fn in ACTIVATIONS.items()}.get(config.activation_func)
        unsupported = {
            "activation_func": activation is None,
            "qk_layernorm": config.qk_layernorm,
            "rotary_interleaved": config.rotary_interleaved,
            "layernorm_zero_centered_gamma": config.layernorm_zero_centered_gamma,
            "apply_residual_connection_post_layernorm":
                config.apply_residual_connection_post_layernorm,
        }
        bad = [name for name, flag in unsupported.items() if flag]
        if bad:
            raise ValueError(f"the reference model does not implement {bad}")
        return cls(
            vocab_size=vocab_size, max_sequence_length=max_sequence_length,
            num_layers=config.num_layers, hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_query_groups, ffn_hidden_size=config.ffn_hidden_size,
            head_dim=config.kv_channels, num_sections=config.num_sections,
            weight_sharing=config.weight_sharing,
            cross_attention_window=config.cross_attention_window,
            output_combination=config.output_combination,
            cross_attention_rope=config.cross_attention_rope, memory_norm=config.memory_norm,
            position_embedding_type=config.position_embedding_type,
            rotary_base=config.rotary_base, rotary_percent=config.rotary_percent,
            normalization=config.normalization, norm_eps=config.layernorm_epsilon,
            linear_bias=config.add_bias_linear,
            qkv_bias=config.add_bias_linear or config.add_qkv_bias,
            gated_linear_unit=config.gated_linear_unit, activation=activation,
            tie_embeddings=tie_embeddings,
        )


def make_norm(cfg: ReferenceConfig) -> nn.Module:
    if cfg.normalization == "RMSNorm":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


def rope_angles(cfg: ReferenceConfig, positions: torch.Tensor) -> torch.Tensor:
    """Angles [len(positions), rot_dim / 2] for the rotated part of each head."""
    rot_dim = int(cfg.head_dim * cfg.rotary_percent)
    inv_freq = 1.0 / cfg.rotary_base ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
    return positions.float()[:, None] * inv_freq[None, :].to(positions.device)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the first rot_dim dims of x [b, heads, s, d] as pairs (i, i + rot_dim/2)."""
    half = angles.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class Attention(nn.Module):
    """Multi-head attention with grouped keys/values; self- or cross-attention."""

    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.cfg = cfg
        q_size = cfg.num_attention_heads * cfg.head_dim
        kv_size = cfg.num_query_groups * cfg.head_dim
        self.q = nn.Linear(cfg.hidden_size, q_size, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.qkv_bias)
        self.o = nn.Linear(q_size, cfg.hidden_size, bias=cfg.linear_bias)

    def forward(self, x, source, visible, q_angles=None, k_angles=None):
        """x [b, sq, h] attends to source [b, sk, h] where visible [sq, sk] is True."""
        cfg = self.cfg
        b, sq, _ = x.shape
        q = self.q(x).view(b, sq, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = self.k(source).view(b, -1, cfg.num_query_groups, cfg.head_dim).transpose(1, 2)
        v = self.v(source).view(b, -1, cfg.num_query_groups, cfg.head_dim).transpose(1, 2)
        if q_angles is not None:
            q, k = apply_rope(q, q_angles), apply_rope(k, k_angles)
        repeat = cfg.num_attention_heads // cfg.num_query_groups  # heads per key/value group
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)  # [b, heads, sq, sk]
        scores = scores.masked_fill(~visible, float("-inf"))
        out = scores.softmax(dim=-1) @ v  # [b, heads, sq, d]
        return self.o(out.transpose(1, 2).reshape(b, sq, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.gated = cfg.gated_linear_unit
        self.up = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=cfg.linear_bias)
        if self.gated:
            self.gate = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=cfg.linear_bias)
        self.down = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.linear_bias)

    def forward(self, x):
        hidden = self.act(self.gate(x)) * self.up(x) if self.gated else self.act(self.up(x))
        return self.down(hidden)


class Block(nn.Module):
    """Pre-norm layer: self-attention, optional cross-attention to memory, MLP."""

    def __init__(self, cfg: ReferenceConfig, with_cross: bool):
        super().__init__()
        self.ln_self, self.self_attn = make_norm(cfg), Attention(cfg)
        if with_cross:
            self.ln_cross, self.cross_attn = make_norm(cfg), Attention(cfg)
        self.ln_mlp, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, causal, angles, memory=None, cross_visible=None, cross_angles=None):
        h = self.ln_self(x)
        x = x + self.self_attn(h, h, causal, angles, angles)
        if memory is not None:
            q_angles, k_angles = cross_angles
            x = x + self.cross_attn(self.ln_cross(x), memory, cross_visible, q_angles, k_angles)
        return x + self.mlp(self.ln_mlp(x))


class Stack(nn.Module):
    """One section: layers_per_section Blocks, and a final norm (`ln_out`) when `final_norm`.
    forward returns the output of the last Block; StagFormer.finish applies the norm."""

    def __init__(self, cfg: ReferenceConfig, with_cross: bool, final_norm: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, with_cross) for _ in range(cfg.layers_per_section))
        if final_norm:
            self.ln_out = make_norm(cfg)

    def forward(self, x, causal, angles, memory=None, cross_visible=None, cross_angles=None):
        for block in self.blocks:
            x = block(x, causal, angles, memory, cross_visible, cross_angles)
        return x


class StagFormer(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.position_embedding_type == "learned_absolute":
            self.pos_emb = nn.Embedding(cfg.max_sequence_length, cfg.hidden_size)
        # Shared weights: one Stack (with cross-attention) runs every section.
        p, shared = cfg.num_sections, cfg.weight_sharing == "shared"
        self.stacks = nn.ModuleList(
            Stack(cfg, with_cross=(k > 0 or (shared and p > 1)),
                  final_norm=shared or cfg.memory_norm or k == p - 1)
            for k in range(1 if shared else p)
        )
        if p > 1:
            self.null_memory = nn.Parameter(torch.zeros(cfg.hidden_size))
        if cfg.output_combination == "learned":
            self.alpha = nn.Parameter(torch.zeros(p).index_fill_(0, torch.tensor([p - 1]), 1.0))
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def stack(self, k: int) -> Stack:
        return self.stacks[0 if self.cfg.weight_sharing == "shared" else k]

    def normalises(self, k: int) -> bool:
        """Whether section k's output passes through a final norm."""
        return self.cfg.memory_norm or k == self.cfg.num_sections - 1

    def finish(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Section k's output from its last Block's output x."""
        return self.stack(k).ln_out(x) if self.normalises(k) else x

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [b, s] -> logits [b, s, vocab]."""
        return self.head(self.combine(self.section_outputs(idx)))

    def section_outputs(self, idx: torch.Tensor) -> List[torch.Tensor]:
        """Teacher-forced outputs [b, s, h] of every section."""
        cfg = self.cfg
        b, s = idx.shape
        x = self.tok_emb(idx)
        if cfg.position_embedding_type == "learned_absolute":
            x = x + self.pos_emb(torch.arange(s, device=idx.device))
        pos = torch.arange(s, device=idx.device)
        causal = pos[None, :] <= pos[:, None]  # [s, s] query i sees token j <= i
        angles = rope_angles(cfg, pos) if cfg.position_embedding_type == "rope" else None
        # Memory slot j holds out_{k-1}[j-1] (slot 0: null) at position j; query i at i + 1.
        cross_visible = causal
        if cfg.cross_attention_window is not None:
            cross_visible = causal & (pos[None, :] > pos[:, None] - cfg.cross_attention_window)
        cross_angles = (rope_angles(cfg, pos + 1), rope_angles(cfg, pos)) \
            if cfg.cross_attention_rope else (None, None)
        outs = [self.finish(0, self.stack(0)(x, causal, angles))]
        for k in range(1, cfg.num_sections):
            memory = torch.cat([self.null_memory.expand(b, 1, -1), outs[-1][:, :-1]], dim=1)
            outs.append(self.finish(k, self.stack(k)(x, causal, angles, memory, cross_visible,
                                                     cross_angles)))
        return outs

    def combine(self, outs: List[torch.Tensor]) -> torch.Tensor:
        if self.cfg.output_combination == "last":
            return outs[-1]
        return sum(a * out for a, out in zip(self.alpha, outs))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.tok_emb.weight if self.cfg.tie_embeddings else self.lm_head.weight
        return hidden @ weight.t()
