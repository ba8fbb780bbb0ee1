"""`stag convert`: move checkpoints between formats, layouts and architectures.

    stag convert to-inference --load CKPT --out DIR [--dtype fp32|bf16|fp16]
        a training checkpoint (any TP / PP layout) -> the self-contained inference folder
    stag convert reshard --load CKPT --out DIR --tensor-model-parallel-size T
                         --pipeline-model-parallel-size P
        a training checkpoint rewritten for another layout, verified tensor by tensor
    stag convert from-gpt --load GPT_CKPT --out DIR --recipe duplicate|split
                          --stag-num-sections p
        a plain GPT (stag train p = 1, or a Megatron-LM GPTModel) upcycled into a StagFormer

Every command writes its output atomically (stag_plugin.convert.common) and reports a problem
as `stag convert: error: <problem>. Fix: <fix>` with exit code 2.

The folder also holds what converted models are: `inference_folder.py` (the self-contained
folder the reference model and Hugging Face load) and `hf/` (the `transformers` classes).
May import: everything below it (training's runtime and checkpoints, core, reference, compat).
"""

from __future__ import annotations

SUBCOMMANDS = {
    "to-inference": ("stag_plugin.convert.to_inference",
                     "training checkpoint -> self-contained inference folder"),
    "reshard": ("stag_plugin.convert.reshard",
                "training checkpoint -> the same checkpoint for another TP / PP layout"),
    "from-gpt": ("stag_plugin.convert.from_gpt",
                 "plain GPT checkpoint -> StagFormer training checkpoint (upcycling)"),
}

