"""Per-token decode latency of StagFormer against a plain GPT of the same depth, held against the
machine's memory bandwidth (CPU or GPU).

    python bench/decode_latency.py --size 30m --out bench/results/decode_30m.json \\
        --plot docs/decode_latency_30m.png
    python bench/decode_latency.py --size 100m --contexts 128 512 1024 --batch-sizes 1
    python bench/decode_latency.py --size tiny --contexts 64 --steps 8 --repeats 1   # smoke
    python bench/decode_latency.py --engine reference --device cuda --size 1b \\
        --dtypes bf16 --backends graph compile+graph --batch-sizes 1 8 --contexts 1024 4096

For each dtype, batch size b and context length c: prefill random prompts [b, c - steps -
warmup], then decode `--warmup` untimed and `--steps` timed greedy tokens; report the median
per-token latency, tokens/s (b / latency), prefill time, the bytes a step reads (weights and
caches, below) and the achieved bandwidth as a fraction of this machine's copy bandwidth,
measured in the same run (a large tensor copy: bytes read + bytes written per second).

Variants (same hidden size; StagFormer = 2 sections of L/2 layers):

    gpt-L             plain GPT, L layers (the baseline: p = 1 through the same fused step as
                      the batched StagFormers, so every backend applies to it alike)
    gpt-L/2           plain GPT, L/2 layers (the ideal a 2-section StagFormer can approach)
    stag-sep-seq      separate weights, the sections one after another in each step
    stag-sep-bat      separate weights, stacked [2, ...]: both sections of a step as one batched
                      computation (the kernel count of one L/2-layer model)
    stag-shared-bat   shared weights, both sections of a step as one forward over 2b rows
    stag-recurrent    shared weights, one pass per token over its own earlier outputs
    stag-sep-pipe     separate weights, one section per pipeline rank (2 processes under
                      torchrun, one thread each; Megatron engine, CPU, eager, fp32 only)
    gpt-L-tp2         plain GPT, L layers, tensor parallel over 2 ranks (as stag-sep-pipe)

Step backends (`--backends`): `eager`; `compile` (torch.compile of the fixed-shape step);
`graph` (the step captured as a CUDA graph; CUDA only); `compile+graph`. A variant whose mode
does not take a backend is skipped with the decoder's reason. Engines (`--engine`): `megatron`
(StagDecoder / PipelineDecoder on a StagGPTModel) or `reference` (ReferenceDecoder on the plain
PyTorch model; no Megatron import, so it runs where megatron-core is not installed).

Bytes read per step (the least a step must move): every weight it multiplies by once per pass
over it (shared weights decoded sequentially are read p times; the embedding table only as the
tied output head), plus the self-attention K/V of every section that runs and the
cross-attention memory K/V of its cross-attending sections (the caches are sized to the
context, so a step at the end of the context reads all of them). `bw %` = those bytes per
second / copy bandwidth: how close the variant comes to the limit of a weight-bound step.

Within each setting (backend, dtype, batch, context) every variant's decoder is built once (a
compiled step compiles once, untimed: the first `--warmup` steps), then the variants are timed in
alternation, `--repeats` rounds, so that machine drift hits all of them alike (prefill runs
eagerly in every backend). Weights are random: latency does not depend on them. Prints a table,
writes JSON (--out) and a plot of latency against context (--plot, PNG).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

SIZES = {  # hidden, heads, total layers L (StagFormer: 2 sections of L/2), vocabulary
    "tiny": dict(hidden=64, heads=4, layers=4, vocab=512),
    "30m": dict(hidden=512, heads=8, layers=8, vocab=8192),
    "100m": dict(hidden=768, heads=12, layers=12, vocab=8192),
    "350m": dict(hidden=1024, heads=16, layers=24, vocab=32768),
    "1b": dict(hidden=2048, heads=16, layers=24, vocab=32768),
}
VARIANT_SHAPES = {  # sections, weight sharing, decode mode, layers (fraction of L)
    "gpt-L": (1, "separate", "batched", 1),  # p = 1: the same fused step as the StagFormers
    "gpt-L/2": (1, "separate", "batched", 2),
    "stag-sep-seq": (2, "separate", "sequential", 1),
    "stag-sep-bat": (2, "separate", "batched", 1),
    "stag-shared-bat": (2, "shared", "batched", 1),
    "stag-recurrent": (2, "shared", "recurrent", 1),
    "stag-sep-pipe": (2, "separate", "pipeline", 1),
    "gpt-L-tp2": (1, "separate", "batched", 1),
}
VARIANTS = tuple(VARIANT_SHAPES)
DISTRIBUTED = {  # launched on 2 ranks under torchrun, one thread each
    "stag-sep-pipe": dict(tensor=1, pipeline=2),
    "gpt-L-tp2": dict(tensor=2, pipeline=1),
}
BACKENDS = {"eager": (False, False), "compile": (True, False), "graph": (False, True),
            "compile+graph": (True, True)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------- models


def build(engine: str, variant: str, size: dict, max_len: int, device: str,
          pipeline: int = 1, tensor: int = 1):
    """The variant's model (fp32, eval) and its decode mode."""
    sections, sharing, mode, fraction = VARIANT_SHAPES[variant]
    shape = dict(layers=size["layers"] // fraction, hidden=size["hidden"], heads=size["heads"],
                 vocab=size["vocab"], sections=sections, sharing=sharing, max_len=max_len)
    torch.manual_seed(0)
    if engine == "reference":
        with torch.device(device):  # initialised where it runs (fast for large sizes on GPU)
            model = build_reference(**shape)
    else:
        model = build_megatron(**shape, pipeline=pipeline, tensor=tensor)
    return model.to(device).eval(), mode


