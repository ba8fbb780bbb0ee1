"""Quality of StagFormer against plain GPTs of the same depth and of half the depth.

    python bench/quality.py --out runs/quality                        # the experiment
    python bench/quality.py --out runs/quality --variants gpt-L gpt-L/2   # does depth pay?
    python bench/quality.py --out runs/quality --heldout path/to/texts  # other held-out text
    python bench/quality.py --out runs/q-smoke --preset smoke           # a minute, toy sizes
    python bench/quality.py --out runs/q-l4 --layers 4 --variants gpt-L gpt-L/2  # other shapes

The paper's comparison (arXiv 2501.15665, Table 1) at a size a CPU can train: an L-layer GPT,
an L/2-layer GPT and StagFormers of 2 sections x L/2 layers, every model trained with
`stag train`'s own training step on the embedded corpus (the Python standard library,
SentencePiece), on the same tokens in the same order for a given seed (the seed sets both the
initialisation and the data order). The default preset (L = 2, width 128, 2.46M training
tokens per model, about 2 minutes per model on 2 CPU cores) is the deepest pair found at which,
on this budget, the L-layer GPT beats the L/2-layer one by more than the seed spread; 4 against
2 layers did not (docs/quality.md). Each (variant, seed) is a unit: trained, checkpointed,
then evaluated on the whole validation and test splits and on a held-out corpus the training
corpus does not contain (default: the `.py` files of the installed numpy and sympy packages,
an even share of tokens from each; `--heldout` names other files or folders).

The run is resumable: every finished unit is written to `--out/units/<variant>-s<seed>.json`
and skipped by a rerun with the same settings (a rerun with other settings is refused). The
summary (mean and spread over seeds per variant) is printed as a table and written to
`--out/quality.json` and `--out/quality.png` (validation loss against training tokens).

Variants (`--variants`; ablations change one StagFormer option at a time):
    gpt-L, gpt-L/2               plain GPTs
    stag-sep, stag-shared        2 x L/2, separate or shared weights, with the base of the
                                 ablations: normalised memory and Megatron's initialisation of
                                 the cross-attention output (BASE_CHOICES)
    stag-sep-window              stag-sep, --stag-cross-attention-window (--window)
    stag-sep-learned             stag-sep, --stag-output-combination learned
    stag-sep-norope              stag-sep, --no-stag-cross-attention-rope
    stag-sep-rawmemory           stag-sep, --no-stag-memory-norm (the memory is the first
                                 section's output before any norm)
    stag-sep-zerocross           stag-sep, --stag-cross-attention-zero-init
    stag-sep-fixednull           stag-sep; the null memory slot stays zero (not learned)
    stag-shared-rawmemory        stag-shared, --no-stag-memory-norm (with stag-sep-rawmemory:
                                 the plugin's defaults)
    stag-sep-rawzero,            raw memory and a zero-initialised cross-attention output,
    stag-shared-rawzero          separate or shared weights
    stag-sep-rawmemory-window    stag-sep-rawmemory with --stag-cross-attention-window
A fixed null slot is not a model option: this script makes that change to the built
StagGPTModel before training (ABLATIONS), for the experiment only; its checkpoints hold the
changed model.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stag_plugin.training import arguments  # noqa: E402
from stag_plugin.training.demo import machine, size_flags, train_in_process  # noqa: E402

PRESETS = {
    "default": dict(layers=2, hidden_size=128, num_attention_heads=4, seq_length=128,
                    micro_batch_size=16, train_iters=1200, lr=2e-3, min_lr=2e-4,
                    lr_warmup_iters=60, eval_interval=150, eval_iters=8, vocab_size=2048,
                    window=16, heldout_tokens=131072),
    "smoke": dict(layers=2, hidden_size=64, num_attention_heads=4, seq_length=64,
                  micro_batch_size=4, train_iters=6, lr=3e-3, min_lr=3e-4, lr_warmup_iters=2,
                  eval_interval=3, eval_iters=2, vocab_size=1024, window=4,
                  heldout_tokens=4096),
}
SHAPE_KEYS = tuple(PRESETS["default"])

MEMORY_NORM, ZERO_INIT = "--stag-memory-norm", "--stag-cross-attention-zero-init"
BASE_CHOICES = [MEMORY_NORM, "--no-stag-cross-attention-zero-init"]
RAW_MEMORY = ["--no-stag-memory-norm", "--no-stag-cross-attention-zero-init"]
SEPARATE, SHARED = ["--stag-weight-sharing", "separate"], ["--stag-weight-sharing", "shared"]
VARIANTS = {
    # name: (sections, depth relative to L, extra --stag-* flags)
    "gpt-L": (1, 1.0, []),
    "gpt-L/2": (1, 0.5, []),
    "stag-sep": (2, 1.0, SEPARATE + BASE_CHOICES),
    "stag-shared": (2, 1.0, SHARED + BASE_CHOICES),
    "stag-sep-window": (2, 1.0, SEPARATE + BASE_CHOICES
                        + ["--stag-cross-attention-window", "{window}"]),
    "stag-sep-learned": (2, 1.0, SEPARATE + BASE_CHOICES
                         + ["--stag-output-combination", "learned"]),
    "stag-sep-norope": (2, 1.0, SEPARATE + BASE_CHOICES + ["--no-stag-cross-attention-rope"]),
    "stag-sep-rawmemory": (2, 1.0, SEPARATE + RAW_MEMORY),
    "stag-sep-zerocross": (2, 1.0, SEPARATE + [MEMORY_NORM, ZERO_INIT]),
    "stag-sep-fixednull": (2, 1.0, SEPARATE + BASE_CHOICES),
    "stag-shared-rawmemory": (2, 1.0, SHARED + RAW_MEMORY),
    "stag-sep-rawzero": (2, 1.0, SEPARATE + ["--no-stag-memory-norm", ZERO_INIT]),
    "stag-shared-rawzero": (2, 1.0, SHARED + ["--no-stag-memory-norm", ZERO_INIT]),
    "stag-sep-rawmemory-window": (2, 1.0, SEPARATE + RAW_MEMORY
                                  + ["--stag-cross-attention-window", "{window}"]),
}
DEFAULT_VARIANTS = ["gpt-L", "gpt-L/2", "stag-sep", "stag-shared"]
HELDOUT_PACKAGES = ("numpy", "sympy")
SPLITS = ("valid", "test", "heldout")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    for key in SHAPE_KEYS:
        kind = float if key in ("lr", "min_lr") else int
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, default=None,
                            help="(default: the preset's)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                        default=DEFAULT_VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1234, 1235])
    parser.add_argument("--heldout", nargs="+", type=Path, default=None,
                        help="held-out text: files or folders (their .py/.txt/.md files); "
                             "default: the .py files of the installed numpy and sympy")
    parser.add_argument("--data-cache-dir", type=Path, default=arguments.DEFAULT_CACHE / "data")
    parser.add_argument("--no-progress", action="store_true")
    options = parser.parse_args(argv)
    options.shape = dict(PRESETS[options.preset])
    for key in SHAPE_KEYS:
        if getattr(options, key) is not None:
            options.shape[key] = getattr(options, key)
    if options.shape["layers"] % 2:
        parser.error(f"--layers {options.shape['layers']}: L must be even (L/2-layer sections)")
    return options


def main(argv=None) -> int:
    options = parse_args(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    check_settings(options)
    # variant by variant: the GPTs' depth gap (and its seed spread) is known first
    units = [(variant, seed) for variant in options.variants for seed in options.seeds]
    for number, (variant, seed) in enumerate(units, 1):
        path = unit_path(options, variant, seed)
        if path.exists():
            print(f"[{number}/{len(units)}] {variant} seed {seed}: done earlier ({path})",
                  file=sys.stderr)
            continue
        print(f"[{number}/{len(units)}] {variant} seed {seed}", file=sys.stderr, flush=True)
        write_json(path, run_unit(options, variant, seed))
    summary = summarise(options, [json.loads(unit_path(options, v, s).read_text())
                                  for v, s in units])
    write_json(options.out / "quality.json", summary)
    plot(summary, options.out / "quality.png")
    (options.out / "quality.md").write_text(format_markdown(summary))
    print(format_table(summary))
    print(f"\nJSON: {options.out / 'quality.json'}  plot: {options.out / 'quality.png'}")
    return 0


# ---------------------------------------------------------------------------- one unit


def unit_name(variant: str, seed: int) -> str:
    """The unit's file and checkpoint name ("gpt-L/2" -> "gpt-L_2-s1234")."""
    return f"{variant.replace('/', '_')}-s{seed}"


