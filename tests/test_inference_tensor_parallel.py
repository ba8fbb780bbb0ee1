"""StagDecoder under tensor parallelism: two real gloo processes (tests/distributed.py) decode
the TP = 2 shards of a one-process model's weights. Every rank's logits (gathered to the full
vocabulary) equal one-process decoding of the same weights at the prefill and every step (fp32; max
abs diff below 2e-5 of the largest logit: TP changes the order of the fp32 sums, and the weights are
perturbed strongly, so logits reach ~20); greedy generation gives the same tokens; a random choice
(each rank's global RNG seeded differently) is the same on both ranks because it is made on the
first rank and broadcast. Mode batched runs the fused step (stacked shards of this rank,
row-parallel outputs all-reduced), also with separate weights and for a plain GPT (p = 1)."""

import torch
from test_tensor_parallel import TP, partition_dim, shard

from stag_plugin.decode.engine import Sampler, StagDecoder

from distributed import run_workers
from stag_testing import (
    build_model,
    fp32_bound,
    fp64_decode,
    fresh_seed,
    random_tokens,
    tiny_config,
    variant_id,
)

CASES = [  # (config overrides, modes, prompt length)
    (dict(num_sections=1), ("sequential", "batched"), 5),
    (dict(num_sections=2, weight_sharing="shared", num_query_groups=2, cross_attention_window=2,
          output_combination="learned"), ("batched", "sequential", "recurrent"), 1),
    (dict(num_sections=2, gated_linear_unit=True, num_query_groups=2), ("sequential", "batched"),
     4),
    (dict(num_sections=3, cross_attention_window=2, output_combination="learned"), ("batched",),
     3),
]
LENGTH, GENERATE = 10, (3, 6)  # tokens decoded; (prompt length, new tokens) for generate


def decode(decoder, tokens, prompt):
    """Logits [b, n, vocab] of prefill(tokens[:, :prompt]) and one step per later token, then
    greedy generation."""
    logits = [decoder.prefill(tokens[:, :prompt])]
    logits += [decoder.step(tokens[:, t]) for t in range(prompt, tokens.shape[1])]
    length, new = GENERATE
    return torch.stack(logits, dim=1), decoder.generate(tokens[:, :length], new, Sampler())


def tp_decode_worker(rank, cases_path, out_dir):
    from stag_plugin import StagGPTModel

    from stag_testing import MAX_LEN, VOCAB

    results = []
    for case in torch.load(cases_path):
        config = tiny_config(tensor_model_parallel_size=TP, **case["config"])
        model = StagGPTModel(config, vocab_size=VOCAB, max_sequence_length=MAX_LEN).eval()
        with torch.no_grad():
            for name, param in model.named_parameters(remove_duplicate=False):
                param.copy_(shard(name, case["state"][name], partition_dim(param), rank,
                                  config.gated_linear_unit))
        for mode in case["modes"]:
            decoder = StagDecoder(model, max_batch_size=2, max_sequence_length=16, mode=mode)
            logits, greedy = decode(decoder, case["tokens"], case["prompt"])
            torch.manual_seed(1000 + rank)  # ranks disagree unless the choice is shared
            sampled = decoder.generate(case["tokens"][:, :3], 6, Sampler(temperature=1.0))
            results.append(dict(logits=logits, greedy=greedy, sampled=sampled,
                                heads=decoder.caches.groups))
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_tp2_decode_matches_one_process(tmp_path):
    seed = fresh_seed()
    cases, expected = [], []
    for i, (overrides, modes, prompt) in enumerate(CASES):
        model = build_model(tiny_config(**overrides), perturb=0.5, seed=seed % 1000 + i)
        tokens, _ = random_tokens(2, LENGTH, seed + i)
        state = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
        cases.append(dict(config=overrides, modes=modes, state=state, tokens=tokens,
                          prompt=prompt))
        for mode in modes:
            with torch.no_grad():
                logits, greedy = decode(StagDecoder(model, 2, 16, mode=mode), tokens, prompt)
                exact = "recurrent" if mode == "recurrent" else "sequential"  # same logits
                bound = fp32_bound(logits, fp64_decode(model, tokens, prompt, exact))
            expected.append((variant_id(overrides), mode, model.config.num_query_groups,
                             (logits, greedy), bound))
    torch.save(cases, tmp_path / "cases.pt")
    run_workers(tp_decode_worker, world_size=TP, tensor_parallel=TP,
                args=(str(tmp_path / "cases.pt"), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(TP)]
    for j, (name, mode, groups, (logits, greedy), bound) in enumerate(expected):
        for rank, results in enumerate(ranks):
            got, msg = results[j], f"seed {seed}, {name}, mode {mode}, rank {rank}"
            assert got["heads"] == groups // TP, msg  # each rank caches its own groups
            diff = (got["logits"] - logits).abs().max().item()
            assert diff < bound, f"{msg}: max abs diff {diff} (bound {bound})"
            assert got["greedy"] == greedy, msg
        assert ranks[0][j]["sampled"] == ranks[1][j]["sampled"], f"seed {seed}, {name}, {mode}"