def build_reference(layers, hidden, heads, vocab, sections, sharing, max_len):
    from stag_plugin.reference.model import ReferenceConfig, StagFormer

    return StagFormer(ReferenceConfig(
        vocab_size=vocab, max_sequence_length=max_len, num_layers=layers, hidden_size=hidden,
        num_attention_heads=heads, num_query_groups=heads, ffn_hidden_size=4 * hidden,
        head_dim=hidden // heads, num_sections=sections, weight_sharing=sharing))


def build_megatron(layers, hidden, heads, vocab, sections, sharing, max_len, pipeline, tensor):
    from megatron.core import parallel_state

    from stag_plugin.core.config import StagFormerConfig
    from stag_plugin.core.model import StagGPTModel

    config = StagFormerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_sections=sections, weight_sharing=sharing, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, pipeline_model_parallel_size=pipeline,
        tensor_model_parallel_size=tensor)
    return StagGPTModel(config, vocab_size=vocab, max_sequence_length=max_len,
                        pre_process=parallel_state.is_pipeline_first_stage(),
                        post_process=parallel_state.is_pipeline_last_stage())


def make_decoder(engine: str, model, batch: int, max_len: int, mode: str, backend: str):
    compile_step, cuda_graph = BACKENDS[backend]
    options = {} if backend == "eager" else dict(compile=compile_step, cuda_graph=cuda_graph)
    if engine == "reference":
        from stag_plugin.reference.decode import ReferenceDecoder

        return ReferenceDecoder(model, batch, max_len, mode, **options)
    from stag_plugin.decode import make_decoder as megatron_decoder

    return megatron_decoder(model, batch, max_len, mode=mode, **options)


# ---------------------------------------------------------------------------- bytes per step


def weight_counts(model, tensor: int = 1) -> dict:
    """Parameters of the model (unique; a tensor-parallel shard counts `tensor` times), split
    into the body (what a pass multiplies by) and the head (vocabulary x hidden)."""
    unique = {id(p): (name, p) for name, p in model.named_parameters()}.values()
    total, tables = 0, 0
    for name, p in unique:
        count = p.numel() * (tensor if getattr(p, "tensor_model_parallel", False) else 1)
        total += count
        if p.dim() == 2 and any(key in name for key in ("word_embeddings", "tok_emb",
                                                         "position_embeddings", "pos_emb",
                                                         "output_layer", "lm_head")):
            tables += count
    return {"parameters": total, "body": total - tables}


def bytes_per_step(counts: dict, size: dict, variant: str, cache: dict,
                   element: int) -> dict:
    """The bytes one step reads: weights (body per pass, head once) and caches."""
    sections, sharing, mode, _ = VARIANT_SHAPES[variant]
    passes = sections if (sharing == "shared" and mode == "sequential") else 1
    head = size["vocab"] * size["hidden"]
    weights = (counts["body"] * passes + head) * element
    self_read, cross_read = cache["self"], cache["cross"]
    if mode == "recurrent":  # one pass: the last section's self cache, one cross memory
        self_read, cross_read = self_read // sections, cross_read // (sections - 1)
    return {"weights": weights, "caches": self_read + cross_read}


def copy_bandwidth(device: str, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes read + written per second by a large tensor copy on `device` (median)."""
    n = megabytes * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n * 4 / statistics.median(times[1:])


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- timing


def measure(decoder, batch: int, context: int, steps: int, warmup: int, vocab: int,
            seed: int, device: str) -> dict:
    """Prefill, then greedy steps; a step's time includes choosing the next tokens (and, in
    pipeline mode, sharing them from the last rank), as in a real decode loop."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, context - warmup - steps), generator=generator)
    sync(device)
    start = time.perf_counter()
    token = next_token(decoder, decoder.prefill(prompt.to(device)), batch)
    sync(device)
    prefill = time.perf_counter() - start
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        token = next_token(decoder, decoder.step(token), batch)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if getattr(decoder, "mode", None) == "pipeline":
        decoder.finish()
    return {"prefill_s": prefill, "step_s": times}


def next_token(decoder, logits, batch: int):
    if getattr(decoder, "mode", None) != "pipeline":
        return logits.argmax(-1)
    from megatron.core import parallel_state

    token = logits.argmax(-1) if logits is not None else torch.zeros(batch, dtype=torch.int64)
    torch.distributed.broadcast(token, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    return token


def settings(args):
    """Every (backend, dtype, batch, context) the run times in this process."""
    return itertools.product(args.backends, args.dtypes, args.batch_sizes, args.contexts)


def run_local(args, size: dict, results: dict, info: dict) -> None:
    """Setting after setting: a decoder per local variant (built once, so a compiled step
    compiles once), then `--repeats` rounds over the variants in alternation."""
    models = {}
    for backend, dtype, batch, context in settings(args):
        decoders = {}
        for variant in (v for v in args.variants if v not in DISTRIBUTED):
            if (variant, dtype) not in models:  # the same seeded weights, in this dtype
                model, mode = build(args.engine, variant, size, max(args.contexts), args.device)
                models[(variant, dtype)] = (model.to(DTYPES[dtype]), mode)
            model, mode = models[(variant, dtype)]
            key = (variant, backend, dtype, batch, context)
            try:
                decoders[variant] = make_decoder(args.engine, model, batch, context, mode,
                                                 backend)
            except Exception as err:  # a mode that does not take this backend: say why
                info[key] = {"skipped": f"{type(err).__name__}: {err}"}
                print(f"  skip {variant} {backend}: {err}", file=sys.stderr, flush=True)
                continue
            counts = weight_counts(model)
            info[key] = dict(counts, mode=mode, bytes=bytes_per_step(
                counts, size, variant, decoders[variant].cache_bytes(),
                DTYPES[dtype].itemsize))
        for repeat in range(args.repeats):
            for variant, decoder in decoders.items():
                key = (variant, backend, dtype, batch, context)
                got = measure(decoder, batch, context, args.steps, args.warmup, size["vocab"],
                              seed=repeat, device=args.device)
                slot = results.setdefault(key, {"prefill_s": [], "step_s": []})
                slot["prefill_s"].append(got["prefill_s"])
                slot["step_s"] += got["step_s"]
                print(f"  {variant:<16} {backend:<13} {dtype} b={batch:<3} ctx={context:<5} "
                      f"{statistics.median(got['step_s']) * 1e3:8.2f} ms/token",
                      file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- distributed


def distributed_worker(args) -> None:
    """Under torchrun (2 ranks): the distributed variant `args.worker` for every batch size and
    context (eager, fp32); the last rank writes its timings (JSON) to args.worker_out."""
    from megatron.core import parallel_state

    from stag_plugin.training import runtime

    torch.set_num_threads(1)
    layout = DISTRIBUTED[args.worker]
    runtime.setup_distributed(layout["tensor"], layout["pipeline"], timeout_minutes=10)
    size = SIZES[args.size]
    model, mode = build("megatron", args.worker, size, max(args.contexts), "cpu", **layout)
    counts = weight_counts(model, tensor=layout["tensor"])
    out = {}
    for batch in args.batch_sizes:
        for context in args.contexts:
            decoder = make_decoder("megatron", model, batch, context, mode, "eager")
            got = measure(decoder, batch, context, args.steps, args.warmup, size["vocab"],
                          seed=args.seed, device="cpu")
            out[f"{batch}/{context}"] = dict(got, cache=decoder.cache_bytes())
    if layout["pipeline"] > 1:  # both stages' parameters
        summed = torch.tensor([counts["parameters"], counts["body"]])
        torch.distributed.all_reduce(summed)
        counts = {"parameters": int(summed[0]), "body": int(summed[1])}
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        args.worker_out.write_text(json.dumps({"counts": counts, "mode": mode, "runs": out}))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def run_distributed(args, variant: str, repeat: int, size: dict, results: dict,
                    info: dict) -> None:
    """Launch a distributed variant on 2 processes and file its timings."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "worker.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", __file__, "--worker", variant, "--worker-out",
               str(result), "--seed", str(repeat), "--size", args.size, "--steps",
               str(args.steps), "--warmup", str(args.warmup),
               "--contexts", *map(str, args.contexts),
               "--batch-sizes", *map(str, args.batch_sizes)]
        subprocess.run(cmd, check=True, timeout=3600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        data = json.loads(result.read_text())
    for batch in args.batch_sizes:
        for context in args.contexts:
            got = data["runs"][f"{batch}/{context}"]
            key = (variant, "eager", "fp32", batch, context)
            slot = results.setdefault(key, {"prefill_s": [], "step_s": []})
            slot["prefill_s"].append(got["prefill_s"])
            slot["step_s"] += got["step_s"]
            info[key] = dict(data["counts"], mode=data["mode"], bytes=bytes_per_step(
                data["counts"], size, variant, got["cache"], 4))
            print(f"  {variant:<16} eager         fp32 b={batch:<3} ctx={context:<5} "
                  f"{statistics.median(got['step_s']) * 1e3:8.2f} ms/token",
                  file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- report


def run(args) -> dict:
    if args.engine == "megatron":
        from stag_plugin.compat import megatron as compat

        compat.initialize_single_process()
    size = SIZES[args.size]
    bandwidth = copy_bandwidth(args.device)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s", file=sys.stderr, flush=True)
    results, info = {}, {}
    for repeat in range(args.repeats):
        for variant in (v for v in args.variants if v in DISTRIBUTED):
            run_distributed(args, variant, repeat, size, results, info)
    run_local(args, size, results, info)
    return summarize(args, size, results, info, bandwidth)


def summarize(args, size: dict, results: dict, info: dict, bandwidth: float) -> dict:
    rows, skipped = [], []
    for key, got in results.items():
        variant, backend, dtype, batch, context = key
        step = statistics.median(got["step_s"])
        moved = info[key]["bytes"]
        rows.append(dict(
            variant=variant, backend=backend, dtype=dtype, batch=batch, context=context,
            mode=info[key]["mode"], parameters=info[key]["parameters"],
            ms_per_token=step * 1e3, tokens_per_s=batch / step,
            prefill_ms=statistics.median(got["prefill_s"]) * 1e3,
            weight_bytes=moved["weights"], cache_bytes=moved["caches"],
            bandwidth_gb_s=(moved["weights"] + moved["caches"]) / step / 1e9,
            bandwidth_fraction=(moved["weights"] + moved["caches"]) / step / bandwidth))
    for key, value in info.items():
        if "skipped" in value:
            skipped.append(dict(zip(("variant", "backend", "dtype", "batch", "context"), key),
                                reason=value["skipped"]))
    base = {(r["backend"], r["dtype"], r["batch"], r["context"]): r["ms_per_token"]
            for r in rows if r["variant"] == "gpt-L"}
    for r in rows:  # against gpt-L with the same backend, dtype, batch and context
        same = base.get((r["backend"], r["dtype"], r["batch"], r["context"]))
        r["speedup_vs_gpt_L"] = same / r["ms_per_token"] if same else None
    order = {v: i for i, v in enumerate(VARIANTS)}
    rows.sort(key=lambda r: (r["dtype"], r["batch"], r["context"], list(BACKENDS).index(
        r["backend"]), order[r["variant"]]))
    return {"size": args.size, "shape": size, "engine": args.engine, "device": args.device,
            "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
            "repeats": args.repeats, "copy_bandwidth_gb_s": bandwidth / 1e9,
            "machine": machine(), "rows": rows, "skipped": skipped}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def table(report: dict) -> str:
    head = (f"{'variant':<16} {'backend':<13} {'dtype':<5} {'b':>3} {'ctx':>5} "
            f"{'params':>11} {'ms/token':>9} {'tok/s':>8} {'prefill ms':>10} "
            f"{'weights MB':>10} {'cache MB':>9} {'GB/s':>6} {'bw %':>5} {'speed-up':>8}")
    lines = [f"copy bandwidth {report['copy_bandwidth_gb_s']:.1f} GB/s", head, "-" * len(head)]
    for r in report["rows"]:
        speed = f"{r['speedup_vs_gpt_L']:.2f}x" if r["speedup_vs_gpt_L"] else "-"
        lines.append(
            f"{r['variant']:<16} {r['backend']:<13} {r['dtype']:<5} {r['batch']:>3} "
            f"{r['context']:>5} {r['parameters']:>11,} {r['ms_per_token']:>9.2f} "
            f"{r['tokens_per_s']:>8.1f} {r['prefill_ms']:>10.1f} "
            f"{r['weight_bytes'] / 1e6:>10.1f} {r['cache_bytes'] / 1e6:>9.1f} "
            f"{r['bandwidth_gb_s']:>6.1f} {100 * r['bandwidth_fraction']:>5.1f} {speed:>8}")
    for s in report["skipped"]:
        lines.append(f"skipped: {s['variant']} {s['backend']} {s['dtype']}: {s['reason']}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """ms/token against context, one line per variant and backend; a panel per dtype (rows)
    and batch size (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in report["rows"]})
    batches = sorted({r["batch"] for r in report["rows"]})
    fig, axes = plt.subplots(len(dtypes), len(batches), squeeze=False,
                             figsize=(4.5 * len(batches) + 2, 3.6 * len(dtypes)))
    for (i, dtype), (j, batch) in itertools.product(enumerate(dtypes), enumerate(batches)):
        ax, lines = axes[i][j], {}
        for r in report["rows"]:
            if (r["dtype"], r["batch"]) == (dtype, batch):
                lines.setdefault(f"{r['variant']} ({r['backend']})", []).append(
                    (r["context"], r["ms_per_token"]))
        for label, points in sorted(lines.items()):
            points.sort()
            ax.plot([c for c, _ in points], [m for _, m in points], marker="o", label=label)
        ax.set(title=f"{report['size']} {dtype}, batch {batch}", xlabel="context (tokens)",
               ylabel="ms per decode step", xscale="log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="30m")
    parser.add_argument("--engine", choices=("megatron", "reference"), default="megatron")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS),
                        default=["eager", "compile"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per repeat")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON report")
    parser.add_argument("--plot", type=Path, default=None, help="PNG: latency against context")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=sorted(DISTRIBUTED), default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    if args.engine == "megatron":
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
    if args.plot is not None:
        try:
            plot(report, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
        except ImportError:  # a bare GPU machine: the JSON and the table are the results
            print(f"not written: {args.plot} (matplotlib is not installed)", file=sys.stderr)
    return 0


def check_arguments(parser, args) -> None:
    if min(args.contexts) <= args.steps + args.warmup:
        parser.error("each context must exceed --steps + --warmup (the prompt is the rest)")
    distributed = [v for v in args.variants if v in DISTRIBUTED]
    if distributed and (args.engine != "megatron" or args.device != "cpu"):
        parser.error(f"{distributed} run on 2 CPU processes with the Megatron engine: leave "
                     "them out of --variants, or use --engine megatron --device cpu")
    if any("graph" in b for b in args.backends) and not args.device.startswith("cuda"):
        parser.error("the graph backends capture CUDA graphs: use --device cuda, or "
                     "--backends eager compile")


if __name__ == "__main__":
    sys.exit(main())
