"""Per-token decode latency of StagFormer against a plain GPT of the same depth (CPU or GPU).

    python bench/decode_latency.py --size 30m --out bench/results/decode_30m.json
    python bench/decode_latency.py --size 100m --contexts 128 512 1024
    python bench/decode_latency.py --size tiny --contexts 64 --steps 8 --repeats 1   # smoke

For each context length c (batch 1): prefill a random prompt of c - 1 tokens, then decode
`--steps` tokens after `--warmup` untimed ones; report the median per-token latency, tokens/s,
prefill time and cache bytes (self / cross). Variants, same hidden size, all in one process using
every core (`torch.get_num_threads()`), timed in alternation (round-robin over variants and
repeats) so that machine drift hits all of them alike:

    gpt-L             plain GPT, L layers (the baseline; p = 1 through the same engine)
    gpt-L/2           plain GPT, L/2 layers (the ideal a 2-section StagFormer can approach)
    stag-sep-seq      StagFormer 2 x L/2, separate weights, sections one after another
    stag-shared-seq   StagFormer 2 x L/2, shared weights, sequential
    stag-shared-bat   shared weights, both sections of a step as one batch-2 forward
    stag-recurrent    shared weights, one pass per token over its own earlier outputs
    stag-sep-pipe     separate weights, one section per pipeline rank (2 processes launched with
                      torchrun, one thread each): both sections run at once every step
    gpt-L-tp2         plain GPT, L layers, tensor parallel over 2 ranks (2 processes, one
                      thread each): the baseline's own use of a second core

The headline column is each variant's latency ratio to gpt-L (speed-up = gpt-L / variant).
Weights are random: latency does not depend on them. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

SIZES = {  # hidden, heads, total layers L (StagFormer: 2 sections of L/2)
    "tiny": dict(hidden=64, heads=4, layers=4, vocab=512),
    "30m": dict(hidden=512, heads=8, layers=8, vocab=8192),
    "100m": dict(hidden=768, heads=12, layers=12, vocab=8192),
}
VARIANTS = ("gpt-L", "gpt-L/2", "stag-sep-seq", "stag-shared-seq", "stag-shared-bat",
            "stag-recurrent", "stag-sep-pipe", "gpt-L-tp2")
PIPELINE = "stag-sep-pipe"
TENSOR_PARALLEL = "gpt-L-tp2"
DISTRIBUTED = {  # launched on 2 ranks under torchrun, one thread each
    PIPELINE: dict(tensor=1, pipeline=2),
    TENSOR_PARALLEL: dict(tensor=2, pipeline=1),
}


def build(variant: str, size: dict, max_len: int, pipeline: int = 1, tensor: int = 1):
    from megatron.core import parallel_state

    from stag_plugin.core.config import StagFormerConfig
    from stag_plugin.core.model import StagGPTModel

    layers = size["layers"]
    sections, sharing, mode = {
        PIPELINE: (2, "separate", "pipeline"),
        "gpt-L": (1, "separate", "sequential"),
        TENSOR_PARALLEL: (1, "separate", "sequential"),
        "gpt-L/2": (1, "separate", "sequential"),
        "stag-sep-seq": (2, "separate", "sequential"),
        "stag-shared-seq": (2, "shared", "sequential"),
        "stag-shared-bat": (2, "shared", "batched"),
        "stag-recurrent": (2, "shared", "recurrent"),
    }[variant]
    if variant == "gpt-L/2":
        layers //= 2
    config = StagFormerConfig(
        num_layers=layers, hidden_size=size["hidden"], num_attention_heads=size["heads"],
        num_sections=sections, weight_sharing=sharing, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, pipeline_model_parallel_size=pipeline,
        tensor_model_parallel_size=tensor)
    torch.manual_seed(0)
    model = StagGPTModel(config, vocab_size=size["vocab"], max_sequence_length=max_len,
                         pre_process=parallel_state.is_pipeline_first_stage(),
                         post_process=parallel_state.is_pipeline_last_stage()).eval()
    # parameters of the whole model held here (a tensor-parallel shard counts tensor times)
    params = sum(p.numel() * (tensor if getattr(p, "tensor_model_parallel", False) else 1)
                 for p in {id(p): p for p in model.parameters()}.values())
    return model, mode, params


def measure(decoder, context: int, steps: int, warmup: int, vocab: int, seed: int) -> dict:
    """Prefill, then greedy steps; a step's time includes choosing the next token (and, in
    pipeline mode, sharing it from the last rank), as in a real decode loop."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, context - warmup - steps), generator=generator)
    start = time.perf_counter()
    token = next_token(decoder, decoder.prefill(prompt))
    prefill = time.perf_counter() - start
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        token = next_token(decoder, decoder.step(token))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if decoder.mode == "pipeline":
        decoder.finish()
    return {"prefill_s": prefill, "step_s": times}


