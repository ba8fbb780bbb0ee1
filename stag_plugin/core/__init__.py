"""The StagFormer on Megatron-Core: its config, layer specs, attention modules and the model.

    config.py       StagFormerConfig (TransformerConfig + every StagFormer option, validated)
    specs.py        layer specs and the one place backends are chosen (local, Transformer
                    Engine)
    attention.py    StagCrossAttention and its core attentions (SDPA; Transformer Engine's)
    fp8.py          where Transformer Engine has an FP8 attention kernel for the model
    model.py        StagGPTModel, top to bottom (with the tying of shared-weight sections)
    state_keys.py   global, layout-independent checkpoint names of the model's tensors

May import: megatron.core, stag_plugin.compat, stag_plugin.parallel, stag_plugin.reference (its
Megatron-free parts). Never imports decode, training, convert, integrations or the CLI.
"""

# megatron.core loads first, or fails with a clear error (a broken Transformer Engine):
from stag_plugin.compat import megatron as _guard  # noqa: F401,E402
