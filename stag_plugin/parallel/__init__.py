"""Pipeline parallelism at the edge of the model.

    layout.py     which layers live on which pipeline stage and what crosses each boundary
                  (pure Python: no torch.distributed, no Megatron)
    pipeline.py   the communication that layout implies: boundary tensors, pipeline replicas
                  and their gradient sums

May import: megatron.core (parallel_state), torch. Never imports the model or anything above it.
"""

# megatron.core loads first, or fails with a clear error (a broken Transformer Engine):
from stag_plugin.compat import megatron as _guard  # noqa: F401,E402
