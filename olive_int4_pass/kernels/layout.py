"""The MatMulNBits storage format in one place: shapes of its three tensors and their bytes.

A weight ``W[K, N]`` is cut into ``n_blocks = ceil(K / block_size)`` blocks per output channel:

- ``packed``      uint8 ``[N, n_blocks, block_size * bits / 8]`` (two 4-bit levels per byte, low nibble first);
- ``scales``      ``[N, n_blocks]`` in the weight's (= the activations') dtype;
- ``zero_points`` uint8 ``[N, ceil(n_blocks * bits / 8)]`` (asymmetric only; 4-bit ones packed two per byte).

``GatherBlockQuantized`` reads the same ``packed`` tensor reshaped to ``[N, n_blocks * block_size * bits / 8]``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NBitsLayout:
    """Shapes and bytes of one quantized ``W[K, N]``."""

    k: int
    n: int
    block_size: int
    bits: int

    @property
    def n_blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.bits // 8

    @property
    def packed_shape(self) -> tuple[int, int, int]:
        return (self.n, self.n_blocks, self.block_bytes)

    @property
    def scales_shape(self) -> tuple[int, int]:
        return (self.n, self.n_blocks)

    @property
    def zero_points_shape(self) -> tuple[int, int]:
        return (self.n, -(-self.n_blocks * self.bits // 8))

    @property
    def row_bytes(self) -> int:
        """One output channel's packed bytes: the width of the ``GatherBlockQuantized`` view."""
        return self.n_blocks * self.block_bytes

    def nbytes(self, scale_itemsize: int, symmetric: bool = True) -> int:
        """Bytes of the three tensors: packed levels, scales and (asymmetric) packed zero points."""
        zero_points = 0 if symmetric else self.zero_points_shape[0] * self.zero_points_shape[1]
        return self.n * self.n_blocks * (self.block_bytes + scale_itemsize) + zero_points


def quantized_bytes(k: int, n: int, block_size: int, bits: int, scale_itemsize: int, symmetric: bool = True) -> int:
    """Bytes of a MatMulNBits weight: packed levels, scales and (asymmetric) packed zero points."""
    return NBitsLayout(k, n, block_size, bits).nbytes(scale_itemsize, symmetric)
