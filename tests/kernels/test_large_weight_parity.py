"""Byte parity at production sizes: weights of >= 2**20 values take the streaming torch kernel in production
(``streaming_rtn.MIN_ELEMENTS``), with its real band and tile sizes. Each is checked against an independent
reference:

- float32 / float16: onnxruntime's own ``quantize_matmul_4bits`` / ``quantize_matmul_8bits`` (the kernel the
  genai builder's ``-p int4`` calls), packed weights and scales byte for byte;
- bfloat16, which that kernel does not take, two references. (1) onnxruntime's ``MatMulNBitsQuantizer``, which the
  genai builder runs for ``-p int4 --extra_options use_cuda_bf16=true``: it widens the weight to float32, runs the
  kernel and casts the scales to bfloat16 afterwards. A block's scale, its extreme / -2**(bits-1), is exact in
  bfloat16 unless it is subnormal there (below 2**-126), so the bytes must agree everywhere else; in those blocks
  it rounds with the float32 scale while we use the stored bfloat16 one (documented in kernels/rtn.py). (2)
  ``hand_rtn`` below, for every block: MLAS's arithmetic written out here, not taken from our code (the block's
  value of largest magnitude, the negative one on a tie, over -2**(bits-1), rounded to the scale's storage dtype
  *before* its float32 reciprocal; ``v * (1/scale) + mid`` in float32, rounded half away from zero, clamped). It
  is first shown to give onnxruntime's bytes for float16 and float32 weights at the same sizes; for bfloat16 the
  only change is the storage dtype of the scale (bfloat16 widens to float32 exactly).

The weights: one 4096 x 4096 (a 7B model's attention projection), one 11008 x 128 (down_proj's K; a K whose
last tile holds fewer blocks than a full tile) and one transposed [128, 11040] (K = 345 blocks, an odd count),
through the production path (``quantize_file`` on an ONNX model with external data) and
``streaming_rtn.quantize_source`` directly.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnx_helpers import attrs, initializers, load_onnx, make_model, nodes_of
from onnxruntime.capi import _pybind_state
from test_streaming_rtn import hard_weight

from olive_int4_pass.kernels import streaming_rtn
from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.pipeline import quantize_file

BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
# name: (stored shape, transposed). W[K, N] is the stored array, or its transpose when stored [N, K].
WEIGHTS = {
    "square": ((4096, 4096), False),
    "down_proj": ((11008, 128), False),
    "transposed_odd_blocks": ((128, 11040), True),
}
ELEM = {F32: TensorProto.FLOAT, F16: TensorProto.FLOAT16, BF16: TensorProto.BFLOAT16}


def onnxruntime_rtn(w: np.ndarray, bits: int):
    """onnxruntime.capi._pybind_state.quantize_matmul_{4,8}bits on W[K, N], symmetric, block 32."""
    k, n = w.shape
    n_blocks = k // 32
    packed = np.zeros((n, n_blocks, 32 * bits // 8), np.uint8)
    scales = np.zeros(n * n_blocks, w.dtype)
    zero_points = np.zeros(n * ((n_blocks * bits + 7) // 8), np.uint8)
    kernel = getattr(_pybind_state, f"quantize_matmul_{bits}bits")
    kernel(packed, np.ascontiguousarray(w), scales, zero_points, 32, n, k, True)
    return packed, scales.reshape(n, n_blocks)


def hand_rtn(w: np.ndarray, bits: int, scale_dtype: np.dtype):
    """Symmetric block-32 RTN of W[K, N] from MLAS's documented arithmetic (see the module docstring)."""
    k, n = w.shape
    blocks = np.ascontiguousarray(w.astype(np.float32).T).reshape(n, k // 32, 32)  # exact widening
    vmax, vmin = blocks.max(-1), blocks.min(-1)
    extreme = np.where(np.abs(vmax) > np.abs(vmin), vmax, vmin)  # a tie takes the negative one
    mid = 1 << (bits - 1)
    scales = (extreme / np.float32(-mid)).astype(np.float32).astype(scale_dtype)  # storage dtype first
    s32 = scales.astype(np.float32)
    with np.errstate(divide="ignore"):
        reciprocal = np.where(s32 != 0, np.float32(1) / s32, np.float32(0)).astype(np.float32)
    x = (blocks * reciprocal[..., None]).astype(np.float32) + np.float32(mid)  # float32, two roundings
    x = x.astype(np.float64)  # exact: roundf below has no rounding of its own
    q = np.clip(np.where(x >= 0, np.floor(x + 0.5), np.ceil(x - 0.5)), 0, 2 * mid - 1).astype(np.uint8)
    packed = q if bits == 8 else q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, scales


def reference(w: np.ndarray, bits: int):
    return hand_rtn(w, bits, BF16) if w.dtype == BF16 else onnxruntime_rtn(w, bits)


def stored_weight(name: str, dtype: np.dtype, bits: int) -> np.ndarray:
    """The stored array: random blocks of magnitudes 2**-20..2**8 with zeros, -0, ties and fp16 extremes."""
    (rows, cols), transposed = WEIGHTS[name]
    k, n = (cols, rows) if transposed else (rows, cols)
    w = hard_weight(k, n, F32 if dtype == BF16 else dtype, seed=sum(map(ord, name)))
    if dtype == BF16:
        # Blocks whose scale, extreme / -2**(bits-1), is a bfloat16 subnormal (below 2**-126, above 2**-128 so
        # that its float32 reciprocal stays finite): rounding it to bfloat16 before the reciprocal changes it.
        # Everywhere else a division by 8 or 128 is exact and the order of the two steps could not be seen.
        rng = np.random.default_rng(5)
        w[128:256, :64] = rng.uniform(-1, 1, (128, 64)) * 2.0 ** (-123.2 if bits == 4 else -119.2)
    w = w.astype(dtype)
    return np.ascontiguousarray(w.T) if transposed else w


def as_w(stored: np.ndarray, name: str) -> np.ndarray:
    return stored.T if WEIGHTS[name][1] else stored


def assert_bytes_equal(packed, scales, want_packed, want_scales, where):
    assert packed.shape == want_packed.shape and scales.shape == want_scales.shape, where
    assert scales.dtype == want_scales.dtype, where
    assert packed.tobytes() == want_packed.tobytes(), f"{where}: packed weights differ"
    assert scales.view(np.uint8).tobytes() == want_scales.view(np.uint8).tobytes(), f"{where}: scales differ"


@pytest.fixture(scope="module")
def weights():
    """``weights(name, dtype, bits)``: the stored array, made once (the 4096 x 4096 float32 one is 64 MB); only
    bfloat16 weights depend on ``bits``."""
    cache = {}

    def get(name, dtype, bits):
        key = (name, dtype, bits if dtype == BF16 else None)
        if key not in cache:
            cache[key] = stored_weight(name, dtype, bits)
        return cache[key]

    return get


def test_these_weights_take_the_streaming_kernel_in_production():
    for name, ((rows, cols), transposed) in WEIGHTS.items():
        k, n = (cols, rows) if transposed else (rows, cols)
        assert k * n >= streaming_rtn.MIN_ELEMENTS, name
        for dtype in (F32, F16, BF16):
            for bits in (4, 8):
                assert streaming_rtn.applies(dtype, k, n, 32, bits, True), (name, dtype, bits)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_the_hand_reference_gives_onnxruntimes_bytes(weights, dtype):
    """What makes ``hand_rtn`` a reference for bfloat16: for the dtypes onnxruntime takes, it is onnxruntime."""
    for name in ("square", "transposed_odd_blocks"):
        for bits in (4, 8):
            w = as_w(weights(name, dtype, bits), name)
            assert_bytes_equal(*hand_rtn(w, bits, dtype), *onnxruntime_rtn(w, bits), f"{name} {bits} bits")


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_quantize_source_at_production_sizes(weights, tmp_path, dtype):
    for name, (_, transposed) in WEIGHTS.items():
        for bits in (4, 8):
            stored = weights(name, dtype, bits)
            offset = 4099  # unaligned, after other bytes
            (tmp_path / "w.data").write_bytes(b"\x01" * offset + stored.tobytes())
            external = ir.ExternalTensor(
                "w.data",
                offset,
                stored.nbytes,
                ir.DataType.from_numpy(stored.dtype),
                shape=ir.Shape(stored.shape),
                name=name,
                base_dir=tmp_path,
            )
            want = reference(as_w(stored, name), bits)
            for source in (external, ir.tensor(stored)):
                q, _ = streaming_rtn.quantize_source(source, transposed, block_size=32, bits=bits, name=name)
                kind = type(source).__name__
                assert_bytes_equal(q.packed, q.scales, *want, f"{name} {dtype} {bits} bits from {kind}")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_quantize_file_at_production_sizes(weights, tmp_path, monkeypatch, dtype, bits):
    """One ONNX model holding the three weights (external data), through the pipeline as the pass runs it."""
    streamed = []
    real = streaming_rtn.quantize_source

    def spy(source, transposed, **kwargs):
        streamed.append(kwargs["name"])
        return real(source, transposed, **kwargs)

    monkeypatch.setattr(streaming_rtn, "quantize_source", spy)
    nodes, inputs, outputs, inits = [], [], [], {}
    for name, ((rows, cols), transposed) in WEIGHTS.items():
        k, n = (cols, rows) if transposed else (rows, cols)
        inits[name] = weights(name, dtype, bits)
        w_in = name
        if transposed:
            nodes.append(helper.make_node("Transpose", [name], [f"{name}_t"], perm=[1, 0]))
            w_in = f"{name}_t"
        nodes.append(helper.make_node("MatMul", [f"x_{name}", w_in], [f"y_{name}"], name=f"/{name}/MatMul"))
        inputs.append(helper.make_tensor_value_info(f"x_{name}", ELEM[dtype], [1, k]))
        outputs.append(helper.make_tensor_value_info(f"y_{name}", ELEM[dtype], [1, n]))
    src = tmp_path / "in" / "model.onnx"
    make_model(nodes, inputs, outputs, inits, src)
    out = quantize_file(src, tmp_path / "out", QuantizeOptions(bits=bits), progress=False)
    assert sorted(streamed) == sorted(WEIGHTS)  # the production path did take the streaming kernel
    model = load_onnx(out)
    got = initializers(model)
    by_output = {n.output[0]: n for n in nodes_of(model, "MatMulNBits")}
    for name in WEIGHTS:
        node = by_output[f"y_{name}"]
        assert attrs(node)["bits"] == bits and len(node.input) == 3, name
        want = reference(as_w(inits[name], name), bits)
        packed, scales = got[node.input[1]], got[node.input[2]]
        assert_bytes_equal(packed, scales, *want, f"{name} {dtype} {bits} bits via quantize_file")


@pytest.mark.parametrize("bits", [4, 8])
def test_bfloat16_against_onnxruntimes_matmul_nbits_quantizer(weights, tmp_path, bits):
    """The bytes of onnxruntime's MatMulNBitsQuantizer (the builder's bfloat16 path), except where it differs by
    design: the packed levels of blocks whose bfloat16 scale is subnormal (``hand_rtn`` covers those)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for name in WEIGHTS:
        w = np.ascontiguousarray(as_w(weights(name, BF16, bits), name))
        k, n = w.shape
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
        io = [helper.make_tensor_value_info(v, TensorProto.BFLOAT16, [1, d]) for v, d in (("x", k), ("y", n))]
        model = make_model(nodes, io[:1], io[1:], {"W": w})
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True)
        quantizer.process()
        theirs = initializers(quantizer.model.model)
        want_packed, want_scales = theirs[f"W_Q{bits}"].reshape(n, k // 32, -1), theirs["W_scales"]
        q, _ = streaming_rtn.quantize_source(ir.tensor(w), False, block_size=32, bits=bits, name=name)
        assert q.scales.view(np.uint16).tobytes() == want_scales.view(np.uint16).tobytes(), name
        subnormal = np.abs(want_scales.astype(np.float32)) < 2.0**-126
        same = (q.packed == want_packed).all(axis=-1)
        assert subnormal.any() and same[~subnormal].all(), f"{name}: blocks with normal scales differ"
        assert not same[subnormal].all(), f"{name}: the subnormal blocks do not tell the two orders apart"
