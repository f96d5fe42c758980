"""Error-compensated rounding (kernels/gptq.py): the bytes of round to nearest when there is nothing to compensate,
the paper's algorithm (checked against a plain float64 version of it), less output error than round to nearest on
correlated inputs, and clear errors for bad H."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

from olive_int4_pass.kernels.gptq import Compensation, compensated_quantize
from olive_int4_pass.kernels.rtn import _unpack, dequantize_blockwise, quantize_blockwise, rtn_params


def correlated_inputs(k: int, tokens: int = 1024, seed: int = 0) -> np.ndarray:
    """Activations with correlated channels of very different sizes, as in a transformer."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k)) * 0.3 + np.eye(k)
    return (rng.normal(size=(tokens, k)) @ mix * np.exp(rng.normal(size=k))).astype(np.float32)


def second_moments(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float64).T @ x / len(x)).astype(np.float32)


def output_error(q, w: np.ndarray, h: np.ndarray) -> float:
    e = dequantize_blockwise(q).astype(np.float64) - w.astype(np.float64)
    return float(np.einsum("kn,kj,jn->", e, h.astype(np.float64), e))


def reference_gptq(
    w: np.ndarray, h: np.ndarray, *, bits: int, symmetric: bool, damp: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ as the paper writes it (Frantar et al. 2022, eq. 2-3), in float64: round row k, spread its error with
    the inverse of H over the rows left, then remove row k from the inverse by one Gaussian elimination step.
    Each block's round-to-nearest parameters are taken from the weights as compensated when it is reached.
    Returns the levels and the dequantized weight."""
    k, n = w.shape
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.inv(h)
    levels = np.empty((k, n), np.uint8)
    deq = np.empty((k, n))
    for row in range(k):
        if row % 32 == 0:
            s, zp = rtn_params(w[row : row + 32].T[:, None, :].astype(np.float32), bits, symmetric, np.float32)
            s = s[:, 0].astype(np.float64)
            offset = 2.0 ** (bits - 1) if zp is None else zp[:, 0].astype(np.float64)
        x = np.clip(w[row] / np.where(s != 0, s, np.inf) + offset, 0, 2**bits - 1)
        q = np.floor(x + 0.5)
        levels[row] = q
        deq[row] = (q - offset) * s
        err = (w[row] - deq[row]) / hinv[row, row]
        w[row + 1 :] -= np.outer(hinv[row + 1 :, row], err)
        hinv -= np.outer(hinv[:, row], hinv[row, :]) / hinv[row, row]
    return levels, deq


def assert_same_bytes(a, b) -> None:
    """Packed levels, scales and (asymmetric) zero points all equal."""
    np.testing.assert_array_equal(a.packed, b.packed)
    np.testing.assert_array_equal(a.scales, b.scales)
    assert (a.zero_points is None) == (b.zero_points is None)
    if a.zero_points is not None:
        np.testing.assert_array_equal(a.zero_points, b.zero_points)


def levels_of(q) -> np.ndarray:
    return _unpack(q.packed, q.bits).reshape(q.n, -1)[:, : q.k].T


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_diagonal_h_gives_round_to_nearest_bytes(dtype, symmetric, bits, act_order):
    # Uncorrelated inputs leave nothing to compensate: the reference RTN bytes, padding of a partial block included.
    rng = np.random.default_rng(1)
    w = rng.normal(size=(80, 48)).astype(dtype)
    h = np.diag(rng.uniform(0.1, 10, size=80)).astype(np.float32)
    q, info = compensated_quantize(
        w, h, bits=bits, symmetric=symmetric, compensation=Compensation(act_order=act_order, block_rows=64)
    )
    ref = quantize_blockwise(w, bits=bits, symmetric=symmetric)
    assert info.retries == 0 and info.dead_channels == 0
    assert q.scales.dtype == ref.scales.dtype
    assert_same_bytes(q, ref)


@pytest.mark.parametrize("symmetric", [True, False])
def test_given_scales_are_kept(symmetric):
    rng = np.random.default_rng(2)
    w = rng.normal(size=(64, 40)).astype(np.float16)
    rtn = quantize_blockwise(w, symmetric=symmetric)
    scales = (rtn.scales.astype(np.float32) * 0.9).astype(np.float16)
    zp = None
    if not symmetric:
        zp = np.stack([rtn.zero_points & 0xF, rtn.zero_points >> 4], axis=-1).reshape(40, -1)[:, :2]
    q, _ = compensated_quantize(w, np.eye(64, dtype=np.float32), symmetric=symmetric, scales=scales, zero_points=zp)
    ref = quantize_blockwise(w, symmetric=symmetric, scales=scales, zero_points=zp)
    np.testing.assert_array_equal(q.scales, scales)
    np.testing.assert_array_equal(q.packed, ref.packed)


@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_the_papers_algorithm(symmetric):
    x = correlated_inputs(96, seed=3)
    h = second_moments(x)
    w = np.random.default_rng(3).normal(size=(96, 64)).astype(np.float32)
    compensation = Compensation(damp=0.01, act_order=False, block_rows=32)
    q, _ = compensated_quantize(w, h, symmetric=symmetric, compensation=compensation)
    ref, ref_deq = reference_gptq(w, h, bits=4, symmetric=symmetric, damp=0.01)
    # float32 against float64: a level next to a tie may round the other way and steer the rows after it a little
    assert (levels_of(q) == ref).mean() > 0.97
    e = ref_deq - w
    assert output_error(q, w, h) == pytest.approx(float(np.einsum("kn,kj,jn->", e, h.astype(np.float64), e)), rel=0.02)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_less_output_error_than_round_to_nearest(bits, symmetric):
    x = correlated_inputs(256, seed=4)
    h = second_moments(x)
    w = np.random.default_rng(4).normal(size=(256, 96)).astype(np.float16)
    rtn = output_error(quantize_blockwise(w, bits=bits, symmetric=symmetric), w, h)
    in_order = Compensation(act_order=False)
    plain, _ = compensated_quantize(w, h, bits=bits, symmetric=symmetric, compensation=in_order)
    ordered, _ = compensated_quantize(w, h, bits=bits, symmetric=symmetric, compensation=Compensation(act_order=True))
    assert output_error(plain, w, h) < 0.7 * rtn
    assert output_error(ordered, w, h) < 0.7 * rtn
    # the lazy batches are an implementation detail: any block of rows gives the same levels up to float rounding
    other, _ = compensated_quantize(
        w, h, bits=bits, symmetric=symmetric, compensation=Compensation(act_order=False, block_rows=32)
    )
    assert (levels_of(other) == levels_of(plain)).mean() > 0.99


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True)])
def test_sweeps_lower_the_output_error_further(bits, symmetric):
    # Coordinate descent from GPTQ's levels under the same damped H: lower on the calibration H, each sweep at
    # most the one before, and lower on held-out inputs of the same distribution too.
    x = correlated_inputs(256, tokens=4096, seed=8)
    h, held_out = second_moments(x[:2048]), second_moments(x[2048:])
    w = np.random.default_rng(8).normal(size=(256, 96)).astype(np.float32)
    errors, held = [], []
    for sweeps in (0, 1, 3):
        c = Compensation(damp=0.01, sweeps=sweeps)
        q, _ = compensated_quantize(w, h, bits=bits, symmetric=symmetric, compensation=c)
        damped = h + 0.01 * np.mean(np.diagonal(h)) * np.eye(256, dtype=np.float32)
        errors.append(output_error(q, w, damped))
        held.append(output_error(q, w, held_out))
    assert errors[1] < errors[0] and errors[2] <= errors[1]
    assert held[2] < held[0]


@pytest.mark.parametrize("symmetric", [True, False])
def test_sweeps_leave_round_to_nearest_alone_under_a_diagonal_h(symmetric):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(80, 48)).astype(np.float16)
    h = np.diag(rng.uniform(0.1, 10, size=80)).astype(np.float32)
    q, _ = compensated_quantize(w, h, symmetric=symmetric, compensation=Compensation(sweeps=3))
    assert_same_bytes(q, quantize_blockwise(w, symmetric=symmetric))


def test_sweeps_in_chunks_of_output_channels_change_no_byte(monkeypatch):
    import olive_int4_pass.kernels.gptq as gptq

    x = correlated_inputs(96, seed=9)
    h = second_moments(x)
    w = np.random.default_rng(9).normal(size=(96, 64)).astype(np.float32)
    whole, _ = compensated_quantize(w, h, compensation=Compensation(sweeps=2))
    monkeypatch.setattr(gptq, "_CHUNK_ELEMENTS", 96 * 16)
    chunked, _ = compensated_quantize(w, h, compensation=Compensation(sweeps=2))
    assert_same_bytes(whole, chunked)


def test_deterministic():
    x = correlated_inputs(128, seed=5)
    h = second_moments(x)
    w = np.random.default_rng(5).normal(size=(128, 64)).astype(np.float32)
    a, _ = compensated_quantize(w, h, symmetric=False, compensation=Compensation(act_order=True))
    b, _ = compensated_quantize(w, h, symmetric=False, compensation=Compensation(act_order=True))
    assert_same_bytes(a, b)


def test_dead_channels_and_rank_deficient_h():
    # 40 tokens for 128 channels (rank 40), 8 channels never active: damped, finite, still better than RTN.
    x = correlated_inputs(128, tokens=40, seed=6)
    x[:, 10:18] = 0
    h = second_moments(x)
    w = np.random.default_rng(6).normal(size=(128, 32)).astype(np.float32)
    q, info = compensated_quantize(w, h)
    assert info.dead_channels == 8
    assert np.isfinite(dequantize_blockwise(q)).all()
    assert output_error(q, w, h) < output_error(quantize_blockwise(w), w, h)


def test_singular_h_raises_the_damping():
    # A negative direction no damping of 10 % fixes: the damping grows tenfold until H is positive definite.
    h = np.eye(64, dtype=np.float32)
    h[0, 1] = h[1, 0] = 1.5
    w = np.random.default_rng(7).normal(size=(64, 16)).astype(np.float32)
    q, info = compensated_quantize(w, h)
    assert info.retries >= 1 and info.damp > 0.1
    assert np.isfinite(dequantize_blockwise(q)).all()


@pytest.mark.parametrize(
    "h, compensation, match",
    [
        (np.eye(32, dtype=np.float32), Compensation(), "expected"),
        (np.full((64, 64), np.nan, np.float32), Compensation(), "NaN"),
        (np.eye(64, dtype=np.float32), Compensation(damp=0.0), "damping"),
        (np.eye(64, dtype=np.float32), Compensation(block_rows=48), "multiple"),
        (-np.ones((64, 64), np.float32) * 1e30, Compensation(), "singular"),
    ],
)
def test_bad_input(h, compensation, match):
    w = np.ones((64, 8), np.float32)
    with pytest.raises(ValueError, match=match):
        compensated_quantize(w, h, compensation=compensation)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("act_order", [False, True])
def test_a_non_finite_weight_is_refused(dtype, bad, act_order):
    w = np.ones((64, 8), np.float32)
    w[37, 5] = bad
    with pytest.raises(ValueError, match=r"'w'.* 1 non-finite"):
        compensated_quantize(
            w.astype(dtype), np.eye(64, dtype=np.float32), compensation=Compensation(act_order=act_order), name="w"
        )


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_chunks_of_output_channels_change_no_byte(monkeypatch, act_order, symmetric):
    # Output channels are rounded independently: a weight cut into chunks (memory) gives the very same bytes.
    from olive_int4_pass.kernels import gptq

    h = second_moments(correlated_inputs(90, seed=8))
    w = np.random.default_rng(8).normal(size=(90, 70)).astype(np.float16)  # a partial last block too
    compensation = Compensation(act_order=act_order, block_rows=32)
    whole, _ = compensated_quantize(w, h, symmetric=symmetric, compensation=compensation)
    monkeypatch.setattr(gptq, "_CHUNK_ELEMENTS", 96 * 16)  # 16 output channels per chunk
    chunked, _ = compensated_quantize(w, h, symmetric=symmetric, compensation=compensation)
    assert_same_bytes(chunked, whole)


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_given_ordered_h_is_factorised_in_place_with_the_same_bytes(symmetric):
    # H handed over already in act-order (as the plan forms it from the kept inputs): the same bytes as letting the
    # kernel permute it, and the caller's buffer is the one factorised (no second K x K copy).
    h = second_moments(correlated_inputs(128, seed=9))
    w = np.random.default_rng(9).normal(size=(128, 40)).astype(np.float16)
    reference, _ = compensated_quantize(w, h, symmetric=symmetric, compensation=Compensation(act_order=True))
    order = np.argsort(-np.diag(h), kind="stable")
    given = []

    def fresh():
        given.append(np.ascontiguousarray(h[order][:, order]))
        return given[-1]

    q, info = compensated_quantize(w, fresh, symmetric=symmetric, order=order)
    assert_same_bytes(q, reference)
    assert len(given) == 1 and info.retries == 0
    assert not np.array_equal(given[0], h[order][:, order])  # overwritten by the factorisation
    with pytest.raises(ValueError, match="not a permutation"):
        compensated_quantize(w, fresh, order=order[:-1])


def test_spans_are_whole_blocks_at_most_span_long():
    from olive_int4_pass.kernels.gptq import spans

    assert spans(3584, 32, None) == [(0, 3584)] and spans(3584, 32, 4096) == [(0, 3584)]
    for k, span in [(18944, 4096), (8960, 2048), (100, 32), (1000, 96)]:
        runs = spans(k, 32, span)
        assert runs[0][0] == 0 and runs[-1][1] == k and len(runs) > 1
        assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))  # contiguous, in order
        assert all((r1 - r0) <= span for r0, r1 in runs)
        assert all(r0 % 32 == 0 for r0, _ in runs)  # every run starts a block
        assert max(r1 - r0 for r0, r1 in runs[:-1]) - min(r1 - r0 for r0, r1 in runs[:-1]) <= 32  # as equal as can be


@pytest.mark.parametrize("symmetric", [True, False])
def test_runs_rounded_on_their_own_equal_the_whole_under_a_block_diagonal_h(symmetric):
    """With no correlation between two runs of inputs (H block diagonal, equal mean diagonals so the damping is the
    same), compensating each run against its own block of H is the whole weight's compensation; the runs' pieces
    join into the whole's bytes (odd block counts: packed zero points re-packed)."""
    from olive_int4_pass.kernels.gptq import concat_rows, spans

    rng = np.random.default_rng(5)
    k, n = 160, 24  # 5 blocks: runs of 3 and 2 blocks
    h = np.zeros((k, k), np.float32)
    runs = spans(k, 32, 96)
    assert runs == [(0, 64), (64, 160)] or len(runs) == 2
    for r0, r1 in runs:
        x = correlated_inputs(r1 - r0, seed=r0)
        block = second_moments(x)
        h[r0:r1, r0:r1] = block / np.diagonal(block).mean()
    w = (rng.normal(size=(k, n)) * 0.02).astype(np.float32)
    comp = Compensation(act_order=False)
    whole, _ = compensated_quantize(w, h, symmetric=symmetric, compensation=comp)
    parts = [
        compensated_quantize(w[r0:r1], h[r0:r1, r0:r1].copy(), symmetric=symmetric, compensation=comp)[0]
        for r0, r1 in runs
    ]
    joined = concat_rows(parts)
    assert (joined.k, joined.n) == (whole.k, whole.n)
    # The same up to float summation order (blocks take their scale from the weights compensated so far).
    np.testing.assert_allclose(joined.scales, whole.scales, rtol=1e-5)
    if not symmetric:
        assert np.mean(joined.zero_points == whole.zero_points) > 0.99
    same = np.mean(_unpack(joined.packed, 4) == _unpack(whole.packed, 4))
    assert same > 0.995, same


@pytest.mark.parametrize("symmetric", [True, False])
def test_one_factor_serves_every_weight_of_the_same_input(symmetric):
    """q/k/v (gate/up) read one input: factorising its H once and rounding each weight against that factor gives
    each weight's own bytes, for whole weights and for runs (the factors dict is filled once, then only read)."""
    from olive_int4_pass.kernels.gptq import compensated_quantize_spans, factorize

    h = second_moments(correlated_inputs(160, seed=11))
    rng = np.random.default_rng(11)
    weights = [(rng.normal(size=(160, n)) * 0.02).astype(np.float16) for n in (48, 16, 16)]
    comp = Compensation(act_order=True)
    factor = factorize(h, 160, compensation=comp)
    for w in weights:
        alone, _ = compensated_quantize(w, h, symmetric=symmetric, compensation=comp)
        assert_same_bytes(compensated_quantize(w, factor, symmetric=symmetric, compensation=comp)[0], alone)
    order = np.argsort(-np.diag(h), kind="stable")
    formed = []

    def moments(orders):
        formed.extend(len(channels) for channels in orders)
        return [np.ascontiguousarray(h[channels][:, channels]) for channels in orders]

    factors: dict = {}
    shared = [
        compensated_quantize_spans(w, moments, order=order, span=96, symmetric=symmetric, factors=factors)[0]
        for w in weights
    ]
    assert sorted(formed) == [64, 96] and sorted(factors) == [(0, 64), (64, 160)]  # two runs, each factored once
    for w, q in zip(weights, shared, strict=True):
        formed.clear()
        assert_same_bytes(q, compensated_quantize_spans(w, moments, order=order, span=96, symmetric=symmetric)[0])
        assert len(formed) == 2
    with pytest.raises(ValueError, match="factor of 160 input rows"):
        compensated_quantize(weights[0][:128], factor)
