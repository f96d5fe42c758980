"""Dropping the pages of a large memory-mapped weight: the process's RSS falls back, the values do not change."""

from __future__ import annotations

import numpy as np
import pytest

from olive_int4_pass.kernels import pages


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.parametrize("view", [lambda m: m, lambda m: m.T, np.ascontiguousarray])
def test_release_drops_what_was_read_and_keeps_the_values(tmp_path, monkeypatch, view):
    monkeypatch.setattr(pages, "RELEASE_BYTES", 1 << 20)
    path = tmp_path / "w.bin"
    data = np.random.default_rng(0).standard_normal((2048, 4096)).astype(np.float16)  # 16 MB
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.float16, mode="r", shape=data.shape)
    array = view(mapped)
    before = rss_bytes()
    total = float(np.asarray(array, np.float32).sum())  # reads every page
    read = rss_bytes()
    assert read - before > 12 * 2**20
    pages.release_pages(array)
    assert rss_bytes() < read - 12 * 2**20
    assert float(np.asarray(array, np.float32).sum()) == total  # pages come back from the file
    small = np.zeros(10)
    pages.release_pages(small)  # not memory-mapped: nothing happens
