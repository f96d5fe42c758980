"""The tiled torch scale search: it scores the levels MLAS writes, never loses to round to nearest (nor, over a set
of weights, to the numpy search it replaced), and gives the same bits whatever the threads and tiles."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest
import torch

from olive_int4_pass.kernels import scale_search
from olive_int4_pass.kernels.rtn import (
    dequantize_blocks,
    dequantize_blockwise,
    quantize_blockwise,
    round_half_away,
    round_to_grid,
    rtn_params,
    to_blocks,
    unpack_zero_points,
)
from olive_int4_pass.kernels.scale_search import SHRINK_GRID, STEP_GRID, search_scales

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float16), np.dtype(np.float32), BF16]
MODES = [(4, True), (4, False), (8, True), (8, False)]  # (bits, symmetric)


def hard_weight(k: int, n: int, dtype: np.dtype, seed: int = 0) -> np.ndarray:
    """Blocks spanning 2**-20..2**8, plus zero, constant, one-signed, tie-laden and (fp16) subnormal blocks."""
    rng = np.random.default_rng(seed)
    n_blocks = -(-k // 32)
    magnitude = np.exp2(rng.integers(-20, 8, size=(n_blocks, 1, n))).repeat(32, axis=1).reshape(-1, n)[:k]
    w = rng.standard_normal((k, n)) * magnitude
    w[0:32, 0] = 0  # scale 0
    w[32:64, 1] = np.abs(w[32:64, 1])  # asymmetric zero point 0
    w[32:64, 2] = -np.abs(w[32:64, 2])
    w[0:32, 3] = 0.75  # constant
    w[64:96, 4] = np.arange(32) - 15.5  # .5 ties at round to nearest
    w[0:32, 5] = rng.integers(0, 16, 32) + 0.5
    w[0, 5], w[1, 5] = 15, 0  # asymmetric: scale 1, zero point 0, the ties stay ties
    w[32:64, 6] = rng.uniform(0.25, 0.5, 32)
    w[32, 6], w[33, 6], w[34, 6] = 15, 0, 0.5 - 2.0**-25  # fl(v + 0.5) rounds up to 1 (float32 weights)
    if dtype == np.float16:
        w[64:96, 7] = rng.integers(-20, 20, 32) * 2.0**-24  # subnormal block: its scale rounds to a subnormal
    return w.astype(dtype)


def llm_weight(kind: str, k: int, n: int, dtype: np.dtype, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        w = rng.standard_normal((k, n)) * 0.02
    elif kind == "student-t":
        w = rng.standard_t(3, (k, n)) * 0.01
    else:  # a few input channels 10-30x larger (the columns of W^T that LLM outlier features hit)
        w = rng.standard_normal((k, n)) * 0.02
        w[rng.choice(k, 4, replace=False)] *= rng.uniform(10, 30, size=(4, 1))
    return w.astype(dtype)


def importance(k: int, seed: int = 0) -> np.ndarray:
    """E[x^2] per input channel: log-normal, a few channels 100x larger, one 0."""
    rng = np.random.default_rng(seed + 1000)
    imp = np.exp(rng.standard_normal(k)).astype(np.float32)
    imp[rng.choice(k, 3, replace=False)] *= 100
    imp[k // 2] = 0
    return imp


def block_errors(w: np.ndarray, scales, zero_points, imp, *, bits: int, symmetric: bool) -> np.ndarray:
    """float64 ``sum imp * (w - deq)^2`` per block ``[N, n_blocks]`` of the bytes quantize_blockwise writes."""
    q = quantize_blockwise(w, bits=bits, symmetric=symmetric, scales=scales, zero_points=zero_points)
    err = (w.astype(np.float64) - dequantize_blockwise(q)) ** 2 * (imp / max(float(imp.mean()), 1e-30))[:, None]
    k, n = w.shape
    padded = np.zeros((q.n_blocks * 32, n))
    padded[:k] = err
    return padded.reshape(q.n_blocks, 32, n).sum(1).T


# --------------------------------------------------------------------------------------------------------------
# Rounding: the levels scored are those MLAS writes
# --------------------------------------------------------------------------------------------------------------


def neighbourhoods(centres: np.ndarray, ulps: int) -> np.ndarray:
    """Every float32 within ``ulps`` steps of each (non-negative) centre."""
    bits = np.asarray(centres, np.float32).view(np.int32)[:, None] + np.arange(-ulps, ulps + 1, dtype=np.int32)
    return bits.ravel().view(np.float32)


def test_half_below_rounds_like_roundf():
    """floor(fl(x + (0.5 - 2**-25))) == roundf(x) for every x in [0, 2**bits - 1]; fl(x + 0.5) is not."""
    x = np.concatenate(
        [
            neighbourhoods(np.arange(0.5, 256, 1.0), 4096),  # around every tie
            neighbourhoods(np.array([0.25, 1, 2, 4, 8, 16, 32, 64, 128]), 4096),  # binade edges
            np.random.default_rng(0).uniform(0, 256, 1 << 20).astype(np.float32),
            np.float32(2.0) ** -np.arange(1, 149, dtype=np.float32),
        ]
    )
    x = x[(x >= 0) & (x <= 255)]
    expected = round_half_away(x)
    np.testing.assert_array_equal(np.floor(x + np.float32(scale_search._HALF_BELOW)), expected)
    assert (np.floor(x + np.float32(0.5)) != expected).any()  # why the offset is just under 1/2


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_levels_subtract_exactly(bits):
    """Symmetric x = fl(p + mid) lies on a 2**-21 (2**-17) grid below 2 * mid: floor(x - (mid - 1/2)) is exact."""
    mid = np.float32(1 << (bits - 1))
    p = np.concatenate(
        [
            neighbourhoods(np.abs(np.arange(-mid - 1, mid + 1) + 0.5), 4096),
            np.random.default_rng(1).uniform(0, float(mid) + 4, 1 << 20).astype(np.float32),
        ]
    )
    p = np.concatenate([p, -p])
    x = p + mid
    expected = np.clip(round_half_away(x), 0, 2 * mid - 1) - mid
    got = np.floor(np.clip(x, 0, 2 * mid - 1) - np.float32(mid - 0.5))
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bits", "symmetric"), MODES)
def test_levels_are_round_to_grid(dtype, bits, symmetric):
    """The search's in-place level computation equals rtn.round_to_grid (the MLAS arithmetic), scale by scale."""
    w = hard_weight(128, 16, dtype)
    blocks = to_blocks(w, 32, 4)  # [n, nb, 32] float32
    rng = np.random.default_rng(2)
    for shrink in (1.0, 0.7, 0.925, -8 / 7, -0.8 * 128 / 127):
        s, zp = rtn_params(blocks, bits, symmetric, dtype, shrink=shrink if symmetric else abs(shrink))
        if shrink == 0.7:  # arbitrary scales too
            s = (s.astype(np.float32) * rng.uniform(0.5, 1.5, s.shape).astype(np.float32)).astype(dtype)
        expected = round_to_grid(blocks, s, zp, bits).astype(np.float32)
        s32 = s.astype(np.float32)
        with np.errstate(divide="ignore"):
            reciprocal = np.where(s32 != 0, np.float32(1) / s32, np.float32(0)).astype(np.float32)
        x = torch.from_numpy(np.ascontiguousarray(blocks.transpose(1, 2, 0)))  # the search's [nb, 32, n]
        x.mul_(torch.from_numpy(np.ascontiguousarray(reciprocal.T)).unsqueeze(1))
        offset = None if zp is None else torch.from_numpy(np.ascontiguousarray(zp.T.astype(np.float32))).unsqueeze(1)
        got = scale_search._levels(x, offset, bits).numpy().transpose(2, 0, 1)
        if symmetric:
            got = got + (1 << (bits - 1))
        np.testing.assert_array_equal(got, expected, err_msg=f"shrink {shrink}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scales_round_to_the_dtype_like_numpy(dtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(1 << 16) * np.exp2(rng.integers(-30, 20, 1 << 16))).astype(np.float32)
    x = np.concatenate([x, neighbourhoods(np.array([6.1e-5, 65504, 65520, 1.0, 2.0**-24]), 64)])
    with np.errstate(over="ignore"):
        expected = x.astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(scale_search._in_dtype(torch, x, dtype), expected)


# --------------------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bits", "symmetric"), MODES)
@pytest.mark.parametrize("k", [200, 256])  # 200: a padded last block
def test_search_scores_the_written_bytes_and_never_loses_to_rtn(dtype, bits, symmetric, k):
    w = np.concatenate([hard_weight(k, 24, dtype), llm_weight("student-t", k, 40, dtype)], axis=1)
    imp = importance(k)
    result = search_scales(w, imp, bits=bits, symmetric=symmetric)
    assert result.scales.dtype == dtype and result.scales.shape == (64, -(-k // 32))
    assert (result.zero_points is None) == symmetric
    searched = block_errors(w, result.scales, result.zero_points, imp, bits=bits, symmetric=symmetric)
    rtn_q = quantize_blockwise(w, bits=bits, symmetric=symmetric, use_onnxruntime=False)
    rtn_zp = None if symmetric else unpack_zero_points(rtn_q.zero_points, bits, rtn_q.n_blocks)
    rtn = block_errors(w, rtn_q.scales, rtn_zp, imp, bits=bits, symmetric=symmetric)
    # Round to nearest is a candidate: no block does worse (float32 scoring, float64 here).
    assert np.all(searched <= rtn * (1 + 1e-5) + 1e-30)
    assert searched.sum() < 0.97 * rtn.sum()
    # The reported errors are those of the bytes written with the scales (and zero points) returned.
    assert result.weighted_error == pytest.approx(searched.sum(), rel=2e-6)
    assert result.rtn_weighted_error == pytest.approx(rtn.sum(), rel=2e-6)
    imp_n = imp / imp.mean()
    assert result.weighted_energy == pytest.approx(float((w.astype(np.float64) ** 2 * imp_n[:, None]).sum()), rel=2e-6)
    # Without candidates, the search is round to nearest, byte for byte.
    plain = search_scales(w, imp, bits=bits, symmetric=symmetric, grid=(1.0,), refit_steps=0)
    np.testing.assert_array_equal(plain.scales.view(np.uint8), rtn_q.scales.view(np.uint8))
    if not symmetric:
        np.testing.assert_array_equal(plain.zero_points, rtn_zp)
    assert plain.weighted_error == plain.rtn_weighted_error == result.rtn_weighted_error


def test_no_importance_and_zero_importance():
    w = llm_weight("normal", 96, 40, np.dtype(np.float16))
    flat = search_scales(w, None, symmetric=False)
    assert flat.weighted_error < 0.95 * flat.rtn_weighted_error
    assert flat.weighted_energy == pytest.approx(float((w.astype(np.float64) ** 2).sum()), rel=2e-6)
    imp = np.ones(96, np.float32)
    imp[32:64] = 0  # a block of channels nobody reads: any scale will do, the refits must not blow up
    for symmetric in (True, False):
        result = search_scales(w, imp, symmetric=symmetric)
        assert np.isfinite(result.scales.astype(np.float32)).all()
        assert result.weighted_error <= result.rtn_weighted_error


def test_strided_read_only_weights_give_the_same_result(tmp_path):
    """The planner passes ``W^T`` views of read-only memory maps (weights stored transposed)."""
    w = llm_weight("outliers", 160, 72, BF16)
    path = tmp_path / "w.bin"
    np.ascontiguousarray(w.T).view(np.int16).tofile(path)
    mapped = np.memmap(path, dtype=np.int16, mode="r", shape=(72, 160)).view(BF16).T
    imp = importance(160)
    for symmetric in (True, False):
        expected, got = (search_scales(x, imp, symmetric=symmetric) for x in (w, mapped))
        assert_same(expected, got)


def assert_same(a, b) -> None:
    assert a.scales.dtype == b.scales.dtype
    np.testing.assert_array_equal(a.scales.view(np.uint8), b.scales.view(np.uint8))
    if a.zero_points is None:
        assert b.zero_points is None
    else:
        np.testing.assert_array_equal(a.zero_points, b.zero_points)
    assert (a.weighted_error, a.rtn_weighted_error, a.weighted_energy) == (
        b.weighted_error,
        b.rtn_weighted_error,
        b.weighted_energy,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("bits", "symmetric"), MODES)
def test_bit_identical_across_runs_threads_and_tiles(monkeypatch, dtype, bits, symmetric):
    w = np.concatenate([hard_weight(232, 30, dtype), llm_weight("outliers", 232, 47, dtype)], axis=1)
    imp = importance(232)
    reference = search_scales(w, imp, bits=bits, symmetric=symmetric)
    assert_same(reference, search_scales(w, imp, bits=bits, symmetric=symmetric))
    configs = [(1, 1 << 19, 1024), (2, 1 << 12, 16), (3, 32 * 3 * 5, 5), (2, 32 * 8, 1), (4, 32 * 7 * 2, 77)]
    for workers, elements, columns in configs:  # (worker threads, weights per tile, output channels per tile)
        monkeypatch.setattr(scale_search, "_MAX_WORKERS", workers)
        monkeypatch.setattr(scale_search, "_TILE_ELEMENTS", elements)
        monkeypatch.setattr(scale_search, "_TILE_COLUMNS", columns)
        monkeypatch.setattr(os, "cpu_count", lambda: 4)
        assert_same(reference, search_scales(w, imp, bits=bits, symmetric=symmetric))


def test_concurrent_searches_agree():
    """``ir.save`` may quantize several weights at once: searches on several threads share torch's settings."""
    w = llm_weight("normal", 256, 300, np.dtype(np.float16))
    imp = importance(256)
    reference = search_scales(w, imp)
    threads_before = torch.get_num_threads()
    with ThreadPoolExecutor(3) as pool:
        for result in pool.map(lambda _: search_scales(w, imp), range(3)):
            assert_same(reference, result)
    assert torch.get_num_threads() == threads_before


# --------------------------------------------------------------------------------------------------------------
# Against the numpy search it replaced (frozen here as an independent reference)
# --------------------------------------------------------------------------------------------------------------


def reference_search(weight, imp, *, bits, symmetric, block_size=32, grid=SHRINK_GRID, refit_steps=2):
    """The search before the torch rewrite, candidate by candidate in numpy: its total weighted error."""
    k = weight.shape[0]
    n_blocks = -(-k // block_size)
    imp_blocks = np.zeros(n_blocks * block_size, np.float32)
    imp_blocks[:k] = imp / max(float(imp.mean()), 1e-30)
    imp_blocks = imp_blocks.reshape(n_blocks, block_size)
    blocks = to_blocks(weight, block_size, n_blocks)

    def error(s, zp):
        deq = dequantize_blocks(round_to_grid(blocks, s, zp, bits), s, zp, bits)
        return np.einsum("nbk,bk->nb", (blocks - deq) ** 2, imp_blocks)

    def refit(scales, zps):
        q = round_to_grid(blocks, scales, zps, bits).astype(np.float32)
        s_old = scales.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if zps is None:
                c = q - np.float32(1 << (bits - 1))
                num = np.einsum("nbk,bk->nb", blocks * c, imp_blocks)
                den = np.einsum("nbk,bk->nb", c * c, imp_blocks)
                return np.where(den > 0, num / den, s_old).astype(scales.dtype), None
            sw = imp_blocks.sum(-1)
            sq, sqq = np.einsum("nbk,bk->nb", q, imp_blocks), np.einsum("nbk,bk->nb", q * q, imp_blocks)
            sx, sqx = np.einsum("nbk,bk->nb", blocks, imp_blocks), np.einsum("nbk,bk->nb", blocks * q, imp_blocks)
            det = sw * sqq - sq * sq
            s = np.where(det > 0, (sw * sqx - sq * sx) / det, s_old)
            m = np.where(det > 0, (sx - s * sq) / sw, -s_old * zps)
            zp = np.clip(np.round(-m / s), 0, (1 << bits) - 1)
        ok = np.isfinite(s) & (s > 0) & np.isfinite(zp)
        return np.where(ok, s, s_old).astype(scales.dtype), np.where(ok, zp, zps).astype(np.uint8)

    best = list(rtn_params(blocks, bits, symmetric, weight.dtype))
    best_err = error(*best)

    def consider(s, zp):
        nonlocal best_err
        err = error(s, zp)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best[0] = np.where(better, s, best[0])
        if zp is not None:
            best[1] = np.where(better, zp, best[1])

    if symmetric:
        half = 1 << (bits - 1)
        for shrink in [g for g in grid if g != 1.0] + [-g * half / (half - 1) for g in grid]:
            consider(*rtn_params(blocks, bits, True, weight.dtype, shrink=shrink))
    else:
        vmax = np.maximum(blocks.max(axis=-1), np.float32(0))
        vmin = np.minimum(blocks.min(axis=-1), np.float32(0))
        for step in STEP_GRID:
            scale = ((vmax - vmin) / np.float32((1 << bits) - 1 + step)).astype(weight.dtype)
            s32 = scale.astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                zp = np.where(s32 != 0, -vmin / s32, np.float32(0))
            zp = np.clip(round_half_away(zp), 0, (1 << bits) - 1).astype(np.uint8)
            consider(scale, zp)
            consider(*refit(scale, zp))
    for _ in range(refit_steps):
        consider(*refit(*best))
    return float(best_err.sum(dtype=np.float64))


def test_no_worse_than_the_numpy_search():
    """Over normal, heavy-tailed and outlier-column weights, three dtypes, both modes, 4 and 8 bits: the geometric
    mean of new / old weighted error is at most 1, and no case is more than 0.1 % worse. Symmetric, the candidates
    are the old ones (equal up to float rounding); asymmetric, the refit's scale solved for the zero point in use
    is better (3-5 % here)."""
    ratios = {}
    for kind in ("normal", "student-t", "outliers"):
        for dtype in DTYPES:
            w = llm_weight(kind, 224, 64, dtype, seed=len(ratios))
            imp = importance(224, seed=len(ratios))
            for bits, symmetric in MODES:
                new = search_scales(w, imp, bits=bits, symmetric=symmetric).weighted_error
                old = reference_search(w, imp, bits=bits, symmetric=symmetric)
                ratios[kind, dtype.name, bits, symmetric] = new / old
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= 1.001, (worst, ratios[worst])

    def geometric_mean(values) -> float:
        return math.exp(np.mean(np.log(list(values))))

    assert geometric_mean(ratios.values()) <= 1.0, ratios
    assert geometric_mean(r for key, r in ratios.items() if not key[3]) < 0.98, ratios
