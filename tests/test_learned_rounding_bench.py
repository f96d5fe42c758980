"""The learned-rounding benchmark's numerics: its RTN row is the reference's, its GPTQ writes no NaN on zero blocks."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from olive_int4_pass.kernels.rtn import dequantize_blockwise, quantize_blockwise


def _load_bench():
    path = Path(__file__).parents[1] / "benchmarks" / "learned_rounding_bench.py"
    spec = importlib.util.spec_from_file_location("learned_rounding_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _weight(n: int = 48, k: int = 200) -> np.ndarray:
    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block: scale 0
    w[5, 32:64] = np.linspace(-1, 1, 32)  # ties at +-0.5 steps
    return w


def test_rtn_row_is_the_reference_symmetric_rtn():
    w = _weight()  # K = 200: a padded last block
    ours = bench.rtn_symmetric(torch.from_numpy(w)).numpy()
    reference = dequantize_blockwise(quantize_blockwise(w.T.copy(), block_size=32, bits=4, symmetric=True))
    np.testing.assert_array_equal(ours, reference.T)


def test_gptq_on_a_zero_block_is_finite_and_on_the_grid():
    w = torch.from_numpy(_weight(k=192))
    x = torch.randn(512, 192)
    h = x.T @ x / 512
    scales = bench.searched_scales(w, torch.diagonal(h))
    levels, centres = bench.gptq(w, h, scales, damp=0.01)
    assert torch.isfinite(levels).all() and torch.isfinite(centres).all()
    assert levels.min() >= bench.QMIN and levels.max() <= bench.QMAX
    assert torch.equal(levels, levels.round())
    assert torch.all(bench.dequantize((levels, scales))[3, :32] == 0)
    # Compensation must beat rounding each weight to its nearest level under the same scales, on H's own error.
    nearest = torch.clamp(torch.round(w / bench.safe(bench.expand(scales, 192))), bench.QMIN, bench.QMAX)
    err_gptq = bench.dequantize((levels, scales)) - w
    err_nearest = bench.dequantize((nearest, scales)) - w
    assert torch.trace(err_gptq @ h @ err_gptq.T) < torch.trace(err_nearest @ h @ err_nearest.T)
