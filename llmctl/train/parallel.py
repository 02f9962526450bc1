"""How the model is replicated or sharded (one process, DDP, FSDP2) and how its training
state is gathered for a checkpoint and scattered back on resume."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..core.errors import LlmctlError
from ..runtime.distributed import DistEnv


class Parallel:
    """`kind`: 'single' (one process), 'ddp' (replicas, gradients all-reduced once per step)
    or 'fsdp' (FSDP2: parameters, gradients and optimizer state sharded over ranks)."""

    def __init__(self, env: DistEnv, device: torch.device, fsdp: bool = False):
        if fsdp and not env.enabled:
            raise LlmctlError("--fsdp shards over several processes: launch with torchrun or "
                              "--nproc N (N > 1)")
        self.env, self.device = env, device
        self.kind = "fsdp" if fsdp else "ddp" if env.enabled else "single"

    def wrap(self, raw: nn.Module, compile: bool) -> tuple[nn.Module, nn.Module]:
        """(module to train through, module to evaluate through). Call before building the
        optimizer: FSDP replaces the parameters with sharded ones."""
        if self.kind == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in raw.blocks:  # one all-gather / reduce-scatter group per block
                fully_shard(block)
            fully_shard(raw)  # embeddings, final norm, tied head
            model = torch.compile(raw) if compile else raw
            return model, model
        model = torch.compile(raw) if compile else raw
        if self.kind == "single":
            return model, model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, **_no_buffer_sync()), model

    @contextlib.contextmanager
    def gradient_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Accumulation micro-steps skip the gradient all-reduce / reduce-scatter."""
        if sync or self.kind == "single":
            yield
        elif self.kind == "ddp":
            with model.no_sync():
                yield
        else:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

    # ------------------------------------------------------------ checkpoint state

    def model_state(self, raw: nn.Module) -> dict[str, torch.Tensor]:
        """Full weights on rank 0 (collective under FSDP; other ranks get {})."""
        if self.kind != "fsdp":
            return raw.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(raw, options=full)

    def optimizer_state(self, raw: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Optimizer state keyed by parameter names, the same for every kind, so a run can
        resume under another one (collective; ranks other than 0 may get {})."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(raw, _optimizers(optimizer), options=full)

    def load_optimizer_state(self, raw: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(raw, _optimizers(optimizer), optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))


def _optimizers(optimizer):
    """The torch optimizers behind one (train.optim.MuonWithAdamW holds two)."""
    return getattr(optimizer, "optimizers", optimizer)


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly DTensor) reduction result such as a gradient norm."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _no_buffer_sync() -> dict[str, bool]:
    """Aux-free biases change identically on every rank: no per-forward buffer broadcast."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
