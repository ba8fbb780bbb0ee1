"""The CPU compatibility layer under parallel training: Megatron's own GPTModel (local layer spec,
SDPA core attention), trained 3 optimizer steps with Megatron DDP, `get_megatron_optimizer` and
`get_forward_backward_func`, in two real processes over gloo, reproduces one process:

- PP = 2, non-interleaved 1F1B, 4 micro-batches, tied embeddings, non-distributed Adam:
  the PP = 1 micro-batch losses, gradient norms and first-step gradients;
- DP = 2, distributed optimizer: the DP = 1 losses (same global batch) and gradient norms.

Both layouts run in one spawn of 2 processes (model parallel state torn down in between); the
references run in this process. All runs start from the same full (PP = 1) weights.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

import pytest
import torch
import torch.multiprocessing as mp

from stag_plugin.compat import megatron as compat
from stag_plugin.compat.cpu import apply_cpu_compat, check_cpu_pipeline_options
from stag_plugin.core.attention import SDPAttention

VOCAB, SEQ, MICRO, MICRO_BATCHES, STEPS = 128, 16, 2, 4, 3
LOSS_ATOL = 1e-5  # fp32, same weights: only the summation order differs
GRAD_TOL = dict(atol=1e-6, rtol=1e-5)
WORLD = 2
DEADLINE_S = 900  # the host can be very slow; a dead worker still ends the test (see spawn_run)


# --------------------------------------------------------------------------- model and training


def gpt_config(pipeline: int = 1):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=4, hidden_size=32, num_attention_heads=2, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, pipeline_model_parallel_size=pipeline,
        pipeline_dtype=torch.float32)


def gpt_model(config, pre_process: bool = True, post_process: bool = True):
    """Megatron's GPTModel with its local layer spec; only the core attention is SDPA."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec()
    attention = spec.submodules.self_attention
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, self_attention=dataclasses.replace(
            attention, submodules=dataclasses.replace(attention.submodules,
                                                      core_attention=SDPAttention))))
    return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                    position_embedding_type="learned_absolute",
                    share_embeddings_and_output_weights=True,
                    pre_process=pre_process, post_process=post_process)


def global_name(local: str, layer_offset: int, post_process_only: bool) -> str:
    """A stage's parameter name in the full (PP = 1) model: layer indices shifted by the stage's
    offset; a later stage's copy of the tied output weight is the word embedding."""
    if local == "output_layer.weight" and post_process_only:
        return "embedding.word_embeddings.weight"
    return re.sub(r"^decoder\.layers\.(\d+)\.",
                  lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", local)


def micro_batches(step: int) -> list[dict]:
    """The global batch of `step`: MICRO_BATCHES micro-batches of [MICRO, SEQ] tokens."""
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCHES, MICRO, SEQ + 1), generator=generator)
    positions = torch.arange(SEQ).expand(MICRO, SEQ)
    return [dict(tokens=t[:, :-1], labels=t[:, 1:], positions=positions) for t in tokens]


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["positions"], None, labels=batch["labels"])
    return output, mean_loss  # output: per-token loss [b, s] on the last stage, else hidden


def mean_loss(per_token_loss):
    loss = per_token_loss.float().mean()
    return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place


