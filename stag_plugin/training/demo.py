"""`stag demo`: the embedded default. Train five models on the embedded corpus for the same
token budget and compare them:

    gpt-{l}L                   a plain GPT with l layers              (the quality target)
    gpt-{l/2}L                 a plain GPT with l/2 layers            (the latency target)
    stag-2x{l/2}-separate      StagFormer, 2 sections of l/2 layers, separate weights
    stag-2x{l/2}-shared        StagFormer, 2 sections sharing one stack of l/2 layers
    stag-2x{l/2}-separate-w{w} separate weights, cross-attention to the last w memory slots

Corpus (the Python standard library) -> SentencePiece tokenizer -> Megatron indexed datasets
(cached, reused by reruns) -> `stag train` for each model -> a table of parameters, validation
perplexity and training tokens/s, greedy and sampled continuations, and in --out: report.md,
results.json, valid_loss.png and one checkpoint per model (usable with `stag eval --load`).

    stag demo                      # about 11 minutes on a 2-core CPU
    stag demo --size small         # a minute: the same pipeline at toy sizes (used by the tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from stag_plugin.errors import StagError
from stag_plugin.training import arguments

# Shapes and budget per size; every model of a size trains on the same tokens in the same order.
SIZES = {
    # bench/quality.py's default shapes and budget: the smallest depths at which, in ten CPU
    # minutes, the l-layer GPT is ahead of the l/2-layer one beyond the seed spread (measured
    # there; docs/quality.md). 8 against 4 layers (and 4 against 2) did not get there.
    "default": dict(layers=2, hidden_size=128, num_attention_heads=4, seq_length=128,
                    micro_batch_size=16, train_iters=1200, lr=2e-3, min_lr=2e-4,
                    lr_warmup_iters=60, eval_interval=150, eval_iters=8, vocab_size=2048,
                    window=16),
    "small": dict(layers=4, hidden_size=64, num_attention_heads=4, seq_length=64,
                  micro_batch_size=4, train_iters=12, lr=3e-3, min_lr=3e-4,
                  lr_warmup_iters=2, eval_interval=6, eval_iters=2, vocab_size=1024, window=8),
}

# The demo's settings beyond SIZES: each was stag train's default before stag train took
# Megatron-LM's defaults, so they are given explicitly and the demo's results stay the same.
FIXED_FLAGS = ["--transformer-impl", "local", "--position-embedding-type", "rope",
               "--hidden-dropout", "0.0", "--attention-dropout", "0.0", "--weight-decay", "0.1",
               "--adam-beta2", "0.95", "--lr-decay-style", "cosine"]

PROMPTS = ("def fibonacci(n):\n", "import os\n\n\nclass ", "    for key, value in ")
NULL_PROMPTS = ("1 2 3",)  # a NullTokenizer's text is token ids
SAMPLING = dict(temperature=0.8, top_p=0.95)  # the sampled continuation beside the greedy one


@dataclass
class ModelResult:
    name: str
    flags: list
    parameters: int
    valid_loss: float
    valid_ppl: float
    tokens_per_second: float
    train_seconds: float
    history: list
    samples: list
    checkpoint: str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stag demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--train-iters", type=int, default=None, help="override the budget")
    parser.add_argument("--data-path", nargs="+", default=None,
                        help="your corpus instead of the Python standard library")
    parser.add_argument("--data-cache-dir", type=Path, default=arguments.DEFAULT_CACHE / "data")
    from stag_plugin.training.data.tokenizers import add_tokenizer_args

    add_tokenizer_args(parser.add_argument_group(
        "tokenizer (default: SentencePiece of the size's vocabulary, trained on the corpus)"))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--sample-tokens", type=int, default=40)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--overwrite", action="store_true",
                        help="--out may hold an earlier demo's report and checkpoints: replace "
                             "them")
    return parser


def main(argv) -> int:
    """`stag demo` (stag_plugin.cli prints a StagError as one `error: ... Fix: ...` line)."""
    options = build_parser().parse_args(argv)
    options.command = " ".join(["stag demo", *argv])
    run_demo(options)
    return 0


def run_demo(options) -> dict:
    size = dict(SIZES[options.size])
    if options.train_iters is not None:
        size["train_iters"] = options.train_iters
    held = [p.name for p in (options.out / "report.md", options.out / "checkpoints") if p.exists()]
    if held and not options.overwrite:
        raise StagError(f"--out {options.out} already holds a demo ({', '.join(held)})",
                        "pass --overwrite to replace it, or another --out folder")
    options.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, flags in model_variants(size["layers"], size.get("window")):
        print(f"\n=== {name} ===", file=sys.stderr)
        results.append(train_variant(name, flags, size, options))
    report = write_outputs(options, size, results)
    print(format_table(results))
    print("\n" + headline(results))
    print_samples(results)
    print(f"\nreport: {options.out / 'report.md'}")
    return report


def model_variants(layers: int, window: Optional[int] = None) -> list:
    """(name, --stag-* and depth flags) of the compared models: four, and with `window` a fifth,
    the separate-weights StagFormer whose cross-attention sees the last `window` memory slots."""
    half = layers // 2
    stag = ["--num-layers", str(layers), "--stag-num-sections", "2", "--stag-weight-sharing"]
    windowed = [(f"stag-2x{half}-separate-w{window}",
                 [*stag, "separate", "--stag-cross-attention-window", str(window)])]
    return [
        (f"gpt-{layers}L", ["--num-layers", str(layers), "--stag-num-sections", "1"]),
        (f"gpt-{half}L", ["--num-layers", str(half), "--stag-num-sections", "1"]),
        (f"stag-2x{half}-separate", [*stag, "separate"]),
        (f"stag-2x{half}-shared", [*stag, "shared"]),
    ] + (windowed if window else [])


def size_flags(size: dict, seed: int, data_cache_dir, log_interval: int = 1) -> list:
    """`stag train` flags of a SIZES-shaped dict (widths, budget, schedule, evaluation,
    vocabulary; not the depth), the seed and the data cache, plus FIXED_FLAGS."""
    return [
        "--hidden-size", size["hidden_size"], "--num-attention-heads", size["num_attention_heads"],
        "--seq-length", size["seq_length"], "--micro-batch-size", size["micro_batch_size"],
        "--train-iters", size["train_iters"], "--lr", size["lr"], "--min-lr", size["min_lr"],
        "--lr-warmup-iters", size["lr_warmup_iters"], "--eval-interval", size["eval_interval"],
        "--eval-iters", size["eval_iters"], "--log-interval", log_interval, "--vocab-size",
        size["vocab_size"], "--seed", seed, "--data-cache-dir", data_cache_dir, *FIXED_FLAGS,
    ]


def train_flags(name: str, flags: list, size: dict, options) -> list:
    """The full `stag train` command line of one variant (recorded in results.json)."""
    common = [*size_flags(size, options.seed, options.data_cache_dir),
              "--save", options.out / "checkpoints" / name]
    if options.data_path:
        common += ["--data-path", *options.data_path]
    for flag in ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file"):
        if getattr(options, flag, None) is not None:
            common += [f"--{flag.replace('_', '-')}", getattr(options, flag)]
    if options.no_progress:
        common.append("--no-progress")
    return [str(flag) for flag in common + flags]


def train_variant(name: str, flags: list, size: dict, options) -> ModelResult:
    from stag_plugin.training import train

    argv = train_flags(name, flags, size, options)
    args = arguments.finalize_args(arguments.parse_with_preset(train.build_parser(), argv))
    _fresh_folder(args.save)  # (only inside --out, which --overwrite allowed)
    run, result, seconds = train_in_process(args)
    null = getattr(options, "tokenizer_type", None) == "NullTokenizer"
    prompts = NULL_PROMPTS if null else PROMPTS
    samples = [continuations(run, prompt, options.sample_tokens, options.seed)
               for prompt in prompts]
    return ModelResult(name=name, flags=argv, parameters=result.parameters,
                       valid_loss=result.valid_loss, valid_ppl=math.exp(result.valid_loss),
                       tokens_per_second=result.tokens_per_second, train_seconds=seconds,
                       history=result.history, samples=samples, checkpoint=str(args.save))


def train_in_process(args, building=None):
    """`stag train` with parsed `args` in this process: (run, TrainResult, seconds of the
    training loop). `building`: a context manager held while the model is built."""
    from stag_plugin.training import train

    with building or contextlib.nullcontext():
        run = train.setup(args)
    start = time.perf_counter()
    try:
        result = train.train_loop(run)
    finally:
        run.log.close()
    return run, result, time.perf_counter() - start


def continuations(run, prompt: str, new_tokens: int, seed: int) -> dict:
    """The greedy continuation of `prompt` by the trained model, and a sampled one (SAMPLING),
    decoded with KV caches (StagDecoder, the one token loop of stag_plugin.reference.sampling)."""
    from stag_plugin.decode.engine import StagDecoder
    from stag_plugin.decode.text import continue_text
    from stag_plugin.reference.sampling import Sampler
    from stag_plugin.training import runtime

    model, tokenizer = runtime.unwrap(run.model[0]), run.tokenizer
    ids = tokenizer.tokenize(prompt)
    new_tokens = min(new_tokens, run.args.max_position_embeddings - len(ids) + 1)
    decoder = StagDecoder(model, 1, len(ids) + new_tokens - 1)
    texts = {}
    for kind, sampler in (("completion", Sampler()), ("sampled", Sampler(**SAMPLING, seed=seed))):
        new = continue_text(decoder, tokenizer, ids, new_tokens, sampler=sampler).token_ids
        texts[kind] = tokenizer.detokenize(ids + new)[len(prompt):]
    model.train()
    return {"prompt": prompt, **texts}


# ---------------------------------------------------------------------------- outputs


def write_outputs(options, size: dict, results: list) -> dict:
    report = {
        "command": getattr(options, "command", "stag demo"),
        "size": options.size, "settings": size, "machine": machine(),
        "models": [asdict(r) for r in results],
    }
    (options.out / "results.json").write_text(json.dumps(report, indent=1))
    plot_curves(results, size, options.out / "valid_loss.png")
    (options.out / "report.md").write_text(markdown_report(report, results))
    return report


def machine() -> dict:
    import megatron.core

    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "megatron_core": megatron.core.__version__,
            "cuda": torch.cuda.is_available()}


def format_table(results: list) -> str:
    rows = [("model", "depth", "parameters", "valid loss", "valid ppl", "train tok/s",
             "train s")]
    for r in results:
        rows.append((r.name, _depth(r), f"{r.parameters / 1e6:.2f}M", f"{r.valid_loss:.4f}",
                     f"{r.valid_ppl:.2f}", f"{r.tokens_per_second:.0f}",
                     f"{r.train_seconds:.0f}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def print_samples(results: list) -> None:
    for r in results:
        for kind, key in (("greedy", "completion"), (_sampling_label(), "sampled")):
            print(f"\n--- {r.name} ({kind}) ---")
            for sample in r.samples:
                print(f"{sample['prompt']}\u2502{sample[key]}\n")


def markdown_report(report: dict, results: list) -> str:
    ranking = " < ".join(r.name for r in sorted(results, key=lambda r: r.valid_loss))
    lines = [
        "# stag demo report", "",
        f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ",
        f"Budget: {report['settings']['train_iters']} iterations x "
        f"{report['settings']['micro_batch_size']} x {report['settings']['seq_length']} tokens "
        "per model, same data order for all.", "",
        "| model | depth | parameters | valid loss | valid ppl | train tok/s | train s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(f"| {r.name} | {_depth(r)} | {r.parameters:,} | {r.valid_loss:.4f} | "
                     f"{r.valid_ppl:.2f} | {r.tokens_per_second:.0f} | {r.train_seconds:.0f} |")
    lines += ["", headline(results), "", f"Validation perplexity, best first: {ranking}", "",
              *comparisons(results), "",
              "![validation loss](valid_loss.png)", "",
              "## Samples", "", f"Greedy, then sampled ({_sampling_label()}), per prompt.", ""]
    for r in results:
        lines.append(f"### {r.name}")
        for sample in r.samples:
            lines += ["```python", sample["prompt"] + sample["completion"], "```",
                      "```python", sample["prompt"] + sample["sampled"], "```"]
    return "\n".join(lines) + "\n"


def headline(results: list) -> str:
    """The comparison that matters, in one sentence: is the deep GPT ahead of the shallow one,
    and how much of that gap does each StagFormer (the shallow one's decode latency) close?"""
    deep, shallow, *stags = results
    gap = shallow.valid_loss - deep.valid_loss
    if gap <= 0:
        return (f"At this budget {deep.name} is not ahead of {shallow.name} (perplexity "
                f"{deep.valid_ppl:.2f} vs {shallow.valid_ppl:.2f}): depth has not started to "
                "pay, so the StagFormers cannot be read against it.")
    parts = [f"{s.name} {s.valid_ppl:.2f} ({(shallow.valid_loss - s.valid_loss) / gap:.0%} of "
             "the gap closed)" for s in stags]
    return (f"{deep.name} is ahead of {shallow.name} (perplexity {deep.valid_ppl:.2f} vs "
            f"{shallow.valid_ppl:.2f}); the StagFormers, which decode with {shallow.name}'s "
            f"critical path: {', '.join(parts)}. One seed, 8 validation batches: "
            "bench/quality.py repeats this with 2 seeds, whole test split and held-out code "
            "(docs/quality.md in the stag_plugin repository).")


def comparisons(results: list) -> list:
    """What the table says about the paper's claims, computed from the measured losses."""
    by_name = {r.name: r for r in results}
    deep, shallow, *stags = [r.name for r in results]
    lines = [_versus(by_name[deep], by_name[shallow], "depth at this budget")]
    for stag in stags:
        lines.append(_versus(by_name[stag], by_name[shallow],
                             "StagFormer vs the latency-matched GPT"))
        lines.append(_versus(by_name[stag], by_name[deep], "StagFormer vs the same-depth GPT"))
    return lines


def _versus(a: ModelResult, b: ModelResult, what: str) -> str:
    delta = a.valid_loss - b.valid_loss
    verdict = "better" if delta < 0 else "worse"
    return (f"- {what}: {a.name} is {verdict} than {b.name} by {abs(delta):.4f} nats/token "
            f"(perplexity {a.valid_ppl:.2f} vs {b.valid_ppl:.2f}).")


def plot_curves(results: list, size: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_per_iter = size["micro_batch_size"] * size["seq_length"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        valid = [h for h in r.history if h.get("split") == "valid"]
        train = [h for h in r.history if "lr" in h]
        left.plot([h["iteration"] * tokens_per_iter for h in valid],
                  [h["loss"] for h in valid], marker="o", label=r.name)
        right.plot([h["iteration"] * tokens_per_iter for h in train],
                   _running_mean([h["loss"] for h in train], 25), label=r.name, linewidth=1)
    for axis, title in ((left, "validation loss"),
                        (right, "training loss (running mean of 25 steps)")):
        axis.set_xlabel("training tokens")
        axis.set_ylabel("loss (nats/token)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _running_mean(values: list, window: int) -> list:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _sampling_label() -> str:
    return ", ".join(f"{key} {value}" for key, value in SAMPLING.items())


def _depth(result: ModelResult) -> str:
    layers = result.flags[result.flags.index("--num-layers") + 1]
    sections = int(result.flags[result.flags.index("--stag-num-sections") + 1])
    if sections > 1:
        return f"{sections} x {int(layers) // sections}"
    return f"{layers} layer" + ("" if layers == "1" else "s")


def _fresh_folder(path: Path) -> None:
    """A demo run's checkpoint folder starts empty (it lies inside --out)."""
    import shutil

    if path.exists():
        shutil.rmtree(path)

