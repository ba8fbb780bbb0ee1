"""`stag train`: train a StagFormer (or, with --stag-num-sections 1, a plain GPT) on Megatron-Core.

Built from megatron-core parts: Megatron's DistributedDataParallel, `get_megatron_optimizer`,
`OptimizerParamScheduler`, `get_forward_backward_func`, `GPTDataset` and distributed checkpoints.
Single process by default; under torchrun it uses the launched world: tensor parallel
(--tensor-model-parallel-size, optionally --sequence-parallel), pipeline parallel
(--pipeline-model-parallel-size; stages hold whole sections or parts of them, see
stag_plugin.parallel.layout) and data parallel over the rest (optionally
--use-distributed-optimizer).

    stag train --config configs/tiny_cpu.yaml --save runs/tiny
    stag train --config configs/tiny_cpu.yaml --save runs/tiny --load runs/tiny   # resume
    python -m stag_plugin train ...                                               # same
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import torch

from stag_plugin.errors import StagError, Stopped
from stag_plugin.training import arguments, checkpointing, liveness, runtime


@dataclass
class TrainResult:
    """What a finished run reports (the demo's table is built from these)."""

    parameters: int
    iterations: int
    valid_loss: float
    tokens_per_second: float
    history: list = field(default_factory=list)  # the JSON-lines records of this run
    checkpoint: Optional[str] = None


@dataclass
class Run:
    """Everything a training run holds; built by `setup`, advanced by `train_step`."""

    args: argparse.Namespace
    config: object
    data: object  # stag_plugin.training.data.PreparedData
    tokenizer: object
    train_ds: object
    valid_ds: object
    model: list  # Megatron DDP-wrapped model chunks (one without pipeline parallelism)
    optimizer: object
    scheduler: object
    log: "MetricsLog"
    iteration: int = 0
    consumed_samples: int = 0
    saved_iteration: Optional[int] = None  # the last iteration this run saved (or resumed)
    replaced_old_run: bool = False  # --overwrite: the --save folder's older checkpoints removed


# ---------------------------------------------------------------------------- command line


def build_parser(prog: str = "stag train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                     allow_abbrev=False)  # as Megatron-LM's
    arguments.add_config_arg(parser)
    arguments.add_model_args(parser)
    arguments.add_data_args(parser)
    arguments.add_training_args(parser)
    return parser


def main(argv) -> int:
    """`stag train` (stag_plugin.cli prints a StagError as one `error: ... Fix: ...` line)."""
    train(arguments.finalize_args(arguments.parse_with_preset(build_parser(), argv)))
    return 0


def train(args: argparse.Namespace) -> TrainResult:
    """Run (or resume) one training job as `args` describe; returns its results. SIGINT and
    SIGTERM stop it (errors.Stopped, saying what was kept); a rank or node that stops
    answering ends it with a StagError naming it (liveness.Watchdog)."""
    with liveness.stop_signals() as stop:
        run, watch = None, []

        def watch_the_job():  # once the world exists, before anything long
            if _world_size() > 1:
                try:
                    watch.append(liveness.Watchdog(kept=lambda: _kept(args)))
                except StagError as err:  # (a bad STAG_HEARTBEAT_TIMEOUT: said once)
                    raise liveness.quiet_ranks_error(err) from None

        def step_done():
            if watch:
                watch[0].phase = f"iteration {run.iteration}"
            stop.check()

        try:
            run = setup(args, on_start=watch_the_job)
            result = train_loop(run, step_done)
            if watch:
                watch[0].finish()
            return result
        except Stopped as stopped:
            if run is None:
                raise
            raise Stopped(stopped.signum, f"stopped at iteration {run.iteration}; "
                                          f"{_kept(args)}") from None
        except Exception as err:
            if not watch:
                raise
            if isinstance(err, StagError):  # this rank's own error: the others end quietly
                if getattr(err, "report", True):
                    watch[0].fail(err)
                raise
            lost = watch[0].explain(err)  # a failed collective: which ranks are gone?
            if lost is None:
                raise
            raise lost from err
        finally:
            if run is not None:
                run.log.close()
            if watch:
                watch[0].stop()


def _kept(args) -> str:
    latest = checkpointing.latest_iteration(args.save) if args.save is not None else None
    if latest is None:
        return "no checkpoint was saved"
    folder = checkpointing.iteration_dir(args.save, latest)
    return f"kept: {folder} (resume with --load {args.save})"


def _from_rank0(key: str, value: str = "1", timeout: Optional[timedelta] = None) -> str:
    """Rank 0 publishes `value` under `key` in the job's store; the other ranks wait for it
    (by default without the collective timeout: rank 0's data preparation may take longer)
    and return it."""
    if _world_size() == 1:
        return value
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    key = f"{key}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # a restart starts anew
    if torch.distributed.get_rank() == 0:
        store.set(key, value)
        return value
    store.wait([key], timeout or timedelta(days=1))
    return store.get(key).decode()


def check_shared_folders(args) -> None:
    """With several ranks, before the data is prepared: every node must see rank 0's --save
    folder (each rank writes its part of every checkpoint there, rank 0 the metadata), and
    rank 0's --data-cache-dir or a prepared copy of it (rank 0 alone prepares the data).
    Rank 0 writes a file with a fresh name into each; a node that cannot read it does not
    share the folder. One error names the nodes, on every rank."""
    if _world_size() == 1:
        return
    import socket
    import uuid

    timeout = timedelta(minutes=args.distributed_timeout_minutes)
    folders = {"save": args.save, "cache": args.data_cache_dir}
    folders = {k: Path(v) for k, v in folders.items() if v is not None}
    name = f".stag-node-check-{uuid.uuid4().hex}"
    if torch.distributed.get_rank() == 0:
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(name)
    name, host0 = json.loads(_from_rank0(
        "stag_node_check", json.dumps([name, socket.gethostname()]), timeout))
    problems = []
    if "save" in folders and not _holds(folders["save"] / name, name):
        problems.append(f"does not see rank 0's --save folder {folders['save']}")
    cache = folders.get("cache")
    if cache is not None and not _holds(cache / name, name) and \
            not (cache / "manifest.json").is_file() and not _uses_tokenizer_folder(args):
        problems.append(f"holds no prepared data in --data-cache-dir {cache} (no "
                        "manifest.json), and it is not the folder rank 0 prepares the data in")
    bad = liveness.agree("node_check", " and ".join(problems) or None, timeout)
    if torch.distributed.get_rank() == 0:
        for folder in folders.values():
            (folder / name).unlink(missing_ok=True)
    if bad:
        raise liveness.quiet_ranks_error(StagError(
            f"the nodes do not share the job's folders with rank 0 (on {host0}): "
            f"{liveness.by_node(bad)}",
            "put --save (SAVE_DIR) on a file system every node mounts at the same path; the "
            "same for --data-cache-dir (STAG_CACHE), or copy rank 0's prepared data folder to "
            "that path on every node before starting"))


def _holds(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except OSError:
        return False


def _uses_tokenizer_folder(args) -> bool:
    """Megatron-LM data (--data-path prefixes, --mock-data): the cache holds the tokenizer only."""
    from stag_plugin.training.data import uses_megatron_data

    return uses_megatron_data(args.data_path, getattr(args, "mock_data", False))


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


# ---------------------------------------------------------------------------- setup


def setup(args: argparse.Namespace, on_start=None) -> Run:
    """Validate everything that can be wrong before any output is written, then build;
    `on_start()` is called once the distributed world is up."""
    arguments.check_trainable(args)
    config = arguments.config_from_args(args)
    check_save_target(args)
    runtime.start(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                  args.distributed_timeout_minutes, seed=args.seed,
                  backend=args.distributed_backend)
    if on_start is not None:
        on_start()
    check_shared_folders(args)
    data, tokenizer = prepare_tokenized_data(args)
    vocab = arguments.padded_vocab_size(tokenizer.vocab_size, args)
    if args.load is not None:
        check_load_target(args, vocab)
        check_resume_data(args, data, tokenizer)
    model = runtime.build_model(args, vocab, config)
    optimizer, scheduler = runtime.build_optimizer(args, model)
    train_ds, valid_ds = build_datasets(args, data, tokenizer)
    run = Run(args, config, data, tokenizer, train_ds, valid_ds, model, optimizer, scheduler,
              MetricsLog(metrics_path(args), fresh=args.overwrite))
    if args.load is not None and checkpointing.latest_iteration(args.load) is not None:
        resume(run)
    return run


def prepare_tokenized_data(args, source=None):
    """Corpus -> tokenizer -> indexed datasets on rank 0 (cached); other ranks read the result.
    The tokenizer: `source` (a data.tokenizers.TokenizerSource), else the one the
    --tokenizer-* flags name, else SentencePiece trained on the corpus (the embedded default).
    Returns (PreparedData, tokenizer); for Megatron-LM's --data-path prefixes or --mock-data,
    (MegatronData, tokenizer), see prepare_megatron_data."""
    from stag_plugin.training.data import PreparedData, prepare_data, tokenizers, uses_megatron_data

    source = source if source is not None else tokenizers.source_from_args(args)
    if uses_megatron_data(args.data_path, getattr(args, "mock_data", False)):
        return prepare_megatron_data(args, source)
    if getattr(args, "split", None) is not None:
        raise StagError(f"--split {args.split!r} splits Megatron .bin/.idx prefixes, not a "
                        "corpus", "split a corpus with --valid-fraction and --test-fraction")
    if _is_logging_rank():
        data = prepare_data(args.data_path, args.data_cache_dir, vocab_size=args.vocab_size,
                            valid_fraction=args.valid_fraction,
                            test_fraction=args.test_fraction, json_key=args.json_keys[0],
                            progress=not args.no_progress, tokenizer=source)
    key = _from_rank0("stag_data_key", data.key if _is_logging_rank() else "")  # however long
    problem = None  # preparing takes (no collective timeout); then every rank checks its copy
    if not _is_logging_rank():
        try:
            data = PreparedData.from_manifest(args.data_cache_dir)
            if data.key != key:
                problem = (f"its --data-cache-dir {data.output_dir} holds other prepared data "
                           f"(key {data.key[:12]}, rank 0's {key[:12]})")
        except StagError as err:
            problem = f"its --data-cache-dir cannot be read: {err.problem}"
    bad = liveness.agree("data_key", problem,
                         timedelta(minutes=args.distributed_timeout_minutes))
    if bad:
        raise liveness.quiet_ranks_error(StagError(
            f"the nodes do not all read the data rank 0 prepared: {liveness.by_node(bad)}",
            "point --data-cache-dir (STAG_CACHE) at a folder every node shares, or copy rank "
            "0's prepared folder to that path on every node"))
    return data, tokenizers.load_prepared(data)


def prepare_megatron_data(args, source):
    """Megatron-LM's --data-path prefixes (weights, --split) or --mock-data: the ids are in the
    data already, so the tokenizer is the one the --tokenizer-* flags name (`source`), written
    to <data-cache-dir>/tokenizer-<id16>/ on rank 0. Returns (MegatronData, tokenizer)."""
    from stag_plugin.training.data import MegatronData, tokenizers

    data = MegatronData.from_flags(args.data_path, args.split, args.mock_data,
                                   args.data_cache_dir)
    if source is None:
        raise StagError(f"{data.describe()} holds token ids already: training needs the "
                        "tokenizer that made them", "pass --tokenizer-type and its files, e.g. "
                        "--tokenizer-type NullTokenizer --vocab-size N")
    if not data.mock:
        args.split = data.split  # Megatron-LM's default when none is given
    folder = Path(args.data_cache_dir) / f"tokenizer-{source.identity[:16]}"
    if _is_logging_rank():
        tokenizers.materialize(source, folder)
    _from_rank0("stag_tokenizer_ready")
    problem = None if folder.is_dir() else f"does not see the tokenizer folder {folder}"
    bad = liveness.agree("tokenizer_folder", problem,
                         timedelta(minutes=args.distributed_timeout_minutes))
    if bad:
        raise liveness.quiet_ranks_error(StagError(
            f"the nodes do not all see the tokenizer rank 0 wrote: {liveness.by_node(bad)}",
            "point --data-cache-dir (STAG_CACHE) at a folder every node shares"))
    return data, tokenizers.load_folder(folder)


def check_save_target(args) -> None:
    """--save may hold another run only when --load names it (resume) or with --overwrite."""
    if args.save is None or args.overwrite or (
            args.load is not None and Path(args.load).resolve() == Path(args.save).resolve()):
        return
    held = checkpointing.saved_iterations(args.save)
    if held:
        raise StagError(f"--save {args.save} already holds a run (checkpoints of iterations "
                        f"{', '.join(map(str, held[-3:]))})",
                        f"resume it with --load {args.save}, pick a new --save folder, or pass "
                        "--overwrite to replace its checkpoints")


TOKENIZER_FLAGS = ("data_path", "vocab_size", "json_keys", "tokenizer_type", "tokenizer_model",
                   "vocab_file", "merge_file")


def check_resume_data(args, data, tokenizer) -> None:
    """A resume reads the data and tokenizer the checkpoint was trained on: another tokenizer
    (another identity: type, files' sha256, options) would give the trained embeddings other
    token ids; other data (without --finetune) would not continue the run."""
    from stag_plugin.training.data import tokenizers

    if checkpointing.latest_iteration(args.load) is None:
        return  # nothing to resume yet: a first run whose --load is its own --save folder
    iteration, run = checkpointing.read_run(args.load)
    saved = tokenizers.saved_spec(checkpointing.iteration_dir(args.load, iteration))
    ours = tokenizers.spec_of(tokenizer)
    flags = {f: run["args"].get(f) for f in TOKENIZER_FLAGS if run["args"].get(f) is not None}
    if saved is not None and saved.identity != ours.identity:
        raise StagError(f"the tokenizer of this run's data ({ours.describe()}) is not the one "
                        f"saved with --load {args.load} ({saved.describe()}; the checkpoint was "
                        f"trained with {flags})", "pass the checkpoint's data and tokenizer "
                        "flags (its files are in the checkpoint's tokenizer/ folder)")
    if not args.finetune and _paths(run["args"].get("data_path")) != _paths(args.data_path):
        raise StagError(f"resuming {args.load} on other data: --data-path {args.data_path} "
                        f"(checkpoint: {run['args'].get('data_path')})",
                        "pass the checkpoint's --data-path, or --finetune to train the loaded "
                        "weights on other data")


def _paths(paths) -> Optional[list]:
    return None if paths is None else [str(Path(p).resolve()) for p in paths]


def check_load_target(args, vocab: int) -> None:
    """--load must exist; it may be empty only when it is also the --save folder (first run).
    Its architecture must be this run's, and so must its schedule unless overridden."""
    if checkpointing.latest_iteration(args.load) is None and args.load == args.save:
        return
    checkpointing.check_architecture(args.load, arguments.architecture_of(args, vocab))
    if args.no_load_optim or args.override_opt_param_scheduler or args.finetune:
        return
    saved = {**vars(runtime.default_args()), **checkpointing.read_run(args.load)[1]["args"]}
    diffs = [f"--{flag.replace('_', '-')} {getattr(args, flag)} (checkpoint: {saved.get(flag)})"
             for flag in arguments.SCHEDULE_FLAGS if saved.get(flag) != getattr(args, flag)]
    if diffs:
        raise StagError(f"resuming {args.load} with another learning-rate schedule: "
                         f"{', '.join(diffs)}", "pass the checkpoint's values, or add "
                         "--override-opt-param-scheduler to continue with the new ones")


def build_datasets(args, data, tokenizer):
    from stag_plugin.training.data import MegatronData, build_gpt_datasets

    valid_samples = args.eval_iters * args.global_batch_size
    test_samples = valid_samples if isinstance(data, MegatronData) else None  # Megatron-LM's
    train_ds, valid_ds, _ = build_gpt_datasets(
        data, tokenizer, seq_length=args.seq_length, seed=args.seed,
        num_samples=(args.train_iters * args.global_batch_size, valid_samples, test_samples))
    if train_ds is None or valid_ds is None:
        raise StagError(f"the data gives the {'train' if train_ds is None else 'valid'} split no "
                        "documents", "give it a share (--split, --valid-fraction) or more data")
    return train_ds, valid_ds


# ---------------------------------------------------------------------------- the loop


def train_loop(run: Run, check_stop=lambda: None) -> TrainResult:
    """Train to --train-iters (or --exit-interval); `check_stop` runs after every step and its
    save (liveness.StopRequest.check raises there when the job was asked to stop)."""
    args = run.args
    timer = StepTimer(args.global_batch_size * args.seq_length)
    bar = progress_bar(run)
    while run.iteration < args.train_iters:
        start = time.perf_counter()
        stats = train_step(run)
        timer.add(time.perf_counter() - start)
        run.iteration += 1
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}",
                        tok_s=f"{timer.tokens_per_second():.0f}")
        if run.iteration % args.log_interval == 0 or run.iteration == args.train_iters:
            log_step(run, bar, stats, timer.tokens_per_second())
        if args.eval_interval and run.iteration % args.eval_interval == 0 and \
                run.iteration < args.train_iters:
            run_validation(run, bar)
        if _should_save(args, run.iteration):
            save(run)
        check_stop()
        if args.exit_interval and run.iteration % args.exit_interval == 0:
            break
    bar.close()
    valid_loss = run_validation(run, None)
    saved = run.saved_iteration == run.iteration
    checkpoint = save(run) if args.save is not None and not saved else None
    return TrainResult(parameters=count_parameters(run.model), iterations=run.iteration,
                       valid_loss=valid_loss, tokens_per_second=timer.tokens_per_second(),
                       history=run.log.records,
                       checkpoint=str(checkpoint or args.save) if args.save else None)


def train_step(run: Run) -> dict:
    """One optimizer step over `global_batch_size` samples; returns loss, lr, grad norm."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    args = run.args
    for chunk in run.model:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    batches, count = micro_batches(run.train_ds, run.consumed_samples, args)
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=run.model,
        num_microbatches=count, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=False,
        **pipeline_kwargs(run.model))
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses
    succeeded, grad_norm, _ = run.optimizer.step()
    if succeeded:  # one iteration's steps: 1, or a global batch of samples (--train-samples)
        run.scheduler.step(increment=arguments.schedule_steps(args)["increment"])
    run.consumed_samples += args.global_batch_size
    return dict(loss=reduce_loss(reports), lr=lr,
                grad_norm=float(grad_norm) if grad_norm is not None else None,
                skipped=not succeeded)


def pipeline_kwargs(model: list) -> dict:
    """Extra schedule arguments under pipeline parallelism: each stage's boundary shapes."""
    from stag_plugin.parallel import pipeline

    stag_model = runtime.unwrap(model[0])
    if len(stag_model.stages) == 1:
        return {}
    return {"adjust_tensor_shapes_fn": pipeline.adjust_tensor_shapes(stag_model.stage)}


def forward_step(data_iterator, model):
    """Megatron's forward-step contract: (output, loss function of that output).

    Every pipeline stage reads the batch: each stage that starts a section embeds the token
    ids, and the last one needs the labels."""
    batch = next(data_iterator)
    per_token_loss = model(batch["tokens"], batch["position_ids"], attention_mask=None,
                           labels=batch["labels"])  # [b, s]
    return per_token_loss, partial(masked_loss, batch["loss_mask"])


def masked_loss(loss_mask, per_token_loss):
    """(loss sum, token count, report) as Megatron-LM's pretrain_gpt returns them."""
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(per_token_loss.reshape(-1).float() * mask)
    tokens = mask.sum().to(torch.int)
    return total, tokens, {"lm loss": torch.stack([total.detach(), mask.sum()])}


def reduce_loss(reports: list) -> float:
    """Mean loss per token over the micro-batches of the data-parallel group, on every rank
    (the last pipeline stage computes it; the pipeline group shares it)."""
    from megatron.core import parallel_state

    summed = (torch.stack([r["lm loss"] for r in reports]).sum(dim=0) if reports
              else torch.zeros(2))  # [loss sum, tokens]
    torch.distributed.all_reduce(summed, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(
            summed, group=parallel_state.get_pipeline_model_parallel_group())
    return (summed[0] / summed[1]).item()


def micro_batches(dataset, consumed: int, args) -> tuple[Iterator[dict], int]:
    """This data-parallel rank's micro-batches of the global batch starting at `consumed`."""
    from megatron.core import parallel_state

    from stag_plugin.training.data import batch_from_samples

    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    per_rank = args.global_batch_size // dp
    if per_rank * dp != args.global_batch_size or per_rank % args.micro_batch_size:
        raise StagError(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                        f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}",
                        f"use a multiple of {args.micro_batch_size * dp}, or fewer processes")
    first = consumed + rank * per_rank
    starts = range(first, first + per_rank, args.micro_batch_size)
    batches = (batch_from_samples([dataset[i % len(dataset)]
                                   for i in range(s, s + args.micro_batch_size)]) for s in starts)
    return batches, len(starts)


def evaluate(model: list, dataset, args, num_batches: Optional[int] = None) -> float:
    """Mean loss per token over the first `num_batches` global batches of `dataset`."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model:
        chunk.eval()
    if num_batches is None:
        num_batches = max(1, len(dataset) // args.global_batch_size)
    reports = []
    with torch.no_grad():
        for b in range(num_batches):
            batches, count = micro_batches(dataset, b * args.global_batch_size, args)
            reports += get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=batches, model=model,
                num_microbatches=count, seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size, forward_only=True,
                **pipeline_kwargs(model))
    for chunk in model:
        chunk.train()
    return reduce_loss(reports)


def log_step(run: Run, bar, stats: dict, tokens_per_second: float) -> None:
    """A JSON-lines record; without a progress bar also a Megatron-style text line."""
    run.log.write(iteration=run.iteration, tokens_per_second=tokens_per_second,
                  consumed_samples=run.consumed_samples, **stats)
    if bar.disable and _is_logging_rank():
        norm = stats["grad_norm"]
        print(f" iteration {run.iteration:>6}/{run.args.train_iters} | loss {stats['loss']:.4f} | "
              f"lr {stats['lr']:.3e} | grad norm {norm if norm is None else f'{norm:.3f}'} | "
              f"tokens/s {tokens_per_second:.0f}", file=sys.stderr, flush=True)


def run_validation(run: Run, bar) -> float:
    loss = evaluate(run.model, run.valid_ds, run.args, run.args.eval_iters)
    run.log.write(iteration=run.iteration, split="valid", loss=loss, ppl=_ppl(loss))
    message = f"iteration {run.iteration}: validation loss {loss:.4f} | ppl {_ppl(loss):.2f}"
    if not _is_logging_rank():
        return loss
    if bar is not None:
        bar.write(message)
    else:
        print(message, file=sys.stderr)
    return loss


# ---------------------------------------------------------------------------- checkpoints


def checkpoint_state(run: Run, loading: bool = False) -> dict:
    """What this run's checkpoints hold; when resuming (`loading`), the optimizer only unless
    --no-load-optim, the RNG streams only under the same TP / PP layout and unless
    --no-load-rng."""
    args = run.args
    with_optimizer = not (loading and args.no_load_optim)
    rng = not (loading and (args.no_load_rng or not checkpointing.same_layout(args.load, args)))
    return runtime.checkpoint_state(
        run.model, run.optimizer if with_optimizer else None, run.scheduler, run.iteration,
        run.consumed_samples, rng=rng, loading=loading)


def save(run: Run) -> Path:
    from stag_plugin.training.data import tokenizers

    args = run.args
    record = runtime.run_record(args, run.iteration, _vocab(run),
                                tokenizers.spec_of(run.tokenizer).to_json())
    path = checkpointing.save_checkpoint(args.save, run.iteration, checkpoint_state(run), record,
                                         tokenizer=run.tokenizer)
    run.saved_iteration = run.iteration
    if args.overwrite and not run.replaced_old_run:  # the new run's first checkpoint exists now
        checkpointing.remove_iterations(args.save, keep=run.iteration)
        run.replaced_old_run = True
    run.log.write(iteration=run.iteration, event="save", path=str(path))
    return path


def resume(run: Run) -> None:
    """Restore model, optimizer, scheduler, data position and RNG from --load (with
    --finetune: the model weights only, starting at iteration 0)."""
    trusted = run.args.trust_checkpoint_code
    if run.args.finetune:
        runtime.load_weights(run.model, run.args.load, trusted)
        run.log.write(iteration=0, event="load-weights", path=str(run.args.load))
        return
    iteration, state = checkpointing.load_checkpoint(run.args.load,
                                                     checkpoint_state(run, loading=True), trusted)
    runtime.unwrap(run.model[0]).load_state_dict(state["model"])
    if "optimizer" in state:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["opt_param_scheduler"])
    if "rng_state" in state:
        checkpointing.set_rng_state(state["rng_state"])
    run.iteration, run.consumed_samples = iteration, int(state["consumed_samples"])
    if run.args.save is not None and Path(run.args.save).resolve() == Path(
            run.args.load).resolve():
        run.saved_iteration = iteration  # that checkpoint is this run's own
    run.log.write(iteration=iteration, event="load", path=str(run.args.load))


def _should_save(args, iteration: int) -> bool:
    if args.save is None:
        return False
    at_interval = args.save_interval and iteration % args.save_interval == 0
    at_exit = args.exit_interval and iteration % args.exit_interval == 0
    return bool(at_interval or at_exit)


# ---------------------------------------------------------------------------- logging


class MetricsLog:
    """Appends one JSON object per record to a JSON-lines file (rank 0) and keeps them;
    `fresh`: the file is started anew, at the first record (a run that fails before logging
    anything leaves it as it was)."""

    def __init__(self, path: Optional[Path], fresh: bool = False):
        self.records = []
        self.file = None
        self.path = path if path is not None and _is_logging_rank() else None
        self.mode = "w" if fresh else "a"

    def write(self, **record) -> None:
        record = {k: v for k, v in record.items() if v is not None}
        self.records.append(record)
        if self.path is not None and self.file is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, self.mode, encoding="utf-8")
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class StepTimer:
    """Training tokens/s over all steps but the first (which pays one-time warm-up costs)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step, self.times = tokens_per_step, []

    def add(self, seconds: float) -> None:
        self.times.append(seconds)

    def tokens_per_second(self) -> float:
        times = self.times[1:] or self.times
        return self.tokens_per_step * len(times) / max(sum(times), 1e-9)


def progress_bar(run: Run):
    from tqdm.auto import tqdm

    return tqdm(total=run.args.train_iters, initial=run.iteration, desc="train", unit="it",
                disable=run.args.no_progress or not _is_logging_rank(), dynamic_ncols=True)


def metrics_path(args) -> Optional[Path]:
    if args.metrics_log is not None:
        return args.metrics_log
    return Path(args.save) / "metrics.jsonl" if args.save is not None else None


def count_parameters(model: list) -> int:
    """Unique parameters (a shared weight counts once) on this rank."""
    seen = {id(p): p.numel() for chunk in model for p in chunk.parameters()}
    return sum(seen.values())


def _vocab(run: Run) -> int:
    return arguments.padded_vocab_size(run.tokenizer.vocab_size, run.args)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _is_logging_rank() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

