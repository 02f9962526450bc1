"""SIGINT / SIGTERM turn into a stop request; a later deliberate second signal is not held."""

from __future__ import annotations

import os
import signal

import pytest

from llmctl.train import signals
from llmctl.train.signals import StopRequest


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_is_a_request(sig):
    before = signal.getsignal(sig)
    with StopRequest() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), sig)
        assert stop.requested == sig.name
        os.kill(os.getpid(), sig)  # a duplicate right after (torchrun forwarding) is absorbed
        assert stop.requested == sig.name
    assert signal.getsignal(sig) is before


def test_later_second_sigint_interrupts(monkeypatch):
    monkeypatch.setattr(signals, "_ESCALATE_AFTER_S", 0.0)
    with pytest.raises(KeyboardInterrupt), StopRequest():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
