"""`stag eval --load CKPT`: validation or test perplexity of a trained checkpoint.

The model is rebuilt from the flags stored in the checkpoint (`stag_run.json`), so no
architecture flags are needed; the data is the run's own corpus split, tokenized with the
tokenizer saved in the checkpoint.

    stag eval --load runs/tiny                 # validation split, every sample once
    stag eval --load runs/tiny --split test
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from stag_plugin import checkpointing
from stag_plugin.cpu_compat import quiet_known_warnings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stag eval", description=__doc__.split("\n")[0])
    parser.add_argument("--load", type=Path, required=True, help="checkpoint folder (--save)")
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
    return parser


def main(argv=None) -> int:
    quiet_known_warnings()
    options = build_parser().parse_args(argv)
    try:
        result = evaluate_checkpoint(options)
    except ValueError as err:
        print(f"stag eval: error: {err}", file=sys.stderr)
        return 2
    print(f"{options.split} loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | "
          f"{result['tokens']} tokens | iteration {result['iteration']} | {options.load}")
    return 0


def evaluate_checkpoint(options: argparse.Namespace) -> dict:
    """Load the checkpoint's model weights and evaluate it on one split of its corpus."""
    from stag_plugin import arguments, train

    iteration, run = checkpointing.read_run(options.load)
    args = saved_args(run, options)
    config = arguments.config_from_args(args)
    train.setup_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                            args.distributed_timeout_minutes)
    train.apply_cpu_compat()
    data, tokenizer = train.prepare_tokenized_data(args)
    check_tokenizer(options.load, iteration, data.tokenizer_path)
    vocab = arguments.padded_vocab_size(tokenizer.vocab_size, args)
    checkpointing.check_architecture(options.load, arguments.architecture_of(args, vocab))
    model = train.build_model(args, config, vocab)
    train.load_weights(model, options.load)
    dataset = split_dataset(args, data, tokenizer, options.split)
    batches = options.eval_iters or max(1, len(dataset) // args.global_batch_size)
    loss = train.evaluate(model, dataset, args, batches)
    tokens = batches * args.global_batch_size * args.seq_length
    return dict(loss=loss, perplexity=math.exp(loss), tokens=tokens, iteration=iteration,
                split=options.split)


def saved_args(run: dict, options: argparse.Namespace) -> argparse.Namespace:
    """The training run's flags, with this command's overrides applied."""
    from stag_plugin import train

    defaults = vars(train.build_parser().parse_args([]))  # flags newer than the checkpoint
    args = argparse.Namespace(**{**defaults, **run["args"]})
    args.data_cache_dir = Path(options.data_cache_dir or args.data_cache_dir)
    if options.micro_batch_size is not None:  # --eval-iters then counts batches of this size
        args.micro_batch_size = args.global_batch_size = options.micro_batch_size
    args.load, args.save = options.load, None
    args.tensor_model_parallel_size = options.tensor_model_parallel_size
    args.pipeline_model_parallel_size = options.pipeline_model_parallel_size
    args.sequence_parallel = args.sequence_parallel and args.tensor_model_parallel_size > 1
    args.use_distributed_optimizer = False
    return args


def check_tokenizer(root: Path, iteration: int, prepared_model: str) -> None:
    saved = checkpointing.iteration_dir(root, iteration) / checkpointing.TOKENIZER_FILE
    if saved.is_file() and saved.read_bytes() != Path(prepared_model).read_bytes():
        raise checkpointing.CheckpointError(
            f"the data prepared for {root} uses another tokenizer than the one saved with the "
            f"checkpoint ({saved}). Fix: point --data-cache-dir at the training run's cache")


def split_dataset(args, data, tokenizer, split: str):
    from stag_plugin.data import build_gpt_datasets

    datasets = build_gpt_datasets(data, tokenizer, seq_length=args.seq_length, seed=args.seed,
                                  num_samples=(1, None, None))
    return datasets[1] if split == "valid" else datasets[2]


if __name__ == "__main__":
    sys.exit(main())
