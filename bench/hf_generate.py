"""Tokens/s of the Hugging Face class's generate() with and without its KV cache, against
stag_plugin's ReferenceDecoder on the same inference folder (random weights, CPU).

    python bench/hf_generate.py --out bench/results/hf_generate.json
    python bench/hf_generate.py --threads 2 --new-tokens 32 128 --rounds 5

The folder is written by stag_plugin.convert.inference_folder.save_inference_folder and loaded
with AutoModelForCausalLM.from_pretrained(trust_remote_code=True), as a user loads it. The three
methods decode the same prompt greedily and are timed in alternation (medians over rounds).
Prints a table and writes JSON.
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

import torch


def build_methods(args):
    from transformers import AutoModelForCausalLM

    from stag_plugin.convert.inference_folder import save_inference_folder
    from stag_plugin.reference.decode import ReferenceDecoder
    from stag_plugin.reference.model import ReferenceConfig, StagFormer

    cfg = ReferenceConfig(vocab_size=args.vocab, max_sequence_length=1024,
                          num_layers=args.layers, hidden_size=args.hidden,
                          num_attention_heads=args.heads, num_query_groups=args.heads,
                          ffn_hidden_size=4 * args.hidden, head_dim=args.hidden // args.heads,
                          num_sections=2)
    torch.manual_seed(0)
    reference = StagFormer(cfg).eval()
    folder = save_inference_folder(Path(tempfile.mkdtemp()) / "folder", cfg,
                                   reference.state_dict())
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt))
    decoder = ReferenceDecoder(reference, 1, args.prompt + max(args.new_tokens))

    def hf(use_cache):
        return lambda n: model.generate(prompt, do_sample=False, max_new_tokens=n,
                                        min_new_tokens=n, use_cache=use_cache)

    return {"generate(use_cache=False)": hf(False), "generate(use_cache=True)": hf(True),
            "ReferenceDecoder": lambda n: decoder.generate(prompt, n)}


def measure(methods: dict, new_tokens: int, rounds: int) -> dict:
    times = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():  # in alternation: drift hits every method alike
            start = time.perf_counter()
            fn(new_tokens)
            times[name].append(time.perf_counter() - start)
    return {name: new_tokens / statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8, help="total (2 sections)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = build_methods(args)
    for fn in methods.values():
        fn(4)  # warm-up
    rows = [dict(new_tokens=n, method=name, tokens_per_s=rate)
            for n in args.new_tokens for name, rate in measure(methods, n, args.rounds).items()]
    print(f"{'new tokens':>10}  {'method':<27} {'tok/s':>8}")
    for r in rows:
        print(f"{r['new_tokens']:>10}  {r['method']:<27} {r['tokens_per_s']:>8.1f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"arguments": vars(args) | {"out": str(args.out)},
                                        "machine": platform.platform(),
                                        "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
