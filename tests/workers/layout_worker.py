"""One training run of tests/test_parallel.py, under whatever layout torchrun (or nothing)
launched: the trainer's own code path (`stag_plugin.training.train`), plus two test-only steps.

    python layout_worker.py OUT [--save-init DIR] [--logits-only] -- <stag train flags>

--save-init DIR   save the freshly built weights to DIR (iteration 0) before training
--logits-only     skip training: build, load (--load ... --finetune), compute logits

After training, the logits of the first validation micro-batch (gathered over tensor-parallel
ranks, from the last pipeline stage) are written to OUT/logits.pt by that stage's first rank.
"""

import argparse
import os
import sys
from pathlib import Path

import torch


def main(argv) -> None:
    split = argv.index("--")
    own = argparse.ArgumentParser()
    own.add_argument("out", type=Path)
    own.add_argument("--save-init", type=Path, default=None)
    own.add_argument("--logits-only", action="store_true")
    options = own.parse_args(argv[:split])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.set_num_threads(1)  # ranks share the machine's cores

    from stag_plugin.compat.cpu import quiet_known_warnings
    from stag_plugin.training import arguments, train

    quiet_known_warnings()
    args = arguments.finalize_args(arguments.parse_with_preset(train.build_parser(),
                                                               argv[split + 1:]))
    options.out.mkdir(parents=True, exist_ok=True)
    run = train.setup(args)
    if options.save_init is not None:
        save_dir, args.save = args.save, options.save_init
        train.save(run)
        args.save = save_dir
    if not options.logits_only:
        train.train_loop(run)
    run.log.close()
    write_logits(run, options.out / "logits.pt")


def write_logits(run, path: Path) -> None:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from stag_plugin.training import train

    batches, count = train.micro_batches(run.valid_ds, 0, run.args)
    collected = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], attention_mask=None)
        return output, lambda out, non_loss_data=False: out

    for chunk in run.model:
        chunk.eval()
    with torch.no_grad():
        collected = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=batches, model=run.model,
            num_microbatches=1, seq_length=run.args.seq_length,
            micro_batch_size=run.args.micro_batch_size, forward_only=True,
            collect_non_loss_data=True, **train.pipeline_kwargs(run.model))
    if not parallel_state.is_pipeline_last_stage():
        return
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(collected[0])
    if (parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0):
        torch.save(logits.float(), path)


if __name__ == "__main__":
    main(sys.argv[1:])
