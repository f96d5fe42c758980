"""The streaming torch kernel gives the reference's bytes (onnxruntime's kernel; the numpy path for bfloat16)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
import torch

from olive_int4_pass.kernels import streaming_rtn
from olive_int4_pass.kernels.rtn import quantize_blockwise

DTYPES = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)]


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    """Bands of a few rows and tiles of a few columns: every boundary is crossed even on small weights."""
    monkeypatch.setattr(streaming_rtn, "_BAND_BYTES", 1 << 16)
    monkeypatch.setattr(streaming_rtn, "_TILE_ELEMENTS", 1 << 12)


def hard_weight(k: int, n: int, dtype: np.dtype, seed: int = 0) -> np.ndarray:
    """Random blocks spanning 2**-20..2**8, plus zeros, -0, +-ties, exact .5 steps and (fp16) subnormals/max."""
    rng = np.random.default_rng(seed)
    magnitude = np.exp2(rng.integers(-20, 8, size=(k // 16, 1, n))).repeat(16, axis=1).reshape(k, n)
    w = (rng.standard_normal((k, n)) * magnitude).astype(dtype)
    w[0:32, 0] = 0
    w[0:32, 1] = -0.0
    w[5, 2] = -0.0
    w[32:64, 3] = 0.5
    w[40, 3] = -0.5  # same magnitude, both signs
    w[64:96, 4] = rng.integers(-8, 9, 32) * 0.25
    w[96:128, 8] = np.arange(32) - 15.5  # lands on .5 ties
    w[96:128, 9] = (np.arange(32) - 16) / 16 * 7.5
    if dtype == np.float16:
        w[0:32, 5] = (rng.integers(-20, 20, 32) * 2.0**-24).astype(np.float16)  # subnormal block: scale rounds
        w[32:64, 6] = 65504
        w[33, 6] = -65504
        w[64:96, 7] = (rng.integers(-1023, 1023, 32) * 2.0**-24).astype(np.float16)
    return w


def external(tmp_path, stored: np.ndarray) -> ir.ExternalTensor:
    offset = 4099  # unaligned, after other bytes
    (tmp_path / "w.data").write_bytes(b"\x01" * offset + stored.tobytes())
    dtype = ir.DataType.from_numpy(stored.dtype)
    return ir.ExternalTensor(
        "w.data", offset, stored.nbytes, dtype, shape=ir.Shape(stored.shape), name="w", base_dir=tmp_path
    )


def assert_same(fast, reference):
    assert fast.packed.shape == reference.packed.shape
    assert np.array_equal(fast.packed, reference.packed)
    assert fast.scales.dtype == reference.scales.dtype
    assert np.array_equal(fast.scales.view(np.uint8), reference.scales.view(np.uint8))
    assert fast.zero_points is None and reference.zero_points is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["W", "W^T"])
@pytest.mark.parametrize(("k", "n"), [(256, 1000), (1024, 37), (128, 700)])
def test_same_bytes_as_the_reference(tmp_path, dtype, transposed, k, n):
    w = hard_weight(k, n, dtype)
    stored = np.ascontiguousarray(w.T) if transposed else w
    cols = np.unique(np.linspace(0, n - 1, min(256, n)).astype(int))
    for block_size, bits in [(32, 4), (16, 4), (64, 4), (128, 4), (32, 8)]:
        reference = quantize_blockwise(w, block_size=block_size, bits=bits, use_onnxruntime=dtype != DTYPES[2])
        for source in (external(tmp_path, stored), ir.tensor(stored)):
            fast, sample = streaming_rtn.quantize_source(
                source, transposed, block_size=block_size, bits=bits, name="w", sample_cols=cols
            )
            assert_same(fast, reference)
            assert np.array_equal(sample, w[:, cols].astype(np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("transposed", [False, True])
def test_non_finite_weight_is_refused(tmp_path, bad, transposed):
    w = hard_weight(256, 64, np.dtype(np.float16))
    w[100, 7] = bad
    stored = np.ascontiguousarray(w.T) if transposed else w
    with pytest.raises(ValueError, match="'w' has non-finite"):
        streaming_rtn.quantize_source(external(tmp_path, stored), transposed, block_size=32, bits=4, name="w")


def test_torch_thread_count_is_restored():
    before = torch.get_num_threads()
    streaming_rtn.quantize_source(
        ir.tensor(hard_weight(256, 64, np.dtype(np.float16))), False, block_size=32, bits=4, name="w"
    )
    assert torch.get_num_threads() == before


def test_applies_only_where_the_bytes_are_proven():
    f16 = np.dtype(np.float16)
    big = streaming_rtn.MIN_ELEMENTS
    assert streaming_rtn.applies(f16, 1024, big // 1024, 32, 4, True)
    assert not streaming_rtn.applies(f16, 1024, big // 1024, 32, 4, False)  # asymmetric: roundf differs near 0.5
    assert not streaming_rtn.applies(f16, 1000, big, 32, 4, True)  # partial last block
    assert not streaming_rtn.applies(f16, 1024, 16, 32, 4, True)  # small: the reference kernel is fast enough
    assert not streaming_rtn.applies(np.dtype(np.float64), 1024, big, 32, 4, True)
