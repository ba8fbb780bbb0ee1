"""Running the model: the runtime every command starts from, training, evaluation, the demo.

    runtime.py        distributed setup, CPU compatibility, seeding, building the model and
                      optimizer, loading weights, a checkpoint's saved flags and state
    arguments.py      the command-line flags and their mapping onto StagFormerConfig
    checkpointing.py  the on-disk layout of training checkpoints (atomic saves, tracker)
    data/             corpus -> SentencePiece tokenizer -> Megatron indexed datasets
    train.py          `stag train`
    evaluate.py       `stag eval`
    demo.py           `stag demo`, the embedded default

May import: everything below it (core, parallel, decode, reference, compat). Never imported by
core, parallel, reference or decode.
"""
