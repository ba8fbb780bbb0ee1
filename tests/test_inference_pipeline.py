"""StagDecoder mode "pipeline": one section per pipeline stage, point-to-point at the edges.

Real processes (torchrun, gloo) decode a 2-section model (2 x 2 layers, hidden 32) built with
pipeline size 2, and a 3-section model on 3 stages, from the weights of a one-process model: the
last stage's logits of prefill + steps equal sequential-mode decoding of the one-process model
(max abs diff < 1e-4) and greedy generation gives the same tokens on every rank. The refusals run
in this process.
"""

import os
import sys
import types
from pathlib import Path

import pytest
import torch

from stag_plugin.compat.megatron import free_port
from stag_plugin.decode.engine import Sampler, StagDecoder
from stag_plugin.decode.pipeline import PipelineDecoder

from distributed import run_command
from stag_testing import (
    build_model,
    fp32_bound,
    fp64_decode,
    fresh_seed,
    random_tokens,
    tiny_config,
)

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "decode_worker.py"
DEADLINE = 600  # seconds; a quiet host needs ~20 per launch
TINY = dict(num_sections=2, hidden_size=32, num_attention_heads=4)
CASES = [  # (config overrides, tied head, prompt length)
    (dict(), True, 5),
    (dict(weight_sharing="shared", cross_attention_window=2,
          position_embedding_type="learned_absolute", cross_attention_rope=False), False, 1),
]
LENGTH, GENERATE = 12, (4, 8)  # tokens decoded; (prompt length, new tokens) for generate


def sequential(model, tokens, prompt):
    decoder = StagDecoder(model, max_batch_size=2, max_sequence_length=16, mode="sequential")
    logits = [decoder.prefill(tokens[:, :prompt])]
    for t in range(prompt, tokens.shape[1]):
        logits.append(decoder.step(tokens[:, t]))
    length, new = GENERATE
    return torch.stack(logits, dim=1), decoder.generate(tokens[:, :length], new, Sampler())


def run_pipeline(cases_spec, stages, tmp_path):
    """Decode every (overrides, tied, prompt) case on `stages` torchrun processes and in one
    process; compare the last stage's logits and every rank's greedy tokens."""
    seed = fresh_seed()
    cases, expected = [], []
    for i, (overrides, tied, prompt) in enumerate(cases_spec):
        config = dict(TINY, **overrides)
        model = build_model(tiny_config(**config), perturb=0.5, seed=seed % 1000 + i,
                            share_embeddings_and_output_weights=tied)
        tokens, _ = random_tokens(2, LENGTH, seed + i)
        cases.append(dict(config=config, tied=tied, state=model.state_dict(),
                          tokens=tokens, prompt=prompt, generate=GENERATE))
        with torch.no_grad():
            logits, generated = sequential(model, tokens, prompt)
            bound = fp32_bound(logits, fp64_decode(model, tokens, prompt))
        expected.append((logits, generated, bound))
    torch.save(cases, tmp_path / "cases.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(stages),
           "--master-port", str(free_port()), str(WORKER), str(tmp_path / "cases.pt"),
           str(tmp_path)]
    code, output = run_command(cmd, timeout=DEADLINE, cwd=REPO,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert code == 0, output[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(stages)]
    for i, (logits, generated, bound) in enumerate(expected):
        assert all(ranks[r][i]["logits"] is None for r in range(stages - 1))
        diff = (ranks[-1][i]["logits"] - logits).abs().max().item()
        print(f"case {i}: pipeline vs sequential logits, max abs diff {diff:.1e}")
        assert diff < bound, f"seed {seed}, case {i}: max abs diff {diff} (bound {bound})"
        for r in range(stages):
            assert ranks[r][i]["generated"] == generated, f"seed {seed}, case {i}, rank {r}"


def test_pipeline_decode_on_two_stages_matches_one_process(tmp_path):
    run_pipeline(CASES, 2, tmp_path)


def test_pipeline_decode_on_three_stages_matches_one_process(tmp_path):
    """A middle stage both receives its memory slots and sends the next section's; no biases
    (the K/V projections sent at setup are weights only)."""
    run_pipeline([(dict(num_sections=3, num_query_groups=2, normalization="RMSNorm",
                        add_bias_linear=False), True, 3)], 3, tmp_path)


def _stub(**overrides):
    """A stand-in model: the refusals read only the config."""
    return types.SimpleNamespace(config=tiny_config(**overrides), max_sequence_length=64)


def test_pipeline_mode_refuses_a_single_stage_model():
    model = build_model(tiny_config(num_sections=2))
    with pytest.raises(ValueError, match="single pipeline stage.*use StagDecoder"):
        PipelineDecoder(model, max_batch_size=1, max_sequence_length=8)
    with pytest.raises(ValueError, match="Fix: build a PipelineDecoder"):
        StagDecoder(model, max_batch_size=1, max_sequence_length=8, mode="pipeline")


@pytest.mark.parametrize("overrides, message", [
    (dict(num_sections=2, pipeline_model_parallel_size=4),
     r"one whole section per pipeline stage.*pipeline_model_parallel_size=2"),
    (dict(num_sections=4, pipeline_model_parallel_size=2),
     r"one whole section per pipeline stage.*pipeline_model_parallel_size=4"),
    (dict(num_sections=2, pipeline_model_parallel_size=2, tensor_model_parallel_size=2),
     r"tensor_model_parallel_size=1"),
    (dict(num_sections=2, pipeline_model_parallel_size=2, output_combination="learned"),
     r"output_combination='last'"),
], ids=["stage-splits-sections", "stage-holds-two-sections", "tensor-parallel", "learned"])
def test_pipeline_mode_refuses_other_layouts(overrides, message):
    with pytest.raises(ValueError, match=message):
        PipelineDecoder(_stub(**overrides), max_batch_size=1, max_sequence_length=8)


def test_other_modes_still_refuse_a_pipelined_model():
    with pytest.raises(ValueError, match="every section on this process.*PipelineDecoder"):
        StagDecoder(_stub(num_sections=2, pipeline_model_parallel_size=2), max_batch_size=1,
                    max_sequence_length=8, mode="sequential")