def train(init_state: dict, distributed_optimizer: bool, dp_rank: int = 0, dp_size: int = 1):
    """STEPS optimizer steps of the current parallel layout; returns losses, grad norms, the
    first step's gradients and the final parameters, keyed by full-model names."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pipeline = ps.get_pipeline_model_parallel_world_size()
    stage = ps.get_pipeline_model_parallel_rank()
    config = gpt_config(pipeline)
    pre, post = stage == 0, stage == pipeline - 1
    model = gpt_model(config, pre, post)
    names = {n: global_name(n, stage * config.num_layers // pipeline, post and not pre)
             for n, _ in model.named_parameters()}
    with torch.no_grad():
        for local, param in model.named_parameters():
            param.copy_(init_state[names[local]])
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer),
        model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-2, clip_grad=1.0, params_dtype=torch.float32,
        use_distributed_optimizer=distributed_optimizer), [ddp])
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    config.grad_scale_func = optimizer.scale_loss

    result = dict(losses=[], grad_norms=[], grads={})
    share = MICRO_BATCHES // dp_size
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        batches = micro_batches(step)[dp_rank * share:(dp_rank + 1) * share]
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp],
            num_microbatches=share, seq_length=SEQ, micro_batch_size=MICRO, forward_only=False)
        if step == 0:
            result["grads"] = {names[n]: p.main_grad.clone() for n, p in model.named_parameters()}
        succeeded, grad_norm, _ = optimizer.step()
        assert succeeded
        result["losses"].append([r["loss"].item() for r in reports])
        result["grad_norms"].append(float(grad_norm))
    result["params"] = {names[n]: p.detach().clone() for n, p in model.named_parameters()}
    return result


# --------------------------------------------------------------------------- the two processes


def layouts_worker(rank: int, state_path: str, out_dir: str) -> None:
    """Both layouts, one after the other, on this rank."""
    from megatron.core import parallel_state as ps

    apply_cpu_compat()
    init_state = torch.load(state_path)
    ps.initialize_model_parallel(pipeline_model_parallel_size=WORLD)
    pipeline = train(init_state, distributed_optimizer=False)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel()  # data parallel = WORLD
    data = train(init_state, distributed_optimizer=True, dp_rank=ps.get_data_parallel_rank(),
                 dp_size=ps.get_data_parallel_world_size())
    ps.destroy_model_parallel()
    torch.save(dict(pipeline=pipeline, data=data), f"{out_dir}/rank{rank}.pt")


def _entry(rank: int, port: int, state_path: str, out_dir: str) -> None:
    from stag_plugin.compat.cpu import quiet_known_warnings

    quiet_known_warnings()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the ranks share the machine's cores
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        layouts_worker(rank, state_path, out_dir)
    finally:
        torch.distributed.destroy_process_group()


def spawn_run(state_path: str, out_dir: str) -> None:
    """Run `_entry` on WORLD spawned processes; raise if one fails or the deadline passes.
    Whatever happens, no process outlives this call."""
    context = mp.start_processes(_entry, args=(compat.free_port(), state_path, out_dir),
                                 nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=5):  # raises when a worker fails
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=30)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """References in this process (PP = DP = 1), then both layouts on 2 processes."""
    from megatron.core import parallel_state as ps

    assert apply_cpu_compat()
    compat.initialize_single_process()
    torch.manual_seed(0)
    init_state = {n: p.detach().clone() for n, p in gpt_model(gpt_config()).named_parameters()}
    reference = dict(pipeline=train(init_state, distributed_optimizer=False),
                     data=train(init_state, distributed_optimizer=True))
    ps.destroy_model_parallel()
    out = tmp_path_factory.mktemp("compat_parallel")
    torch.save(init_state, out / "init.pt")
    spawn_run(str(out / "init.pt"), str(out))
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    return reference, ranks


# --------------------------------------------------------------------------- the checks


def assert_losses(got: list, expected: list, msg: str) -> None:
    assert len(got) == len(expected) == STEPS, msg
    for step, (g, e) in enumerate(zip(got, expected)):
        assert g == pytest.approx(e, abs=LOSS_ATOL), f"{msg}, step {step}"


def test_pp2_1f1b_matches_pp1(runs):
    reference, ranks = runs
    ref = reference["pipeline"]
    first, last = ranks[0]["pipeline"], ranks[1]["pipeline"]
    assert first["losses"] == [[]] * STEPS  # losses live on the last stage only
    assert_losses(last["losses"], ref["losses"], "PP=2 last stage")
    assert ref["losses"][-1] != pytest.approx(ref["losses"][0], abs=1e-3)  # the steps do train
    for stage in (first, last):  # the global norm (clipping) spans both stages
        assert stage["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    assert first["grads"].keys() | last["grads"].keys() == ref["grads"].keys()
    shared = first["grads"].keys() & last["grads"].keys()
    assert shared == {"embedding.word_embeddings.weight"}  # the tied weight, on both ends
    for stage in (first, last):
        for name, grad in stage["grads"].items():
            torch.testing.assert_close(grad, ref["grads"][name], **GRAD_TOL, msg=name)


def test_dp2_distributed_optimizer_matches_dp1(runs):
    reference, ranks = runs
    ref = reference["data"]
    share = MICRO_BATCHES // WORLD
    for rank, result in enumerate(ranks):
        expected = [step[rank * share:(rank + 1) * share] for step in ref["losses"]]
        assert_losses(result["data"]["losses"], expected, f"DP=2 rank {rank}")
        assert result["data"]["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    params = [r["data"]["params"] for r in ranks]
    assert params[0].keys() == ref["params"].keys()
    for name, value in params[0].items():  # the distributed optimizer's all-gather syncs them
        assert torch.equal(value, params[1][name]), name


# --------------------------------------------------------------------------- in-process checks


def test_interleaved_pipeline_with_batched_p2p_is_refused_on_cpu():
    base = dict(pipeline_model_parallel_size=2)
    refused = gpt_config_fields(virtual_pipeline_model_parallel_size=2, batch_p2p_comm=True,
                                **base)
    if torch.cuda.is_available():
        check_cpu_pipeline_options(refused)  # a no-op on a GPU
    else:
        with pytest.raises(ValueError, match="batch_p2p_comm=False"):
            check_cpu_pipeline_options(refused)
    for fine in (dict(virtual_pipeline_model_parallel_size=2, batch_p2p_comm=False, **base),
                 dict(batch_p2p_comm=True, **base), dict()):
        check_cpu_pipeline_options(gpt_config_fields(**fine))


def gpt_config_fields(**overrides):
    """A ModelParallelConfig with the pipeline fields the check reads."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(pipeline_dtype=torch.float32, **overrides)


def test_apply_cpu_compat_is_idempotent():
    from megatron.core.models.common.language_module import language_module
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.pipeline_parallel import p2p_communication

    assert apply_cpu_compat() is True
    view = p2p_communication.torch
    init = distrib_optimizer.DistributedOptimizer.__init__
    setup = language_module.LanguageModule.setup_embeddings_and_output_layer
    assert apply_cpu_compat() is True
    assert p2p_communication.torch is view and view.cuda.current_device() == "cpu"
    assert distrib_optimizer.DistributedOptimizer.__init__ is init  # not wrapped twice
    assert language_module.LanguageModule.setup_embeddings_and_output_layer is setup
    assert view.zeros(2, device="cuda").device.type == "cpu"
    assert torch.Tensor.type(torch.zeros(1)) == "torch.FloatTensor"  # restored outside calls
