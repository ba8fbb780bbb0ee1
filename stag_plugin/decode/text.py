"""Text in, text out: a prompt continued by any decoder (StagDecoder, ReferenceDecoder) through
the one token loop (stag_plugin.reference.sampling.generate_tokens), streamed as it is produced.
`stag generate` and the demo's samples both come through here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional

import torch

from stag_plugin.reference.sampling import Sampler, generate_tokens

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 byte sequence decodes to (held back)


@dataclass
class Generation:
    """What `continue_text` produced."""

    text: str
    token_ids: List[int]
    prompt_ids: List[int]
    stopped: Optional[str]  # "eod", "stop", or None (max_new_tokens / length reached)
    prefill_ms: float
    decode_tokens_per_s: float
    cache_bytes: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (f"[stag generate] {len(self.token_ids)} tokens | prefill {self.prefill_ms:.1f} ms "
                f"({len(self.prompt_ids)} prompt tokens) | decode "
                f"{self.decode_tokens_per_s:.1f} tokens/s | cache bytes self "
                f"{self.cache_bytes.get('self', 0)} / cross {self.cache_bytes.get('cross', 0)}"
                + (f" | stopped at {self.stopped}" if self.stopped else ""))


def continue_text(decoder, tokenizer, prompt_ids: List[int], max_new_tokens: int,
                  sampler: Optional[Sampler] = None, stop_ids: Iterable[int] = (),
                  stop_texts: Iterable[str] = (),
                  stream: Optional[Callable[[str], None]] = None) -> Generation:
    """Decode up to `max_new_tokens` tokens after `prompt_ids` (one sequence). The end-of-
    document token ends the text (not included); a token of `stop_ids`, or a text of
    `stop_texts` appearing in the output, ends it after that token. `stream(piece)` receives
    the text as it is produced; the pieces concatenate to the returned text."""
    sampler = sampler or Sampler()
    vocab = tokenizer.vocab_size  # logits beyond it are vocabulary padding
    choose = lambda logits: sampler(logits[:, :vocab])
    stops, stop_texts = set(stop_ids) | {tokenizer.eod}, list(stop_texts)
    streamer, ids, stopped = _Streamer(tokenizer, stream), [], None
    times = [time.perf_counter()]
    for chosen, _ in generate_tokens(decoder, torch.tensor([prompt_ids]), max_new_tokens,
                                     next_tokens=choose, stop_tokens=stops):
        times.append(time.perf_counter())
        token = int(chosen[0])
        if token == tokenizer.eod:
            stopped = "eod"
            break
        ids.append(token)
        text = streamer.update(ids)
        if token in stops or any(s in text for s in stop_texts):
            stopped = "stop"
            break
    steps = len(times) - 2  # the first token came from prefill
    return Generation(text=streamer.finish(ids), token_ids=ids, prompt_ids=list(prompt_ids),
                      stopped=stopped, prefill_ms=(times[1] - times[0]) * 1e3,
                      decode_tokens_per_s=steps / (times[-1] - times[1]) if steps > 0 else 0.0,
                      cache_bytes=decoder.cache_bytes())


class _Streamer:
    """Emits the new suffix of detokenize(ids) each step, holding back a trailing incomplete
    multi-byte character (decoded as U+FFFD) until its last byte arrives."""

    def __init__(self, tokenizer, sink: Optional[Callable[[str], None]]):
        self.tokenizer, self.sink, self.emitted = tokenizer, sink, ""

    def update(self, ids: List[int]) -> str:
        text = self.tokenizer.detokenize(ids)
        self._emit(text.rstrip(REPLACEMENT))
        return text

    def finish(self, ids: List[int]) -> str:
        text = self.tokenizer.detokenize(ids)
        self._emit(text)
        return self.emitted if not text.startswith(self.emitted) else text

    def _emit(self, text: str) -> None:
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            piece = text[len(self.emitted):]
            self.emitted = text
            if self.sink is not None:
                self.sink(piece)
