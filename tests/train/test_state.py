"""RNG states survive a JSON round trip and replay the same random streams."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from llmctl.train.state import capture_rng, restore_rng


def _draw() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            torch.rand(4).tolist(), torch.randn(2).tolist())


def test_json_round_trip_replays_every_generator():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in Python's state
    np.random.randn()  # and a cached one in NumPy's
    state = json.loads(json.dumps(capture_rng()))
    first = _draw()
    _draw()  # move every generator on
    restore_rng(state)
    assert _draw() == first


def test_dropout_masks_replay_after_restore():
    torch.manual_seed(0)
    drop = torch.nn.Dropout(0.5)
    state = capture_rng()
    a = drop(torch.ones(64))
    restore_rng(state)
    assert torch.equal(drop(torch.ones(64)), a)
