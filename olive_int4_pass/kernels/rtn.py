"""Block-wise round-to-nearest weight quantization in the MatMulNBits format (numerics only, no graphs).

A MatMul weight ``W[K, N]`` is cut into blocks of ``block_size`` consecutive values along K. Each block gets
one scale (and, asymmetric, one zero point); values are rounded to ``bits``-bit unsigned integers:

- symmetric:  ``scale = v_maxabs / -2**(bits-1)``, ``q = round(v / scale) + 2**(bits-1)`` (no zero-point input);
- asymmetric: ``scale = (max(v, 0) - min(v, 0)) / (2**bits - 1)``, ``zp = round(-min / scale)``,
  ``q = round(v / scale + zp)``.

The arithmetic replicates onnxruntime's ``MlasQuantizeBlockwise`` (``quantize_matmul_4bits`` / ``_8bits``, used by
the genai model builder and Olive's RTN pass) operation for operation, so the bytes are identical: the scale is
rounded to its storage dtype *before* its float32 reciprocal is taken, ``v * (1/scale) + zp`` is evaluated in
float32 and rounded half away from zero (C ``roundf``), and the padding of a last partial block is written the
way onnxruntime writes it. bfloat16 weights are widened to float32 (exact) and their scales are rounded to
bfloat16, mirroring what the reference does for float16.

Layout (what MatMulNBits and the genai builder use): ``packed`` uint8 ``[N, n_blocks, block_size * bits / 8]``
(two 4-bit values per byte, low nibble first), ``scales`` ``[N, n_blocks]``, ``zero_points`` uint8
``[N, ceil(n_blocks * bits / 8)]`` (4-bit zero points packed two per byte, a missing last one is 8).
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np

from olive_int4_pass.kernels.pages import release_pages

SUPPORTED_BITS = (4, 8)
_BF16 = np.dtype(ml_dtypes.bfloat16)
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), _BF16)
_CHUNK_ELEMENTS = 1 << 23


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A block-quantized ``W[K, N]`` in MatMulNBits layout."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    n: int
    block_size: int
    bits: int

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[1]


def validate_block_size(block_size: int) -> None:
    """MatMulNBits accepts power-of-two blocks of at least 16 values."""
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (16, 32, 64, 128, ...), got {block_size}")


def validate_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def check_finite(weight: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` naming the tensor if it holds NaN or Inf (an RTN scale of NaN ruins a model)."""
    finite = np.isfinite(weight)
    if not finite.all():
        bad = int(weight.size - np.count_nonzero(finite))
        raise ValueError(f"weight {name!r} has {bad} non-finite value(s) (NaN/Inf); refusing to quantize it")


