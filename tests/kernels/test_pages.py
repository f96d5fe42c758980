"""Dropping the pages of a large memory-mapped weight: the process's RSS falls back, the values do not change."""

from __future__ import annotations

import numpy as np
import pytest

from olive_int4_pass.kernels import pages


def mapped_rss_bytes(path) -> int:
    """Resident bytes of this process's maps of ``path`` (from /proc/self/smaps): unlike the process's whole RSS,
    not moved by what other tests left in the allocator."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a map's first line
                inside = len(head) >= 6 and head[5] == str(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


@pytest.mark.parametrize("view", [lambda m: m, lambda m: m.T, np.ascontiguousarray])
def test_release_drops_what_was_read_and_keeps_the_values(tmp_path, monkeypatch, view):
    monkeypatch.setattr(pages, "RELEASE_BYTES", 1 << 20)
    path = tmp_path / "w.bin"
    data = np.random.default_rng(0).standard_normal((2048, 4096)).astype(np.float16)  # 16 MB
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.float16, mode="r", shape=data.shape)
    array = view(mapped)
    before = mapped_rss_bytes(path)
    total = float(np.asarray(array, np.float32).sum())  # reads every page
    read = mapped_rss_bytes(path)
    assert read - before > 12 * 2**20
    pages.release_pages(array)
    assert mapped_rss_bytes(path) < read - 12 * 2**20
    assert float(np.asarray(array, np.float32).sum()) == total  # pages come back from the file
    small = np.zeros(10)
    pages.release_pages(small)  # not memory-mapped: nothing happens
