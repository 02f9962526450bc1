"""Shared test fixtures: the offline corpus / BPE ranks beside the checkout, GPU skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tiny models run far faster on one intra-op thread than on 2 cores shared with other work
# (oversubscription stalls cost 10x); set before torch is imported, so subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    """$LLMCTL_SHARED_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("LLMCTL_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shakespeare_txt() -> Path:
    path = _shared_data_dir() / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present (set LLMCTL_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def gpt2_tiktoken() -> Path:
    path = _shared_data_dir() / "gpt2.tiktoken"
    if not path.is_file():
        pytest.skip(f"{path} not present (set LLMCTL_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
