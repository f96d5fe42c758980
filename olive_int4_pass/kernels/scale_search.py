"""Importance-weighted scale (and clip) search per block, still rounding to nearest in the MatMulNBits format.

Per block, the candidate scale whose dequantized block minimises ``sum_k imp_k * (w_k - deq_k)^2`` wins;
``imp_k = E[x_k^2]`` of the MatMul's input channel k (llama.cpp's importance matrix, AWQ's observation: channels
with large activations matter most). Candidates:

- symmetric: the round-to-nearest range shrunk by each factor of ``SHRINK_GRID`` (clipping the extremes), and
  the same with the sign flipped, the block's extreme on the short side of the signed range (``+7`` instead of
  ``-8`` at 4 bits: a coarser step, but the other side reaches ``-8``);
- asymmetric: the range spread over ``2**bits - 1 + d`` steps for each ``d`` of ``STEP_GRID`` (llama.cpp's
  ``make_qkx2_quants`` grid), each candidate refitted once;
- the winner refitted ``REFIT_STEPS`` times: the least-squares scale (asymmetric: scale and offset, the zero
  point rounded) for the levels it rounds to, then rounded to nearest again with it.

Measured on a real 1.5B model's MatMuls (importance-weighted error relative to symmetric RTN, geometric mean
over 12-25): shrink only 0.82, + sign flip 0.75, + refit 0.73; asymmetric: RTN 0.87, shrink + refit 0.64, step
grid with a refit per candidate 0.58 (0.60 with a 2-D grid of clipped minima and maxima, at 8x the cost). Plain
MSE (``importance=None``) is allowed but measured to be no better than RTN in perplexity. Candidates are rounded
to the scale dtype before they are scored, exactly as they will be stored, and scored with the levels the MLAS
kernel picks for them; the winner is then quantized by :func:`quantize_blockwise` with ``scales=``, so the
bytes follow the same kernel as everything else.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from olive_int4_pass.kernels.rtn import dequantize_blocks, round_half_away, round_to_grid, rtn_params, to_blocks

SHRINK_GRID = tuple(np.round(np.arange(0.70, 1.0001, 0.025), 3))
STEP_GRID = tuple(np.round(np.linspace(-3.0, 1.0, 11), 3))
REFIT_STEPS = 2
# Weights per work item: small enough that the float32 temporaries are recycled by the allocator instead of being
# fresh mmap'd pages (with 4M-element items, page faults made half of the search's CPU time system time).
_CHUNK_ELEMENTS = 1 << 16


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
    refit_steps: int = REFIT_STEPS,
) -> SearchResult:
    """Best per-block scales for ``weight[K, N]`` under the activation importance ``importance[K]``.

    ``grid=(1.0,), refit_steps=0`` measures plain round to nearest.
    """
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
    searching = tuple(grid) != (1.0,)
    shrinks = [g for g in grid if g != 1.0] if symmetric else []
    if symmetric and searching:  # the extreme -> +(2**(bits-1) - 1) instead of -2**(bits-1)
        half = 1 << (bits - 1)
        shrinks += [-g * half / (half - 1) for g in grid]
    steps = STEP_GRID if searching and not symmetric else ()

    def work(n0: int) -> np.ndarray:
        blocks = to_blocks(weight[:, n0 : n0 + rows], block_size, n_blocks)

        def error(s, zp):
            deq = dequantize_blocks(round_to_grid(blocks, s, zp, bits), s, zp, bits)
            return np.einsum("nbk,bk->nb", (blocks - deq) ** 2, imp_blocks)

        best_s, best_zp = rtn_params(blocks, bits, symmetric, weight.dtype)
        best_err = rtn_err = error(best_s, best_zp)

        def consider(s, zp) -> None:
            nonlocal best_err, best_s, best_zp
            err = error(s, zp)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s, best_s)
            if zp is not None:
                best_zp = np.where(better, zp, best_zp)

        for shrink in shrinks:
            consider(*rtn_params(blocks, bits, symmetric, weight.dtype, shrink=shrink))
        for step in steps:
            s, zp = _spread(blocks, step, bits, weight.dtype)
            consider(s, zp)
            consider(*_refit(blocks, imp_blocks, s, zp, bits))
        for _ in range(refit_steps):
            consider(*_refit(blocks, imp_blocks, best_s, best_zp, bits))
        scales[n0 : n0 + rows] = best_s
        if zps is not None:
            zps[n0 : n0 + rows] = best_zp
        return np.array([best_err.sum(), rtn_err.sum(), np.einsum("nbk,bk->", blocks**2, imp_blocks)])

    starts = range(0, n, rows)
    # numpy releases the GIL in its kernels: chunks run in parallel (results do not depend on the split).
    with ThreadPoolExecutor(max_workers=max(1, min(len(starts), os.cpu_count() or 1))) as pool:
        totals = sum(pool.map(work, starts))
    return SearchResult(scales, zps, *map(float, totals))


def _spread(blocks: np.ndarray, step: float, bits: int, scale_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric parameters spreading each block's range (zero included) over ``2**bits - 1 + step`` steps."""
    vmax = np.maximum(blocks.max(axis=-1), np.float32(0))
    vmin = np.minimum(blocks.min(axis=-1), np.float32(0))
    scale = ((vmax - vmin) / np.float32((1 << bits) - 1 + step)).astype(scale_dtype)
    s32 = scale.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(s32 != 0, -vmin / s32, np.float32(0))
    return scale, np.clip(round_half_away(zp), 0, (1 << bits) - 1).astype(np.uint8)


def _refit(blocks: np.ndarray, imp: np.ndarray, scales: np.ndarray, zps: np.ndarray | None, bits: int):
    """Least-squares (importance-weighted) scale, and offset when asymmetric, for the levels ``scales`` round to."""
    q = round_to_grid(blocks, scales, zps, bits).astype(np.float32)
    s_old = scales.astype(np.float32)
    if zps is None:
        c = q - np.float32(1 << (bits - 1))
        num = np.einsum("nbk,bk->nb", blocks * c, imp)
        den = np.einsum("nbk,bk->nb", c * c, imp)
        with np.errstate(divide="ignore", invalid="ignore"):
            fitted = np.where(den > 0, num / den, s_old)
        return fitted.astype(scales.dtype), None
    # w ~ s * q + m: the weighted normal equations of each block, then the zero point -m / s rounded into range.
    sw = imp.sum(-1)
    sq, sqq = np.einsum("nbk,bk->nb", q, imp), np.einsum("nbk,bk->nb", q * q, imp)
    sx, sqx = np.einsum("nbk,bk->nb", blocks, imp), np.einsum("nbk,bk->nb", blocks * q, imp)
    det = sw * sqq - sq * sq
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.where(det > 0, (sw * sqx - sq * sx) / det, s_old)
        m = np.where(det > 0, (sx - s * sq) / sw, -s_old * zps)
        zp = np.clip(np.round(-m / s), 0, (1 << bits) - 1)
    ok = np.isfinite(s) & (s > 0) & np.isfinite(zp)
    return np.where(ok, s, s_old).astype(scales.dtype), np.where(ok, zp, zps).astype(np.uint8)
