"""Fixtures for the data tests: a real HTTP server, tiktoken's own cache, small corpora."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"


@pytest.fixture
def r50k_cache(gpt2_tiktoken: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tiktoken's documented offline cache holding r50k_base (GPT-2's ranks, same file).

    `tiktoken.get_encoding("r50k_base")` then builds tiktoken's own registry encoding offline,
    the reference our tokenizers are compared against.
    """
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    shutil.copy(gpt2_tiktoken, cache / hashlib.sha1(R50K_URL.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def reference_gpt2(r50k_cache: Path):
    import tiktoken

    return tiktoken.get_encoding("r50k_base")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder it serves): a real http.server on 127.0.0.1."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def refused_url() -> str:
    """A URL on 127.0.0.1 whose port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"


@pytest.fixture
def write_parquet() -> Callable[[Path, list], Path]:
    def write(path: Path, texts: list, field: str = "text") -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({field: texts, "id": list(range(len(texts)))}), path)
        return path
    return write


@pytest.fixture
def leftovers() -> Callable[[Path], list[str]]:
    """Entries of a data dir besides the download cache (partial folders, locks...)."""
    def entries(data_dir: Path) -> list[str]:
        if not data_dir.exists():
            return []
        return sorted(p.name for p in data_dir.iterdir() if p.name != ".downloads")
    return entries
