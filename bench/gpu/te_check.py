"""The Transformer Engine backend on a GPU: logits and training against the local backend, bf16
and FP8. One command, one process, one GPU:

    python bench/gpu/te_check.py --out bench/results/te_check.json
    python bench/gpu/te_check.py --size tiny --steps 4          # a smoke run (also on a CPU)

For each variant (a 2-section StagFormer with separate weights, with shared weights, and with a
cross-attention window) the local-backend model is built first; every other row of the variant
starts from its weights, read into the Transformer Engine layout through the name map
(stag_plugin.reference.name_map.local_key: TE's fused norms under the local norms' names). Rows:

    local-bf16     the local backend (torch norms, SDPA): the baseline, always run
    te-bf16        Transformer Engine layers: logits against local-bf16 on the same weights and
                   input, the decoder (StagDecoder prefill + steps) against its own forward
    te-fp8         TE with FP8 GEMMs (--fp8-format hybrid, delayed scaling), attention bf16
    te-fp8-attn    the same with FP8 attention (fp8_dot_product_attention); with a cross-attention
                   window on a GPU below compute capability 10.0 the cross-attention keeps bf16
                   attention (one FP8AttentionWarning, recorded in the row)

Each row trains `--steps` AdamW steps on one fixed batch (bf16 parameters) and records the losses
and the median step time. Checks (each row's "checks", all in "ok"):

    logits      te-bf16 against local-bf16 on the same weights, at most NOISE_FACTOR times as far
                apart as local-bf16 lies from the same model in fp32 (bf16's own error), plus
                1e-3 of the largest logit
    decode      te-bf16's StagDecoder against its own forward, within the same bound
    final_loss  within LOSS_TOLERANCE[bf16 | fp8] of local-bf16's final loss (relative)
    loss_fell   the last loss below the first

The bounds are first estimates (bf16 kernels that differ: fused norm + GEMM, flash or cuDNN
attention; FP8); a failed check prints and the exit status is 1.

Without Transformer Engine the TE rows are skipped (with the reason) and the local rows run: the
reduced form. Without FP8 support (compute capability below 8.9) the FP8 rows are skipped.
Writes JSON (--out) and prints one line per row.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

SIZES = {  # head dim 128 (FP8 attention trains at 128); dims multiples of 16 (FP8 GEMMs)
    "tiny": dict(hidden=256, heads=2, layers=4, vocab=512, seq=64, batch=2),
    "small": dict(hidden=1024, heads=8, layers=8, vocab=32768, seq=1024, batch=8),
}
VARIANTS = {
    "separate": dict(weight_sharing="separate"),
    "shared": dict(weight_sharing="shared"),
    "window": dict(weight_sharing="separate", cross_attention_window=16),
}
ROWS = ("local-bf16", "te-bf16", "te-fp8", "te-fp8-attn")
NOISE_FACTOR = 4  # bf16 logits may differ this many times bf16's own error (see above)
LOSS_TOLERANCE = {"bf16": 0.02, "fp8": 0.05}  # |final loss - local-bf16's| / local-bf16's


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                        default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args(argv)
    device = start(options.seed)
    report = {"environment": environment(), "size": options.size, "steps": options.steps,
              "tolerances": {"noise_factor": NOISE_FACTOR, "loss": LOSS_TOLERANCE},
              "rows": []}
    for variant in options.variants:
        report["rows"] += check_variant(variant, SIZES[options.size], options, device)
    report["ok"] = all(row.get("ok", True) for row in report["rows"])
    for row in report["rows"]:
        print(summary(row), flush=True)
    if options.out is not None:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["ok"] else 1


def start(seed: int) -> torch.device:
    """One process: Megatron's parallel state (size 1) and its model-parallel RNG."""
    from stag_plugin.compat import megatron as compat

    compat.initialize_single_process()
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
        return torch.device("cuda", torch.cuda.current_device())
    from stag_plugin.compat.cpu import seed_model_parallel_rng

    seed_model_parallel_rng(seed)
    return torch.device("cpu")


def environment() -> dict:
    from stag_plugin.compat import megatron as compat

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "megatron_core": _version("megatron.core"),
           "transformer_engine": _version("transformer_engine")
           if compat.transformer_engine_available() else None,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "capability": compat.cuda_capability(),
           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    return env


def _version(module: str):
    import importlib

    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except ImportError:
        return None


