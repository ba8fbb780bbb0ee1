"""Running the model: the runtime every command starts from, training, evaluation, the demo.

    runtime.py        distributed setup, CPU compatibility, seeding, building the model and
                      optimizer, loading weights, a checkpoint's saved flags and state
    arguments.py      the command-line flags (Megatron-LM's names, meanings and defaults) and
                      their mapping onto StagFormerConfig
    megatron_lm_flags.py  every Megatron-LM flag, so stag train refuses the ones it lacks by name
    checkpointing.py  the on-disk layout of training checkpoints (atomic saves, tracker)
    data/             corpus -> tokenizer (trained SentencePiece, or Megatron-LM's
                      --tokenizer-type) -> Megatron indexed datasets; or Megatron-LM's
                      .bin/.idx prefixes (--split) and --mock-data
    train.py          `stag train`
    evaluate.py       `stag eval`
    demo.py           `stag demo`, the embedded default

May import: everything below it (core, parallel, decode, reference, compat). Never imported by
core, parallel, reference or decode.
"""
