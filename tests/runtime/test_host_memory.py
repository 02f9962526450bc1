"""Freed host memory is reused by later steps instead of being faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A "step" allocates, touches and frees a 48 MiB tensor, above the largest mmap threshold
# glibc picks by itself (32 MiB): untuned, every step maps and faults it in afresh. Tuned,
# the heap grows over the first steps (torch's 64-byte-aligned allocations leave small
# separators that glibc's per-thread cache holds, up to 7) and then stays. Prints the page
# faults and the growth of resident memory over the 10 steps after 12 warm-up steps.
SCRIPT = """
import resource, torch
from llmctl.runtime.host_memory import keep_freed_memory
tuned = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def resident_pages():
    return int(open("/proc/self/statm").read().split()[1])
for _ in range(12):
    torch.ones(12 * 2**20)
start, resident = faults(), resident_pages()
for _ in range(10):
    torch.ones(12 * 2**20)
print(tuned, faults() - start, resident_pages() - resident)
"""


def _run(env_value: str | None) -> tuple[bool, int, int]:
    env = dict(os.environ)
    env.pop("LLMCTL_KEEP_HOST_MEMORY", None)
    if env_value is not None:
        env["LLMCTL_KEEP_HOST_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_tuned_allocator_reuses_freed_memory_without_page_faults() -> None:
    tuned, tuned_faults, tuned_growth = _run(None)
    if not tuned:
        pytest.skip("not glibc")
    untouched, untuned_faults, _ = _run("0")
    assert not untouched
    pages = 10 * 48 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert untuned_faults > pages // 2  # every step faulted its 48 MiB in again
    assert tuned_faults < pages // 20  # the steady state reuses the heap it grew
    assert tuned_growth < pages // 20  # and does not keep growing it
