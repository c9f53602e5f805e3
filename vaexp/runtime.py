"""Process set-up that every command (and scripts/bench.py) applies before it computes.

Invariant: nothing here changes results; it only changes how fast memory and threads behave.
Importing this module does not import torch (`vaexp --help` stays quick).
"""
from __future__ import annotations

import os
import sys


def tune_cpu_allocator() -> bool:
    """glibc only: serve big allocations from the heap and keep freed memory in the process
    (mallopt M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB) instead of mmap-ing and unmapping
    every CPU temporary above 32 MiB, each of which is page-faulted in again on first touch: on a
    2-core VM that made the K=5000 evaluation ~1.8x slower, and a stacked M·K=64 step ~1.4x. The
    cost: the process keeps its peak memory (as CUDA's caching allocator does).
    VAEXP_MALLOC_TUNING=0 leaves the allocator alone. Returns whether it was applied."""
    if os.environ.get("VAEXP_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def resolve_device(name):
    """The torch.device for a config's device setting (auto: CUDA when present)."""
    import torch  # here, not at the top: `vaexp --help` and `vaexp report` never load torch

    name = getattr(name, "value", name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
