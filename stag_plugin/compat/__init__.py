"""Where stag_plugin meets version- and device-specific corners of Megatron-Core.

    megatron.py   the version adapter: every difference between megatron-core releases, import
                  guards for optional dependencies, the CPU-safe rotary embedding
    cpu.py        Megatron's training code on a machine without CUDA: one explicit layer

May import: megatron.core, torch. Imports no other stag_plugin folder.
"""
