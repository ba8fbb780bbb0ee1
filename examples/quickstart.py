"""Quick start: build StagFormers and a plain GPT with Megatron-Core, check one against the
plain-PyTorch reference, and train each for a few steps on a synthetic in-context task.

    python examples/quickstart.py [--steps 60]

This is a usage example on synthetic data, not the main job (that trains on a real corpus).
"""

import argparse
import time
import warnings

import torch

warnings.filterwarnings("ignore", module=r"megatron\.")  # Megatron's deprecation chatter

from stag_plugin import StagFormerConfig, StagGPTModel  # noqa: E402
from stag_plugin.reference.model import ReferenceConfig, StagFormer  # noqa: E402
from stag_plugin.reference.name_map import megatron_to_reference  # noqa: E402

VOCAB, SEQ, BATCH = 128, 64, 8

VARIANTS = {
    "GPT, 4 layers (baseline)": dict(num_layers=4, num_sections=1),
    "StagFormer 2x2, separate": dict(num_layers=4, num_sections=2),
    "StagFormer 2x2, shared": dict(num_layers=4, num_sections=2, weight_sharing="shared"),
    "StagFormer 2x2, window 8": dict(num_layers=4, num_sections=2, cross_attention_window=8),
}


def counting_batch(generator):
    """Sequences counting up from a random start with a random stride (mod VOCAB)."""
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=generator)
    stride = torch.randint(1, 5, (BATCH, 1), generator=generator)
    tokens = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    return tokens[:, :-1], torch.arange(SEQ).expand(BATCH, SEQ), tokens[:, 1:]


def build(options) -> StagGPTModel:
    torch.manual_seed(0)
    config = StagFormerConfig(hidden_size=128, num_attention_heads=4, hidden_dropout=0.0,
                              attention_dropout=0.0, **options)
    return StagGPTModel(config, vocab_size=VOCAB, max_sequence_length=SEQ)


def check_against_reference(model: StagGPTModel) -> float:
    cfg = ReferenceConfig.from_megatron(model.config, VOCAB, SEQ)
    reference = StagFormer(cfg).eval()
    reference.load_state_dict(megatron_to_reference(model.state_dict(), cfg))
    tokens, positions, _ = counting_batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (model.eval()(tokens, positions) - reference(tokens)).abs().max().item()


def train(model: StagGPTModel, steps: int) -> tuple[float, float, float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(2)
    start, first = time.perf_counter(), None
    for _ in range(steps):
        tokens, positions, labels = counting_batch(generator)
        loss = model(tokens, positions, labels=labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    return first, loss.item(), steps * BATCH * SEQ / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    print(f"{'model':28s} {'params':>8s} {'vs reference':>13s} {'loss start':>11s} "
          f"{'loss end':>9s} {'tokens/s':>9s}")
    for name, options in VARIANTS.items():
        model = build(options)
        params = sum(p.numel() for p in model.parameters())
        diff = check_against_reference(model)
        first, last, speed = train(model, args.steps)
        print(f"{name:28s} {params:8d} {diff:13.1e} {first:11.3f} {last:9.3f} {speed:9.0f}")


if __name__ == "__main__":
    main()