def unit_path(options, variant: str, seed: int) -> Path:
    return options.out / "units" / f"{unit_name(variant, seed)}.json"


def check_settings(options) -> None:
    """A rerun resumes only the run it started: same shapes and held-out corpus."""
    settings = {"shape": options.shape, "heldout": [str(p) for p in heldout_files(options)]}
    path = options.out / "settings.json"
    if path.exists() and json.loads(path.read_text()) != settings:
        sys.exit(f"error: {options.out} holds a run with other settings ({path}). Fix: use "
                 "another --out, or the same preset and flags as that run")
    write_json(path, settings)


def train_flags(options, variant: str, seed: int) -> list:
    shape = options.shape
    sections, depth, extra = VARIANTS[variant]
    layers = int(shape["layers"] * depth)
    flags = [
        "--num-layers", layers, "--stag-num-sections", sections,
        *size_flags(shape, seed, options.data_cache_dir, log_interval=10),
        "--save", options.out / "checkpoints" / unit_name(variant, seed),
        "--overwrite", *[f.format(window=shape["window"]) for f in extra],
    ]
    if options.no_progress:
        flags.append("--no-progress")
    return [str(flag) for flag in flags]


def run_unit(options, variant: str, seed: int) -> dict:
    from stag_plugin.training import train

    argv = train_flags(options, variant, seed)
    args = arguments.finalize_args(arguments.parse_with_preset(train.build_parser(), argv))
    run, result, seconds = train_in_process(args, ablated(variant))
    losses = {split: split_loss(run, split) for split in ("valid", "test")}
    losses["heldout"] = heldout_loss(run, options)
    return {
        "variant": variant, "seed": seed, "flags": argv, "parameters": result.parameters,
        "train_tokens": args.train_iters * args.global_batch_size * args.seq_length,
        "train_seconds": seconds, "tokens_per_second": result.tokens_per_second,
        "loss": losses, "ppl": {k: math.exp(v) for k, v in losses.items()},
        "curve": [(h["iteration"], h["loss"]) for h in result.history
                  if h.get("split") == "valid"],
        "checkpoint": str(args.save),
    }


