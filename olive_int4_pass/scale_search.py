"""Importance-weighted scale (and clip) search per block, still rounding to nearest in the MatMulNBits format.

For each block the round-to-nearest range is shrunk by factors in ``SHRINK_GRID`` and the candidate whose
dequantized block minimises ``sum_k imp_k * (w_k - deq_k)^2`` wins; ``imp_k = E[x_k^2]`` of the MatMul's input
channel k (llama.cpp's importance matrix, AWQ's observation: channels with large activations matter most). Plain
weight MSE (``importance=None``) is allowed but measured to be no better than RTN. Candidates are rounded to the
scale dtype before they are scored, exactly as they will be stored; the winner is then quantized by
:func:`quantize_blockwise` with ``scales=``, so the bytes follow the same kernel as everything else.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from olive_int4_pass.block_quant import dequantize_blocks, round_to_grid, rtn_params, to_blocks

SHRINK_GRID = tuple(np.round(np.arange(0.70, 1.0001, 0.025), 3))
_CHUNK_ELEMENTS = 1 << 22


@dataclasses.dataclass(frozen=True)
class SearchResult:
    scales: np.ndarray  # [N, n_blocks], weight dtype
    zero_points: np.ndarray | None  # [N, n_blocks] uint8, unpacked
    weighted_error: float  # sum imp * (w - deq)^2 with the chosen scales
    rtn_weighted_error: float  # the same with round-to-nearest scales
    weighted_energy: float  # sum imp * w^2, to make the errors relative


def search_scales(
    weight: np.ndarray,
    importance: np.ndarray | None,
    *,
    block_size: int = 32,
    bits: int = 4,
    symmetric: bool = True,
    grid: tuple[float, ...] = SHRINK_GRID,
) -> SearchResult:
    """Best per-block scales for ``weight[K, N]`` under the activation importance ``importance[K]``."""
    k, n = weight.shape
    n_blocks = -(-k // block_size)
    imp = np.ones(k, np.float32) if importance is None else np.asarray(importance, np.float32)
    if imp.shape != (k,):
        raise ValueError(f"importance has shape {imp.shape}, expected ({k},)")
    imp_blocks = np.zeros(n_blocks * block_size, np.float32)
    imp_blocks[:k] = imp / max(float(imp.mean()), 1e-30)  # scale-free; padding weighs nothing
    imp_blocks = imp_blocks.reshape(n_blocks, block_size)
    scales = np.empty((n, n_blocks), weight.dtype)
    zps = None if symmetric else np.empty((n, n_blocks), np.uint8)
    rows = max(1, _CHUNK_ELEMENTS // (n_blocks * block_size))

    def work(n0: int) -> np.ndarray:
        blocks = to_blocks(weight[:, n0 : n0 + rows], block_size, n_blocks)

        def error(s, zp):
            deq = dequantize_blocks(round_to_grid(blocks, s, zp, bits), s, zp, bits)
            return np.einsum("nbk,bk->nb", (blocks - deq) ** 2, imp_blocks)

        best_s, best_zp = rtn_params(blocks, bits, symmetric, weight.dtype)
        best_err = rtn_err = error(best_s, best_zp)
        for shrink in grid:
            if shrink == 1.0:
                continue
            s, zp = rtn_params(blocks, bits, symmetric, weight.dtype, shrink=shrink)
            err = error(s, zp)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s, best_s)
            if zp is not None:
                best_zp = np.where(better, zp, best_zp)
        scales[n0 : n0 + rows] = best_s
        if zps is not None:
            zps[n0 : n0 + rows] = best_zp
        return np.array([best_err.sum(), rtn_err.sum(), np.einsum("nbk,bk->", blocks**2, imp_blocks)])

    starts = range(0, n, rows)
    # numpy releases the GIL in its kernels: chunks run in parallel (results do not depend on the split).
    with ThreadPoolExecutor(max_workers=max(1, min(len(starts), os.cpu_count() or 1))) as pool:
        totals = sum(pool.map(work, starts))
    return SearchResult(scales, zps, *map(float, totals))
