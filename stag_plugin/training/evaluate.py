"""`stag eval --load CKPT`: validation or test perplexity of a trained checkpoint.

The model is rebuilt from the flags stored in the checkpoint (`stag_run.json`), so no
architecture flags are needed; the data is the run's own corpus split, tokenized with the
tokenizer saved in the checkpoint (its `tokenizer/` folder; with the embedded default, the
SentencePiece model prepared from the corpus, which must equal the saved one). The
--tokenizer-* flags, when given, must name that same tokenizer.

    stag eval --load runs/tiny                 # validation split, every sample once
    stag eval --load runs/tiny --split test
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from stag_plugin.errors import StagError
from stag_plugin.training import arguments, checkpointing, runtime
from stag_plugin.training.data import tokenizers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stag eval", description=__doc__.split("\n")[0])
    parser.add_argument("--load", type=Path, required=True, help="checkpoint folder (--save)")
    arguments.add_trust_arg(parser)
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--eval-iters", type=int, default=None,
                        help="batches to evaluate, of the run's --global-batch-size samples "
                             "(default: the whole split once)")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="default: the training run's")
    parser.add_argument("--data-cache-dir", type=Path, default=None,
                        help="default: the training run's")
    parser.add_argument("--tensor-model-parallel-size", type=int,
                        default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="any layout: the checkpoint is resharded on load (default: the "
                             "launched world size, 1 without torchrun)")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                        help="pipeline stages (TP x PP must divide the launched world size)")
    tokenizers.add_tokenizer_args(parser.add_argument_group(
        "tokenizer (default: the checkpoint's own; given flags must name the same tokenizer)"))
    return parser


def main(argv) -> int:
    """`stag eval` (stag_plugin.cli prints a StagError as one `error: ... Fix: ...` line)."""
    options = build_parser().parse_args(argv)
    result = evaluate_checkpoint(options)
    print(f"{options.split} loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | "
          f"{result['tokens']} tokens | iteration {result['iteration']} | {options.load}")
    return 0


def evaluate_checkpoint(options: argparse.Namespace) -> dict:
    """Load the checkpoint's model weights and evaluate it on one split of its corpus."""
    from stag_plugin.training import train

    iteration, run = checkpointing.read_run(options.load)
    args = runtime.saved_args(run, options.tensor_model_parallel_size,
                              options.pipeline_model_parallel_size)
    args.data_cache_dir = Path(options.data_cache_dir or args.data_cache_dir)
    if options.micro_batch_size is not None:  # --eval-iters then counts batches of this size
        args.micro_batch_size = args.global_batch_size = options.micro_batch_size
    runtime.start(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                  args.distributed_timeout_minutes)
    folder = checkpointing.iteration_dir(options.load, iteration)
    data, tokenizer = train.prepare_tokenized_data(args, tokenizer_source(options, args, folder))
    check_tokenizer(options.load, iteration, tokenizer)
    vocab = arguments.padded_vocab_size(tokenizer.vocab_size, args)
    checkpointing.check_architecture(options.load, arguments.architecture_of(args, vocab))
    model = runtime.build_model(args, vocab)
    runtime.load_weights(model, options.load, trusted=options.trust_checkpoint_code)
    dataset = split_dataset(args, data, tokenizer, options.split)
    batches = options.eval_iters or max(1, len(dataset) // args.global_batch_size)
    loss = train.evaluate(model, dataset, args, batches)
    tokens = batches * args.global_batch_size * args.seq_length
    return dict(loss=loss, perplexity=math.exp(loss), tokens=tokens, iteration=iteration,
                split=options.split)


def tokenizer_source(options, args, folder: Path):
    """What tokenizes the split: the --tokenizer-* flags when given, else the tokenizer saved in
    the checkpoint `folder`; None for the embedded default (SentencePiece prepared from the
    corpus as in training, then compared with the saved one)."""
    given = tokenizers.source_from_args(options, vocab_size=args.vocab_size)
    if given is not None:
        return given
    inside = tokenizers.saved_tokenizer_folder(folder)
    if inside is None or tokenizers.read_spec(inside).type == tokenizers.STAG:
        return None
    return tokenizers.source_of_folder(inside)


def check_tokenizer(root: Path, iteration: int, tokenizer) -> None:
    """The tokenizer of the prepared data must be the checkpoint's (same identity)."""
    folder = checkpointing.iteration_dir(root, iteration)
    saved, ours = tokenizers.saved_spec(folder), tokenizers.spec_of(tokenizer)
    if saved is not None and saved.identity != ours.identity:
        raise checkpointing.CheckpointError(
            f"the data prepared for {root} uses another tokenizer ({ours.describe()}) than the "
            f"one saved with the checkpoint ({saved.describe()}, in {folder})",
            "drop the --tokenizer-* flags (the checkpoint's own tokenizer is used), or point "
            "--data-cache-dir at the training run's cache")


def split_dataset(args, data, tokenizer, split: str):
    from stag_plugin.training.data import build_gpt_datasets

    datasets = build_gpt_datasets(data, tokenizer, seq_length=args.seq_length, seed=args.seed,
                                  num_samples=(1, None, None))
    dataset = datasets[1] if split == "valid" else datasets[2]
    if dataset is None or len(dataset) == 0:
        raise StagError(f"the {split} split of this data holds no documents",
                        "evaluate the other split (--split valid|test), or give it a share "
                        "(--split of Megatron-LM data, --valid-fraction / --test-fraction of "
                        "text)")
    return dataset