def split_loss(run, split: str) -> float:
    """Mean loss per token over the whole validation or test split (prepared again if another
    job re-prepared the shared data cache for other data since this unit started)."""
    from stag_plugin.training import train
    from stag_plugin.training.evaluate import split_dataset

    data, tokenizer = train.prepare_tokenized_data(run.args)
    if data.key != run.data.key:
        sys.exit(f"error: the data under {run.args.data_cache_dir} changed during the unit. "
                 "Fix: give this run its own --data-cache-dir, and rerun (finished units stay)")
    dataset = split_dataset(run.args, data, tokenizer, split)
    return train.evaluate(run.model, dataset, run.args)


def heldout_loss(run, options) -> float:
    """Mean loss per token on the held-out corpus, in windows of --seq-length."""
    from stag_plugin.training import train

    ids = heldout_ids(run.tokenizer, options)
    samples = windows(ids, run.args.seq_length)
    usable = len(samples) - len(samples) % run.args.global_batch_size
    if usable == 0:
        sys.exit(f"error: the held-out text gives {len(ids)} tokens, under one batch. Fix: "
                 "name more text with --heldout")
    return train.evaluate(run.model, samples[:usable], run.args)


def windows(ids: list, seq_length: int) -> list:
    """Non-overlapping samples of seq_length tokens (GPTDataset's dict layout)."""
    out = []
    for start in range(0, len(ids) - seq_length, seq_length):
        chunk = torch.tensor(ids[start:start + seq_length + 1], dtype=torch.long)
        out.append({"tokens": chunk[:-1], "labels": chunk[1:],
                    "loss_mask": torch.ones(seq_length),
                    "position_ids": torch.arange(seq_length)})
    return out


# ---------------------------------------------------------------------------- ablations


def _fixed_null(model) -> None:
    if hasattr(model, "null_memory"):
        model.null_memory.requires_grad_(False)  # stays at its zero initialisation


ABLATIONS = {"stag-sep-fixednull": _fixed_null}


@contextlib.contextmanager
def ablated(variant: str):
    """While building the unit's model: StagGPTModel with the variant's change applied at the
    end of its construction (before Megatron's DDP and optimizer see its parameters)."""
    change = ABLATIONS.get(variant)
    if change is None:
        yield
        return
    from stag_plugin.core.model import StagGPTModel

    original = StagGPTModel.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        change(self)

    StagGPTModel.__init__ = init
    try:
        yield
    finally:
        StagGPTModel.__init__ = original


# ---------------------------------------------------------------------------- held-out text


def heldout_roots(options) -> list:
    """The --heldout paths, or the installed held-out packages' folders."""
    return options.heldout or [_package_dir(name) for name in HELDOUT_PACKAGES]


def heldout_files(options) -> list:
    """Files of the held-out corpus, in a fixed order; the roots share it evenly."""
    return [path for root in heldout_roots(options) for path in _text_files(root)]


def heldout_ids(tokenizer, options) -> list:
    """`heldout_tokens` token ids, an even share from each --heldout path (or package); a
    document ends with the tokenizer's end-of-document token."""
    roots = heldout_roots(options)
    share = options.shape["heldout_tokens"] // len(roots)
    ids = []
    for root in roots:
        taken = []
        for path in _text_files(root):
            taken += tokenizer.tokenize(path.read_text(errors="replace")) + [tokenizer.eod]
            if len(taken) >= share:
                break
        ids += taken[:share]
    return ids


