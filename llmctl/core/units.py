"""Human-readable numbers: counts (1.2M), byte sizes (3.4 GiB) and durations (1h02m03s)."""

from __future__ import annotations

_COUNT_UNITS = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3))
_BYTE_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def human_count(n: float, digits: int = 1, billions: str = "B") -> str:
    """1234567 -> '1.2M' (`digits` decimals above 1000, none below); `billions` names 1e9
    ('B' for parameters, 'G' for rates)."""
    for unit, scale in _COUNT_UNITS:
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f}{billions if unit == 'B' else unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for unit, size in _BYTE_UNITS:
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def human_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
