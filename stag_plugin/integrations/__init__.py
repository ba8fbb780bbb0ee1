"""StagFormer inside other frameworks' training loops.

    megatron_lm/     Megatron-LM's pretrain() with a StagFormer (flags, model provider and builder)

May import: everything in stag_plugin; nothing in stag_plugin imports it.
"""