def quantize_blockwise(
    weight: np.ndarray,
    *,
    block_size: int = 32,
    bits: int = 4,
    symmetric: bool = True,
    name: str = "weight",
    scales: np.ndarray | None = None,
    zero_points: np.ndarray | None = None,
    use_onnxruntime: bool = True,
) -> QuantizedWeight:
    """Quantize ``weight[K, N]`` (float32, float16 or bfloat16) block-wise along K.

    ``scales`` (and ``zero_points`` when asymmetric, unpacked ``[N, n_blocks]``) may be given to round with
    precomputed parameters, e.g. from a calibrated search; otherwise they are the round-to-nearest ones.
    With ``use_onnxruntime`` the round-to-nearest case of float32/float16 weights runs onnxruntime's own kernel
    (same bytes as the numpy path, about twice as fast); the numpy path serves everything else.
    """
    validate_block_size(block_size)
    validate_bits(bits)
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ValueError(f"weight {name!r} must be 2-D [K, N], got shape {weight.shape}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight {name!r} must be float32, float16 or bfloat16, got {weight.dtype}")
    check_finite(weight, name)
    k, n = weight.shape
    n_blocks = -(-k // block_size)
    scale_dtype = weight.dtype
    packed = np.empty((n, n_blocks, block_size * bits // 8), dtype=np.uint8)
    out_scales = np.empty((n, n_blocks), dtype=scale_dtype)
    zp_full = None if symmetric else np.empty((n, n_blocks), dtype=np.uint8)
    reference = _reference_kernel(bits) if use_onnxruntime and scales is None and weight.dtype != _BF16 else None
    # Output channels per chunk: bounds the float32 temporaries (and the contiguous copy) to ~32 MB.
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, n_blocks * block_size))

    def work(n0: int) -> None:
        n1 = min(n, n0 + rows_per_chunk)
        if reference is not None:
            _reference_chunk(reference, weight[:, n0:n1], block_size, bits, symmetric, packed, out_scales, zp_full, n0)
            return
        blocks = to_blocks(weight[:, n0:n1], block_size, n_blocks)  # [n, nb, bs] float32
        if scales is None:
            s, zp = rtn_params(blocks, bits, symmetric, scale_dtype)
        else:
            s = np.asarray(scales[n0:n1], dtype=scale_dtype)
            zp = None if symmetric else np.asarray(zero_points[n0:n1], dtype=np.uint8)
        q = round_to_grid(blocks, s, zp, bits)
        _clear_padding(q, k, block_size, bits)
        out_scales[n0:n1] = s
        if zp_full is not None:
            zp_full[n0:n1] = zp
        packed[n0:n1] = _pack(q, bits)
        release_pages(weight)  # a large memory-mapped weight: keep only the pages of the chunks in flight

    starts = range(0, n, rows_per_chunk)
    if reference is None and len(starts) > 1:
        # numpy releases the GIL in its kernels: chunks run in parallel on several cores.
        with ThreadPoolExecutor(max_workers=min(len(starts), os.cpu_count() or 1)) as pool:
            list(pool.map(work, starts))
    else:
        # onnxruntime's kernel already uses every core.
        for n0 in starts:
            work(n0)
    if not np.isfinite(out_scales.astype(np.float32)).all():
        # Finite weights whose block range max - min overflows the scale's dtype (|w| near 3e38 in float32/bfloat16,
        # asymmetric only): an infinite scale would make MatMulNBits output NaN.
        kind = "symmetric" if symmetric else "asymmetric: max - min"
        raise ValueError(
            f"weight {name!r}: a block's range overflows its {scale_dtype} scale ({kind}); quantize it symmetric,"
            " or keep it in float with nodes_to_exclude"
        )
    packed_zp = None if zp_full is None else _pack_zero_points(zp_full, bits)
    return QuantizedWeight(packed, out_scales, packed_zp, k, n, block_size, bits)


def dequantize_blockwise(q: QuantizedWeight, dtype: np.dtype = np.float32, *, transposed: bool = False) -> np.ndarray:
    """Reconstruct ``W[K, N]`` (``W^T`` with ``transposed``) from a :class:`QuantizedWeight`, as MatMulNBits computes
    it in float32, then cast to ``dtype``.

    Output channels are done a chunk at a time straight into the result, so a large weight (a 7B lm_head: 545 M
    values) costs its result and ~32 MB, not three float32 copies of itself.
    """
    out = np.empty((q.n, q.k) if transposed else (q.k, q.n), dtype=dtype)
    rows = max(1, _CHUNK_ELEMENTS // max(1, q.n_blocks * q.block_size))
    for n0 in range(0, q.n, rows):
        n1 = min(q.n, n0 + rows)
        levels = _unpack(q.packed[n0:n1], q.bits)  # [n, nb, bs]
        zp = None if q.zero_points is None else unpack_zero_points(q.zero_points[n0:n1], q.bits, q.n_blocks)
        w = dequantize_blocks(levels, q.scales[n0:n1], zp, q.bits).reshape(n1 - n0, -1)[:, : q.k]
        if transposed:
            out[n0:n1] = w
        else:
            out[:, n0:n1] = w.T
    return out


def unpack_zero_points(zero_points: np.ndarray, bits: int, n_blocks: int) -> np.ndarray:
    """Packed ``[N, ceil(n_blocks*bits/8)]`` zero points → uint8 ``[N, n_blocks]``."""
    zp = zero_points.reshape(zero_points.shape[0], -1)
    if bits == 8:
        return zp[:, :n_blocks].copy()
    return np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(zp.shape[0], -1)[:, :n_blocks]


def _reference_kernel(bits: int):
    """onnxruntime's ``quantize_matmul_{4,8}bits`` when the installed onnxruntime has it, else None."""
    try:
        from onnxruntime.capi import _pybind_state
    except ImportError:
        return None
    return getattr(_pybind_state, f"quantize_matmul_{bits}bits", None)


def _reference_chunk(kernel, w, block_size, bits, symmetric, packed, scales, zp_full, n0) -> None:
    """Quantize the output channels ``w[:, :]`` (starting at ``n0``) with onnxruntime's kernel."""
    k, n = w.shape
    n_blocks = packed.shape[1]
    w = np.ascontiguousarray(w)
    chunk = np.zeros((n, n_blocks, packed.shape[2]), dtype=np.uint8)
    chunk_scales = np.zeros(n * n_blocks, dtype=w.dtype)
    chunk_zp = np.zeros(n * ((n_blocks * bits + 7) // 8), dtype=np.uint8)
    kernel(chunk, w, chunk_scales, chunk_zp, block_size, n, k, symmetric)
    packed[n0 : n0 + n] = chunk
    scales[n0 : n0 + n] = chunk_scales.reshape(n, n_blocks)
    if zp_full is not None:
        zp_full[n0 : n0 + n] = unpack_zero_points(chunk_zp.reshape(n, -1), bits, n_blocks)


def to_blocks(w: np.ndarray, block_size: int, n_blocks: int) -> np.ndarray:
    """``w[K, n]`` → float32 ``[n, n_blocks, block_size]``, zero padded (padding never changes a block's range)."""
    k, n = w.shape
    out = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    out[:, :k] = w.T
    return out.reshape(n, n_blocks, block_size)


def rtn_params(
    blocks: np.ndarray, bits: int, symmetric: bool, scale_dtype: np.dtype, shrink: float = 1.0
) -> tuple[np.ndarray, np.ndarray | None]:
    """Round-to-nearest scales (in ``scale_dtype``) and, asymmetric, unpacked zero points.

    ``shrink`` < 1 narrows the range before the scale is taken (clipping the extremes), for scale searches.
    """
    vmax = blocks.max(axis=-1)
    vmin = blocks.min(axis=-1)
    if symmetric:
        extreme = np.where(np.abs(vmax) > np.abs(vmin), vmax, vmin)
        if shrink != 1.0:
            extreme = extreme * np.float32(shrink)
        return (-extreme / np.float32(1 << (bits - 1))).astype(scale_dtype), None
    qmax = np.float32((1 << bits) - 1)
    vmin = np.minimum(vmin, np.float32(0))
    vmax = np.maximum(vmax, np.float32(0))
    if shrink != 1.0:
        vmin, vmax = vmin * np.float32(shrink), vmax * np.float32(shrink)
    scale = (vmax - vmin) / qmax
    with np.errstate(divide="ignore", invalid="ignore"):
        zp_fp = np.where(scale != 0, np.float32(0) - vmin / scale, vmin)
    zp = np.clip(round_half_away(zp_fp), 0, qmax).astype(np.uint8)
    return scale.astype(scale_dtype), zp


def dequantize_blocks(q: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, bits: int) -> np.ndarray:
    """Unpacked levels ``[n, nb, bs]`` back to float32 values."""
    offset = np.float32(1 << (bits - 1)) if zp is None else zp.astype(np.float32)[..., None]
    return (q.astype(np.float32) - offset) * scales.astype(np.float32)[..., None]


def round_to_grid(blocks: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, bits: int) -> np.ndarray:
    """``clamp(roundf(v * (1/scale) + zp), 0, 2**bits - 1)`` in float32, as MLAS computes it."""
    s32 = scales.astype(np.float32)
    with np.errstate(divide="ignore"):
        reciprocal = np.where(s32 != 0, np.float32(1) / s32, np.float32(0)).astype(np.float32)
    offset = np.float32(1 << (bits - 1)) if zp is None else zp.astype(np.float32)[..., None]
    x = blocks * reciprocal[..., None]
    x += offset
    return np.clip(round_half_away(x), 0, (1 << bits) - 1).astype(np.uint8)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C ``roundf``: ties away from zero, exactly, for float32 or float64 ``x``.

    ``rint`` rounds ties to even; only exact ties (``|x - rint(x)| == 0.5``, computed exactly since both are close)
    are moved away from zero. Four times faster than rounding ``|x| + 0.5`` in float64, which the scale search
    does for every candidate.
    """
    r = np.rint(x)
    tie = np.abs(x - r) == 0.5
    if tie.any():
        r = np.where(tie, x + np.copysign(x.dtype.type(0.5), x), r)
    return r


def _clear_padding(q: np.ndarray, k: int, block_size: int, bits: int) -> None:
    """Write the padding after K the way onnxruntime leaves it.

    MLAS never writes padded positions (the caller's zero-initialised buffer shows through), except that with
    4 bits and odd K the high nibble of the last byte keeps the value of the previous pair's high nibble when that
    pair lies in the same two-block tile (a stale register in the reference).
    """
    n = q.shape[0]
    flat = q.reshape(n, -1)
    if flat.shape[1] == k:
        return
    flat[:, k:] = 0
    if bits == 4 and k % 2 == 1 and (k - 1) % (2 * block_size) != 0:
        flat[:, k] = flat[:, k - 2]


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return q
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def _pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return zp
    n, n_blocks = zp.shape
    if n_blocks % 2:
        zp = np.concatenate([zp, np.full((n, 1), 8, dtype=np.uint8)], axis=1)
    return zp[:, 0::2] | (zp[:, 1::2] << 4)
