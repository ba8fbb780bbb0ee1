"""Tensor parallel = 2 in two real processes over gloo reproduces tensor parallel = 1:
same logits, same loss, same gradients, with the same weights."""

import pytest
import torch

from distributed import run_workers
from stag_testing import build_model, fresh_seed, random_tokens, tiny_config

TP = 2
VARIANTS = [
    dict(num_sections=2, num_query_groups=2, gated_linear_unit=True),
    dict(num_sections=3, weight_sharing="shared", cross_attention_window=2,
         output_combination="learned"),
]


def partition_dim(param):
    """The dimension Megatron splits a tensor-parallel parameter along, None if replicated."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def shard(name: str, full: torch.Tensor, dim, rank: int, gated: bool):
    """This rank's slice of a full (TP = 1) tensor split along `dim` (None: replicated)."""
    if dim is None:
        return full
    if gated and ".mlp.linear_fc1." in name:  # rows are [gate | up]; each rank holds both halves
        return torch.cat([half.chunk(TP, dim)[rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(TP, dim)[rank]


def tp_worker(rank, overrides, inputs_path, out_dir):
    from megatron.core import parallel_state

    from stag_plugin import StagGPTModel

    from stag_testing import MAX_LEN, VOCAB

    inputs = torch.load(inputs_path)
    config = tiny_config(tensor_model_parallel_size=TP, **overrides)
    model = StagGPTModel(config, vocab_size=VOCAB, max_sequence_length=MAX_LEN)
    with torch.no_grad():
        for name, param in model.named_parameters(remove_duplicate=False):
            param.copy_(shard(name, inputs["state"][name], partition_dim(param), rank,
                              config.gated_linear_unit))
    tokens, positions = inputs["tokens"], inputs["positions"]
    logits = model(tokens, positions)  # [b, s, vocab / tp]
    group = parallel_state.get_tensor_model_parallel_group()
    pieces = [torch.empty_like(logits) for _ in range(TP)]
    torch.distributed.all_gather(pieces, logits.contiguous(), group=group)
    loss = model(tokens, positions, labels=tokens)
    loss.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    dims = {n: partition_dim(p) for n, p in model.named_parameters()}
    torch.save(dict(logits=torch.cat(pieces, dim=-1), loss=loss.detach(), grads=grads, dims=dims),
               f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("overrides", VARIANTS, ids=["separate-gqa-glu", "shared-p3-window"])
def test_tp2_matches_tp1(overrides, tmp_path):
    seed = fresh_seed()
    model = build_model(tiny_config(**overrides), seed=seed % 1000).train()
    tokens, positions = random_tokens(2, 12, seed)
    logits = model(tokens, positions).detach()
    loss = model(tokens, positions, labels=tokens)
    loss.sum().backward()
    state = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
    torch.save(dict(state=state, tokens=tokens, positions=positions), tmp_path / "inputs.pt")

    run_workers(tp_worker, world_size=TP, tensor_parallel=TP,
                args=(overrides, str(tmp_path / "inputs.pt"), str(tmp_path)))

    gated = overrides.get("gated_linear_unit", False)
    full_params = dict(model.named_parameters())
    for rank in range(TP):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        msg = f"seed {seed}, rank {rank}"
        assert (result["logits"] - logits).abs().max().item() < 1e-5, msg
        assert (result["loss"] - loss.detach()).abs().max().item() < 1e-5, msg
        assert result["grads"].keys() == full_params.keys()
        for name, grad in result["grads"].items():
            param = full_params[name]
            expected = shard(name, param.grad, result["dims"][name], rank, gated)
            assert (grad - expected).abs().max().item() < 1e-4, f"{msg}: grad of {name}"