def next_token(decoder, logits):
    if decoder.mode != "pipeline":
        return logits.argmax(-1)
    from megatron.core import parallel_state

    token = (logits.argmax(-1) if logits is not None else torch.zeros(1, dtype=torch.int64))
    torch.distributed.broadcast(token, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    return token


def distributed_worker(args) -> None:
    """Under torchrun (2 ranks): the distributed variant `args.worker` for every context; the
    last rank writes its timings (JSON) to args.worker_out."""
    from megatron.core import parallel_state

    from stag_plugin.decode import make_decoder
    from stag_plugin.training import runtime

    torch.set_num_threads(1)
    layout = DISTRIBUTED[args.worker]
    runtime.setup_distributed(layout["tensor"], layout["pipeline"], timeout_minutes=10)
    model, mode, params = build(args.worker, SIZES[args.size], max(args.contexts), **layout)
    out = {}
    for context in args.contexts:
        decoder = make_decoder(model, 1, context, mode=mode)
        got = measure(decoder, context, args.steps, args.warmup, SIZES[args.size]["vocab"],
                      seed=args.seed)
        out[context] = dict(got, cache=decoder.cache_bytes())
    if layout["pipeline"] > 1:  # both stages' parameters
        params_all = torch.tensor([params])
        torch.distributed.all_reduce(params_all)
        params = int(params_all)
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        args.worker_out.write_text(json.dumps({"parameters": params, "runs": out}))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def run_distributed(args, variant: str, repeat: int) -> dict:
    """Launch a distributed variant on 2 processes; returns its JSON report."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "worker.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", __file__, "--worker", variant, "--worker-out",
               str(result), "--seed", str(repeat), "--size", args.size, "--steps",
               str(args.steps), "--warmup", str(args.warmup),
               "--contexts", *map(str, args.contexts)]
        subprocess.run(cmd, check=True, timeout=3600,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        data = json.loads(result.read_text())
    return data


def run(args) -> dict:
    from stag_plugin.compat import megatron as compat
    from stag_plugin.decode import make_decoder

    compat.initialize_single_process()
    size = SIZES[args.size]
    max_len = max(args.contexts)
    local = [v for v in args.variants if v not in DISTRIBUTED]
    models = {v: build(v, size, max_len) for v in local}
    results = {v: {c: {"prefill_s": [], "step_s": []} for c in args.contexts}
               for v in args.variants}
    cache = {}
    for repeat in range(args.repeats):
        for variant in (v for v in args.variants if v in DISTRIBUTED):
            data = run_distributed(args, variant, repeat)
            models[variant] = (None, "pipeline" if variant == PIPELINE else "sequential",
                               data["parameters"])
            for context in args.contexts:
                got = data["runs"][str(context)]
                results[variant][context]["prefill_s"].append(got["prefill_s"])
                results[variant][context]["step_s"] += got["step_s"]
                cache[(variant, context)] = got["cache"]
                print(f"  repeat {repeat + 1}/{args.repeats} context {context:>5} {variant:<16} "
                      f"{statistics.median(got['step_s']) * 1e3:8.2f} ms/token",
                      file=sys.stderr, flush=True)
        for context in args.contexts:
            for variant in local:  # alternate: drift affects every variant alike
                model, mode, _ = models[variant]
                decoder = make_decoder(model, 1, context, mode=mode)
                got = measure(decoder, context, args.steps, args.warmup, size["vocab"],
                              seed=repeat)
                results[variant][context]["prefill_s"].append(got["prefill_s"])
                results[variant][context]["step_s"] += got["step_s"]
                cache[(variant, context)] = decoder.cache_bytes()
                print(f"  repeat {repeat + 1}/{args.repeats} context {context:>5} {variant:<16} "
                      f"{statistics.median(got['step_s']) * 1e3:8.2f} ms/token",
                      file=sys.stderr, flush=True)
    return summarize(args, size, models, results, cache)


def summarize(args, size, models, results, cache) -> dict:
    rows = []
    for context in args.contexts:
        base = statistics.median(results["gpt-L"][context]["step_s"]) if "gpt-L" in results \
            else None
        for variant in args.variants:
            step = statistics.median(results[variant][context]["step_s"])
            rows.append(dict(
                variant=variant, context=context, parameters=models[variant][2],
                mode=models[variant][1], ms_per_token=step * 1e3, tokens_per_s=1.0 / step,
                prefill_ms=statistics.median(results[variant][context]["prefill_s"]) * 1e3,
                cache_self_bytes=cache[(variant, context)]["self"],
                cache_cross_bytes=cache[(variant, context)]["cross"],
                speedup_vs_gpt_L=(base / step) if base else None))
    return {"size": args.size, "shape": size, "threads": torch.get_num_threads(),
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "machine": machine(), "rows": rows}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def table(report: dict) -> str:
    head = (f"{'variant':<16} {'ctx':>5} {'params':>10} {'ms/token':>9} {'tok/s':>7} "
            f"{'prefill ms':>10} {'self KB':>9} {'cross KB':>9} {'speed-up':>8}")
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        speed = f"{r['speedup_vs_gpt_L']:.2f}x" if r["speedup_vs_gpt_L"] else "-"
        lines.append(f"{r['variant']:<16} {r['context']:>5} {r['parameters']:>10,} "
                     f"{r['ms_per_token']:>9.2f} {r['tokens_per_s']:>7.1f} "
                     f"{r['prefill_ms']:>10.1f} {r['cache_self_bytes'] / 1024:>9.0f} "
                     f"{r['cache_cross_bytes'] / 1024:>9.0f} {speed:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="30m")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per repeat")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="JSON report")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=sorted(DISTRIBUTED), default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.contexts) <= args.steps + args.warmup:
        parser.error("each context must exceed --steps + --warmup (the prompt is the rest)")
    from stag_plugin.compat.cpu import quiet_known_warnings

    quiet_known_warnings()
    if args.worker is not None:
        distributed_worker(args)
        return 0
    report = run(args)
    print(table(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
