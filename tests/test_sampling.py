"""stag_plugin.reference.sampling: the Sampler and the generate loop every decoder shares, on a
scripted stand-in decoder (no model): what the loop feeds back, when it stops, and its hooks."""

import pytest
import torch

import stag_plugin.decode.engine as inference
from stag_plugin.reference import sampling
from stag_plugin.reference.sampling import Sampler, generate

from stag_testing import fresh_seed

VOCAB = 16


class ScriptedDecoder:
    """Logits that make argmax pick script[i][n] for sequence i at new token n; records every
    call so the test sees what the loop fed back."""

    def __init__(self, script, max_len=32):
        self.script, self.max_len, self.calls = torch.tensor(script), max_len, []
        self.n = 0

    def _logits(self) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.script[:, self.n], VOCAB).float()

    def prefill(self, ids):
        self.calls.append(("prefill", ids.shape))
        self.n = 0
        return self._logits()

    def step(self, ids):
        self.calls.append(("step", ids.tolist()))
        self.n += 1
        return self._logits()

    def check_room(self, length, what):
        self.calls.append(("room", length))
        if length > self.max_len:
            raise ValueError(f"{what} needs {length}")


def test_loop_feeds_back_tokens_and_stops_each_sequence_on_its_own():
    decoder = ScriptedDecoder([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    prompt = torch.zeros(2, 3, dtype=torch.long)
    assert generate(decoder, prompt, 5) == [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]
    # 3 + 5 - 1 positions; prefill, then a step per new token except the last
    assert decoder.calls[0] == ("room", 7)
    assert decoder.calls[1:] == [("prefill", (2, 3)), ("step", [3, 8]), ("step", [4, 9]),
                                 ("step", [5, 10]), ("step", [6, 11])]
    # per-sequence stops: seq 0 ends at 4, seq 1 at 11; the loop goes on until both ended
    decoder.calls.clear()
    assert generate(decoder, prompt, 5, stop_tokens=[{4}, {11}]) == [[3, 4], [8, 9, 10, 11]]
    assert [c for c in decoder.calls if c[0] == "step"][-1] == ("step", [5, 10])
    # one flat list applies to every sequence; no step after all ended
    decoder.calls.clear()
    assert generate(decoder, prompt, 5, stop_tokens=[3, 9]) == [[3], [8, 9]]
    assert [c[0] for c in decoder.calls] == ["room", "prefill", "step"]


def test_next_tokens_hook_replaces_the_sampler():
    decoder = ScriptedDecoder([[1, 2, 3]])
    seen = []

    def hook(logits):  # e.g. pipeline mode: logits only on the last rank, token broadcast
        seen.append(logits.argmax(-1).tolist())
        return torch.tensor([7])

    assert generate(decoder, torch.zeros(1, 2, dtype=torch.long), 3, next_tokens=hook) == \
        [[7, 7, 7]]
    assert seen == [[1], [2], [3]]
    assert [c for c in decoder.calls if c[0] == "step"] == [("step", [7]), ("step", [7])]


def test_loop_errors():
    decoder = ScriptedDecoder([[1, 2, 3]], max_len=4)
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="prompt \\+ max_new_tokens - 1 needs 5"):
        generate(decoder, prompt, 4)
    with pytest.raises(ValueError, match="max_new_tokens=0.*Fix"):
        generate(decoder, prompt, 0)
    with pytest.raises(ValueError, match="one collection per sequence.*Fix"):
        generate(ScriptedDecoder([[1], [2]]), torch.zeros(2, 1, dtype=torch.long), 1,
                 stop_tokens=[{1}, {2}, {3}])


def test_sampler():
    logits = torch.randn(4, 96, generator=torch.Generator().manual_seed(fresh_seed()))
    greedy = logits.argmax(dim=-1)
    assert torch.equal(Sampler()(logits), greedy)
    assert torch.equal(Sampler(temperature=1.0, top_k=1, seed=1)(logits), greedy)
    assert torch.equal(Sampler(temperature=1.0, top_p=1e-6, seed=1)(logits), greedy)
    first = [Sampler(temperature=0.8, top_k=20, top_p=0.9, seed=7)(logits) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    top5 = logits.topk(5, dim=-1).indices
    sampled = Sampler(temperature=2.0, top_k=5, seed=3)(logits)
    assert (top5 == sampled[:, None]).any(dim=-1).all()
    with pytest.raises(ValueError, match="top_p"):
        Sampler(temperature=1.0, top_p=1.5)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = sampling._top_p_filter(probs.log(), 0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = sampling._top_p_filter(probs.log(), 0.85).isfinite()
    assert kept.tolist() == [[True, True, True, False]]


def test_inference_reexports_the_shared_sampler():
    assert inference.Sampler is Sampler


def test_fresh_seeds_are_recorded_and_replayable(monkeypatch):
    """conftest lists a failing test's seeds from stag_testing.SEEDS; STAG_TEST_SEED replays."""
    import stag_testing

    first, second = stag_testing.fresh_seed(), stag_testing.fresh_seed()
    assert stag_testing.SEEDS[-2:] == [first, second]
    monkeypatch.setenv("STAG_TEST_SEED", "1234")
    assert stag_testing.fresh_seed() == 1234 == stag_testing.SEEDS[-1]
