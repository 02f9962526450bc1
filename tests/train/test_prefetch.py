"""The prefetcher hands out the sampler's batches in order and tracks the consumed state."""

from __future__ import annotations

import pytest
import torch

from llmctl.train.prefetch import Prefetcher


class CountingSampler:
    """Batch i is filled with i; the state is the number of batches drawn."""

    def __init__(self, fail_at: int | None = None):
        self.drawn, self.fail_at = 0, fail_at

    def next_batch(self):
        if self.drawn == self.fail_at:
            raise ValueError("token 99 is beyond the vocabulary")
        x = torch.full((2, 3), self.drawn, dtype=torch.long)
        self.drawn += 1
        return x, x + 1

    def state_dict(self):
        return {"drawn": self.drawn}

    def load_state_dict(self, state):
        self.drawn = state["drawn"]


def test_order_and_consumed_state():
    sampler = CountingSampler()
    with Prefetcher(sampler, torch.device("cpu"), depth=3) as feed:
        assert feed.state_dict() == {"drawn": 0}
        for i in range(5):
            x, y = feed.next()
            assert x.unique().tolist() == [i] and y.unique().tolist() == [i + 1]
            assert feed.state_dict() == {"drawn": i + 1}  # not the sampler's, which runs ahead
        saved = feed.state_dict()
    # restoring the consumed state replays exactly the batches not yet used
    replay = CountingSampler()
    replay.load_state_dict(saved)
    assert replay.next_batch()[0].unique().tolist() == [5]


def test_sampler_errors_reach_the_loop():
    with Prefetcher(CountingSampler(fail_at=2), torch.device("cpu")) as feed:
        feed.next()
        feed.next()
        with pytest.raises(ValueError, match="beyond the vocabulary"):
            feed.next()
