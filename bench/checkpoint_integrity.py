"""What the checkpoint manifest costs: save and load time of a real training checkpoint with
and without writing / verifying manifest.json (SHA-256 of every file).

    python bench/checkpoint_integrity.py --sizes 30m 100m --repeats 3

For each model size: the StagGPTModel is built and one checkpoint saved (model + Adam state, the
way `stag train` saves), then timed: the save itself (dist_checkpointing.save), writing the
manifest, verifying it, and loading the checkpoint (dist_checkpointing.load). Medians of
--repeats. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # hidden, layers (2 sections), heads
    "30m": (512, 8, 8),
    "100m": (768, 12, 12),
}


def build(size: str):
    from stag_plugin.training import arguments, runtime, train
    from stag_plugin.training.demo import FIXED_FLAGS  # the demo's values beyond its sizes

    hidden, layers, heads = SIZES[size]
    args = arguments.finalize_args(train.build_parser().parse_args([
        *FIXED_FLAGS, "--lr", "1e-3", "--train-iters", "100", "--hidden-size", str(hidden),
        "--num-layers", str(layers), "--num-attention-heads", str(heads), "--seq-length", "128",
        "--vocab-size", "8192", "--no-progress"]))
    runtime.start(1, 1, seed=0)
    model = runtime.build_model(args, 8192)
    optimizer, scheduler = runtime.build_optimizer(args, model)
    for chunk in model:  # one (zero-gradient) step creates Adam's state, as a trained run has
        chunk.zero_grad_buffer()
    optimizer.step()
    return args, model, optimizer, scheduler


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(size: str, repeats: int) -> dict:
    from megatron.core import dist_checkpointing

    from stag_plugin.compat.megatron import install_saver_queue
    from stag_plugin.training import integrity, runtime

    args, model, optimizer, scheduler = build(size)
    install_saver_queue()
    times = {"save_s": [], "manifest_s": [], "verify_s": [], "load_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            folder = Path(tmp) / f"iter_{repeat}"
            folder.mkdir()
            state = runtime.checkpoint_state(model, optimizer, scheduler)
            times["save_s"].append(timed(dist_checkpointing.save, state, str(folder)))
            times["manifest_s"].append(timed(integrity.write_manifest, folder))
            times["verify_s"].append(timed(integrity.verify_manifest, folder))
            template = runtime.checkpoint_state(model, optimizer, scheduler, loading=True)
            times["load_s"].append(timed(dist_checkpointing.load, template, str(folder)))
            size_bytes = sum(p.stat().st_size for p in folder.iterdir())
            shutil.rmtree(folder)
    row = {k: statistics.median(v) for k, v in times.items()}
    parameters = sum(p.numel() for p in runtime.unwrap(model[0]).parameters())
    return dict(size=size, parameters=parameters, checkpoint_bytes=size_bytes, **row,
                save_overhead=row["manifest_s"] / row["save_s"],
                load_overhead=row["verify_s"] / row["load_s"], samples=times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["30m"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/integrity.json"))
    options = parser.parse_args()
    from stag_plugin.compat.cpu import quiet_known_warnings

    quiet_known_warnings()
    rows = [measure(size, options.repeats) for size in options.sizes]
    print("| size | parameters | checkpoint MB | save s | + manifest s | load s | + verify s "
          "| save overhead | load overhead |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['size']} | {r['parameters']:,} | {r['checkpoint_bytes'] / 2**20:.0f} | "
              f"{r['save_s']:.2f} | {r['manifest_s']:.2f} | {r['load_s']:.2f} | "
              f"{r['verify_s']:.2f} | {100 * r['save_overhead']:.1f}% | "
              f"{100 * r['load_overhead']:.1f}% |")
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
