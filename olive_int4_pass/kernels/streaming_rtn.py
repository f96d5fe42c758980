"""Streaming round-to-nearest quantization: the fast path for large weights, byte-identical to the reference.

Two things make quantizing a 7B-class model fast and flat in memory:

1. A symmetric round-to-nearest kernel in torch (installed with olive-ai). The weight is cut into tiles of whole
   blocks that stay in cache; the fp16 -> fp32 widening, the block extremes, the scale rounding and
   ``clamp(floor(fl(fl(v * (1/scale)) + mid) + 0.5))`` run vectorised, 3-5x faster than onnxruntime's
   ``quantize_matmul_4bits`` and with the same bytes (``tests/kernels/test_streaming_rtn.py``). ``floor(x + 0.5)``
   equals C ``roundf`` for these ``x``: the sum can only round for ``x`` just under 0.5, and such an ``x`` is
   ``fl(p + mid)`` with ``|p|`` near ``mid``, a multiple of ``2**-21``, so the sum is exact. With a zero point ``p``
   alone may sit just under 0.5, which is why asymmetric quantization keeps the reference path. NaN/Inf show up as
   non-finite block extremes: the finiteness check costs nothing.
2. Weights in external data are streamed band by band from a memory map of their own: the next band's pages are
   mapped in on a helper thread while the current one is quantized, and a finished band's pages are dropped
   from the process. onnx_ir's map keeps every page it touched resident (and counted in RSS) until the tensor
   is released: through it the whole float model ends up in the process's RSS. The output channels the error
   report samples are kept as the bands go by.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np

from olive_int4_pass.kernels.pages import advise
from olive_int4_pass.kernels.rtn import QuantizedWeight

_BF16 = np.dtype(ml_dtypes.bfloat16)
_FAST_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), _BF16)
MIN_ELEMENTS = 1 << 20  # smaller weights take the reference kernel: not worth importing torch for
_BAND_BYTES = 1 << 25  # float bytes per band: about two bands of a weight are mapped in at a time
_TILE_ELEMENTS = 1 << 19  # weights per tile: 2 MiB of float32 temporaries per worker, about one L2 cache
_TILE_BLOCKS = 8  # blocks of K per tile: each channel's packed bytes are written in runs of 8 blocks
_MAX_WORKERS = 8
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; Python < 3.13 lacks the name

_threads_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_threads_users = 0
_threads_saved = 0


def _torch():
    try:
        import torch
    except ImportError:  # the numpy/onnxruntime paths remain
        return None
    return torch


def applies(dtype, k: int, n: int, block_size: int, bits: int, symmetric: bool) -> bool:
    """Whether the fast kernel handles this weight (else ``quantize_blockwise``: same bytes, slower)."""
    supported = np.dtype(dtype) in _FAST_DTYPES and bits in (4, 8) and k % block_size == 0
    return symmetric and supported and k * n >= MIN_ELEMENTS and _torch() is not None


def quantize_source(
    source, transposed: bool, *, block_size: int, bits: int, name: str, sample_cols: np.ndarray | None = None
) -> tuple[QuantizedWeight, np.ndarray | None]:
    """Quantize the onnx_ir tensor ``source``: ``W[K, N]``, or ``W^T`` stored ``[N, K]`` when ``transposed``.

    Returns the quantized weight and float32 ``W[:, sample_cols]`` (None when no columns are asked for).
    """
    import onnx_ir as ir

    dtype = np.dtype(source.dtype.numpy())
    rows, cols = (int(d) for d in source.shape)
    if isinstance(source, ir.ExternalTensor):
        bands = file_bands(source.path, source.offset or 0, rows, cols, dtype, block_size, transposed)
    else:
        bands = array_bands(source.numpy(), block_size, transposed)
    with contextlib.closing(bands):  # on an error, stop the read-ahead now
        return quantize_bands(
            bands, rows, cols, dtype, transposed, block_size=block_size, bits=bits, name=name, sample_cols=sample_cols
        )


def quantize_bands(
    bands: Iterator[tuple[int, np.ndarray]],
    rows: int,
    cols: int,
    dtype,
    transposed: bool,
    *,
    block_size: int,
    bits: int,
    name: str,
    sample_cols: np.ndarray | None = None,
) -> tuple[QuantizedWeight, np.ndarray | None]:
    """Quantize a stored ``[rows, cols]`` weight handed over as ``(first_row, band)`` pieces.

    Not transposed, the stored tensor is ``W[K, N]`` and a band holds whole blocks of K; transposed, it is
    ``W^T[N, K]`` and a band holds whole output channels. The tiles of a band run on a few Python threads with
    torch held to one thread each: torch's own OpenMP team synchronises after every op and slows down several
    times, erratically, as soon as another process takes a core.
    """
    torch = _torch()
    dtype = np.dtype(dtype)
    k, n = (cols, rows) if transposed else (rows, cols)
    n_blocks = k // block_size
    packed = np.empty((n, n_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.empty((n, n_blocks), dtype=dtype)
    packed_t, scales_t = torch.from_numpy(packed), _as_torch(torch, scales)
    sample = None if sample_cols is None else np.empty((k, len(sample_cols)), dtype=np.float32)
    workers = max(1, min(os.cpu_count() or 1, _MAX_WORKERS))
    if transposed:  # tiles of whole output channels
        step_rows, step_cols = max(1, _TILE_ELEMENTS // k), k
    else:  # tiles of a few blocks of K by as many channels as fit
        band_blocks = _band_rows(rows, cols, dtype.itemsize, block_size, False) // block_size
        step_rows = block_size * max(1, min(_TILE_BLOCKS, band_blocks))
        step_cols = max(1, min(n, _TILE_ELEMENTS // step_rows))

    def work(band_t, first: int, tiles: list[tuple[int, int]]) -> bool:
        ok = True
        for r, c in tiles:
            if transposed:
                tile = band_t[r : r + step_rows]
                ns = slice(first + r, first + r + tile.shape[0])
                ok &= _rows_tile(torch, tile, packed_t[ns], scales_t[ns], block_size, bits)
            else:
                tile = band_t[r : r + step_rows, c : c + step_cols]
                bs = slice((first + r) // block_size, (first + r + tile.shape[0]) // block_size)
                ns = slice(c, c + tile.shape[1])
                ok &= _cols_tile(torch, tile, packed_t[ns, bs], scales_t[ns, bs], block_size, bits)
        return ok

    pool = _shared_pool(workers)
    with _one_torch_thread(torch):
        for first, band in bands:
            band_t = _as_torch(torch, band)
            tiles = [(r, c) for r in range(0, band.shape[0], step_rows) for c in range(0, band.shape[1], step_cols)]
            done = [pool.submit(work, band_t, first, tiles[i::workers]) for i in range(min(workers, len(tiles)))]
            if sample is not None:  # gathered while the workers quantize
                _keep_sample(sample, band, first, sample_cols, transposed)
            if not all([f.result() for f in done]):
                raise ValueError(f"weight {name!r} has non-finite value(s) (NaN/Inf); refusing to quantize it")
    return QuantizedWeight(packed, scales, None, k, n, block_size, bits), sample


def _shared_pool(workers: int) -> ThreadPoolExecutor:
    """One pool for every quantization in the process: two weights quantized at once share the cores."""
    global _pool
    with _threads_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="streaming_rtn")
        return _pool


@contextlib.contextmanager
def _one_torch_thread(torch):
    """torch.set_num_threads(1) while any quantization runs (``ir.save`` may run several at once)."""
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


def _scales(torch, vmax, vmin, scale_dtype, bits: int):
    """Scales (storage dtype) and float32 reciprocals from the block extremes; None if one is not finite."""
    # The value of largest magnitude, the negative one on a tie, as MLAS picks it (vmax >= vmin, so
    # vmax > -vmin <=> |vmax| > |vmin|). amax/amin propagate NaN; an Inf is its block's extreme.
    extreme = torch.where(vmax > -vmin, vmax, vmin)
    if not bool(torch.isfinite(extreme.abs().amax())):  # amax propagates NaN
        return None
    scale = (extreme / -float(1 << (bits - 1))).to(scale_dtype)  # rounded before the reciprocal, as MLAS does
    s32 = scale.to(torch.float32)
    return scale, torch.where(s32 != 0, 1.0 / s32, torch.zeros((), dtype=torch.float32))


def _levels(torch, f, bits: int):
    """``clamp(floor(f + mid + 0.5), 0, 2**bits - 1)`` as int32, in place on ``f`` = ``v * (1/scale)``."""
    f.add_(float(1 << (bits - 1)))
    f.add_(0.5)  # a separate add: fl(x + 0.5) is exact for every x here (module docstring)
    f.clamp_(0.0, float((1 << bits) - 1))  # truncating a value in [0, 2**bits - 1] takes its floor
    return f.to(torch.int32)  # float -> int32 converts vectorised; float -> uint8 is ~10x slower in torch


def _cols_tile(torch, tile, packed_out, scales_out, block_size: int, bits: int) -> bool:
    """``tile[nbb * block_size, c]`` (nbb blocks of K for c channels) -> ``packed_out[c, nbb, bytes]``, scales.

    The packed bytes are assembled into int32 words and transposed as words, so each channel receives one
    contiguous run of nbb blocks instead of 16 scattered bytes per block.
    """
    rows, c = tile.shape
    nbb = rows // block_size
    f = tile.to(torch.float32, copy=True).view(nbb, block_size, c)  # exact widening; f is modified in place
    result = _scales(torch, f.amax(1), f.amin(1), scales_out.dtype, bits)
    if result is None:
        return False
    scale, reciprocal = result
    f.mul_(reciprocal.unsqueeze(1))
    per_word = 32 // bits
    q = _levels(torch, f, bits).view(nbb, block_size // per_word, per_word, c)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32).view(1, 1, per_word, 1)
    words = (q << shifts).sum(2, dtype=torch.int32)  # the fields do not overlap: the sum is their bitwise or
    words = words.view(-1, c).t().contiguous()  # [c, nbb * words per block], little-endian bytes in order
    packed_out.copy_(words.view(torch.uint8).view(c, nbb, -1))
    scales_out.copy_(scale.t())
    return True


def _rows_tile(torch, tile, packed_out, scales_out, block_size: int, bits: int) -> bool:
    """``tile[r, K]`` (whole output channels of a transposed weight) -> ``packed_out[r, nb, bytes]``, scales."""
    r, k = tile.shape
    f = tile.to(torch.float32, copy=True).view(r, k // block_size, block_size)
    result = _scales(torch, f.amax(2), f.amin(2), scales_out.dtype, bits)
    if result is None:
        return False
    scale, reciprocal = result
    f.mul_(reciprocal.unsqueeze(2))
    q = _levels(torch, f, bits).to(torch.uint8)
    packed_out.copy_(q[..., 0::2] | (q[..., 1::2] << 4) if bits == 4 else q)
    scales_out.copy_(scale)
    return True


def _keep_sample(sample: np.ndarray, band: np.ndarray, first: int, cols: np.ndarray, transposed: bool) -> None:
    """Copy the sampled output channels found in this band (all the error report needs of the float weight)."""
    if not transposed:
        sample[first : first + band.shape[0]] = band[:, cols]
        return
    inside = (cols >= first) & (cols < first + band.shape[0])
    sample[:, inside] = band[cols[inside] - first].T


def _as_torch(torch, array: np.ndarray):
    if array.dtype == _BF16:  # torch.from_numpy does not know ml_dtypes' bfloat16; the bits are the same
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def array_bands(weight: np.ndarray, block_size: int, transposed: bool) -> Iterator[tuple[int, np.ndarray]]:
    """Bands of an in-memory stored weight (views, no copies)."""
    rows, cols = weight.shape
    step = _band_rows(rows, cols, weight.dtype.itemsize, block_size, transposed)
    for first in range(0, rows, step):
        yield first, weight[first : first + step]


def file_bands(
    path: str | os.PathLike, offset: int, rows: int, cols: int, dtype, block_size: int, transposed: bool
) -> Iterator[tuple[int, np.ndarray]]:
    """Bands of a row-major ``[rows, cols]`` tensor at ``offset`` in ``path``, memory-mapped without a copy.

    The next band's pages are mapped in (and read from disk if not cached) on a helper thread while the current
    band is quantized; a finished band's pages are dropped from the process (``MADV_DONTNEED``), so its RSS holds
    about two bands whatever the tensor's size. onnx_ir's own map keeps every page it touched.
    """
    dtype = np.dtype(dtype)
    row_bytes = cols * dtype.itemsize
    step = _band_rows(rows, cols, dtype.itemsize, block_size, transposed)
    starts = list(range(0, rows, step))
    with open(path, "rb") as f:
        # Private and writable (copy-on-write, never written): torch takes it without a read-only warning.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if len(mm) < offset + rows * row_bytes:
        raise ValueError(f"external data file {path} ends inside a tensor (offset {offset})")

    def pages(i: int) -> tuple[int, int]:
        begin = offset + starts[i] * row_bytes
        end = begin + min(step, rows - starts[i]) * row_bytes
        return begin - begin % mmap.PAGESIZE, end - begin + begin % mmap.PAGESIZE

    def populate(i: int) -> None:
        try:
            advise(mm, _MADV_POPULATE_READ, *pages(i))
        except OSError:  # kernels before 5.14: start the read-ahead, the workers fault the pages in
            advise(mm, mmap.MADV_WILLNEED, *pages(i))

    with ThreadPoolExecutor(max_workers=1) as helper:
        pending = helper.submit(populate, 0)
        for i, first in enumerate(starts):
            pending.result()
            if i + 1 < len(starts):
                pending = helper.submit(populate, i + 1)
            count = min(step, rows - first) * cols
            yield (
                first,
                np.frombuffer(mm, dtype=dtype, count=count, offset=offset + first * row_bytes).reshape(-1, cols),
            )
            advise(mm, getattr(mmap, "MADV_DONTNEED", 0), *pages(i))
    # The map closes when the last view of it is gone.


def _band_rows(rows: int, cols: int, itemsize: int, block_size: int, transposed: bool) -> int:
    unit = 1 if transposed else block_size  # whole blocks of K when K runs down the rows
    return min(rows, max(1, _BAND_BYTES // max(1, cols * itemsize * unit)) * unit)