# ---------------------------------------------------------------------------- one variant


def check_variant(variant: str, size: dict, options, device) -> list:
    batch = fixed_batch(size, options.seed, device)
    local = build(variant, size, device, row="local-bf16")
    initial = {k: v.detach().clone() for k, v in local.state_dict().items()
               if isinstance(v, torch.Tensor)}  # (the local layers' extra state is None)
    rows = [train_row(local, "local-bf16", variant, batch, options.steps)]
    baseline = rows[0]
    for name in ROWS[1:]:
        skipped = skip_reason(name)
        if skipped:
            rows.append({"row": name, "variant": variant, "skipped": skipped})
            continue
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            model = build(variant, size, device, row=name)
        load_local_weights(model, initial)
        row = {"row": name, "variant": variant,
               "warnings": [str(w.message) for w in said if "FP8" in str(w.message)]}
        if name == "te-bf16":
            bound = bf16_bound(initial, variant, size, device, batch)
            row["checks"] = {"logits": logits_check(model, bound, batch),
                             "decode": decode_check(model, bound["bound"], batch)}
        row.update(train_row(model, name, variant, batch, options.steps))
        row["checks"] = {**row.get("checks", {}), **loss_checks(row, baseline)}
        row["ok"] = all(check["ok"] for check in row["checks"].values())
        rows.append(row)
    baseline["checks"] = {"loss_fell": fell(baseline)}
    baseline["ok"] = baseline["checks"]["loss_fell"]["ok"]
    step_time_ratios(rows)
    return rows


def step_time_ratios(rows: list) -> None:
    """Each timed row's step time over local-bf16's and (FP8 rows) over te-bf16's."""
    timed = {row["row"]: row["step_ms"] for row in rows if "step_ms" in row}
    for row in rows:
        if "step_ms" not in row:
            continue
        row["step_time_vs_local_bf16"] = row["step_ms"] / timed["local-bf16"]
        if "fp8" in row["row"] and "te-bf16" in timed:
            row["step_time_vs_te_bf16"] = row["step_ms"] / timed["te-bf16"]


def skip_reason(row: str):
    from stag_plugin.compat import megatron as compat

    if not compat.transformer_engine_available():
        return "Transformer Engine is not installed (the reduced form: local rows only)"
    capability = compat.cuda_capability()
    if "fp8" in row and (capability is None or tuple(capability) < (8, 9)):
        return f"compute capability {capability} has no FP8 (8.9 or newer)"
    return None


def build(variant: str, size: dict, device, row: str, dtype=torch.bfloat16):
    from stag_plugin import StagFormerConfig, StagGPTModel

    fp8 = {"local-bf16": {}, "te-bf16": {},
           "te-fp8": dict(fp8="hybrid", fp8_recipe="delayed"),
           "te-fp8-attn": dict(fp8="hybrid", fp8_recipe="delayed",
                               fp8_dot_product_attention=True)}[row]
    config = StagFormerConfig(
        num_layers=size["layers"], hidden_size=size["hidden"],
        num_attention_heads=size["heads"], num_sections=2, hidden_dropout=0.0,
        attention_dropout=0.0, bf16=dtype == torch.bfloat16, params_dtype=dtype,
        transformer_impl="local" if row == "local-bf16" else "transformer_engine",
        use_cpu_initialization=device.type == "cpu", **VARIANTS[variant], **fp8)
    torch.manual_seed(0)
    model = StagGPTModel(config, vocab_size=size["vocab"], max_sequence_length=size["seq"],
                         share_embeddings_and_output_weights=True)
    return model.to(device)


def local_with(initial: dict, variant: str, size: dict, device, dtype=torch.bfloat16):
    model = build(variant, size, device, row="local-bf16", dtype=dtype)
    load_local_weights(model, initial)
    return model.eval()


def load_local_weights(model, initial: dict) -> None:
    """The local model's initial weights into `model` (either layout): each key read under its
    local name; Transformer Engine's own `_extra_state` (FP8 metadata) kept."""
    from stag_plugin.reference.name_map import local_key

    own = model.state_dict()
    model.load_state_dict({key: value if key.endswith("_extra_state")
                           else initial[local_key(key)].to(own[key].device, own[key].dtype)
                           for key, value in own.items()})


