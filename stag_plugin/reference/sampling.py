"""Sampling and the generate loop shared by every decoder. Plain PyTorch, no Megatron import.

    Sampler(temperature, top_k, top_p, seed)(logits [b, vocab]) -> token ids [b]
    generate_tokens(decoder, prompt [b, s], max_new_tokens, sampler, stop_tokens)
        the one decode loop, a generator: prefill -> choose -> step -> choose -> ... yielding
        each position's ids until every sequence hit a stop token
    generate(...)   the same, collected into one list of new tokens per sequence

A decoder is anything with the three methods of `Decoder` (stag_plugin.decode's StagDecoder and
PipelineDecoder, stag_plugin.reference.decode.ReferenceDecoder). Where the ranks of a parallel
decoder must agree on the next token, the decoder passes a `next_tokens(logits) -> ids [b]` hook
that samples on one rank and shares the choice (pipeline mode: logits exist on the last stage only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Protocol, Tuple

import torch
from torch import Tensor

from stag_plugin.errors import StagError


@dataclass
class Sampler:
    """Next-token choice from logits [b, vocab], outside the model.

    temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) restricted to the
    top_k most likely tokens and to the smallest set whose probability reaches top_p.
    `seed` makes sampling reproducible (a torch.Generator owned by the sampler).
    """

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None

    def __post_init__(self):
        if self.temperature < 0:
            raise StagError(f"temperature {self.temperature} is negative",
                            "pass a temperature >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise StagError(f"top_k {self.top_k} keeps no token", "pass top_k >= 1, or none")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise StagError(f"top_p {self.top_p} is outside (0, 1]",
                            "pass a top_p in (0, 1], or none")
        self.generator = None
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def greedy(self) -> bool:
        """True when the choice is a deterministic function of the logits (argmax)."""
        return self.temperature == 0.0

    def __call__(self, logits: Tensor) -> Tensor:
        """logits [b, vocab] -> token ids [b] (int64, on the logits' device)."""
        if self.greedy:
            return logits.argmax(dim=-1)
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            scores = _top_p_filter(scores, self.top_p)
        probs = scores.softmax(dim=-1).cpu()  # sampled on the CPU: one generator everywhere
        tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        return tokens.to(logits.device)


def _top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of highest-probability tokens whose mass reaches top_p."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - sorted_scores.softmax(dim=-1) >= top_p  # mass before this token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def stop_sets(stop_tokens, batch: int) -> List[set]:
    """None, token ids for every sequence, or one collection per sequence -> one set each."""
    if stop_tokens is None:
        return [set() for _ in range(batch)]
    stop_tokens = list(stop_tokens)
    if all(isinstance(s, int) for s in stop_tokens):
        return [set(stop_tokens) for _ in range(batch)]
    if len(stop_tokens) != batch:
        raise StagError(f"stop_tokens: give token ids for every sequence, or one collection "
                         f"per sequence ({batch}); got {len(stop_tokens)} collections", f""
                         f"pass a list of {batch} collections, or one flat list of ids")
    return [set(s) for s in stop_tokens]


def check_mode(mode: str, weight_sharing: str, num_sections: int) -> None:
    """The rules every decoder shares: recurrent decoding needs shared section weights and a
    cross-attention to read its own outputs through (p >= 2). Batched decoding takes either
    weight sharing (separate weights run stacked)."""
    if mode == "recurrent" and weight_sharing != "shared":
        raise StagError(f"mode={mode!r} needs shared section weights (weight_sharing="
                        f"'shared'); this model has weight_sharing={weight_sharing!r}",
                        "use mode='batched' or 'sequential'")
    if mode == "recurrent" and num_sections < 2:
        raise StagError("mode='recurrent' needs num_sections >= 2 (the pass reads its own "
                         "outputs through the cross-attention of sections 2..p)", "use "
                         "mode='sequential'")


class Decoder(Protocol):
    """What `generate` needs from a decoder."""

    def prefill(self, input_ids: Tensor) -> Optional[Tensor]:
        """Prompt [b, s] -> logits [b, vocab] at its last position (None on ranks that make
        no logits)."""

    def step(self, input_ids: Tensor) -> Optional[Tensor]:
        """One token per sequence [b] -> logits [b, vocab] of the next position."""

    def check_room(self, length: int, what: str) -> None:
        """Raise ValueError (naming the fix) if `length` positions do not fit the caches."""


@torch.no_grad()
def generate_tokens(decoder: Decoder, prompt_ids: Tensor, max_new_tokens: int,
                    sampler: Optional[Sampler] = None, stop_tokens=None,
                    next_tokens: Optional[Callable[[Optional[Tensor]], Tensor]] = None
                    ) -> Iterator[Tuple[Tensor, List[bool]]]:
    """The one decode loop: prefill the prompts [b, s], then choose a token per sequence and
    feed it back, one position at a time. Yields (ids [b], growing): the chosen ids, and which
    sequences they extend (a sequence stops growing after emitting one of its stop tokens).
    Ends when every sequence has stopped or `max_new_tokens` positions were produced; a
    consumer may stop earlier (break), and nothing more is computed.

    sampler: the choice of each token (None = greedy). stop_tokens: None, token ids for every
    sequence, or one collection per sequence. next_tokens: logits -> ids [b], default the
    sampler itself (parallel decoders pass one that makes the choice on one rank)."""
    batch, length = prompt_ids.shape
    if max_new_tokens < 1:
        raise StagError(f"max_new_tokens={max_new_tokens} must be >= 1",
                        "ask for at least one token")
    # n new tokens feed n - 1 of them back: prompt + n - 1 positions
    decoder.check_room(length + max_new_tokens - 1, "prompt + max_new_tokens - 1")
    choose = next_tokens or sampler or Sampler()
    stops = stop_sets(stop_tokens, batch)
    growing = [True] * batch
    logits = decoder.prefill(prompt_ids)
    for n in range(max_new_tokens):
        ids = choose(logits)  # [b]
        yield ids, list(growing)
        growing = [alive and token not in stop
                   for alive, token, stop in zip(growing, ids.tolist(), stops)]
        if not any(growing) or n == max_new_tokens - 1:
            return
        logits = decoder.step(ids)


def generate(decoder: Decoder, prompt_ids: Tensor, max_new_tokens: int,
             sampler: Optional[Sampler] = None, stop_tokens=None,
             next_tokens: Optional[Callable[[Optional[Tensor]], Tensor]] = None
             ) -> List[List[int]]:
    """The new tokens of each prompt of `prompt_ids` [b, s] (`generate_tokens` collected): a
    sequence ends after its stop token (kept in its list) while the others go on."""
    tokens: List[List[int]] = [[] for _ in range(prompt_ids.shape[0])]
    for ids, growing in generate_tokens(decoder, prompt_ids, max_new_tokens, sampler,
                                        stop_tokens, next_tokens):
        for sequence, token, alive in zip(tokens, ids.tolist(), growing):
            if alive:
                sequence.append(token)
    return tokens
