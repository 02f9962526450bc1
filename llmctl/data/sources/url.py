"""Sources on the web: a URL is fetched once into the data folder's cache, then read as a
local file."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ...core.errors import LlmctlError
from ...core.files import atomic_file
from .base import SourcePlan
from .text import local_plan


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https")


_DOWNLOAD_HINT = ("download it yourself and pass --source PATH (a local copy); --source also "
                  "takes any local text / JSONL / parquet file or folder")


def download(url: str, cache_dir: Path, *, refresh: bool = False,
             what: str | None = None, progress: Callable[[int, int | None], None] | None = None
             ) -> Path:
    """Fetch `url` once into `cache_dir` (temp file + rename); later calls reuse it."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    key = hashlib.sha1(url.encode()).hexdigest()[:12]
    dest = cache_dir / f"{key}-{name}"
    if dest.is_file() and not refresh:
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    what = what or url
    hint = _DOWNLOAD_HINT
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "llmctl"})
        with urllib.request.urlopen(request, timeout=60) as response, \
                atomic_file(dest, "wb") as f:
            size = response.headers.get("Content-Length")
            size = int(size) if size and size.isdigit() else None
            done = 0
            while block := response.read(1 << 20):
                f.write(block)
                done += len(block)
                if progress:
                    progress(done, size)
    except urllib.error.HTTPError as err:
        raise LlmctlError(f"could not download {what} from {url}: HTTP {err.code} "
                          f"{err.reason}; {hint}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise LlmctlError(f"could not reach {url} to download {what} ({reason}); {hint}"
                          ) from None
    return dest


def probe_url(url: str, cache_dir: Path, what: str | None = None) -> None:
    """Raise the error `download` would, without downloading (a HEAD request)."""
    key = hashlib.sha1(url.encode()).hexdigest()[:12]
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    if (cache_dir / f"{key}-{name}").is_file():
        return
    try:
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "llmctl"})
        with urllib.request.urlopen(request, timeout=30):
            pass
    except urllib.error.HTTPError as err:
        if err.code not in (405, 501):  # HEAD not allowed: the download will tell
            raise LlmctlError(f"could not download {what or url} from {url}: HTTP {err.code} "
                              f"{err.reason}; {_DOWNLOAD_HINT}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise LlmctlError(f"could not reach {url} to download {what or url} ({reason}); "
                          f"{_DOWNLOAD_HINT}") from None


def url_plan(url: str, cache_dir: Path, text_field: str, refresh: bool,
             what: str | None = None) -> SourcePlan:
    path = download(url, cache_dir, refresh=refresh, what=what)
    if path.stat().st_size == 0:
        raise LlmctlError(f"{url} returned an empty file")
    return local_plan(path, text_field, description=url)
