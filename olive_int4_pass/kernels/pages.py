"""Pages of memory-mapped weights: asking the kernel to read them ahead, or to drop them once read.

A weight in external data is read through a memory map; every page read through a map stays resident (and counted
in RSS) until the map is closed, so reading a large weight whole through one holds all of it.
"""

from __future__ import annotations

import mmap

import numpy as np

RELEASE_BYTES = 1 << 28  # memory-mapped weights at least this large have their read pages dropped as work goes by


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of a large memory-mapped ``array`` (a ``np.memmap`` or a view of one) from the process.

    A map keeps every page read through it resident and counted in RSS until it is closed: a 14B lm_head searched
    or probed through one would hold its 1.6 GB. Dropped pages are read again from the page cache if touched, so
    this is safe at any time, also while another thread reads the array. Does nothing for other arrays.
    """
    if array.nbytes < RELEASE_BYTES:
        return
    owner = array  # views (a transpose, np.asarray of a memmap) lead to the memmap through .base
    while owner is not None and getattr(owner, "_mmap", None) is None:
        owner = getattr(owner, "base", None)
    mm = getattr(owner, "_mmap", None)
    if mm is not None:
        advise(mm, getattr(mmap, "MADV_DONTNEED", 0), 0, len(mm))


def advise(mm: mmap.mmap, advice: int, start: int, length: int) -> None:
    """``madvise`` where the platform has it (not on Windows: there the pages stay mapped until the map closes)."""
    if hasattr(mm, "madvise"):  # not on Windows: there the pages stay mapped until the tensor is done
        mm.madvise(advice, start, length)
