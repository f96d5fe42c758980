"""Error-compensated rounding (GPTQ, Frantar et al. 2022) into the MatMulNBits block format (numerics only).

``W[K, N]`` is rounded one input row ``k`` at a time; each row's rounding error is pushed onto the rows not yet
rounded through the inverse of ``H = E[x x^T]``, the second moments of the MatMul's input over the calibration
tokens: ``W[j] -= Hinv[k, j] / Hinv[k, k] * (W[k] - deq(W[k]))`` for ``j`` after ``k``. This greedily minimises the
error of the layer's *output* on the calibration inputs, ``sum_n (w_n - q_n)^T H (w_n - q_n)``, which rounding each
value to nearest ignores. The output is the same format as round to nearest: packed levels, one scale (and zero
point) per block of ``block_size`` values along K, so every execution provider loads it unchanged.

The algorithm is the paper's, with its lazy batch updates (``block_rows`` rows are rounded against a local copy,
then the rest of ``W`` is updated by one matrix product) and the Cholesky form of ``Hinv``. Choices for the block
format:

- a block's scale (and zero point) is taken when its first row is reached, from the weights as compensated so far
  (GPTQ's "groups"; ``block_params`` picks it: round-to-nearest parameters by default, a scale search in the
  quality plan), or given up front for every block (``scales=``);
- with ``act_order`` the rows are rounded in decreasing ``H[k, k]`` (largest inputs first); the blocks are still the
  fixed runs of ``block_size`` rows of the stored layout, so their parameters are fixed up front from the original
  weights ("static groups"), never from a block that is half rounded;
- the damping ``damp * mean(diag H)`` is added to the diagonal; an input channel that calibration never saw
  (``H[k, k] = 0``) gets a unit diagonal, so its row is rounded to nearest and passes no error on; if ``H`` is
  still not positive definite the damping is raised tenfold (up to four times), and the caller is told;
- levels are rounded exactly as onnxruntime's MLAS kernel rounds (``roundf(fl(w * (1/scale)) + zp)``, clamped),
  so with a diagonal ``H`` (nothing to compensate) the bytes equal :func:`.rtn.quantize_blockwise`'s;
- ``sweeps`` > 0 then refines GPTQ's levels by coordinate descent on the same objective under the same damped
  ``H``: row by row, every level of the row that lowers ``(w - deq)^T H (w - deq)`` by moving one step up or down
  moves (GPTQ decides each row once, against rows it has not rounded yet; a sweep revisits it against all of
  them). Each sweep only lowers the objective, and a diagonal ``H`` leaves round to nearest as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable

import ml_dtypes
import numpy as np

from olive_int4_pass.kernels import streaming_rtn
from olive_int4_pass.kernels.rtn import (
    QuantizedWeight,
    _clear_padding,
    _pack,
    _pack_zero_points,
    rtn_params,
    unpack_zero_points,
    validate_bits,
    validate_block_size,
)

_HALF_BELOW = 0.5 - 2.0**-25  # floor(x + _HALF_BELOW) == roundf(x) for 0 <= x < 2**22 (see scale_search)
_DAMP_RETRIES = 4
_BAND_ROWS = 1024
_BF16 = np.dtype(ml_dtypes.bfloat16)
_MIN_GAIN = 1e-4  # coordinate descent: the least gain, as a fraction of a move's own d^2 H[r, r], worth a move
_CHUNK_ELEMENTS = 1 << 26  # float32 weight values per chunk of output channels (256 MB)

# (block [block_size, N] float32, block index) -> (scales [N] in the storage dtype, zero points [N] uint8 or None)
BlockParams = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray | None]]


@dataclasses.dataclass(frozen=True)
class Compensation:
    """GPTQ's knobs: relative damping, activation order, rows rounded between two lazy updates, and the
    coordinate-descent sweeps over the levels afterwards (0: GPTQ's levels as they are)."""

    damp: float = 0.1
    act_order: bool = True
    block_rows: int = 128
    sweeps: int = 0


@dataclasses.dataclass(frozen=True)
class CompensationInfo:
    """What the rounding had to do to ``H``: the damping finally used and the input channels never seen."""

    damp: float
    dead_channels: int
    retries: int


def rtn_block_params(symmetric: bool, bits: int, dtype: np.dtype) -> BlockParams:
    """Round-to-nearest scale (and zero point) of each block, as :func:`.rtn.rtn_params` computes them."""

    def params(block: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        s, zp = rtn_params(block.T[:, None, :], bits, symmetric, dtype)
        return s[:, 0], None if zp is None else zp[:, 0]

    return params


@dataclasses.dataclass(frozen=True)
class Factor:
    """What the rounding needs from one input's ``H``: the upper Cholesky factor ``u`` of ``(H + damping)^-1``
    (float32 ``[kp, kp]``, ``kp`` = K padded to whole blocks) in the rounding order ``perm`` (None: natural order).
    It depends on the input only, so the weights that read the same input (q/k/v, gate/up) share one."""

    u: object  # torch.Tensor
    perm: object | None  # torch.Tensor of kp row indices, padding rows last
    info: CompensationInfo
    k: int
    hessian: Callable[[], object] | None = None  # a fresh damped H [kp, kp] in rounding order, for the sweeps


def factorize(
    hessian: np.ndarray | Callable[[], np.ndarray],
    k: int,
    *,
    block_size: int = 32,
    compensation: Compensation = Compensation(),
    order: np.ndarray | None = None,
    name: str = "weight",
) -> Factor:
    """The :class:`Factor` of ``hessian`` (``[k, k]``, or a function giving a fresh float32 one already in the order
    ``order``, which is then factorised in place; see :func:`compensated_quantize`)."""
    torch = _require_torch()
    kp = -(-k // block_size) * block_size
    if callable(hessian):  # H comes in the rounding order, to be overwritten
        perm = None
        if order is not None:
            if sorted(np.asarray(order).tolist()) != list(range(k)):
                raise ValueError(f"weight {name!r}: order is not a permutation of its {k} input rows")
            perm = torch.cat([torch.as_tensor(np.asarray(order, np.int64)), torch.arange(k, kp)])
        source = functools.partial(lambda h: _owned(torch, h(), k, kp, name), hessian)
    else:
        _check_hessian(hessian, k, name)
        perm = None
        if compensation.act_order:  # padding rows (H[k, k] = 0) come last
            diag = torch.zeros(kp)
            diag[:k] = torch.as_tensor(np.diagonal(np.asarray(hessian)).astype(np.float32))
            perm = torch.argsort(diag, descending=True, stable=True)
        source = functools.partial(_padded, torch, hessian, k, kp, perm)
    u, info = _inverse_factor(torch, source, k, kp, compensation.damp, name)
    again = None
    if compensation.sweeps:
        again = functools.partial(_damped, torch, source, info.damp)
    return Factor(u, perm, info, k, again)


def compensated_quantize(
    weight: np.ndarray,
    hessian: np.ndarray | Callable[[], np.ndarray] | Factor,
    *,
    block_size: int = 32,
    bits: int = 4,
    symmetric: bool = True,
    compensation: Compensation = Compensation(),
    scales: np.ndarray | None = None,
    zero_points: np.ndarray | None = None,
    block_params: BlockParams | None = None,
    order: np.ndarray | None = None,
    name: str = "weight",
) -> tuple[QuantizedWeight, CompensationInfo]:
    """Quantize ``weight[K, N]`` with error compensation under ``hessian[K, K]`` (``E[x x^T]`` of its input).

    ``scales`` (``[N, n_blocks]``, and ``zero_points`` unpacked, when asymmetric) fix every block's parameters up
    front; otherwise ``block_params`` (default: round to nearest) picks them as each block is reached, or, with
    ``act_order``, from the original weight before any row is rounded.

    ``hessian`` may instead be a function returning a fresh float32 ``H`` already in the rounding order ``order``
    (a permutation of the K rows; None: their natural order, i.e. no act-order), which the kernel then factorises
    in place: no second K x K buffer (1.4 GB for a 7B down projection). It is called again if ``H`` must be damped
    more. Or it is a :class:`Factor` made before (by :func:`factorize`, for another weight of the same input).
    """
    validate_block_size(block_size)
    validate_bits(bits)
    _check(weight, compensation, block_size, name)  # an array H is checked when it is factorised
    torch = _require_torch()
    k, n = weight.shape
    n_blocks = -(-k // block_size)
    kp = n_blocks * block_size
    dtype = weight.dtype
    if block_params is None:
        block_params = rtn_block_params(symmetric, bits, dtype)
    if isinstance(hessian, Factor):
        factor = hessian
        if factor.k != k or tuple(factor.u.shape) != (kp, kp):
            raise ValueError(f"weight {name!r}: a factor of {factor.k} input rows given for {k}")
    else:
        factor = factorize(hessian, k, block_size=block_size, compensation=compensation, order=order, name=name)
    u, perm = factor.u, factor.perm

    if scales is None and perm is not None:  # static groups: every block's parameters from the original weight
        params = [block_params(_block(weight, b, block_size), b) for b in range(n_blocks)]
        scales = np.stack([p[0] for p in params], axis=1)
        zero_points = None if symmetric else np.stack([p[1] for p in params], axis=1)
    out_scales = np.empty((n, n_blocks), dtype)
    out_zp = None if symmetric else np.empty((n, n_blocks), np.uint8)
    if scales is not None:
        out_scales[:] = scales
        if out_zp is not None:
            if zero_points is None:
                raise ValueError(f"weight {name!r}: asymmetric rounding with given scales needs zero_points")
            out_zp[:] = zero_points

    rows = perm[:k].numpy() if perm is not None else None
    groups = ((perm if perm is not None else torch.arange(kp)) // block_size).tolist()
    q = np.empty((n, n_blocks, block_size), np.uint8)
    sweeps = compensation.sweeps if factor.hessian is not None else 0
    h = factor.hessian() if sweeps else None  # damped, in rounding order: one for every chunk
    # Output channels are independent (each is rounded against the same H): a chunk of them at a time bounds the
    # float32 copy of the weight (an lm_head's would be 2.2 GB at 7B) without changing a level.
    width = max(1, min(n, _CHUNK_ELEMENTS // kp))
    with torch.no_grad():
        for c0 in range(0, n, width):
            c1 = min(n, c0 + width)
            chunk = _Chunk(torch, weight, rows, kp, c0, c1, out_scales, out_zp, bits, name)
            fixed = scales is not None
            levels = chunk.round(u, groups, block_size, compensation.block_rows, None if fixed else block_params)
            if sweeps:
                original = _Chunk(torch, weight, rows, kp, c0, c1, out_scales, out_zp, bits, name)
                levels = original.refine(levels, h, groups, sweeps, block_size)
            if perm is not None:
                unpermuted = torch.empty_like(levels)
                unpermuted[perm] = levels
                levels = unpermuted
            # torch's transposed copy is tiled; numpy's strides through a 64k-wide chunk one byte a page (7x slower)
            torch.from_numpy(q[c0:c1]).view(c1 - c0, kp).copy_(levels.T)
    _clear_padding(q, k, block_size, bits)
    if not np.isfinite(out_scales.astype(np.float32)).all():
        raise ValueError(f"weight {name!r}: a block's scale is not finite after compensation")
    packed_zp = None if out_zp is None else _pack_zero_points(out_zp, bits)
    return QuantizedWeight(_pack(q, bits), out_scales, packed_zp, k, n, block_size, bits), factor.info


def _require_torch():
    torch = streaming_rtn._torch()
    if torch is None:
        raise ImportError("compensated rounding needs torch (installed with olive-ai)")
    return torch


def spans(k: int, block_size: int, span: int | None) -> list[tuple[int, int]]:
    """The runs of input rows compensated together: the whole weight, or (when ``k`` exceeds ``span``) runs of whole
    blocks, as equal as possible and none longer than ``span``. Each run is rounded against its own diagonal block of
    ``H`` (errors are not passed between runs): the inverse costs ``k * span^2`` instead of ``k^3``."""
    if span is None or k <= span:
        return [(0, k)]
    n_blocks = -(-k // block_size)
    parts = -(-n_blocks // max(1, span // block_size))
    edges = [block_size * (n_blocks * i // parts) for i in range(parts)] + [k]
    return list(itertools.pairwise(edges))


def compensated_quantize_spans(
    weight: np.ndarray,
    moments: Callable[[list[np.ndarray | None]], list[np.ndarray]],
    *,
    order: np.ndarray | None = None,
    span: int | None = None,
    block_size: int = 32,
    scales: np.ndarray | None = None,
    zero_points: np.ndarray | None = None,
    factors: dict[tuple[int, int], Factor] | None = None,
    compensation: Compensation = Compensation(),
    name: str = "weight",
    **kwargs,
) -> tuple[QuantizedWeight, CompensationInfo]:
    """:func:`compensated_quantize` run by run over :func:`spans` (the whole weight when it fits one).

    ``moments([channels, ...])`` returns, for each entry, a fresh float32 ``H`` of those input channels, rows and
    columns in that order (``None``: every channel in natural order); it is asked once for every run still to
    factor (one pass over the calibration inputs), and again for a single run only if its ``H`` must be damped
    more. ``order`` is the whole weight's rounding order (None: natural), each run keeping its own channels in that
    order. ``scales`` / ``zero_points`` (``[N, n_blocks]``) cover the whole weight. ``factors``
    (``{(first row, end row): Factor}``), when given, is looked in before ``H`` is formed and filled after: pass the
    same dict for every weight of one input. The info is the worst run's damping, with the dead channels of all
    runs.
    """
    k = weight.shape[0]
    runs = {}  # (r0, r1) -> (channels to fetch, their order within the run)
    for r0, r1 in spans(k, block_size, span):
        channels = np.arange(r0, r1) if order is None else order[(order >= r0) & (order < r1)]
        fetch = None if (r0, r1) == (0, k) and order is None else channels
        runs[(r0, r1)] = (fetch, None if order is None else channels - r0)
    cached = factors if factors is not None else {}
    missing = [run for run in runs if run not in cached]
    formed = dict(zip(missing, moments([runs[run][0] for run in missing]) if missing else [], strict=True))

    def fresh(run):  # the H formed in the one pass, once; a damping retry forms that run's again
        return formed.pop(run) if run in formed else moments([runs[run][0]])[0]

    parts, infos = [], []
    for (r0, r1), (_, local) in runs.items():
        factor = cached.get((r0, r1))
        if factor is None:
            factor = factorize(
                functools.partial(fresh, (r0, r1)),
                r1 - r0,
                block_size=block_size,
                compensation=compensation,
                order=local,
                name=name,
            )
            if factors is not None:
                factors[(r0, r1)] = factor
        g0, g1 = r0 // block_size, -(-r1 // block_size)
        q, info = compensated_quantize(
            weight[r0:r1],
            factor,
            block_size=block_size,
            scales=None if scales is None else scales[:, g0:g1],
            zero_points=None if zero_points is None else zero_points[:, g0:g1],
            compensation=compensation,
            name=name,
            **kwargs,
        )
        parts.append(q)
        infos.append(info)
    worst = max(infos, key=lambda i: i.retries)
    return concat_rows(parts), dataclasses.replace(worst, dead_channels=sum(i.dead_channels for i in infos))


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Quantized runs of input rows (each a whole number of blocks but the last) as one weight."""
    first = parts[0]
    if len(parts) == 1:
        return first
    packed = np.concatenate([p.packed for p in parts], axis=1)
    scales = np.concatenate([p.scales for p in parts], axis=1)
    zero_points = None
    if first.zero_points is not None:
        unpacked = [unpack_zero_points(p.zero_points, p.bits, p.n_blocks) for p in parts]
        zero_points = _pack_zero_points(np.concatenate(unpacked, axis=1), first.bits)
    k = sum(p.k for p in parts)
    return QuantizedWeight(packed, scales, zero_points, k, first.n, first.block_size, first.bits)


class _Chunk:
    """Output channels ``c0:c1`` of the weight as float32 ``[kp, c]`` rows in rounding order, and their rounding."""

    def __init__(self, torch, weight, rows, kp, c0, c1, scales, zero_points, bits: int, name: str) -> None:
        self.torch = torch
        k = weight.shape[0]
        self.w = torch.zeros((kp, c1 - c0), dtype=torch.float32)
        band = max(1, _CHUNK_ELEMENTS // 16 // (c1 - c0))  # rows copied at a time: small temporaries
        for r0 in range(0, k, band):
            r1 = min(k, r0 + band)
            part = weight[r0:r1, c0:c1] if rows is None else weight[rows[r0:r1], c0:c1]
            self.w[r0:r1] = _as_torch(torch, np.ascontiguousarray(part))  # widened by torch: 2x numpy's speed
        low, high = torch.aminmax(self.w)  # NaN or Inf, checked on the float32 copy (40x isfinite's speed)
        if not (np.isfinite(float(low)) and np.isfinite(float(high))):
            bad = int((~torch.isfinite(self.w)).sum())
            raise ValueError(f"weight {name!r} has {bad} non-finite value(s) (NaN/Inf); refusing to quantize it")
        self.scales, self.zero_points, self.c0, self.c1 = scales, zero_points, c0, c1
        self.s32 = torch.from_numpy(scales[c0:c1].astype(np.float32).T.copy())  # [n_blocks, c]
        self.offset = torch.full(self.s32.shape, float(1 << (bits - 1)))
        if zero_points is not None:
            self.offset = torch.from_numpy(zero_points[c0:c1].astype(np.float32).T.copy())
        self.reciprocal = torch.where(self.s32 != 0, 1.0 / self.s32, torch.zeros_like(self.s32))
        self.qmax = (1 << bits) - 1

    def set_block(self, g: int, s: np.ndarray, zp: np.ndarray | None) -> None:
        """Block ``g``'s parameters, chosen now (from the weights compensated so far)."""
        torch = self.torch
        self.scales[self.c0 : self.c1, g] = s
        self.s32[g] = torch.from_numpy(np.asarray(s, np.float32))
        self.reciprocal[g] = torch.where(self.s32[g] != 0, 1.0 / self.s32[g], torch.zeros_like(self.s32[g]))
        if zp is not None:
            self.zero_points[self.c0 : self.c1, g] = zp
            self.offset[g] = torch.from_numpy(zp.astype(np.float32))

    def refine(self, levels, h, groups: list[int], sweeps: int, block_size: int):
        """Coordinate descent from ``levels`` ``[kp, c]`` (rounding order) on ``sum_c e_c^T H e_c``, ``e = w - deq``.

        Row by row, each level moves one step (up or down, within its range) where that lowers the objective:
        a change ``d`` of ``e[r]`` changes it by ``2 d g + d^2 H[r, r]`` with ``g = (H e)[r]``. ``G = H e`` is kept
        up to date lazily: exactly within a block of rows, by one product for the rest after the block.
        """
        torch, w = self.torch, self.w  # w: the original weights in rounding order
        kp, c = w.shape
        scale = self.s32[groups]  # [kp, c]: each row's block scale
        offset = self.offset[groups]
        q = levels.to(torch.float32)
        e = w - (q - offset) * scale
        g = h @ e
        hd = torch.diagonal(h).clone()
        qmax = float(self.qmax)
        pending = torch.empty((block_size, c), dtype=torch.float32)
        for _ in range(sweeps):
            moved = 0
            for b0 in range(0, kp, block_size):
                b1 = min(kp, b0 + block_size)
                pending.zero_()
                for r in range(b0, b1):
                    j = r - b0
                    gr = g[r] + h[r, b0:r] @ pending[:j] if j else g[r].clone()
                    s, qr = scale[r], q[r]
                    best = torch.zeros(c)
                    gain = torch.zeros(c)
                    for step in (-1.0, 1.0):
                        d = -step * s  # e moves opposite to the level
                        change = d * (2 * gr + d * hd[r])
                        # a move must gain a little of its own size: float noise (round to nearest's ties under
                        # MLAS's reciprocal, G's float32 sums) moves nothing
                        better = (change < gain - _MIN_GAIN * d * d * hd[r]) & (qr + step >= 0) & (qr + step <= qmax)
                        gain = torch.where(better, change, gain)
                        best = torch.where(better, torch.full_like(best, step), best)
                    moving = best != 0
                    if bool(moving.any()):
                        moved += int(moving.sum())
                        qr.add_(best)
                        pending[j] = -best * s
                        e[r].add_(pending[j])
                g.addmm_(h[:, b0:b1], pending[: b1 - b0])
            if not moved:
                break
        return q.to(torch.uint8)

    def round(self, u, groups: list[int], block_size: int, step: int, block_params: BlockParams | None):
        """GPTQ over the rows: levels ``[kp, c]`` uint8 (in rounding order). ``block_params``: choose each block's
        parameters when its first row is reached; None: they are fixed.

        The rows of one step (``step`` rows between two lazy updates of the rest) are rounded a block of
        ``block_size`` rows at a time: a row's error goes to the rows left in its block by a rank-1 update, and the
        block's errors to the rest of the step by one product, so the memory-bound rank-1 updates touch at most a
        block. Errors are kept as ``w - deq`` and ``u``'s rows divided by their diagonal instead. The elementwise
        work on one row is numpy's: its calls cost less than torch's on rows this short, with the same values.
        """
        torch, w = self.torch, self.w
        kp, c = w.shape
        wn = w.numpy()
        recip_all, offset_all, scale_all = self.reciprocal.numpy(), self.offset.numpy(), self.s32.numpy()
        levels = torch.empty((kp, c), dtype=torch.uint8)
        q = np.empty((step, c), dtype=np.float32)  # one step's levels, as floats
        err = np.empty((step, c), dtype=np.float32)  # and rounding errors w - deq
        q_t, err_t = torch.from_numpy(q), torch.from_numpy(err)
        err_rows = err_t.unbind(0)
        x, t = np.empty(c, dtype=np.float32), np.empty(c, dtype=np.float32)
        qmax = float(self.qmax)
        for i1 in range(0, kp, step):
            i2 = min(i1 + step, kp)
            m = i2 - i1
            un = u[i1:i2, i1:] / torch.diagonal(u[i1:i2, i1:i2])[:, None]  # [m, kp - i1], unit diagonal
            for j0 in range(0, m, block_size):
                j1 = min(j0 + block_size, m)
                if block_params is not None:  # a new block: its parameters from the weights compensated so far
                    g = groups[i1 + j0]
                    self.set_block(g, *block_params(wn[i1 + j0 : i1 + j0 + block_size], g))
                index = groups[i1 + j0 : i1 + j1]
                recip, offset, scale = recip_all[index], offset_all[index], scale_all[index]
                for j in range(j0, j1):
                    row, b = wn[i1 + j], j - j0
                    # Level as MLAS rounds it: roundf(fl(w * (1/s)) + zp), clamped (floor(x + just under 1/2)).
                    np.multiply(row, recip[b], out=x)
                    np.add(x, offset[b], out=x)
                    np.maximum(x, 0.0, out=x)
                    np.minimum(x, qmax, out=x)
                    np.add(x, _HALF_BELOW, out=x)
                    np.floor(x, out=q[j])
                    np.subtract(q[j], offset[b], out=t)
                    np.multiply(t, scale[b], out=t)
                    np.subtract(row, t, out=err[j])
                    if j + 1 < j1:
                        w[i1 + j + 1 : i1 + j1].addr_(un[j, j + 1 : j1], err_rows[j], alpha=-1)
                if j1 < m:  # the block's errors onto the rest of the step
                    w[i1 + j1 : i2].addmm_(un[j0:j1, j1:m].T, err_t[j0:j1], alpha=-1)
            levels[i1:i2] = q_t[:m]
            if i2 < kp:  # the step's errors onto every row after it
                w[i2:].addmm_(un[:, m:].T, err_t[:m], alpha=-1)
        return levels


def _damped(torch, source, damp: float):
    """A fresh ``H`` from ``source`` with the damping the factorisation ended with (dead channels at 1, as there)."""
    h = source()
    diag = torch.diagonal(h)
    diag[diag <= 0] = 1.0
    diag.add_(damp * float(diag.mean()))
    return h


def _as_torch(torch, part: np.ndarray):
    """A float32, float16 or bfloat16 array as a torch tensor of that dtype (bfloat16 through its int16 bits)."""
    if part.dtype == _BF16:
        return torch.from_numpy(part.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(part)


def _block(weight: np.ndarray, b: int, block_size: int) -> np.ndarray:
    """Rows ``b * block_size ...`` of the weight as float32 ``[block_size, N]``, zero padded past K."""
    part = np.asarray(weight[b * block_size : (b + 1) * block_size], np.float32)
    if part.shape[0] == block_size:
        return part
    block = np.zeros((block_size, weight.shape[1]), np.float32)
    block[: part.shape[0]] = part
    return block


def _check(weight: np.ndarray, compensation: Compensation, block_size: int, name: str) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight {name!r} must be 2-D [K, N], got shape {weight.shape}")
    if not (np.isfinite(compensation.damp) and 0 < compensation.damp <= 1):
        raise ValueError(f"compensation damping must be in (0, 1], got {compensation.damp!r}")
    rows = compensation.block_rows
    if rows < block_size or rows % block_size:
        raise ValueError(f"compensation block_rows must be a multiple of block_size {block_size}, got {rows}")


def _check_hessian(hessian: np.ndarray, k: int, name: str) -> None:
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"weight {name!r}: H has shape {tuple(hessian.shape)}, expected ({k}, {k})")
    if not _all_finite(np.asarray(hessian)):
        raise ValueError(f"weight {name!r}: the input's second moments H hold NaN or Inf (calibration overflowed)")


def _owned(torch, hessian: np.ndarray, k: int, kp: int, name: str):
    """A fresh ``H`` given to the kernel, as float32 ``[kp, kp]``: the array itself where it already is one."""
    _check_hessian(hessian, k, name)
    if kp == k and hessian.dtype == np.float32 and hessian.flags.c_contiguous and hessian.flags.writeable:
        return torch.from_numpy(hessian)
    return _padded(torch, hessian, k, kp)


def _all_finite(matrix: np.ndarray) -> bool:
    """No NaN or Inf, checked a band of rows at a time (a whole-matrix mask would be K^2 bytes more)."""
    return all(np.isfinite(matrix[r : r + _BAND_ROWS]).all() for r in range(0, matrix.shape[0], _BAND_ROWS))


def _padded(torch, hessian: np.ndarray, k: int, kp: int, perm=None):
    """``H`` as float32 ``[kp, kp]`` (rows past K, the last block's padding, never see an input), rows and columns
    in the order ``perm``; copied a band of rows at a time, so the only large allocation is the result."""
    source = torch.from_numpy(np.ascontiguousarray(hessian, np.float32))
    h = torch.zeros((kp, kp), dtype=torch.float32)
    order = perm[:k] if perm is not None else None  # padding sorts last: the first K are a permutation of 0..K-1
    for r0 in range(0, k, _BAND_ROWS):
        r1 = min(r0 + _BAND_ROWS, k)
        h[r0:r1, :k] = source[r0:r1] if order is None else source[order[r0:r1]][:, order]
    return h


def _inverse_factor(torch, source, k: int, kp: int, damp: float, name: str):
    """Upper Cholesky factor of ``(H + damping)^-1``, damping raised tenfold while ``H`` is not positive definite.

    ``source()`` gives a fresh ``[kp, kp]`` ``H`` in the rounding order; every step overwrites that one buffer (the
    factor, its inverse, the inverse's factor), and a failed factorisation asks ``source`` again.
    """
    h = source()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0
    mean = float(diag.mean())
    original = diag.clone()
    status = torch.empty((), dtype=torch.int32)
    for retry in range(_DAMP_RETRIES + 1):
        level = damp * 10**retry
        if retry:  # the failed factorisation overwrote h: start again from H
            h = source()
            diag = torch.diagonal(h)
        diag.copy_(original + level * mean)
        torch.linalg.cholesky_ex(h, out=(h, status))
        if int(status) == 0:
            break
    else:
        raise ValueError(
            f"weight {name!r}: the input's second moments stay singular even damped by {level:g} x mean(diag H);"
            " calibrate on more (or more varied) tokens"
        )
    torch.cholesky_inverse(torch.tril(h, out=h), out=h)
    torch.linalg.cholesky_ex(h, upper=True, out=(h, status))
    if int(status) != 0 or not _all_finite(h.numpy()):
        raise ValueError(f"weight {name!r}: H is too ill-conditioned to invert; raise the damping")
    return h, CompensationInfo(level, int(dead.sum()) - (kp - k), retry)  # padding rows are not channels
