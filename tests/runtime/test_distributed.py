"""The torchrun environment read as data: a malformed one is a message naming it, before
any process group is joined."""

from __future__ import annotations

import pytest
import torch

from llmctl.core.errors import LlmctlError
from llmctl.runtime import distributed


@pytest.mark.parametrize("env, reason", [
    ({"WORLD_SIZE": "two"}, "malformed torchrun environment"),
    ({"WORLD_SIZE": "-5"}, "WORLD_SIZE=-5"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "0 <= RANK < WORLD_SIZE"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "-3"}, "LOCAL_RANK=-3"),
])
def test_a_malformed_torchrun_environment_is_named(monkeypatch, env, reason):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(LlmctlError, match=reason):
        distributed.env_from_torchrun()


@pytest.mark.parametrize("port", ["abc", "99999999", "0", ""])
def test_a_bad_master_port_is_refused_before_the_rendezvous(monkeypatch, port):
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", port)
    env = distributed.DistEnv(rank=0, local_rank=0, world_size=2)
    with pytest.raises(LlmctlError, match="MASTER_PORT=.*port number from 1 to 65535"):
        distributed.init(env, torch.device("cpu"))


def test_a_malformed_launcher_pid_is_a_message(monkeypatch):
    from llmctl.train import launch

    if launch._prctl() is None:
        pytest.skip("no prctl: the launcher's pid is not used here")
    monkeypatch.setenv(launch.LAUNCHER_PID_ENV, "abc")
    with pytest.raises(LlmctlError, match="LLMCTL_LAUNCHER_PID='abc' is not a process id"):
        launch.die_with_parent()
