"""Training throughput of StagFormer against plain GPTs, held against model FLOPs per token.

    python bench/train_throughput.py --out bench/results/train_throughput.json
    python bench/train_throughput.py --hidden 256 --seq-length 256 --steps 8
    python bench/train_throughput.py --profile stag-2x4-separate     # torch.profiler top ops

Builds the demo's four models (`stag demo`, stag_plugin/training/demo.py: gpt-{L}L, gpt-{L/2}L,
stag-2x{L/2}-separate, stag-2x{L/2}-shared) in one process, on the CPU, with the demo's flags
and builders (runtime.build_model / build_optimizer), and times the demo's own training step
(train.train_step: forward, backward, optimizer) on random tokens. After `--warmup` untimed
steps per variant, `--steps` rounds run one step of every variant in turn (round-robin, so
machine drift hits all of them alike); the median step time gives tokens/s.

Model FLOPs per token (forward + backward = 3 x forward; the flash kernel's recomputation in
the backward is not counted, as in the usual MFU convention):

    matmuls     6 x (weights a token is multiplied by: every layer it passes through, QKV,
                output projection, MLP, the cross-attention's Q, KV and output projections,
                and the LM head; shared weights count once per use)
    attention   6 x 2 x (keys visible to a query, averaged over queries) x (heads x head dim)
                per attention sublayer: 2 for Q.K^T plus 2 for A.V, forward only, then x3.
                Causal masks count (s + 1) / 2 visible keys (SDPA's CPU and GPU kernels skip
                key blocks above the diagonal). The cross-attention is counted as it runs:
                causal ((s + 1) / 2 slots) without a window; with a window w it passes an
                explicit mask, which SDPA computes over all s slots, so it counts s.

Columns: tokens/s, achieved FLOP/s (FLOPs/token x tokens/s), throughput ratio against gpt-{L}L,
the FLOP-predicted ratio (gpt-{L}L's FLOPs / the variant's) and their quotient (1.00 = the
variant loses no more time than its extra FLOPs explain). Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="default", help="demo size preset (demo.SIZES)")
    parser.add_argument("--layers", type=int, default=None, help="L (default: the demo's)")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--seq-length", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--window", type=int, default=None,
                        help="--stag-cross-attention-window for the StagFormers")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="names from the demo's list (default: all four)")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="step time: wall clock, or this process's CPU time (steadier on a "
                             "shared machine; use with --threads 1)")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="step time over the timed rounds (min: the least disturbed step "
                             "on a shared machine)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    parser.add_argument("--profile", metavar="VARIANT", default=None,
                        help="instead of timing: torch.profiler's top ops for one variant")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=30, help="profiler rows")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- models


def shapes(options) -> dict:
    """The demo's size preset with the command line's overrides."""
    from stag_plugin.training import demo

    size = dict(demo.SIZES[options.size])
    overrides = dict(layers=options.layers, hidden_size=options.hidden,
                     num_attention_heads=options.heads, seq_length=options.seq_length,
                     micro_batch_size=options.micro_batch, vocab_size=options.vocab)
    size.update({k: v for k, v in overrides.items() if v is not None})
    return size


def variant_args(name: str, flags: list, size: dict, options) -> argparse.Namespace:
    """`stag train`'s parsed flags for one demo variant (demo.train_flags, no data or --save)."""
    from stag_plugin.training import arguments, demo, train

    scratch = Path(tempfile.gettempdir()) / "stag-train-throughput"
    demo_options = SimpleNamespace(seed=options.seed, data_cache_dir=scratch, out=scratch,
                                   data_path=None, no_progress=True)
    argv = demo.train_flags(name, flags, size, demo_options)
    at = argv.index("--save")
    argv = argv[:at] + argv[at + 2:]
    if options.window is not None and name.startswith("stag"):
        argv += ["--stag-cross-attention-window", str(options.window)]
    return arguments.finalize_args(arguments.parse_with_preset(train.build_parser(), argv))


class RandomTokens:
    """A dataset of GPTDataset-like samples of random tokens (step time does not depend on
    them); sample i is the same for every variant."""

    def __init__(self, seq_length: int, vocab: int, seed: int):
        self.seq_length, self.vocab, self.seed = seq_length, vocab, seed

    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, index: int) -> dict:
        gen = torch.Generator().manual_seed(self.seed + index)
        tokens = torch.randint(0, self.vocab, (self.seq_length + 1,), generator=gen)
        return {"tokens": tokens[:-1], "labels": tokens[1:],
                "loss_mask": torch.ones(self.seq_length),
                "position_ids": torch.arange(self.seq_length)}


def build_run(name: str, flags: list, size: dict, options):
    """A train.Run (model, optimizer, schedule) ready for train.train_step on random tokens."""
    from stag_plugin.training import arguments, runtime, train

    args = variant_args(name, flags, size, options)
    config = arguments.config_from_args(args)
    vocab = arguments.padded_vocab_size(args.vocab_size, args)
    model = runtime.build_model(args, vocab, config)
    optimizer, scheduler = runtime.build_optimizer(args, model)
    data = RandomTokens(args.seq_length, args.vocab_size, options.seed)
    return train.Run(args=args, config=config, data=None, tokenizer=None, train_ds=data,
                     valid_ds=None, model=model, optimizer=optimizer, scheduler=scheduler,
                     log=None)


# ---------------------------------------------------------------------------- FLOPs


