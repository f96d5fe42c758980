"""The calibration inputs of the MatMuls to compensate, kept on disk until their weights are rounded.

Compensated rounding needs each MatMul input's full second moments ``H = E[x x^T]`` (``K x K``), but only while that
weight is being rounded, which happens when the model is written, long after calibration. Keeping ``H`` for every
input would take ``sum K^2`` floats (44 GB at 7B); the inputs themselves take ``tokens x sum K`` (a fifth of that at
2,048 tokens, and only disk). So calibration appends each window's inputs here as rows of the model's own float16 (a
16-bit model: half the disk, exactly) or float32, one file per MatMul input in a temporary folder, and
:meth:`ActivationStore.second_moments` forms ``H`` from the memory-mapped rows when a weight asks for it, already in
the weight's rounding order, into the one ``K x K`` buffer the kernel then factorises in place, once per input (q/k/v,
gate/up share the factor). The output error of the report is estimated from 512 of the rows. The folder is removed by
:meth:`close`, or when the store is garbage collected; one left by a killed run is removed by the next
(:mod:`.scratch`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from olive_int4_pass.genai.files import describe_os_error
from olive_int4_pass.kernels import streaming_rtn
from olive_int4_pass.plan import scratch

logger = logging.getLogger(__name__)

_ERROR_ROWS = 512  # the report's output error is estimated on this many kept rows, spread over the calibration


class ActivationStore:
    """Float32 rows of each named activation (``[tokens, K]``), appended window by window."""

    def __init__(self, widths: Mapping[str, int], directory: str | os.PathLike | None = None) -> None:
        self.widths = dict(widths)
        self.folder = scratch.make_folder("olive-int4-activations-", directory)
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self._files = {name: self.folder / f"{i}.f32" for i, name in enumerate(sorted(self.widths))}
        self._rows = dict.fromkeys(self.widths, 0)
        self._orders: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._lock = threading.Lock()

    def __contains__(self, name: object) -> bool:
        return name in self.widths

    @staticmethod
    def check_space(widths: Mapping[str, int], tokens: int, directory: str | os.PathLike | None = None) -> int:
        """The bytes ``tokens`` rows of every input take; ``ValueError`` when the temporary folder's disk lacks them."""
        needed = 4 * tokens * sum(widths.values())
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
        try:
            with open(self._files[name], "ab") as f:
                f.write(rows.tobytes())
        except OSError as e:
            why = describe_os_error(e)
            raise ValueError(f"cannot keep the calibration inputs for compensated rounding: {why}") from e
        self._rows[name] += rows.shape[0]

    def tokens(self, name: str) -> int:
        return self._rows[name]

    def act_order(self, name: str) -> np.ndarray:
        """The input channels by decreasing ``E[x_k^2]`` (ties in channel order): GPTQ's act-order."""
        with self._lock:
            if name not in self._orders:
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
        for rows in self._bands(name, stride):
            err += float(np.square(rows @ e, dtype=np.float64).sum())
            energy += float(np.square(rows @ w, dtype=np.float64).sum())
            count += rows.shape[0]
        return err / max(count, 1), energy / max(count, 1)

    def _bands(self, name: str, stride: int = 1):
        """The kept rows (every ``stride``-th), as float32, about 64 MB at a time."""
        count, k = self._rows[name], self.widths[name]
        if count == 0:
            raise ValueError(f"calibration saw no values for {name!r}")
        x = np.memmap(self._files[name], dtype=self._dtypes[name], mode="r", shape=(count, k))[::stride]
        step = max(256, (1 << 24) // k)
        for start in range(0, x.shape[0], step):
            yield np.array(x[start : start + step], np.float32)

    def _compute(self, name: str, orders: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        torch = streaming_rtn._torch()
        if torch is None:
            raise ImportError("compensated rounding needs torch (installed with olive-ai)")
        sizes = [self.widths[name] if order is None else len(order) for order in orders]
        totals = [torch.zeros((k, k), dtype=torch.float32) for k in sizes]  # 1.4 GB at K = 18,944, whole
        for rows in self._bands(name):
            for order, total in zip(orders, totals, strict=True):
                band = torch.from_numpy(rows if order is None else rows[:, order])
                total.addmm_(band.T, band)
        return [total.div_(self._rows[name]).numpy() for total in totals]

    def close(self) -> None:
        self._finalizer()


def widths_of(activations: Iterable[tuple[str, int]]) -> dict[str, int]:
    """``{activation: K}``, refusing one input read with two widths (it cannot happen in a valid graph)."""
    widths: dict[str, int] = {}
    for name, k in activations:
        if widths.setdefault(name, k) != k:
            raise ValueError(f"activation {name!r} feeds weights of {widths[name]} and {k} input channels")
    return widths
