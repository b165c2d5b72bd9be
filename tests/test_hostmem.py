"""fix_malloc_mmap_threshold: freed tensors of a few MiB go back to the OS (glibc), so a process that
frees and allocates layers over and over does not grow in resident memory (lift_ds.stream sets it)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CHILD = """
import sys, torch
from lift_ds.utils import fix_malloc_mmap_threshold
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
if sys.argv[1] == "fixed":
    assert fix_malloc_mmap_threshold(1 << 17)
big = torch.ones(1 << 22)  # 16 MiB: freeing it raises glibc's dynamic threshold to 16 MiB
del big
keep, blocks = [], []
for _ in range(64):  # 64 x 4 MiB, each followed by a small live tensor: the heap cannot shrink from the top
    blocks.append(torch.ones(1 << 20))
    keep.append(torch.ones(1 << 14))  # 64 KiB, from the top of the heap
before = rss()
blocks.clear()
print((before - rss()) / 2**20)
"""


def freed_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc's mallopt")
def test_freed_blocks_go_back_to_the_os_with_the_threshold_fixed():
    assert freed_mib("fixed") > 200  # 256 MiB freed: returned
    assert freed_mib("default") < 64  # glibc's default keeps them in the heap (what the fix is for)


def test_the_streamer_fixes_the_threshold(monkeypatch):
    import lift_ds.stream as stream

    calls = []
    monkeypatch.setattr(stream, "fix_malloc_mmap_threshold", lambda n: calls.append(n) or True)
    s = stream.LayerStreamer()
    s.close()
    assert calls == [stream.MMAP_THRESHOLD]
