"""Time the importance-weighted scale search: the tiled torch search against the numpy one it replaced.

    python benchmarks/scale_search_bench.py                      # Qwen2-7B's MatMul shapes, fp16, 4 bits
    python benchmarks/scale_search_bench.py --shapes 3584x512 --bits 4 8 --modes asym --repeat 5
    python benchmarks/scale_search_bench.py --dtypes float16 bfloat16 float32 --shapes 1024x1024

Each row is one weight ``W[K, N]`` (random normal, std 0.02, with 1 % of the input channels 8x larger) and an
importance vector (log-normal, with 0.5 % of the channels 100x larger), searched by both implementations in
turns, ``--repeat`` times; the table shows the median wall and CPU seconds (all threads) of each, the speed-up
(wall) and the ratio of the weighted errors (new / old: below 1 is better). ``old`` is a frozen copy of the
search as it was before the torch rewrite (commit 4e076b7), kept here: numpy, per chunk of output channels,
candidate by candidate.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from olive_int4_pass.kernels.rtn import dequantize_blocks, round_half_away, round_to_grid, rtn_params, to_blocks
from olive_int4_pass.kernels.scale_search import SHRINK_GRID, STEP_GRID, search_scales

DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


# --------------------------------------------------------------------------------------------------------------
# The search before the torch rewrite, frozen (only the names changed)
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OldResult:
    scales: np.ndarray
    zero_points: np.ndarray | None
    weighted_error: float
    rtn_weighted_error: float
    weighted_energy: float


def old_search_scales(weight, importance, *, block_size=32, bits=4, symmetric=True, grid=SHRINK_GRID, refit_steps=2):
    k, n = weight.shape
    n_blocks = -(-k // block_size)
    imp = np.ones(k, np.float32) if importance is None else np.asarray(importance, np.float32)
    imp_blocks = np.zeros(n_blocks * block_size, np.float32)
    imp_blocks[:k] = imp / max(float(imp.mean()), 1e-30)
    imp_blocks = imp_blocks.reshape(n_blocks, block_size)
    scales = np.empty((n, n_blocks), weight.dtype)
    zps = None if symmetric else np.empty((n, n_blocks), np.uint8)
    rows = max(1, (1 << 16) // (n_blocks * block_size))
    searching = tuple(grid) != (1.0,)
    shrinks = [g for g in grid if g != 1.0] if symmetric else []
    if symmetric and searching:
        half = 1 << (bits - 1)
        shrinks += [-g * half / (half - 1) for g in grid]
    steps = STEP_GRID if searching and not symmetric else ()

    def work(n0):
        blocks = to_blocks(weight[:, n0 : n0 + rows], block_size, n_blocks)

        def error(s, zp):
            deq = dequantize_blocks(round_to_grid(blocks, s, zp, bits), s, zp, bits)
            return np.einsum("nbk,bk->nb", (blocks - deq) ** 2, imp_blocks)

        best_s, best_zp = rtn_params(blocks, bits, symmetric, weight.dtype)
        best_err = rtn_err = error(best_s, best_zp)

        def consider(s, zp):
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
            s, zp = _old_spread(blocks, step, bits, weight.dtype)
            consider(s, zp)
            consider(*_old_refit(blocks, imp_blocks, s, zp, bits))
        for _ in range(refit_steps):
            consider(*_old_refit(blocks, imp_blocks, best_s, best_zp, bits))
        scales[n0 : n0 + rows] = best_s
        if zps is not None:
            zps[n0 : n0 + rows] = best_zp
        return np.array([best_err.sum(), rtn_err.sum(), np.einsum("nbk,bk->", blocks**2, imp_blocks)])

    starts = range(0, n, rows)
    with ThreadPoolExecutor(max_workers=max(1, min(len(starts), os.cpu_count() or 1))) as pool:
        totals = sum(pool.map(work, starts))
    return OldResult(scales, zps, *map(float, totals))


def _old_spread(blocks, step, bits, scale_dtype):
    vmax = np.maximum(blocks.max(axis=-1), np.float32(0))
    vmin = np.minimum(blocks.min(axis=-1), np.float32(0))
    scale = ((vmax - vmin) / np.float32((1 << bits) - 1 + step)).astype(scale_dtype)
    s32 = scale.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(s32 != 0, -vmin / s32, np.float32(0))
    return scale, np.clip(round_half_away(zp), 0, (1 << bits) - 1).astype(np.uint8)


def _old_refit(blocks, imp, scales, zps, bits):
    q = round_to_grid(blocks, scales, zps, bits).astype(np.float32)
    s_old = scales.astype(np.float32)
    if zps is None:
        c = q - np.float32(1 << (bits - 1))
        num = np.einsum("nbk,bk->nb", blocks * c, imp)
        den = np.einsum("nbk,bk->nb", c * c, imp)
        with np.errstate(divide="ignore", invalid="ignore"):
            fitted = np.where(den > 0, num / den, s_old)
        return fitted.astype(scales.dtype), None
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


# --------------------------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------------------------


def make_case(k: int, n: int, dtype: np.dtype, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n), dtype=np.float32) * np.float32(0.02)
    w *= np.where(rng.random(k) < 0.01, np.float32(8), np.float32(1))[:, None]
    importance = np.exp(1.5 * rng.standard_normal(k)).astype(np.float32)
    importance[rng.random(k) < 0.005] *= 100
    return w.astype(dtype), importance


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["3584x3584", "3584x18944", "18944x3584"], help="KxN")
    parser.add_argument("--dtypes", nargs="+", default=["float16"], choices=sorted(DTYPES))
    parser.add_argument("--modes", nargs="+", default=["sym", "asym"], choices=["sym", "asym"])
    parser.add_argument("--bits", nargs="+", type=int, default=[4], choices=[4, 8])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    search_scales(*make_case(64, 8, DTYPES["float16"]))  # imports torch, outside the timings
    header = f"{'shape':>11} {'dtype':>8} {'bits':>4} {'mode':>4} | {'old s':>7} {'new s':>7} {'speed-up':>8} |"
    header += f" {'old cpu s':>9} {'new cpu s':>9} | {'error new/old':>13}"
    print(f"median of {args.repeat} runs, {os.cpu_count()} cores", flush=True)
    print(header)
    print("-" * len(header), flush=True)
    for shape in args.shapes:
        k, n = (int(d) for d in shape.lower().split("x"))
        for dtype_name in args.dtypes:
            w, importance = make_case(k, n, DTYPES[dtype_name])
            for bits in args.bits:
                for mode in args.modes:
                    kw = dict(bits=bits, symmetric=mode == "sym")
                    runs = {"old": [], "new": []}
                    for i in range(args.repeat):  # in turns, the order alternating: noise hits both alike
                        order = ("old", "new") if i % 2 == 0 else ("new", "old")
                        for name in order:
                            fn = old_search_scales if name == "old" else search_scales
                            runs[name].append(timed(fn, w, importance, **kw))
                    old_wall, old_cpu = (statistics.median(r[j] for r in runs["old"]) for j in (0, 1))
                    new_wall, new_cpu = (statistics.median(r[j] for r in runs["new"]) for j in (0, 1))
                    ratio = runs["new"][0][2].weighted_error / runs["old"][0][2].weighted_error
                    print(
                        f"{shape:>11} {dtype_name:>8} {bits:>4} {mode:>4} | {old_wall:7.2f} {new_wall:7.2f}"
                        f" {old_wall / new_wall:7.1f}x | {old_cpu:9.2f} {new_cpu:9.2f} | {ratio:13.6f}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
