"""The residual-stream rotation: orthogonal, applied without the matrix exactly as with it, fixed by its seed."""

import numpy as np
import pytest

from olive_int4_pass.kernels.rotation import Rotation


@pytest.mark.parametrize("size", [1, 12, 64, 96, 576])
def test_orthogonal_and_the_same_as_the_dense_matrix(size):
    rotation = Rotation(size, seed=3)
    q = rotation.matrix().astype(np.float64)
    assert np.abs(q.T @ q - np.eye(size)).max() < 1e-5
    rng = np.random.default_rng(0)
    reader = rng.standard_normal((size, 37)).astype(np.float32)
    writer = rng.standard_normal((29, size)).astype(np.float32)
    np.testing.assert_allclose(rotation.rotate_rows(reader), q.T @ reader, atol=1e-5)
    np.testing.assert_allclose(rotation.rotate_columns(writer), writer @ q, atol=1e-5)


def test_a_reader_after_a_writer_gives_the_same_product():
    rotation = Rotation(96, seed=1)
    rng = np.random.default_rng(1)
    x, w_out, w_in = rng.standard_normal((5, 40)), rng.standard_normal((40, 96)), rng.standard_normal((96, 24))
    np.testing.assert_allclose(
        (x @ rotation.rotate_columns(w_out)) @ rotation.rotate_rows(w_in), x @ w_out @ w_in, rtol=1e-4, atol=1e-4
    )


def test_spreads_an_outlier_channel():
    w = np.zeros((64, 8), np.float32)
    w[5] = 100.0  # one input channel far larger than the rest
    rotated = Rotation(64, seed=0).rotate_rows(w)
    assert np.abs(rotated).max() < 100.0 / 4  # spread over all 64 rows (100 / 8 each for a pure Hadamard)
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=0), np.linalg.norm(w, axis=0), rtol=1e-5)


def test_the_seed_fixes_the_matrix():
    a, b, c = (Rotation(48, seed=s).matrix() for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1


def test_half_precision_and_bands():
    rotation = Rotation(64, seed=2)
    w = np.random.default_rng(2).standard_normal((64, 300_000)).astype(np.float16)  # more than one band of columns
    out = rotation.rotate_rows(w)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, -5:], rotation.matrix().T @ w[:, -5:].astype(np.float32), atol=1e-4)


@pytest.mark.parametrize("shape", [(63, 8), (8, 8, 8)])
def test_a_tensor_of_another_width_is_refused(shape):
    with pytest.raises(ValueError, match="64 wide"):
        Rotation(64).rotate_rows(np.zeros(shape, np.float32))


def test_a_folded_row_scale_and_the_stored_dtype():
    rotation = Rotation(96, seed=4)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((96, 40)).astype(np.float16)
    gamma = rng.uniform(0.2, 3.0, 96).astype(np.float32)
    out = rotation.rotate_rows(w, np.float16, row_scale=gamma)
    assert out.dtype == np.float16
    want = rotation.matrix().astype(np.float64).T @ (gamma[:, None] * w.astype(np.float64))
    np.testing.assert_allclose(out.astype(np.float64), want, rtol=2e-3, atol=2e-3)
