"""A few optimizer steps lower the loss on a small synthetic task, for every variant, and the
StagFormer-specific parameters (cross-attention, null memory, combination) receive gradients."""

import pytest
import torch

from stag_testing import VOCAB, build_model, tiny_config

VARIANTS = {
    "gpt-p1": dict(num_sections=1),
    "separate-p2": dict(num_sections=2),
    "shared-p2": dict(num_sections=2, weight_sharing="shared"),
    "separate-p3-window3-learned": dict(num_sections=3, cross_attention_window=3,
                                        output_combination="learned"),
    "shared-p3-window1-learned": dict(num_sections=3, weight_sharing="shared",
                                      cross_attention_window=1, output_combination="learned"),
}


def synthetic_batch(batch=8, seq_len=24, seed=0):
    """Each sequence counts up from a random start with a random stride: learnable in context."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (batch, 1), generator=g)
    stride = torch.randint(1, 4, (batch, 1), generator=g)
    tokens = (start + stride * torch.arange(seq_len + 1)) % VOCAB
    positions = torch.arange(seq_len).expand(batch, seq_len)
    return tokens[:, :-1], positions, tokens[:, 1:]


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_optimizer_steps_lower_the_loss(variant):
    model = build_model(tiny_config(**variant), perturb=0.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    tokens, positions, labels = synthetic_batch()
    losses = []
    for step in range(30):
        optimizer.zero_grad()
        loss = model(tokens, positions, labels=labels).mean()
        loss.backward()
        if step == 0:
            assert_stagformer_parameters_learn(model)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def assert_stagformer_parameters_learn(model):
    cfg = model.config
    if cfg.num_sections == 1:
        return
    assert model.null_memory.grad.abs().sum() > 0
    for k in range(1, cfg.num_sections):
        kv = model.sections[k].layers[0].cross_attention.linear_kv.weight
        assert kv.grad is not None and kv.grad.abs().sum() > 0, f"section {k}"
    if cfg.output_combination == "learned":
        assert (model.combination_weights.grad != 0).all()