def fixed_batch(size: dict, seed: int, device) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, size["vocab"], (size["batch"], size["seq"] + 1),
                           generator=generator)
    positions = torch.arange(size["seq"]).expand(size["batch"], size["seq"])
    return {"tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device),
            "positions": positions.to(device)}


# ---------------------------------------------------------------------------- measurements


def train_row(model, name: str, variant: str, batch: dict, steps: int) -> dict:
    """`steps` AdamW steps on `batch`: the losses and the median step time (after 3)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    losses, times = [], []
    for _ in range(steps):
        synchronize()
        begin = time.perf_counter()
        model.set_is_first_microbatch()  # TE's FP8 weight cache: refresh once per step
        loss = model(batch["tokens"], batch["positions"], labels=batch["labels"]).float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize()
        times.append(time.perf_counter() - begin)
        losses.append(loss.item())
    model.eval()
    timed = times[3:] or times
    return {"row": name, "variant": variant, "losses": losses,
            "step_ms": 1e3 * statistics.median(timed)}


def bf16_bound(initial: dict, variant: str, size: dict, device, batch: dict) -> dict:
    """local-bf16's logits, and how far bf16 logits may differ from them: NOISE_FACTOR times
    local-bf16's distance from the same model in fp32, plus 1e-3 of the largest logit."""
    with torch.no_grad():
        bf16 = local_with(initial, variant, size, device)(batch["tokens"], batch["positions"])
        fp32 = local_with(initial, variant, size, device, torch.float32)(
            batch["tokens"], batch["positions"])
    noise = (bf16.float() - fp32).abs().max().item()
    return {"local_bf16": bf16.float(), "bf16_noise": noise,
            "bound": NOISE_FACTOR * noise + 1e-3 * fp32.abs().max().item()}


def logits_check(te_model, bound: dict, batch: dict) -> dict:
    with torch.no_grad():
        te = te_model(batch["tokens"], batch["positions"]).float()
    diff = (te - bound["local_bf16"]).abs().max().item()
    return {"max_abs_diff": diff, "bf16_noise": bound["bf16_noise"], "bound": bound["bound"],
            "ok": diff <= bound["bound"]}


def decode_check(model, bound: float, batch: dict, prompt: int = 8, steps: int = 8) -> dict:
    """StagDecoder (prefill + steps, TE modules under the same project-query / project-memory
    steps) against the model's own teacher-forced forward."""
    from stag_plugin.decode.engine import StagDecoder

    tokens = batch["tokens"][:1, :prompt + steps]
    positions = batch["positions"][:1, :prompt + steps]
    with torch.no_grad():
        expected = model(tokens, positions).float()[0]  # [s, vocab]
        decoder = StagDecoder(model, 1, prompt + steps)
        got = [decoder.prefill(tokens[:, :prompt]).float()[0]]
        for t in range(prompt, prompt + steps):
            got.append(decoder.step(tokens[:, t]).float()[0])
    diff = (torch.stack(got) - expected[prompt - 1:]).abs().max().item()
    return {"max_abs_diff": diff, "bound": bound, "ok": diff <= bound}


def loss_checks(row: dict, baseline: dict) -> dict:
    kind = "fp8" if "fp8" in row["row"] else "bf16"
    final, reference = row["losses"][-1], baseline["losses"][-1]
    relative = abs(final - reference) / abs(reference)
    return {"loss_fell": fell(row),
            "final_loss_vs_local_bf16": {"relative": relative,
                                         "ok": relative < LOSS_TOLERANCE[kind]}}


def fell(row: dict) -> dict:
    return {"first": row["losses"][0], "last": row["losses"][-1],
            "ok": row["losses"][-1] < row["losses"][0]}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summary(row: dict) -> str:
    head = f"{row['variant']:>9} {row['row']:<12}"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    checks = ", ".join(f"{name} {'ok' if c['ok'] else 'FAILED'}"
                       for name, c in row.get("checks", {}).items())
    versus = row.get("step_time_vs_te_bf16", row["step_time_vs_local_bf16"])
    against = "te-bf16" if "step_time_vs_te_bf16" in row else "local-bf16"
    return (f"{head} loss {row['losses'][0]:.4f} -> {row['losses'][-1]:.4f}  "
            f"{row['step_ms']:.1f} ms/step ({versus:.2f} x {against})  {checks}")


if __name__ == "__main__":
    sys.exit(main())