def _package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: the held-out package {name} is not installed. Fix: pip install "
                 f"{name}, or name held-out text with --heldout")
    return Path(list(spec.submodule_search_locations)[0])


def _text_files(path: Path) -> list:
    """A file, or a folder's .py/.txt/.md files in an order that mixes its subfolders (sorted
    by a hash of the relative path; fixed across runs)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        sys.exit(f"error: --heldout {path} is neither a file nor a folder")
    files = [p for p in path.rglob("*") if p.suffix in (".py", ".txt", ".md") and p.is_file()]
    return sorted(files, key=lambda p: hashlib.sha1(
        str(p.relative_to(path)).encode()).hexdigest())


# ---------------------------------------------------------------------------- summary


def summarise(options, units: list) -> dict:
    variants = []
    for name in options.variants:
        mine = [u for u in units if u["variant"] == name]
        row = {"variant": name, "seeds": [u["seed"] for u in mine],
               "parameters": mine[0]["parameters"],
               "tokens_per_second": statistics.median(u["tokens_per_second"] for u in mine),
               "train_seconds": statistics.mean(u["train_seconds"] for u in mine),
               "curve": _mean_curve([u["curve"] for u in mine])}
        for split in SPLITS:
            ppls = [u["ppl"][split] for u in mine]
            row[split] = {"ppl_mean": statistics.mean(ppls), "ppl_min": min(ppls),
                          "ppl_max": max(ppls), "ppl": ppls,
                          "loss_mean": statistics.mean(math.log(p) for p in ppls)}
        variants.append(row)
    shape = options.shape
    return {"command": "python bench/quality.py " + " ".join(sys.argv[1:]),
            "machine": machine(), "shape": shape,
            "tokens_per_model": shape["train_iters"] * shape["micro_batch_size"] *
            shape["seq_length"], "heldout_files": len(heldout_files(options)),
            "variants": variants, "units": units}


def _mean_curve(curves: list) -> list:
    by_iteration = {}
    for curve in curves:
        for iteration, loss in curve:
            by_iteration.setdefault(iteration, []).append(loss)
    return [(i, statistics.mean(v)) for i, v in sorted(by_iteration.items())]


def format_table(summary: dict) -> str:
    header = ("variant", "params", "valid ppl", "test ppl", "held-out ppl", "tok/s", "train s")
    rows = [header]
    for v in summary["variants"]:
        rows.append((v["variant"], f"{v['parameters'] / 1e6:.2f}M",
                     *(_spread(v[s]) for s in SPLITS),
                     f"{v['tokens_per_second']:.0f}", f"{v['train_seconds']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_markdown(summary: dict) -> str:
    """The table as markdown, with each split's loss gap to gpt-L/2 and to gpt-L (nats/token,
    means over seeds; negative = better)."""
    by_name = {v["variant"]: v for v in summary["variants"]}
    lines = ["| variant | parameters | valid ppl | test ppl | held-out ppl | vs gpt-L/2 "
             "(valid / test / held-out, nats) | vs gpt-L | train tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in summary["variants"]:
        lines.append(f"| {v['variant']} | {v['parameters']:,} | " +
                     " | ".join(_spread(v[s]) for s in SPLITS) +
                     f" | {_gaps(v, by_name.get('gpt-L/2'))} | {_gaps(v, by_name.get('gpt-L'))}"
                     f" | {v['tokens_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


def _gaps(row: dict, other) -> str:
    if other is None or other is row:
        return "-"
    return " / ".join(f"{row[s]['loss_mean'] - other[s]['loss_mean']:+.4f}" for s in SPLITS)


def _spread(cell: dict) -> str:
    """mean [min-max] over seeds."""
    return f"{cell['ppl_mean']:.2f} [{cell['ppl_min']:.2f}-{cell['ppl_max']:.2f}]"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = summary["shape"]["micro_batch_size"] * summary["shape"]["seq_length"]
    fig, axis = plt.subplots(figsize=(10, 5))
    colours = plt.get_cmap("tab20").colors
    for n, v in enumerate(summary["variants"]):  # GPTs dashed and black/grey
        gpt = v["variant"].startswith("gpt-")
        axis.plot([i * tokens for i, _ in v["curve"]], [loss for _, loss in v["curve"]],
                  marker="o", markersize=3, linestyle="--" if gpt else "-",
                  color=("black", "grey")[n % 2] if gpt else colours[n % len(colours)],
                  label=f"{v['variant']} ({len(v['seeds'])} seeds)")
    axis.set_xlabel("training tokens")
    axis.set_ylabel("validation loss (nats/token, mean over seeds)")
    axis.set_title("bench/quality.py")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: Path, data) -> None:
    """Written whole or not at all (a killed run leaves no half unit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    part.write_text(json.dumps(data, indent=1))
    part.replace(path)


if __name__ == "__main__":
    sys.exit(main())
