"""Compensated rounding run beside the scale search, on one background thread, its results kept on disk until written.

With a size budget the plan searches every weight's scales before it chooses which go to 8 bits, and only then
writes the model. The search keeps the cores busy with large vectorised operations; compensated rounding, with many
small ones on one thread, keeps about one core busy. So each weight's compensation is started (at the default
bits, with the scales just searched) as soon as its search ends, and runs beside the next searches; the write then
takes the finished weight instead of rounding it. The sensitivity probe (``quality: max``) measures each layer with
these very weights, waiting for them and leaving them for the write. A weight the budget later moves to 8 bits is
rounded again by the write, and its early result is dropped. A result that cannot be kept (a full temporary
disk) is left to the write (or the probe) to compute; an error of the rounding itself is raised by the write, as
if the write had met it.
"""

from __future__ import annotations

import logging
import shutil
import threading
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from olive_int4_pass.kernels.rtn import QuantizedWeight
from olive_int4_pass.plan import scratch

logger = logging.getLogger(__name__)

_FIELDS = ("packed", "scales", "zero_points")


class CompensationAhead:
    """``submit(key, work)`` runs ``work()`` (a :class:`QuantizedWeight`) in the background; ``take(key)`` waits for
    it and returns it, or None when nothing was submitted for ``key`` or its result could not be kept."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compensation-ahead")
        self._futures: dict[Hashable, Future] = {}
        self._submitted = 0  # numbers the result files
        self._warned = False
        self._folder: Path | None = None
        self._finalizer = None
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        return key in self._futures

    def submit(self, key: Hashable, work: Callable[[], QuantizedWeight]) -> None:
        with self._lock:
            if key in self._futures:  # submitted twice: the first result stands
                return
            self._submitted += 1
            self._futures[key] = self._pool.submit(self._run, self._submitted, work)

    def discard(self, key: Hashable) -> None:
        """No longer wanted (the weight goes to other bits): cancelled if not started, else dropped at close."""
        with self._lock:
            future = self._futures.pop(key, None)
        if future is not None:
            future.cancel()

    def take(self, key: Hashable) -> QuantizedWeight | None:
        """The result (waiting for it), whose files then go; None if it was never submitted or not kept."""
        with self._lock:
            future = self._futures.pop(key, None)
        return None if future is None else self._load(future, remove=True)

    def peek(self, key: Hashable) -> QuantizedWeight | None:
        """The result (waiting for it), left for :meth:`take`: what the sensitivity probe measures."""
        with self._lock:
            future = self._futures.get(key)
        return None if future is None else self._load(future, remove=False)

    @staticmethod
    def _load(future: Future, remove: bool) -> QuantizedWeight | None:
        entry = future.result()  # an error of the rounding is raised here, by the write (or the probe)
        if entry is None:
            return None
        files, meta = entry
        arrays = {f: np.load(path) if path else None for f, path in files.items()}
        if remove:
            for path in files.values():
                if path:
                    path.unlink(missing_ok=True)
        return QuantizedWeight(arrays["packed"], arrays["scales"], arrays["zero_points"], *meta)

    def close(self) -> None:
        """Cancel what has not started, wait for what has, and remove the kept results."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._futures.clear()
        if self._finalizer is not None:
            self._finalizer()

    def _run(self, index: int, work: Callable[[], QuantizedWeight]):
        q = work()
        try:
            folder = self._folder_made()
            files = {}
            for field in _FIELDS:
                value = getattr(q, field)
                files[field] = None
                if value is not None:
                    files[field] = folder / f"{index}.{field}.npy"
                    np.save(files[field], value)
        except OSError as e:  # the write rounds this weight itself
            if not self._warned:
                self._warned = True
                logger.warning(
                    "Compensated rounding beside the search: cannot keep a result (%s); the write redoes it", e
                )
            return None
        return files, (q.k, q.n, q.block_size, q.bits)

    def _folder_made(self) -> Path:
        with self._lock:
            if self._folder is None:
                self._folder = scratch.make_folder("olive-int4-ahead-")
                self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._folder), True)
            return self._folder
