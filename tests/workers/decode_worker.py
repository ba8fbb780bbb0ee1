"""Pipeline-mode decoding on the ranks torchrun launched (tests/test_inference_pipeline.py).

    python -m torch.distributed.run --nproc-per-node P decode_worker.py CASES OUT

CASES (torch.save'd by the test): a list of dicts with `config` (tiny_config overrides, without
the pipeline size), `tied` (tied LM head), `state` (the state_dict of the one-process model),
`tokens` [b, n], `prompt` (prefill length) and `generate` (prompt length, new tokens). Each rank
builds its stage of the model with pipeline size = world size, loads its entries of `state` by
their global names (`StagGPTModel.checkpoint_key`), then decodes in mode "pipeline":
prefill + one step per remaining token, and greedy generation. Rank r writes OUT/rank{r}.pt:
per case the logits (last stage; None elsewhere) and the generated tokens.
"""

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main(argv) -> None:
    cases_path, out = Path(argv[0]), Path(argv[1])
    torch.set_num_threads(1)  # the ranks share the machine's cores
    from megatron.core import parallel_state

    from stag_plugin.compat.cpu import quiet_known_warnings
    from stag_plugin.core.model import StagGPTModel
    from stag_plugin.decode.pipeline import PipelineDecoder
    from stag_plugin.reference.sampling import Sampler
    from stag_plugin.training import runtime

    from stag_testing import MAX_LEN, VOCAB, tiny_config

    quiet_known_warnings()
    world = int(__import__("os").environ["WORLD_SIZE"])
    runtime.setup_distributed(1, world, timeout_minutes=2)
    rank = torch.distributed.get_rank()
    results = []
    try:
        for case in torch.load(cases_path, weights_only=False):
            config = tiny_config(pipeline_model_parallel_size=world, **case["config"])
            model = StagGPTModel(config, vocab_size=VOCAB, max_sequence_length=MAX_LEN,
                                 pre_process=parallel_state.is_pipeline_first_stage(),
                                 post_process=parallel_state.is_pipeline_last_stage(),
                                 share_embeddings_and_output_weights=case["tied"])
            full = case["state"]
            model.load_state_dict({name: full[model.checkpoint_key(name, owner=False)]
                                   for name in model.state_dict()})
            decoder = PipelineDecoder(model, max_batch_size=2, max_sequence_length=16)
            tokens, prompt = case["tokens"], case["prompt"]
            logits = [decoder.prefill(tokens[:, :prompt])]
            for t in range(prompt, tokens.shape[1]):
                logits.append(decoder.step(tokens[:, t]))
            decoder.finish()
            last = parallel_state.is_pipeline_last_stage()
            if not last:
                assert all(x is None for x in logits), "only the last stage returns logits"
            length, new = case["generate"]
            generated = decoder.generate(tokens[:, :length], new, Sampler())
            results.append(dict(logits=torch.stack(logits, dim=1) if last else None,
                                generated=generated))
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
