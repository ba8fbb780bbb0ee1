"""KVCache: the key/value cache of one attention layer, for both decode engines (the Megatron
engine in stag_plugin.decode and the reference ReferenceDecoder). Plain PyTorch.

Rows are sequences, section-major when several sections share a cache: section k's b sequences
sit at rows k*b .. k*b+b-1, so the first p*b rows hold a batch of b for p sections and one
tensor slice reads them all (the batched decode mode).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


class KVCache:
    """Keys and values of one attention layer: k, v [rows, groups, size, head_dim].

    Position j is stored at index j % size: with fewer slots than positions (a cross-attention
    window) it is a ring holding the last `size` positions. Positions >= `limit` are never read;
    `update` (positions as ints) does not store them.

        update(rows, first, k, v)   positions first..first+n-1, any n (prefill)
        write(rows, index, k, v)    positions given as a tensor (fixed-shape decode steps)
        read(rows, count)           the first `count` entries
    """

    def __init__(self, rows: int, groups: int, size: int, head_dim: int, limit: int,
                 dtype: torch.dtype, device):
        shape = (rows, groups, size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.size, self.limit = size, limit

    def update(self, rows: slice, first: int, k: Tensor, v: Tensor) -> None:
        """Store positions first..first+n-1 of k, v [b, groups, n, d] in rows `rows`."""
        n = k.shape[2]
        start = max(first, first + n - self.size)  # only the last `size` positions fit
        stop = min(first + n, self.limit)
        if start >= stop:
            return
        index = torch.arange(start, stop, device=k.device) % self.size
        self.k[rows].index_copy_(2, index, k[:, :, start - first:stop - first])
        self.v[rows].index_copy_(2, index, v[:, :, start - first:stop - first])

    def write(self, rows: slice, index: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k, v [b, groups, n, d] at the positions index [n] (a tensor) in rows `rows`,
        in place at entries index % size. Nothing depends on the positions' values, so a
        compiled or graph-captured step can call it. Unlike `update` nothing is skipped: the
        positions must be distinct modulo size, and a position >= limit is stored too (over
        entry position % size, which the caller must then not read)."""
        entries = index % self.size
        self.k[rows].index_copy_(2, entries, k)
        self.v[rows].index_copy_(2, entries, v)

    def read(self, rows: slice, count: int) -> Tuple[Tensor, Tensor]:
        """The first `count` indices of rows `rows`: k, v [b, groups, count, d]."""
        return self.k[rows, :, :count], self.v[rows, :, :count]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
