"""The numpy kernel against onnxruntime's reference quantizer (identical bytes), and against hand computations.

``quantize_blockwise`` runs onnxruntime's own kernel by default for float32/float16 round to nearest; every
comparison here forces the numpy path (``use_onnxruntime=False``), the one that serves bfloat16, given scales and
the scale search, so that the reference is never the code under test.
"""

import ml_dtypes
import numpy as np
import pytest
from onnxruntime.capi import _pybind_state
from test_large_weight_parity import hand_rtn

from olive_int4_pass.kernels.rtn import dequantize_blockwise, quantize_blockwise, unpack_zero_points

SHAPES = [(64, 1), (32, 8), (33, 7), (100, 5), (97, 3), (48, 16), (1, 4), (65, 2), (256, 40)]


def reference(w: np.ndarray, block_size: int, bits: int, symmetric: bool):
    """onnxruntime.capi._pybind_state.quantize_matmul_{4,8}bits, called as Olive and the genai builder call it."""
    k, n = w.shape
    n_blocks = -(-k // block_size)
    packed = np.zeros((n, n_blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros(n * n_blocks, w.dtype)
    zp = np.zeros(n * ((n_blocks * bits + 7) // 8), np.uint8)
    kernel = getattr(_pybind_state, f"quantize_matmul_{bits}bits")
    kernel(packed, w, scales, zp, block_size, n, k, symmetric)
    return packed, scales.reshape(n, n_blocks), zp.reshape(n, -1)


def random_weight(rng, shape, dtype):
    w = rng.standard_normal(shape) * rng.choice([1e-3, 0.05, 20.0])
    w[:, rng.integers(0, shape[1])] = 0  # an all-zero column: scale 0
    if shape[0] > 8:
        w[: shape[0] // 4] = np.abs(w[: shape[0] // 4])  # one-signed blocks
    return w.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_numpy_path_bytes_equal_reference(dtype, bits, symmetric):
    rng = np.random.default_rng(bits * 10 + symmetric)
    for k, n in SHAPES:
        for block_size in (16, 32, 64):
            w = random_weight(rng, (k, n), dtype)
            packed, scales, zp = reference(w, block_size, bits, symmetric)
            q = quantize_blockwise(w, block_size=block_size, bits=bits, symmetric=symmetric, use_onnxruntime=False)
            where = f"K={k} N={n} block={block_size}"
            assert q.packed.shape == packed.shape and q.scales.shape == scales.shape, where
            assert q.scales.dtype == w.dtype, where
            np.testing.assert_array_equal(q.packed, packed, err_msg=where)
            np.testing.assert_array_equal(q.scales.view(np.uint8), scales.view(np.uint8), err_msg=where)
            if symmetric:
                assert q.zero_points is None
            else:
                np.testing.assert_array_equal(q.zero_points, zp, err_msg=where)


def test_numpy_path_matches_reference_on_a_large_fp16_weight():
    # Many chunks, run on a thread pool: chunk boundaries must not change a byte.
    w = (np.random.default_rng(7).standard_normal((1024, 3000)) * 0.02).astype(np.float16)
    packed, scales, _ = reference(w, 32, 4, True)
    q = quantize_blockwise(w, use_onnxruntime=False)
    np.testing.assert_array_equal(q.packed, packed)
    np.testing.assert_array_equal(q.scales, scales)


def test_dequantized_error_is_within_the_grid_step():
    """The step is computed by hand from the weight's blocks, not read from the scales the kernel wrote."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 24)).astype(np.float32)
    blocks = w.reshape(3, 32, 24)
    vmax, vmin = blocks.max(1), blocks.min(1)  # [blocks, N]
    for bits, symmetric in [(4, True), (4, False), (8, True), (8, False)]:
        q = quantize_blockwise(w, bits=bits, symmetric=symmetric, use_onnxruntime=False)
        err = np.abs(dequantize_blockwise(q) - w)
        if symmetric:  # largest magnitude / 2**(bits-1)
            step = np.maximum(np.abs(vmax), np.abs(vmin)) / 2 ** (bits - 1)
        else:  # the range including 0 over 2**bits - 1 steps
            step = (np.maximum(vmax, 0) - np.minimum(vmin, 0)) / (2**bits - 1)
        step = np.repeat(step, 32, axis=0)  # [K, N]
        # Asymmetric grids cover [min, max]: half a step. Symmetric ones end at +7 steps while the largest
        # magnitude sits at -8, so the opposite extreme may be clipped by up to one step.
        bound = step / 2 if not symmetric else np.maximum(step / 2, np.abs(w) - (2 ** (bits - 1) - 1) * step)
        assert np.all(err <= bound * (1 + 1e-6) + 1e-7), (bits, symmetric, float((err - bound).max()))


def test_bfloat16_rounds_scales_to_bfloat16_before_quantizing():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((70, 9)).astype(ml_dtypes.bfloat16)
    q = quantize_blockwise(w)
    assert q.scales.dtype == np.dtype(ml_dtypes.bfloat16)
    # Same as quantizing the exactly widened float32 weight with those (bfloat16-valued) scales.
    widened = quantize_blockwise(w.astype(np.float32), scales=q.scales.astype(np.float32), use_onnxruntime=False)
    np.testing.assert_array_equal(q.packed, widened.packed)
    # And the scales are the float32 RTN scales (onnxruntime's kernel) rounded to bfloat16.
    _, scales32, _ = reference(w.astype(np.float32), 32, 4, True)
    np.testing.assert_array_equal(q.scales, scales32.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("bits", [4, 8])
def test_bfloat16_bytes_equal_the_hand_reference(bits):
    """bfloat16 against ``hand_rtn`` (tests/kernels/test_large_weight_parity.py: MLAS's arithmetic written out
    and checked there against onnxruntime for float16/float32), with blocks whose bfloat16 scale is subnormal, so
    that rounding the scale before its reciprocal matters."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    w[32:64, :20] = rng.uniform(-1, 1, (32, 20)) * 2.0 ** (-123.2 if bits == 4 else -119.2)
    w = w.astype(ml_dtypes.bfloat16)
    packed, scales = hand_rtn(w, bits, np.dtype(ml_dtypes.bfloat16))
    q = quantize_blockwise(w, bits=bits)
    np.testing.assert_array_equal(q.packed, packed)
    np.testing.assert_array_equal(q.scales.view(np.uint16), scales.view(np.uint16))


def test_given_scales_and_zero_points_are_used():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 4)).astype(np.float32)
    rtn = quantize_blockwise(w, symmetric=False)
    zp = unpack_zero_points(rtn.zero_points, 4, rtn.n_blocks)
    again = quantize_blockwise(w, symmetric=False, scales=rtn.scales, zero_points=zp)
    np.testing.assert_array_equal(again.packed, rtn.packed)
    halved = quantize_blockwise(w, symmetric=False, scales=rtn.scales * 2, zero_points=zp)
    assert not np.array_equal(halved.packed, rtn.packed)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_names_the_tensor(bad):
    w = np.ones((32, 4), np.float16)
    w[5, 2] = bad
    with pytest.raises(ValueError, match=r"'layers\.3\.mlp' has 1 non-finite"):
        quantize_blockwise(w, name="layers.3.mlp")


@pytest.mark.parametrize("block_size", [0, 8, 12, 48, -32])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match="power of two >= 16"):
        quantize_blockwise(np.ones((64, 2), np.float32), block_size=block_size)


def test_bad_inputs_are_typed_errors():
    with pytest.raises(TypeError, match="block_size must be an int"):
        quantize_blockwise(np.ones((64, 2), np.float32), block_size=32.0)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_blockwise(np.ones((64, 2), np.float32), bits=3)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize_blockwise(np.ones((64, 2), np.int32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_blockwise(np.ones((2, 64, 2), np.float32))


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, False)])
def test_dequantize_in_chunks_equals_the_whole_weight_at_once(monkeypatch, bits, symmetric):
    """Chunked over output channels, cast and transposed on the way: the same values as MatMulNBits' float32 math
    (levels minus zero point, times scale) done on the whole weight by hand."""
    from olive_int4_pass.kernels import rtn

    rng = np.random.default_rng(3)
    w = rng.standard_normal((70, 29)).astype(np.float16)  # K not a multiple of the block: padding is cut
    q = quantize_blockwise(w, bits=bits, symmetric=symmetric, use_onnxruntime=False)
    levels = rtn._unpack(q.packed, bits).astype(np.float32)
    zp = np.float32(1 << (bits - 1)) if symmetric else unpack_zero_points(q.zero_points, bits, q.n_blocks)[..., None]
    by_hand = ((levels - zp) * q.scales.astype(np.float32)[..., None]).reshape(q.n, -1)[:, : q.k].T
    monkeypatch.setattr(rtn, "_CHUNK_ELEMENTS", 3 * q.n_blocks * q.block_size)  # 3 output channels per chunk
    whole = dequantize_blockwise(q)
    assert whole.dtype == np.float32 and whole.shape == (70, 29)
    np.testing.assert_array_equal(whole, by_hand)
    half = dequantize_blockwise(q, np.float16, transposed=True)
    assert half.dtype == np.float16 and half.shape == (29, 70) and half.flags.c_contiguous
    np.testing.assert_array_equal(half, by_hand.T.astype(np.float16))
