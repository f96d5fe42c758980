"""Searched scales kept on disk between the search and the write.

The quality plan searches every weight's scales (and zero points) before writing, to rank the weights for the
8-bit budget; the write then rounds with them. Held in memory in between, they grow with the model (fp16 scales and
uint8 zero points per 32 values: 0.66 GB at 7B, 1.4 GB at 14B) on top of everything else the write holds. Here
each result goes to a ``.npy`` pair in a temporary folder (``TMPDIR``, made on the first result) and is read back
when asked for; the folder is removed by :meth:`SearchStore.close` or when the store is garbage collected.
"""

from __future__ import annotations

import shutil
import threading
import weakref
from collections.abc import Hashable
from pathlib import Path

import numpy as np

from olive_int4_pass.kernels.scale_search import SearchResult
from olive_int4_pass.plan import scratch


class SearchStore:
    """``{key: SearchResult}`` whose arrays live on disk; ``get`` returns a fresh copy, or None."""

    def __init__(self) -> None:
        self._folder: Path | None = None
        self._finalizer = None
        self._entries: dict[Hashable, tuple[int, float, float, float, bool]] = {}
        self._lock = threading.Lock()

    def __setitem__(self, key: Hashable, result: SearchResult) -> None:
        with self._lock:
            if self._folder is None:
                self._folder = scratch.make_folder("olive-int4-searches-")
                self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._folder), True)
            index = self._entries[key][0] if key in self._entries else len(self._entries)
            np.save(self._folder / f"{index}.scales.npy", result.scales)
            if result.zero_points is not None:
                np.save(self._folder / f"{index}.zp.npy", result.zero_points)
            errors = (result.weighted_error, result.rtn_weighted_error, result.weighted_energy)
            self._entries[key] = (index, *errors, result.zero_points is not None)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> SearchResult | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        index, weighted, rtn, energy, has_zp = entry
        scales = np.load(self._folder / f"{index}.scales.npy")
        zero_points = np.load(self._folder / f"{index}.zp.npy") if has_zp else None
        return SearchResult(scales, zero_points, weighted, rtn, energy)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
