"""The calibration inputs of the MatMuls to compensate, kept on disk until their weights are rounded.

Compensated rounding needs each MatMul input's second moments ``H = E[x x^T]``, but only while that weight is being
rounded, which happens when the model is written, long after calibration. Per input the store keeps whichever is
smaller on disk:

- the inputs themselves (``tokens x K``, the model's own float16 or float32): ``H`` is formed from the memory-mapped
  rows when a weight asks for it, already in the weight's rounding order, into the one ``K x K`` buffer the kernel
  then factorises in place. Keeping ``H`` whole for every input would take ``sum K^2`` floats (44 GB at 7B).
- with ``compensation_span``, only the diagonal blocks of ``H`` that the runs are rounded against (``K x span``
  float32 sums, about ``K x 4 KB``), accumulated window by window: the disk no longer grows with the calibration
  tokens (a 7B model's 16,384 tokens: 4.1 GB instead of 27 GB of float16 inputs). The sums of the inputs a layer
  is adding to stay in memory (at most 256 MB) and go to disk when other inputs need the room.

Act-order comes from each channel's sum of squares; the output error of the report is estimated from 512 rows
spread over the calibration (kept aside in block mode). The weights that read one input (q/k/v, gate/up) share the
factor. The folder is removed by :meth:`close`, or when the store is garbage collected; one left by a killed run is
removed by the next (:mod:`.scratch`).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from olive_int4_pass.genai.files import describe_os_error
from olive_int4_pass.kernels import streaming_rtn
from olive_int4_pass.plan import scratch

logger = logging.getLogger(__name__)

_ERROR_ROWS = 512  # the report's output error is estimated on this many kept rows, spread over the calibration
_CACHE_BYTES = 256 << 20  # block sums held in memory between windows (a 7B layer's are about 115 MB)

Runs = Sequence[tuple[int, int]]  # the input channel ranges [r0, r1) compensated together (kernels.gptq.spans)


def _block_bytes(runs: Runs) -> int:
    return 4 * sum((r1 - r0) ** 2 for r0, r1 in runs)


def keeps_blocks(k: int, runs: Runs | None, tokens: int, row_bytes: int = 4) -> bool:
    """Whether an input of ``k`` channels takes less disk as its runs' blocks of ``H`` (and the report's rows) than
    as ``tokens`` rows of ``row_bytes`` values (2: a 16-bit model's inputs)."""
    if runs is None:
        return False
    return _block_bytes(runs) + row_bytes * min(tokens, _ERROR_ROWS) * k < row_bytes * tokens * k


def _needed(k: int, runs: Runs | None, tokens: int) -> int:
    """Disk for one input: float32 rows (the space check's bound for either dtype), or its blocks when ``runs``."""
    if runs is not None:
        return _block_bytes(runs) + 4 * min(tokens, _ERROR_ROWS) * k
    return 4 * tokens * k


class ActivationStore:
    """Each named activation's rows (``[tokens, K]``) or its runs' blocks of ``H``, appended window by window.

    ``runs`` (``{name: [(r0, r1), ...]}``, optional): the inputs that keep blocks (:func:`keeps_blocks`), with the
    channel ranges their weights are compensated in; they can only give ``H`` of channels within one run.
    ``tokens``: the calibration's, known before it runs (spreads the report's rows over it).
    """

    def __init__(
        self,
        widths: Mapping[str, int],
        directory: str | os.PathLike | None = None,
        *,
        runs: Mapping[str, Runs] | None = None,
        tokens: int = 0,
    ) -> None:
        self.widths = dict(widths)
        self.folder = scratch.make_folder("olive-int4-activations-", directory)
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self._files = {name: self.folder / f"{i}.f32" for i, name in enumerate(sorted(self.widths))}
        self._rows = dict.fromkeys(self.widths, 0)
        self._orders: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._lock = threading.Lock()
        runs = runs or {}
        self._runs = {name: [tuple(r) for r in runs[name]] for name in self.widths if name in runs}
        for name, blocks in self._runs.items():
            contiguous = all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(blocks))
            if not contiguous or blocks[0][0] != 0 or blocks[-1][1] != self.widths[name]:
                raise ValueError(f"the runs of {name!r} do not cover its {self.widths[name]} channels in order")
        self._stride = max(1, -(-tokens // _ERROR_ROWS))  # block mode: every stride-th row is kept for the report
        self._squares = {name: np.zeros(self.widths[name], np.float64) for name in self._runs}
        self._cache: OrderedDict[str, tuple] = OrderedDict()  # name -> (flat torch float32 sums, per-run views)

    def __contains__(self, name: object) -> bool:
        return name in self.widths

    @staticmethod
    def check_space(
        widths: Mapping[str, int],
        tokens: int,
        directory: str | os.PathLike | None = None,
        runs: Mapping[str, Runs] | None = None,
    ) -> int:
        """The bytes the store takes for ``tokens`` calibration tokens (float32 rows, or the blocks of the inputs in
        ``runs``); ``ValueError`` when the temporary folder's disk lacks them."""
        needed = sum(_needed(k, (runs or {}).get(name), tokens) for name, k in widths.items())
        where = Path(directory or tempfile.gettempdir())
        free = shutil.disk_usage(where).free
        if needed > free:
            raise ValueError(
                f"compensated rounding keeps the calibration inputs on disk: {needed / 1e9:.2f} GB needed in {where},"
                f" {free / 1e9:.2f} GB free (set TMPDIR to a larger disk, or lower calibration_tokens)"
            )
        return needed

    def add(self, name: str, x: np.ndarray) -> None:
        """Append one window's inputs ``[..., K]``."""
        if name not in self.widths:
            return
        # Kept as the model computed them: float16 (a 16-bit model's inputs: half the disk, exactly) or float32.
        dtype = self._dtypes.setdefault(name, np.dtype(np.float16 if x.dtype == np.float16 else np.float32))
        rows = np.ascontiguousarray(np.asarray(x, dtype).reshape(-1, self.widths[name]))
        if not np.isfinite(rows).all():
            raise ValueError(f"calibration input {name!r} holds NaN or Inf: the float model overflows on this text")
        if name in self._runs:
            with self._lock:
                self._accumulate(name, rows)
            return
        self._append(self._files[name], rows)
        self._rows[name] += rows.shape[0]

    @staticmethod
    def _append(path: Path, rows: np.ndarray) -> None:
        try:
            with open(path, "ab") as f:
                f.write(rows.tobytes())
        except OSError as e:
            why = describe_os_error(e)
            raise ValueError(f"cannot keep the calibration inputs for compensated rounding: {why}") from e

    def _accumulate(self, name: str, rows: np.ndarray) -> None:
        """Block mode: add ``rows``' products to the input's runs' sums, keep every stride-th row for the report."""
        torch = _torch()
        first = self._rows[name]
        kept = rows[(-first) % self._stride :: self._stride]
        if len(kept):
            self._append(self._sample_file(name), kept)
        x = np.asarray(rows, np.float32)
        self._squares[name] += np.einsum("ij,ij->j", x, x, dtype=np.float64)
        sums = self._cached(name)
        band = torch.from_numpy(x)
        for (r0, r1), total in zip(self._runs[name], sums, strict=True):
            part = band[:, r0:r1]
            total.addmm_(part.T, part)
        self._rows[name] += rows.shape[0]

    def _sample_file(self, name: str) -> Path:
        return self._files[name].with_suffix(".rows")

    def _cached(self, name: str) -> list:
        """The input's block sums in memory (loaded from disk if they went there), others flushed to make room."""
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name][1]
        torch = _torch()
        size = _block_bytes(self._runs[name])
        while self._cache and sum(_block_bytes(self._runs[n]) for n in self._cache) + size > _CACHE_BYTES:
            self._flush(next(iter(self._cache)))
        path = self._files[name]
        if path.exists():
            flat = torch.from_numpy(np.fromfile(path, np.float32))
        else:
            flat = torch.zeros(size // 4, dtype=torch.float32)
        sums, at = [], 0
        for r0, r1 in self._runs[name]:
            n = r1 - r0
            sums.append(flat[at : at + n * n].view(n, n))
            at += n * n
        self._cache[name] = (flat, sums)
        return sums

    def _flush(self, name: str) -> None:
        flat, _ = self._cache.pop(name)
        try:
            flat.numpy().tofile(self._files[name])
        except OSError as e:
            why = describe_os_error(e)
            raise ValueError(f"cannot keep the calibration statistics for compensated rounding: {why}") from e

    def _block_sums(self, name: str) -> list[np.ndarray]:
        while self._cache:  # calibration is over: its sums go to disk, and the memory they held is freed
            self._flush(next(iter(self._cache)))
        flat = np.memmap(self._files[name], dtype=np.float32, mode="r")
        sums, at = [], 0
        for r0, r1 in self._runs[name]:
            n = r1 - r0
            sums.append(flat[at : at + n * n].reshape(n, n))
            at += n * n
        return sums

    def tokens(self, name: str) -> int:
        return self._rows[name]

    def act_order(self, name: str) -> np.ndarray:
        """The input channels by decreasing ``E[x_k^2]`` (ties in channel order): GPTQ's act-order."""
        with self._lock:
            if name not in self._orders:
                if name in self._runs:
                    self._check_seen(name)
                    squares = self._squares[name]
                else:
                    squares = np.zeros(self.widths[name], np.float64)
                    for rows in self._bands(name):
                        squares += np.einsum("ij,ij->j", rows, rows, dtype=np.float64)
                self._orders[name] = np.argsort(-squares, kind="stable")
            return self._orders[name]

    def second_moments(self, name: str, order: np.ndarray | None = None) -> np.ndarray:
        """``E[x x^T]`` (float32 ``[K, K]``) with its rows and columns in ``order``, formed from the kept rows in a
        new array that the caller owns and may overwrite (the kernel factorises it in place). ``order`` may also
        pick a subset of the channels: their diagonal block of ``H`` (``compensation_span``)."""
        return self.second_moment_blocks(name, [order])[0]

    def second_moment_blocks(self, name: str, orders: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        """:meth:`second_moments` for each of ``orders`` (the runs of one weight), in one pass over the kept rows:
        a 7B down projection's 19 runs read its 18,944-wide rows once, not 19 times."""
        return self._compute(name, orders)

    def output_error(self, name: str, error: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
        """``sum |x e|^2`` and ``sum |x w|^2`` over the kept rows, per token: the MatMul's output error and energy
        for the columns ``error`` / ``weight`` (``[K, c]``), without forming ``H``."""
        err = energy = 0.0
        e, w = np.asarray(error, np.float32), np.asarray(weight, np.float32)
        stride = max(1, -(-self._rows[name] // _ERROR_ROWS))
        count = 0
        bands = self._sample_bands(name) if name in self._runs else self._bands(name, stride)
        for rows in bands:
            err += float(np.square(rows @ e, dtype=np.float64).sum())
            energy += float(np.square(rows @ w, dtype=np.float64).sum())
            count += rows.shape[0]
        return err / max(count, 1), energy / max(count, 1)

    def _check_seen(self, name: str) -> None:
        if self._rows[name] == 0:
            raise ValueError(f"calibration saw no values for {name!r}")

    def _sample_bands(self, name: str):
        self._check_seen(name)
        k = self.widths[name]
        x = np.fromfile(self._sample_file(name), self._dtypes[name]).reshape(-1, k)
        yield np.asarray(x, np.float32)

    def _bands(self, name: str, stride: int = 1):
        """The kept rows (every ``stride``-th), as float32, about 64 MB at a time."""
        self._check_seen(name)
        count, k = self._rows[name], self.widths[name]
        x = np.memmap(self._files[name], dtype=self._dtypes[name], mode="r", shape=(count, k))[::stride]
        step = max(256, (1 << 24) // k)
        for start in range(0, x.shape[0], step):
            yield np.array(x[start : start + step], np.float32)

    def _compute(self, name: str, orders: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        if name in self._runs:
            with self._lock:
                return self._from_blocks(name, orders)
        torch = _torch()
        sizes = [self.widths[name] if order is None else len(order) for order in orders]
        totals = [torch.zeros((k, k), dtype=torch.float32) for k in sizes]  # 1.4 GB at K = 18,944, whole
        for rows in self._bands(name):
            for order, total in zip(orders, totals, strict=True):
                band = torch.from_numpy(rows if order is None else rows[:, order])
                total.addmm_(band.T, band)
        return [total.div_(self._rows[name]).numpy() for total in totals]

    def _from_blocks(self, name: str, orders: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        """Block mode: each order's ``H`` cut from its run's sums (the order must lie within one run)."""
        self._check_seen(name)
        sums, count = self._block_sums(name), np.float32(self._rows[name])
        out = []
        for order in orders:
            channels = np.arange(self.widths[name]) if order is None else np.asarray(order)
            for (r0, r1), total in zip(self._runs[name], sums, strict=True):
                if r0 <= channels.min() and channels.max() < r1:
                    local = channels - r0
                    out.append(np.asarray(total[np.ix_(local, local)], np.float32) / count)
                    break
            else:
                raise ValueError(f"{name!r} keeps H in runs {self._runs[name]}: channels across runs were asked for")
        return out

    def close(self) -> None:
        self._cache.clear()
        self._finalizer()


def _torch():
    torch = streaming_rtn._torch()
    if torch is None:
        raise ImportError("compensated rounding needs torch (installed with olive-ai)")
    return torch


def widths_of(activations: Iterable[tuple[str, int]]) -> dict[str, int]:
    """``{activation: K}``, refusing one input read with two widths (it cannot happen in a valid graph)."""
    widths: dict[str, int] = {}
    for name, k in activations:
        if widths.setdefault(name, k) != k:
            raise ValueError(f"activation {name!r} feeds weights of {widths[name]} and {k} input channels")
    return widths
