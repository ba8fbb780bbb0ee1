"""Upcycling a plain GPT into a StagFormer (`stag convert from-gpt`) against training one from
scratch, on the embedded corpus (the Python standard library).

    python bench/upcycle.py --out runs/upcycle                 # the measured configuration
    python bench/upcycle.py --size tiny --out /tmp/upcycle     # the same pipeline in seconds

Every model trains on the same data order with the same learning-rate schedule (warm-up, cosine
decay) for N steps; fine-tuning starts a fresh optimizer and schedule (`stag train --finetune`):

    gpt-{L}L              plain GPT, L layers, trained from scratch (the source)
    gpt-{L}L+N            the source trained N more steps (the extra budget the upcycled get)
    dup-sep-2x{L}         from-gpt --recipe duplicate, separate weights, then N steps
    dup-shared-2x{L}      from-gpt --recipe duplicate, shared weights, then N steps
    split-2x{L/2}         from-gpt --recipe split, then N steps
    scratch-2x{L}         StagFormer shaped like dup-sep, from scratch, N steps
    scratch-2x{L/2}       StagFormer shaped like split, from scratch, N steps

Reported: validation loss / perplexity after training and, for the converted models, at step 0
(right after the conversion: duplicate must equal the source exactly). Prints a table, writes
results.json and valid_ppl.png (validation perplexity against total training steps, the
source's included) into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

SIZES = {
    "default": dict(layers=4, hidden_size=128, num_attention_heads=4, seq_length=128,
                    micro_batch_size=8, train_iters=300, lr=2e-3, min_lr=2e-4,
                    lr_warmup_iters=30, eval_interval=50, eval_iters=8, vocab_size=4096),
    "tiny": dict(layers=2, hidden_size=32, num_attention_heads=4, seq_length=32,
                 micro_batch_size=4, train_iters=6, lr=3e-3, min_lr=3e-4, lr_warmup_iters=1,
                 eval_interval=3, eval_iters=2, vocab_size=1024),
}


def build_parser() -> argparse.ArgumentParser:
    from stag_plugin.training import arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/upcycle"))
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--train-iters", type=int, default=None, help="N (override)")
    parser.add_argument("--data-cache-dir", type=Path, default=arguments.DEFAULT_CACHE / "data")
    parser.add_argument("--seed", type=int, default=1234)
    return parser


def main(argv=None) -> int:
    from stag_plugin.compat.cpu import quiet_known_warnings

    quiet_known_warnings()
    argv = sys.argv[1:] if argv is None else list(argv)
    options = build_parser().parse_args(argv)
    options.command = " ".join(["python bench/upcycle.py", *argv])
    size = dict(SIZES[options.size])
    if options.train_iters:  # N, with the warm-up and evaluation points scaled along
        scale = options.train_iters / size["train_iters"]
        size.update(train_iters=options.train_iters,
                    lr_warmup_iters=max(1, round(size["lr_warmup_iters"] * scale)),
                    eval_interval=max(1, round(size["eval_interval"] * scale)))
    for own in ("checkpoints", "converted"):  # a rerun replaces its own outputs, nothing else
        shutil.rmtree(options.out / own, ignore_errors=True)
    options.out.mkdir(parents=True, exist_ok=True)
    results = run_all(size, options)
    report = write_outputs(options, size, results)
    print(format_table(results, size))
    print(f"\nresults: {options.out / 'results.json'}")
    return 0 if report else 1


# ---------------------------------------------------------------------------- the runs


def run_all(size: dict, options) -> list:
    """Train the source, convert it, fine-tune / train every variant; in the order above."""
    layers, n = size["layers"], size["train_iters"]
    source = f"gpt-{layers}L"
    results = [train_variant(source, gpt_flags(layers), size, options)]
    gpt_ckpt = options.out / "checkpoints" / source
    results.append(train_variant(f"{source}+{n}", gpt_flags(layers), size, options,
                                 load=gpt_ckpt, offset=n))
    for name, recipe, sharing, sections_layers in (
            (f"dup-sep-2x{layers}", "duplicate", "separate", layers),
            (f"dup-shared-2x{layers}", "duplicate", "shared", layers),
            (f"split-2x{layers // 2}", "split", "separate", layers // 2)):
        converted = convert(gpt_ckpt, options.out / "converted" / name, recipe, sharing)
        flags = stag_flags(2 * sections_layers, sharing)
        results.append(train_variant(name, flags, size, options, load=converted, offset=n))
    for name, sections_layers in ((f"scratch-2x{layers}", layers),
                                  (f"scratch-2x{layers // 2}", layers // 2)):
        results.append(train_variant(name, stag_flags(2 * sections_layers, "separate"), size,
                                     options))
    return results


def gpt_flags(layers: int) -> list:
    return ["--num-layers", str(layers), "--stag-num-sections", "1"]


def stag_flags(layers: int, sharing: str) -> list:
    return ["--num-layers", str(layers), "--stag-num-sections", "2", "--stag-weight-sharing",
            sharing]


def convert(gpt: Path, out: Path, recipe: str, sharing: str) -> Path:
    from stag_plugin import cli

    argv = ["from-gpt", "--load", str(gpt), "--out", str(out), "--recipe", recipe,
            "--stag-num-sections", "2", "--stag-weight-sharing", sharing, "--no-progress"]
    if cli.main(["convert", *argv]) != 0:
        raise SystemExit(f"stag convert {' '.join(argv)} failed")
    return out


def train_flags(name: str, model_flags: list, size: dict, options, load=None) -> list:
    from stag_plugin.training.demo import size_flags  # the demo's values beyond its sizes

    flags = [*size_flags(size, options.seed, options.data_cache_dir, log_interval=10),
             "--save", options.out / "checkpoints" / name, "--no-progress", *model_flags]
    if load is not None:
        flags += ["--load", load, "--finetune"]
    return [str(flag) for flag in flags]


def train_variant(name: str, model_flags: list, size: dict, options, load=None,
                  offset: int = 0) -> dict:
    """One `stag train` run in this process; with `load`, a fine-tune evaluated at step 0."""
    from stag_plugin.training import arguments, train

    print(f"\n=== {name} ===", file=sys.stderr, flush=True)
    argv = train_flags(name, model_flags, size, options, load)
    args = arguments.finalize_args(arguments.parse_with_preset(train.build_parser(), argv))
    run = train.setup(args)
    start_loss = train.evaluate(run.model, run.valid_ds, args, args.eval_iters) if load else None
    start = time.perf_counter()
    try:
        result = train.train_loop(run)
    finally:
        run.log.close()
    curve = ([(offset, start_loss)] if load else []) + [
        (offset + h["iteration"], h["loss"]) for h in result.history if h.get("split") == "valid"]
    return dict(name=name, flags=argv, parameters=result.parameters, offset=offset,
                start_loss=start_loss, valid_loss=result.valid_loss,
                valid_ppl=math.exp(result.valid_loss), train_seconds=time.perf_counter() - start,
                tokens_per_second=result.tokens_per_second, curve=curve)


# ---------------------------------------------------------------------------- outputs


def format_table(results: list, size: dict) -> str:
    rows = [("model", "parameters", "steps", "ppl at step 0", "valid loss", "valid ppl")]
    for r in results:
        start = "-" if r["start_loss"] is None else f"{math.exp(r['start_loss']):.2f}"
        steps = (f"{r['offset']} + {size['train_iters']}" if r["offset"]
                 else str(size["train_iters"]))
        rows.append((r["name"], f"{r['parameters'] / 1e6:.3f}M", steps, start,
                     f"{r['valid_loss']:.4f}", f"{r['valid_ppl']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def write_outputs(options, size: dict, results: list) -> dict:
    import megatron.core

    report = {"command": options.command, "size": options.size, "settings": size,
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__,
                          "megatron_core": megatron.core.__version__},
              "models": results}
    (options.out / "results.json").write_text(json.dumps(report, indent=1))
    plot_curves(results, options.out / "valid_ppl.png")
    return report


def plot_curves(results: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 4.5))
    for r in results:
        steps, losses = zip(*r["curve"])
        axis.plot(steps, [math.exp(loss) for loss in losses], marker="o", label=r["name"],
                  linestyle="--" if r["name"].startswith("scratch") else "-")
    axis.set_xlabel("training steps (the source's included for converted models)")
    axis.set_ylabel("validation perplexity")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # the checkpoint saver starts a spawn-context helper process
    sys.exit(main())
