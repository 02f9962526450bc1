"""Shared test fixtures: the embedded corpus / BPE ranks (and the reference copies beside the
checkout they are compared with), GPU skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tiny models run far faster on one intra-op thread than on 2 cores shared with other work
# (oversubscription stalls cost 10x); set before torch is imported, so subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    """$LLMCTL_SHARED_DATA, else ../shared/data beside the checkout: the reference copies of
    Tiny Shakespeare and GPT-2's ranks that the embedded ones are compared with."""
    env = os.environ.get("LLMCTL_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def _shared(name: str) -> Path:
    path = _shared_data_dir() / name
    if not path.is_file():
        pytest.skip(f"{path} not present (set LLMCTL_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def shared_shakespeare_txt() -> Path:
    """The reference copy of Tiny Shakespeare (skips when absent)."""
    return _shared("tinyshakespeare.txt")


@pytest.fixture(scope="session")
def shared_gpt2_tiktoken() -> Path:
    """The reference copy of GPT-2's .tiktoken rank file (skips when absent)."""
    return _shared("gpt2.tiktoken")


@pytest.fixture(scope="session")
def shakespeare_txt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Shakespeare as a file: the copy embedded in llmctl."""
    from llmctl.data.embedded import shakespeare_bytes

    path = tmp_path_factory.mktemp("embedded") / "tinyshakespeare.txt"
    path.write_bytes(shakespeare_bytes())
    return path


@pytest.fixture(scope="session")
def gpt2_tiktoken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2's .tiktoken rank file: the copy embedded in llmctl."""
    from llmctl.data.embedded import gpt2_rank_bytes

    path = tmp_path_factory.mktemp("embedded") / "gpt2.tiktoken"
    path.write_bytes(gpt2_rank_bytes())
    return path


@pytest.fixture(scope="session")
def char_dataset(tmp_path_factory: pytest.TempPathFactory, shakespeare_txt: Path):
    """char_dataset(name, chars) -> a data_dir holding dataset `name`: the first `chars`
    characters of Tiny Shakespeare, prepared with the char tokenizer (one per session)."""
    from llmctl.data.prepare import PrepareOptions, prepare_dataset

    made: dict[tuple[str, int], Path] = {}

    def make(name: str, chars: int) -> Path:
        if (name, chars) not in made:
            root = tmp_path_factory.mktemp(f"char_{name}")
            corpus = root / "corpus.txt"
            corpus.write_text(shakespeare_txt.read_text(encoding="utf-8")[:chars],
                              encoding="utf-8")
            prepare_dataset(PrepareOptions(source=str(corpus), name=name,
                                           data_dir=root / "data", tokenizer="char",
                                           progress=False, num_proc=1))
            made[name, chars] = root / "data"
        return made[name, chars]

    return make


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


class _Tmpfs:
    """Small tmpfs mounts for full-disk and read-only tests (root on Linux, else skipped)."""

    def __init__(self, root: Path):
        self.root, self.mounted = root, []

    def mount(self, size: str = "64k") -> Path:
        import subprocess
        import sys

        if not sys.platform.startswith("linux") or os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root on Linux")
        where = self.root / f"tmpfs{len(self.mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(where)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.mounted.append(where)
        return where

    def read_only(self, where: Path) -> None:
        import subprocess

        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)

    def unmount_all(self) -> None:
        import subprocess

        for where in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path):
    """tmpfs.mount(size) -> a fresh small tmpfs; tmpfs.read_only(path) remounts it ro."""
    mounts = _Tmpfs(tmp_path)
    yield mounts
    mounts.unmount_all()