def flops_per_token(config, vocab: int, seq_length: int) -> dict:
    """Model FLOPs per trained token (forward + backward), by the convention of the docstring."""
    h, layers, sections = config.hidden_size, config.num_layers, config.num_sections
    heads_dim = config.num_attention_heads * config.kv_channels  # query width
    kv_dim = (config.num_query_groups or config.num_attention_heads) * config.kv_channels
    ffn = config.ffn_hidden_size * (2 if config.gated_linear_unit else 1)
    self_attn = h * (heads_dim + 2 * kv_dim) + heads_dim * h
    mlp = h * ffn + config.ffn_hidden_size * h
    cross = h * heads_dim + h * 2 * kv_dim + heads_dim * h
    later = layers - config.layers_per_section if sections > 1 else 0
    matmul_weights = layers * (self_attn + mlp) + later * cross + h * vocab
    causal = (seq_length + 1) / 2
    window = config.cross_attention_window
    cross_visible = causal if window is None else seq_length
    visible = layers * causal + later * cross_visible
    attention = 3 * 4 * visible * heads_dim  # forward 2 (Q.K^T) + 2 (A.V) per key, x3 with bwd
    return {"matmul_weights": matmul_weights, "matmul_flops": 6 * matmul_weights,
            "attention_flops": attention, "total": 6 * matmul_weights + attention}


# ---------------------------------------------------------------------------- timing


STATS = {"median": statistics.median, "min": min}


def time_round_robin(runs: dict, steps: int, warmup: int, clock: str = "wall") -> dict:
    """Step seconds per variant: `warmup` steps each, then `steps` interleaved rounds."""
    from stag_plugin.training import train

    now = time.perf_counter if clock == "wall" else time.process_time

    for run in runs.values():
        for _ in range(warmup):
            train.train_step(run)
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            start = now()
            train.train_step(run)
            times[name].append(now() - start)
    return times


def profile(run, steps: int, rows: int) -> None:
    """torch.profiler over `steps` training steps: ops by self CPU time, then by shape."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from stag_plugin.training import train

    train.train_step(run)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            train.train_step(run)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows))
    total = sum(e.self_cpu_time_total for e in averages) / steps / 1e3
    print(f"self CPU time per step: {total:.1f} ms over {len(averages)} distinct ops; "
          f"op calls per step: {sum(e.count for e in averages) // steps}")


# ---------------------------------------------------------------------------- report


def table(rows: list, reference: str) -> str:
    header = ("variant", "params", "MFLOP/token", "tokens/s", "GFLOP/s",
              f"ratio vs {reference}", "FLOP-predicted", "ratio / predicted")
    lines = [header]
    for r in rows:
        lines.append((r["variant"], f"{r['parameters'] / 1e6:.2f}M",
                      f"{r['flops_per_token']['total'] / 1e6:.2f}", f"{r['tokens_per_second']:.0f}",
                      f"{r['flops_per_second'] / 1e9:.2f}", f"{r['ratio']:.3f}",
                      f"{r['predicted_ratio']:.3f}", f"{r['ratio'] / r['predicted_ratio']:.3f}"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def machine() -> dict:
    import megatron.core

    return {"platform": platform.platform(), "processor": platform.processor(),
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "megatron_core": megatron.core.__version__}


def measure(options, size: dict, variants: dict, names: list) -> list:
    """Build the reference and `names`, time them interleaved; one row per variant."""
    from stag_plugin.training import runtime, train

    reference = f"gpt-{size['layers']}L"
    runs = {name: build_run(name, variants[name], size, options)
            for name in dict.fromkeys([reference, *names])}
    times = time_round_robin(runs, options.steps, options.warmup, options.clock)
    tokens = size["micro_batch_size"] * size["seq_length"]
    rows = []
    for name, run in runs.items():
        vocab = runtime.unwrap(run.model[0]).vocab_size
        flops = flops_per_token(run.config, vocab, size["seq_length"])
        tps = tokens / STATS[options.stat](times[name])
        rows.append(dict(variant=name, parameters=train.count_parameters(run.model),
                         flops_per_token=flops, tokens_per_second=tps,
                         flops_per_second=flops["total"] * tps, step_seconds=times[name]))
    base = rows[0]
    for r in rows:
        r["ratio"] = r["tokens_per_second"] / base["tokens_per_second"]
        r["predicted_ratio"] = base["flops_per_token"]["total"] / r["flops_per_token"]["total"]
    return rows


def settings_line(size: dict, options) -> str:
    return (f"shapes: {size['layers']} layers, hidden {size['hidden_size']}, "
            f"{size['num_attention_heads']} heads, seq {size['seq_length']}, micro-batch "
            f"{size['micro_batch_size']}, vocab {size['vocab_size']}; {options.stat} of "
            f"{options.steps} interleaved steps after {options.warmup} warm-up; "
            f"{torch.get_num_threads()} threads, {options.clock} clock")


def main(argv=None) -> int:
    options = parse_args(argv)
    from stag_plugin.compat.cpu import quiet_known_warnings

    quiet_known_warnings()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    from stag_plugin.training import demo, runtime

    runtime.start(1, 1, seed=options.seed, backend="gloo")
    size = shapes(options)
    variants = dict(demo.model_variants(size["layers"]))
    names = options.variants or list(variants)
    unknown = sorted(set(names + [options.profile or names[0]]) - set(variants))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(variants)}")
    if options.profile is not None:
        profile(build_run(options.profile, variants[options.profile], size, options),
                options.profile_steps, options.rows)
        return 0
    rows = measure(options, size, variants, names)
    print(settings_line(size, options))
    print(table(rows, rows[0]["variant"]))
    if options.out is not None:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"command": " ".join(["python bench/train_throughput.py", *sys.argv[1:]]),
                  "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                  "settings": settings_line(size, options), "shapes": size,
                  "reference": rows[0]["variant"], "variants": rows}
        options.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
