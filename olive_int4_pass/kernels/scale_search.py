"""Importance-weighted scale (and clip) search per block, still rounding to nearest in the MatMulNBits format.

Per block, the candidate scale whose dequantized block minimises ``sum_k imp_k * (w_k - deq_k)^2`` wins;
``imp_k = E[x_k^2]`` of the MatMul's input channel k (llama.cpp's importance matrix, AWQ's observation: channels
with large activations matter most). Candidates:

- symmetric: the round-to-nearest range shrunk by each factor of ``SHRINK_GRID`` (clipping the extremes), and
  the same with the sign flipped, the block's extreme on the short side of the signed range (``+7`` instead of
  ``-8`` at 4 bits: a coarser step, but the other side reaches ``-8``);
- asymmetric: the range spread over ``2**bits - 1 + d`` steps for each ``d`` of ``STEP_GRID`` (llama.cpp's
  ``make_qkx2_quants`` grid), each candidate refitted once;
- the winner refitted ``REFIT_STEPS`` times. A refit is the least-squares scale for the levels a candidate rounds
  to (asymmetric: for its zero point), then rounded to nearest again with it.

Measured on a real 1.5B model's MatMuls (importance-weighted error relative to symmetric RTN, geometric mean
over 12-25): shrink only 0.82, + sign flip 0.75, + refit 0.73; asymmetric: RTN 0.87, shrink + refit 0.64, step
grid with a refit per candidate 0.58 (0.60 with a 2-D grid of clipped minima and maxima, at 8x the cost). The
asymmetric refit used to solve for scale and offset together and round the offset to a zero point, keeping the
joint solution's scale; the scale solved for the zero point in use has 3-5 % less error (synthetic weights,
``tests/kernels/test_scale_search.py``), and letting the refit move the zero point measured no better. Plain MSE
(``importance=None``) is allowed but measured to be no better than RTN in perplexity. Candidates are rounded to
the scale dtype before they are scored, exactly as they will be stored, and scored with the levels the MLAS
kernel picks for them; the winner is then quantized by :func:`quantize_blockwise` with ``scales=``, so the bytes
follow the same kernel as everything else. A block's winner is its first candidate of least error in the order
above (round to nearest first).

Implementation (6-8x faster than the numpy search it replaced on 2 cores, ``benchmarks/scale_search_bench.py``):
the weight is cut into tiles of whole blocks of K by up to 1024 output channels, laid out ``[blocks, block_size,
channels]`` so that every per-block quantity broadcasts along the contiguous channels. A tile's candidates are
scored one after the other by about ten in-place float32 torch operations each, on buffers that stay in cache
(torch on a few Python threads, held to one thread each, as in :mod:`.streaming_rtn`); the per-block parameters
(the candidates' scales and zero points, with the expressions of :mod:`.rtn`, and the refits) are numpy
expressions on ``[blocks, channels]`` arrays. A refit's sums ride along with its candidate's scoring (two
products more, summed with the error). No operation mixes elements (no fused multiply-add; a block's sums are a
fixed tree of pairwise additions, not ``torch.sum``, whose order depends on the shape), so a block's result does
not depend on the tile it lands in, and the totals are summed exactly (per binary exponent): the result is
bit-identical whatever the tiling and the number of threads.

MLAS rounds ``x = fl(fl(w * (1/scale)) + zp)`` half away from zero and clamps it to ``[0, 2**bits - 1]``;
here, after the clamp (which commutes with rounding), ``floor(fl(x + (0.5 - 2**-25)))`` gives the same level for
every ``x`` in range (the offset just under 1/2 keeps ``x`` just under 0.5 from rounding up to 1, and still
turns a tie ``n + 1/2`` into ``n + 1``). Symmetric, ``x`` is a multiple of ``2**-21`` (4 bits; ``2**-17`` at 8
bits) below ``2 * mid``, so ``x - (mid - 1/2)`` is exact and ``floor`` of it is directly the signed level.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np

from olive_int4_pass.kernels import streaming_rtn
from olive_int4_pass.kernels.pages import release_pages
from olive_int4_pass.kernels.rtn import round_half_away

SHRINK_GRID = tuple(np.round(np.arange(0.70, 1.0001, 0.025), 3))
STEP_GRID = tuple(np.round(np.linspace(-3.0, 1.0, 11), 3))
REFIT_STEPS = 2
# Weights per tile: a worker's buffers (about 12 MiB at 2**19) stay in L3 while the tile's 25-30 candidates are
# scored; larger tiles amortise torch's per-operation overhead (a few microseconds): on a 2-core EPYC, 2**17 took
# 1.2-1.6x the time of 2**19, 2**20 about the same.
_TILE_ELEMENTS = 1 << 19
_TILE_COLUMNS = 1024  # output channels per tile (fewer if the weight has fewer)
_MAX_WORKERS = 8
_HALF_BELOW = 0.5 - 2.0**-25  # floor(fl(x + _HALF_BELOW)) == roundf(x) for 0 <= x < 2**22 (module docstring)
_BF16 = np.dtype(ml_dtypes.bfloat16)
_EXPONENT_BUCKETS = 300  # frexp exponents of float32 values, -148..128, shifted by _EXPONENT_SHIFT
_EXPONENT_SHIFT = 160


@dataclasses.dataclass(frozen=True)
class SearchResult:
    scales: np.ndarray  # [N, n_blocks], weight dtype
    zero_points: np.ndarray | None  # [N, n_blocks] uint8, unpacked
    weighted_error: float  # sum imp * (w - deq)^2 with the chosen scales
    rtn_weighted_error: float  # the same with round-to-nearest scales
    weighted_energy: float  # sum imp * w^2, to make the errors relative


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What every tile of one search shares."""

    k: int
    n: int
    block_size: int
    bits: int
    symmetric: bool
    dtype: np.dtype
    factors: np.ndarray  # symmetric: float32 multipliers of the block's extreme, 1.0 (round to nearest) first
    steps: tuple[float, ...]  # asymmetric: the step grid (empty: round to nearest only)
    refit_steps: int
    imp: object  # torch float32 [n_blocks, block_size, 1], mean 1, padding 0

    @property
    def n_candidates(self) -> int:
        return len(self.factors) if self.symmetric else 1 + 2 * len(self.steps)


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
    torch = streaming_rtn._torch()
    if torch is None:
        raise ImportError("the scale search needs torch (installed with olive-ai)")
    weight = np.asarray(weight)
    k, n = weight.shape
    n_blocks = -(-k // block_size)
    imp = np.ones(k, np.float32) if importance is None else np.asarray(importance, np.float32)
    if imp.shape != (k,):
        raise ValueError(f"importance has shape {imp.shape}, expected ({k},)")
    imp_blocks = np.zeros(n_blocks * block_size, np.float32)
    imp_blocks[:k] = imp / max(float(imp.mean()), 1e-30)  # scale-free; padding weighs nothing
    imp_blocks = imp_blocks.reshape(n_blocks, block_size)

    searching = tuple(grid) != (1.0,)
    factors = [1.0]
    if symmetric:
        factors += [g for g in grid if g != 1.0]
        if searching:  # the extreme -> +(2**(bits-1) - 1) instead of -2**(bits-1)
            half = 1 << (bits - 1)
            factors += [-g * half / (half - 1) for g in grid]
    setup = _Setup(
        k=k,
        n=n,
        block_size=block_size,
        bits=bits,
        symmetric=symmetric,
        dtype=weight.dtype,
        factors=np.array(factors, np.float32),
        steps=tuple(STEP_GRID) if searching and not symmetric else (),
        refit_steps=refit_steps,
        imp=torch.from_numpy(imp_blocks).unsqueeze(-1),
    )
    scales = np.empty((n, n_blocks), weight.dtype)
    zps = None if symmetric else np.empty((n, n_blocks), np.uint8)
    cols = max(1, min(n, _TILE_COLUMNS))
    rows = max(1, min(n_blocks, _TILE_ELEMENTS // (block_size * cols)))  # blocks of K per tile
    tiles = [(b0, c0) for b0 in range(0, n_blocks, rows) for c0 in range(0, n, cols)]
    next_tile = iter(range(len(tiles)))
    lock = threading.Lock()

    def work() -> np.ndarray:
        tiler = _Tiler(torch, setup, rows, cols, weight, scales, zps)
        band = None
        while True:
            with lock:
                i = next(next_tile, None)
            if i is None:
                return tiler.totals
            if tiles[i][0] != band:  # a new band of K: the pages read for the last one are not needed again
                band = tiles[i][0]
                release_pages(weight)
            tiler.run(*tiles[i])

    workers = max(1, min(len(tiles), os.cpu_count() or 1, _MAX_WORKERS))
    with streaming_rtn._one_torch_thread(torch):
        if workers == 1:
            totals = [work()]
        else:  # tiles are handed out one at a time: a worker slowed by another process takes fewer
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scale_search") as pool:
                totals = [f.result() for f in [pool.submit(work) for _ in range(workers)]]
    best, rtn, energy = (_exact_total(t) for t in sum(totals[1:], totals[0]))
    return SearchResult(scales, zps, best, rtn, energy)


class _Tiler:
    """One worker's buffers, and the search of one tile: blocks ``b0..`` of K by output channels ``c0..``.

    Work tensors are ``[nb, bs, c]`` views (``nb`` blocks of K, ``c`` output channels); per-block quantities are
    ``[nb, c]`` numpy arrays, ``[nb, 1, c]`` torch views of them where they broadcast. With ``c`` the signed level
    of a candidate (``q - zero point``) and ``e = c * s - w`` its error, a refit ``s' = A / B`` needs
    ``B = sum imp * c^2``, summed with the error ``sum imp * e^2``; ``A = sum imp * w * c`` follows from them,
    ``2 s A = sum imp * w^2 + s^2 B - error`` (``A`` is large: no cancellation).
    """

    def __init__(self, torch, setup: _Setup, rows: int, cols: int, source, scales, zps) -> None:
        self.torch, self.setup, self.source, self.scales, self.zps = torch, setup, source, scales, zps
        self.rows, self.cols = rows, cols
        size, per_block = rows * setup.block_size * cols, rows * cols
        self.w_np = np.empty(size, np.float32)
        self.w = torch.from_numpy(self.w_np)
        self.t = torch.empty(size, dtype=torch.float32)
        self.products = torch.empty(2 * size, dtype=torch.float32)  # imp * c^2, imp * e^2
        # 16-bit weights are copied as they are (numpy: any strides, read-only maps), then widened by torch.
        raw = {np.dtype(np.float16): np.float16, _BF16: np.int16}.get(source.dtype)
        self.raw = None if raw is None else np.empty(size, raw)
        self.raw_t = None if raw is None else torch.from_numpy(self.raw)
        if source.dtype == _BF16:
            self.raw_t = self.raw_t.view(torch.bfloat16)
        self.levels = []  # the pairwise block sums' levels: bs/2 .. 2 values per block
        half = setup.block_size // 2
        while half > 1:
            self.levels.append(torch.empty(2 * rows * half * cols, dtype=torch.float32))
            half //= 2
        self.sums_np = np.empty(2 * per_block, np.float32)  # per-block sums: B, error (numpy, torch view)
        self.sums = torch.from_numpy(self.sums_np)
        self.errors = np.empty((setup.n_candidates, per_block), np.float32)  # each candidate's, per block
        self.errors_t = torch.from_numpy(self.errors)
        self.totals = np.zeros((3, _EXPONENT_BUCKETS), np.float64)  # best, round to nearest, energy
        self.shape = None

    def _shape(self, nb: int, c: int) -> None:
        """The views of a tile shape (all tiles but the last row and column of tiles share one)."""
        if self.shape == (nb, c):
            return
        self.shape, bs, m = (nb, c), self.setup.block_size, nb * c
        self.W, self.T = self.w[: m * bs].view(nb, bs, c), self.t[: m * bs].view(nb, bs, c)
        self.P = self.products[: 2 * m * bs].view(2, nb, bs, c)
        self.tree_t = self._tree(self.T)
        self.tree_b = self._tree(self.P[0])  # B
        self.tree_all = self._tree(self.P.view(-1, bs, c))  # B, error
        self.sums_view = self.sums_np[: 2 * m].reshape(2, nb, c)

    def _tree(self, x):
        """The additions that sum ``x[k, bs, c]`` over each block, pairwise in a fixed order, into ``sums``."""
        k, bs, c = x.shape
        steps, half, level = [], bs // 2, 0
        while half >= 1:
            out = self.sums if half == 1 else self.levels[level]
            out = out[: k * half * c].view(k, half, c)
            steps.append((x[:, :half], x[:, half : 2 * half], out))
            x, half, level = out, half // 2, level + 1
        return steps

    def _sum(self, tree, into=None) -> None:
        """Run ``tree``; the last addition goes to ``into`` (a ``[nb, 1, c]`` view) if given."""
        add = self.torch.add
        for a, b, out in tree[:-1]:
            add(a, b, out=out)
        a, b, out = tree[-1]
        add(a, b, out=out if into is None else into)

    def run(self, b0: int, c0: int) -> None:
        torch, st = self.torch, self.setup
        bs = st.block_size
        nb, c = min(self.rows, -(-st.k // bs) - b0), min(self.cols, st.n - c0)
        r0, r1 = b0 * bs, min(st.k, (b0 + nb) * bs)
        self._shape(nb, c)
        tile = self.source[r0:r1, c0 : c0 + c]
        w = self.W.view(nb * bs, c)
        if self.raw is None:
            np.copyto(self.w_np[: (r1 - r0) * c].reshape(r1 - r0, c), tile, casting="unsafe")
        else:
            np.copyto(self.raw[: (r1 - r0) * c].reshape(r1 - r0, c), tile.view(self.raw.dtype))
            w[: r1 - r0].view(-1).copy_(self.raw_t[: (r1 - r0) * c])  # exact widening
        w[r1 - r0 :].zero_()  # padding of a last partial block: never changes its range, weighs nothing
        self.IMP = st.imp[b0 : b0 + nb]
        vmax, vmin = self.W.amax(1).numpy(), self.W.amin(1).numpy()
        torch.mul(self.IMP, self.W, out=self.T).mul_(self.W)
        self._sum(self.tree_t)
        self.energy = self.sums_view[0].copy()  # sum imp * w^2
        best = self._symmetric(vmax, vmin) if st.symmetric else self._asymmetric(vmax, vmin)
        best_s, best_zp, best_err, rtn_err = best
        if st.refit_steps:
            best_b = self._score(best_s, best_zp, None).copy()  # B of the winners' levels
        for _ in range(st.refit_steps):
            s = self._fit(best_s, best_b, best_err)
            err = self._score(s, best_zp, 0, with_sums=True)
            better = err < best_err
            if not better.any():  # nothing moved: the next refit would find the same candidates again
                break
            best_err, best_s = np.where(better, err, best_err), np.where(better, s, best_s)
            best_b = np.where(better, self.sums_view[0], best_b)
        self.scales[c0 : c0 + c, b0 : b0 + nb] = best_s.T.astype(st.dtype)  # exact: the values are in dtype
        if self.zps is not None:
            self.zps[c0 : c0 + c, b0 : b0 + nb] = best_zp.T
        for total, values in zip(self.totals, (best_err, rtn_err, self.energy), strict=True):
            _exact_add(total, values)

    # --- candidates -------------------------------------------------------------------------------------------

    def _symmetric(self, vmax, vmin):
        st = self.setup
        half = np.float32(1 << (st.bits - 1))
        extreme = np.where(np.abs(vmax) > np.abs(vmin), vmax, vmin)  # as rtn_params picks it
        # rtn_params: (-(extreme * shrink) / half).astype(dtype); the product by 1.0 (round to nearest) is exact.
        cands = _in_dtype(self.torch, -(extreme[None] * st.factors[:, None, None]) / half, st.dtype)
        reciprocals = _reciprocal(cands)
        for i in range(len(cands)):
            self._score(cands[i], None, i, reciprocal=reciprocals[i])
        return self._pick(cands, None)

    def _asymmetric(self, vmax, vmin):
        st = self.setup
        qmax = np.float32((1 << st.bits) - 1)
        vmax, vmin = np.maximum(vmax, np.float32(0)), np.minimum(vmin, np.float32(0))
        # rtn_params: the zero point from the unrounded float32 scale, then the scale rounded.
        scale = (vmax - vmin) / qmax
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(scale != 0, np.float32(0) - vmin / scale, vmin)
        scales = [_in_dtype(self.torch, scale, st.dtype)[None]]
        zps = [np.clip(round_half_away(zp), 0, qmax).astype(np.uint8)[None]]
        self._score(scales[0][0], zps[0][0], 0)
        if st.steps:
            # The range over qmax + step steps (llama.cpp's make_qkx2_quants), as _spread did: the scale rounded
            # first, the zero point from it. Then each one's refit.
            steps = np.array([(1 << st.bits) - 1 + step for step in st.steps], np.float32)[:, None, None]
            s = _in_dtype(self.torch, (vmax - vmin)[None] / steps, st.dtype)
            with np.errstate(divide="ignore", invalid="ignore"):
                zp = np.where(s != 0, -vmin[None] / s, np.float32(0))
            zp = np.clip(round_half_away(zp), 0, qmax).astype(np.uint8)
            reciprocals = _reciprocal(s)
            sums = np.empty((len(s), 2, *vmax.shape), np.float32)
            for j in range(len(s)):  # slots in the order spread, refit, spread, refit...: the first wins ties
                self._score(s[j], zp[j], 1 + 2 * j, reciprocal=reciprocals[j], with_sums=True)
                sums[j] = self.sums_view
            fit_s = self._fit(s, sums[:, 0], sums[:, 1])
            reciprocals = _reciprocal(fit_s)
            for j in range(len(s)):
                self._score(fit_s[j], zp[j], 2 + 2 * j, reciprocal=reciprocals[j])
            scales += [np.stack([s, fit_s], 1).reshape(-1, *vmax.shape)]
            zps += [np.stack([zp, zp], 1).reshape(-1, *vmax.shape)]
        return self._pick(np.concatenate(scales), np.concatenate(zps))

    def _pick(self, scales, zps):
        """Each block's first candidate of least error: (scale, zero point, error, round to nearest's error)."""
        nb, c = self.shape
        errors = self.errors[: len(scales), : nb * c].reshape(len(scales), nb, c)
        best_err = np.fmin.reduce(errors, axis=0)  # NaN never wins (all NaN: round to nearest stays)
        best_s, best_zp = scales[0].copy(), None if zps is None else zps[0].copy()
        for i in range(len(scales) - 1, 0, -1):  # backwards: the first of equal errors is written last
            at = errors[i] == best_err
            np.copyto(best_s, scales[i], where=at)
            if zps is not None:
                np.copyto(best_zp, zps[i], where=at)
        first = errors[0] == best_err
        np.copyto(best_s, scales[0], where=first)
        if zps is not None:
            np.copyto(best_zp, zps[0], where=first)
        return best_s, best_zp, best_err, errors[0].copy()

    def _fit(self, s, b_sum, err):
        """The least-squares (importance-weighted) scale of candidates for the levels they round to, their zero
        points kept, from their sums: ``A / B``. Where there is none (or, asymmetric, not a positive one) the
        candidate stays as it was.
        """
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            a_sum = ((self.energy - err) + s * s * b_sum) / (np.float32(2) * s)  # sum imp * w * c
            fitted = a_sum / b_sum
        ok = b_sum > 0
        if not self.setup.symmetric:
            ok &= np.isfinite(fitted) & (fitted > 0)
        return _in_dtype(self.torch, np.where(ok, fitted, s), self.setup.dtype)

    # --- scoring ----------------------------------------------------------------------------------------------

    def _score(self, s: np.ndarray, zp: np.ndarray | None, slot, *, with_sums=False, reciprocal=None):
        """Per-block ``sum imp * (w - deq)^2`` for the float32 scales ``s`` (values of the scale dtype) into
        ``errors[slot]``, returned as a ``[nb, c]`` view.

        ``with_sums``: ``B`` of its levels too, in ``sums_view[0]`` (the error in ``sums_view[1]``). ``slot`` None:
        only ``B``, returned.
        """
        torch = self.torch
        nb, c = self.shape
        T, W, IMP, P = self.T, self.W, self.IMP, self.P
        if reciprocal is None:
            reciprocal = _reciprocal(s)
        offset = None if zp is None else torch.from_numpy(zp.astype(np.float32)).view(nb, 1, c)
        _levels(torch.mul(torch.from_numpy(reciprocal).view(nb, 1, c), W, out=T), offset, self.setup.bits)
        if offset is not None:
            T.sub_(offset)  # c = q - zp
        if with_sums or slot is None:
            torch.mul(IMP, T, out=P[0]).mul_(T)
            if slot is None:
                self._sum(self.tree_b)
                return self.sums_view[0]
        T.mul_(torch.from_numpy(s).view(nb, 1, c)).sub_(W)  # e
        errors = self.errors[slot, : nb * c].reshape(nb, c)
        if with_sums:
            torch.mul(T, T, out=P[1]).mul_(IMP)
            self._sum(self.tree_all)
            errors[:] = self.sums_view[1]
        else:
            T.mul_(T).mul_(IMP)
            self._sum(self.tree_t, into=self.errors_t[slot, : nb * c].view(nb, 1, c))
        return errors


def _reciprocal(s: np.ndarray) -> np.ndarray:
    """round_to_grid's ``1 / scale`` (0 for a zero scale), float32, contiguous."""
    with np.errstate(divide="ignore"):
        return np.where(s != 0, np.float32(1) / s, np.float32(0)).astype(np.float32)


def _levels(x, offset, bits: int):
    """In place, ``x = fl(w * (1/scale))`` -> the level MLAS picks: ``q - 2**(bits-1)`` symmetric (``offset``
    None), ``q`` asymmetric (``offset``: the zero points, float32). See the module docstring for why it is exact.
    """
    qmax = float((1 << bits) - 1)
    if offset is None:
        mid = float(1 << (bits - 1))
        return x.add_(mid).clamp_(0.0, qmax).sub_(mid - 0.5).floor_()
    return x.add_(offset).clamp_(0.0, qmax).add_(_HALF_BELOW).floor_()


def _in_dtype(torch, x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 ``x`` rounded to ``dtype`` (as ``astype`` rounds: to nearest, ties to even), back in float32."""
    x = np.asarray(x, np.float32)
    if dtype == np.float32:
        return x
    if dtype == np.float16:
        return torch.from_numpy(x).half().float().numpy()  # torch's conversion is faster than numpy's
    if dtype == _BF16:
        return torch.from_numpy(x).bfloat16().float().numpy()
    return x.astype(dtype).astype(np.float32)


def _exact_add(total: np.ndarray, values: np.ndarray) -> None:
    """Add float32 ``values`` to ``total``, float64 sums per binary exponent, exactly: in any order, same total.

    A bucket holds values in ``[2**(e-1), 2**e)``, multiples of ``2**(e-24)``: its float64 sum is exact for fewer
    than ``2**28`` values.
    """
    values = values.ravel()
    _, exponent = np.frexp(values)
    total += np.bincount(exponent + _EXPONENT_SHIFT, weights=values.astype(np.float64), minlength=_EXPONENT_BUCKETS)


def _exact_total(total: np.ndarray) -> float:
    if not np.isfinite(total).all():
        return float(total.sum())
    return math.fsum(total)
