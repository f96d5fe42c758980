"""Seeded random orthogonal rotations of the residual stream, applied without forming the ``d x d`` matrix.

``Q = diag(s) (R ⊗ H / sqrt(b))``: ``b`` is the largest power of two dividing ``d``, ``H`` the ``b x b``
Walsh-Hadamard matrix (applied by butterflies, ``log2 b`` passes), ``R`` a random orthogonal ``a x a`` factor
(``a = d / b``, QR of a Gaussian) and ``s`` random signs. Every entry of ``Q`` is small (at most
``max|R| / sqrt(b)``), so a rotated weight's rows mix all of the stream's channels: an outlier channel (a large
norm weight folded into a weight, a large input channel) is spread over the whole block instead of setting one
block's scale. QuaRot (Ashkboos et al. 2024) and SpinQuant (Liu et al. 2024) rotate the same way.

Readers of the stream (a MatMul weight ``W [d, n]``) become ``Qᵀ W``, writers (``W [k, d]``, the embedding table)
``W Q``; both are the same contraction over the ``d`` axis: two float32 matrix products (``R`` on one axis of the
``[a, b]``-shaped stream, ``H / sqrt(b)`` on the other), ``d (a + b)`` multiply-adds per column instead of ``d²``,
in bands of columns for memory.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["Rotation"]

_BAND_ELEMENTS = 1 << 24  # float32 elements per band (64 MB)


class Rotation:
    """The rotation ``Q`` of a ``size``-wide residual stream, fixed by ``seed``."""

    def __init__(self, size: int, seed: int = 0) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"rotation size must be a positive integer, got {size!r}")
        self.size = size
        self.seed = seed
        self.hadamard = size & -size
        a = size // self.hadamard
        rng = np.random.default_rng(seed)
        self.signs = rng.choice(np.array([-1.0, 1.0]), size)
        q, r = np.linalg.qr(rng.standard_normal((a, a)))
        self.factor = q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]  # the sign fix makes R Haar-distributed
        self._signs = torch.from_numpy(self.signs.astype(np.float32))
        self._factor_t = torch.from_numpy(np.ascontiguousarray(self.factor.T, dtype=np.float32))
        self._walsh = torch.from_numpy((_walsh_hadamard(self.hadamard) / np.sqrt(self.hadamard)).astype(np.float32))

    def matrix(self) -> np.ndarray:
        """``Q`` itself, for tests and small widths."""
        return self.rotate_columns(np.eye(self.size))

    def rotate_columns(self, w: np.ndarray, dtype: np.dtype = np.float32) -> np.ndarray:
        """``W Q`` for ``W [k, size]`` (a writer of the stream, the embedding table), computed in float32 and
        stored as ``dtype``."""
        return self._apply(np.asarray(w), 1, dtype)

    def rotate_rows(
        self, w: np.ndarray, dtype: np.dtype = np.float32, row_scale: np.ndarray | None = None
    ) -> np.ndarray:
        """``Qᵀ diag(row_scale) W`` for ``W [size, n]`` (a reader of the stream, a norm's weight folded in),
        computed in float32 and stored as ``dtype``."""
        return self._apply(np.asarray(w), 0, dtype, row_scale)

    def _apply(self, w: np.ndarray, axis: int, dtype: np.dtype, row_scale: np.ndarray | None = None) -> np.ndarray:
        if w.ndim != 2 or w.shape[axis] != self.size:
            raise ValueError(f"cannot rotate a {w.shape} tensor on axis {axis}: the stream is {self.size} wide")
        out = np.empty(w.shape, dtype)  # the weight's own dtype: no float32 copy of a whole 7B embedding table
        other = w.shape[1 - axis]
        band = max(1, _BAND_ELEMENTS // self.size)
        a, b = self.size // self.hadamard, self.hadamard
        with torch.no_grad():
            for c0 in range(0, other, band):
                c1 = min(other, c0 + band)
                if axis == 1:  # x Q for the rows x of W [k, size]
                    y = torch.from_numpy(np.asarray(w[c0:c1], np.float32)) * self._signs
                    y = torch.matmul(self._factor_t, y.reshape(c1 - c0, a, b))  # R on the a axis
                    out[c0:c1] = torch.matmul(y, self._walsh).reshape(c1 - c0, self.size).numpy()  # H on b
                else:  # Qᵀ W = (R ⊗ H)ᵀ diag(s) W, the columns of W [size, n] as they lie
                    scale = self._signs if row_scale is None else self._signs * torch.from_numpy(row_scale)
                    y = torch.from_numpy(np.ascontiguousarray(w[:, c0:c1], np.float32)) * scale[:, None]
                    y = torch.matmul(self._factor_t, y.reshape(a, -1)).reshape(a, b, c1 - c0)
                    out[:, c0:c1] = torch.matmul(self._walsh, y).reshape(self.size, c1 - c0).numpy()
        return out


def _walsh_hadamard(n: int) -> np.ndarray:
    """The ``n x n`` Walsh-Hadamard matrix (Sylvester's construction; ``n`` a power of two)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h
