"""StagFormer inside other frameworks' training loops.

    megatron_lm.py   the --stag-* flags and model provider for Megatron-LM's pretrain()

May import: everything in stag_plugin; nothing in stag_plugin imports it.
"""
