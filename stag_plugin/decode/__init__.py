"""Staggered decoding of a Megatron StagGPTModel.

    layers.py     the layer math of prefill and of a step (self-attention over a cache, cross-
                  attention over cached memory slots, the MLP), on the model's own Megatron
                  submodules
    fused.py      the fused step: the layer weights stacked once ([p, ...], or [1, ...] when
                  shared) and several sections' passes of a token as one batched computation;
                  fixed shapes for torch.compile / CUDA graphs
    engine.py     StagDecoder: one process, any tensor-parallel size; modes sequential (layers),
                  batched and recurrent (fused)
    pipeline.py   PipelineDecoder: one section per pipeline rank, all sections at once

May import: megatron.core, stag_plugin.core, stag_plugin.compat, stag_plugin.reference (KV
cache, sampling). Never imports training, convert or the CLI.
"""

# megatron.core loads first, or fails with a clear error (a broken Transformer Engine):
from stag_plugin.compat import megatron as _guard  # noqa: F401,E402

MODES = ("sequential", "batched", "recurrent", "pipeline")


def make_decoder(model, max_batch_size: int, max_sequence_length: int,
                 mode: str = "sequential", **options):
    """The engine for `mode`: PipelineDecoder for "pipeline" (one section per pipeline rank;
    build it on every rank), else StagDecoder, given `options` (compile, cuda_graph, dtype)."""
    if mode == "pipeline":
        from stag_plugin.decode.pipeline import PipelineDecoder

        if options:
            from stag_plugin.errors import StagError

            raise StagError(f"PipelineDecoder takes no {sorted(options)}",
                            "decode with mode 'batched' for them, or drop them")
        return PipelineDecoder(model, max_batch_size, max_sequence_length)
    from stag_plugin.decode.engine import StagDecoder

    return StagDecoder(model, max_batch_size, max_sequence_length, mode, **options)
