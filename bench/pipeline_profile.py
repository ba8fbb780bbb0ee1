"""Where a pipeline-mode decode step spends its time, per rank (run under torchrun, 2 ranks).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 bench/pipeline_profile.py --size 30m

Each rank reports the median of: its `step` (receive the previous section's last output, run
its section on the new token, send its output on) and the token exchange after it (the last
rank chooses the next token and broadcasts it; the others wait for it). Compare with one
section run alone on one thread: `OMP_NUM_THREADS=1 python bench/decode_latency.py --variants
gpt-L/2 stag-sep-seq ...`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_latency as bench  # noqa: E402


def timed_steps(decoder, token, steps: int, warmup: int):
    step_s, share_s = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits = decoder.step(token)
        t1 = time.perf_counter()
        token = bench.next_token(decoder, logits)
        t2 = time.perf_counter()
        if i >= warmup:
            step_s.append(t1 - t0)
            share_s.append(t2 - t1)
    decoder.finish()
    return statistics.median(step_s) * 1e3, statistics.median(share_s) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(bench.SIZES), default="30m")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=8)
    args = parser.parse_args()
    from stag_plugin.compat.cpu import quiet_known_warnings
    from stag_plugin.decode.pipeline import PipelineDecoder
    from stag_plugin.training import runtime

    quiet_known_warnings()
    torch.set_num_threads(1)
    runtime.setup_distributed(1, 2, timeout_minutes=10)
    rank = torch.distributed.get_rank()
    model, _, _ = bench.build(bench.PIPELINE, bench.SIZES[args.size], args.context, pipeline=2)
    decoder = PipelineDecoder(model, 1, args.context)
    prompt = torch.randint(0, bench.SIZES[args.size]["vocab"],
                           (1, args.context - args.steps - args.warmup - 1),
                           generator=torch.Generator().manual_seed(0))
    token = bench.next_token(decoder, decoder.prefill(prompt))
    step_ms, share_ms = timed_steps(decoder, token, args.steps, args.warmup)
    print(f"rank {rank}: step {step_ms:.2f} ms | token exchange {share_ms:.2f} ms | "
          f"per token {step_ms + share_ms:.2f} ms", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
