"""The kept calibration inputs of compensated rounding: E[x x^T] over every window, on disk, removed after."""

from __future__ import annotations

import numpy as np
import pytest

from olive_int4_pass.plan.activation_store import ActivationStore, widths_of


def test_second_moments_over_all_windows(tmp_path):
    rng = np.random.default_rng(0)
    store = ActivationStore({"a": 48, "b": 16}, tmp_path)
    windows = [rng.normal(size=(1, n, 48)).astype(np.float32) for n in (100, 37, 256)]
    for x in windows:
        store.add("a", x)
        store.add("b", x[..., :16].astype(np.float16))  # a 16-bit model's inputs: kept as float16
        store.add("not kept", x)
    x = np.concatenate([w.reshape(-1, 48) for w in windows]).astype(np.float64)
    assert store.tokens("a") == store.tokens("b") == 393
    np.testing.assert_allclose(store.second_moments("a"), x.T @ x / 393, rtol=2e-5, atol=1e-6)
    b = x[:, :16].astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(store.second_moments("b"), b.T @ b / 393, rtol=2e-5, atol=1e-6)
    assert store.second_moments("a") is not store.second_moments("a")  # a fresh array each time: the caller owns it
    # act-order and a fresh H in that order; the output error without forming H
    h = x.T @ x / 393
    order = store.act_order("a")
    np.testing.assert_array_equal(order, np.argsort(-np.diag(h), kind="stable"))
    np.testing.assert_allclose(store.second_moments("a", order), h[order][:, order], rtol=2e-5, atol=1e-6)
    e, w = rng.normal(size=(48, 5)), rng.normal(size=(48, 5))
    error, energy = store.output_error("a", e, w)
    assert error == pytest.approx(np.einsum("kc,kj,jc->", e, h, e), rel=1e-4)
    assert energy == pytest.approx(np.einsum("kc,kj,jc->", w, h, w), rel=1e-4)
    folder = store.folder
    assert sorted(p.stat().st_size for p in folder.iterdir()) == [393 * 16 * 2, 393 * 48 * 4]
    store.close()
    assert not folder.exists()


def test_the_reports_output_error_is_estimated_on_rows_spread_over_the_calibration(tmp_path, monkeypatch):
    from olive_int4_pass.plan import activation_store

    monkeypatch.setattr(activation_store, "_ERROR_ROWS", 100)
    rng = np.random.default_rng(5)
    store = ActivationStore({"a": 24}, tmp_path)
    x = rng.normal(size=(393, 24)).astype(np.float32) * np.linspace(0.1, 3, 393, dtype=np.float32)[:, None]
    for part in np.array_split(x, 5):
        store.add("a", part)
    e, w = rng.normal(size=(24, 3)), rng.normal(size=(24, 3))
    kept = x[::4].astype(np.float64)  # ceil(393 / 100) = every 4th row: 99 rows from first to last window
    error, energy = store.output_error("a", e, w)
    assert error == pytest.approx(np.square(kept @ e).sum() / len(kept), rel=1e-4)
    assert energy == pytest.approx(np.square(kept @ w).sum() / len(kept), rel=1e-4)
    store.close()


def test_bad_inputs(tmp_path):
    store = ActivationStore({"a": 8}, tmp_path)
    with pytest.raises(ValueError, match="NaN or Inf"):
        store.add("a", np.full((2, 8), np.inf, np.float32))
    with pytest.raises(ValueError, match="saw no values"):
        store.second_moments("a")
    with pytest.raises(ValueError, match=r"1000\.00 GB needed"):
        ActivationStore.check_space({"a": 10**6}, 250_000, tmp_path)
    with pytest.raises(ValueError, match="feeds weights of 8 and 16"):
        widths_of([("x", 8), ("x", 16)])
    store.close()


def test_the_blocks_of_several_runs_in_one_pass_equal_each_formed_alone(tmp_path):
    """A weight's runs (compensation_span) get their diagonal blocks of H from one read of the kept rows: the same
    floats as forming each alone, and fresh arrays the caller may overwrite."""
    rng = np.random.default_rng(3)
    store = ActivationStore({"a": 96}, tmp_path)
    for _ in range(3):
        store.add("a", rng.normal(size=(1, 50, 96)).astype(np.float32))
    order = rng.permutation(96)
    runs = [order[order < 64], order[order >= 64], None]
    blocks = store.second_moment_blocks("a", runs)
    assert [b.shape for b in blocks] == [(64, 64), (32, 32), (96, 96)]
    for run, block in zip(runs, blocks, strict=True):
        np.testing.assert_array_equal(block, store.second_moments("a", run))
    blocks[0][:] = 0
    assert store.second_moment_blocks("a", runs[:1])[0].any()
    store.close()


def test_with_runs_it_keeps_their_blocks_of_h_and_the_same_statistics(tmp_path, monkeypatch):
    """Block mode (``compensation_span``): each run's diagonal block of H is summed window by window, so the disk
    holds ``sum run^2`` floats whatever the token count; the blocks, act-order and the report's output error are
    those of keeping every row. Two inputs interleaved through a cache that holds one: sums go to disk and back."""
    from olive_int4_pass.plan import activation_store

    monkeypatch.setattr(activation_store, "_ERROR_ROWS", 50)
    monkeypatch.setattr(activation_store, "_CACHE_BYTES", 4 * 64 * 64)  # one input's sums at a time
    rng = np.random.default_rng(7)
    widths = {"a": 96, "b": 64}
    runs = {"a": [(0, 64), (64, 96)], "b": [(0, 64)]}
    sizes = (100, 37, 256, 1)
    tokens = sum(sizes)
    blocks = ActivationStore(widths, tmp_path, runs=runs, tokens=tokens)
    rows = ActivationStore(widths, tmp_path)
    for n in sizes:
        x = (rng.normal(size=(1, n, 96)) * np.linspace(0.2, 2, 96)).astype(np.float32)
        for store in (blocks, rows):
            store.add("a", x)
            store.add("b", x[..., 16:80].astype(np.float16))
    assert blocks.tokens("a") == blocks.tokens("b") == tokens
    for name in widths:
        np.testing.assert_array_equal(blocks.act_order(name), rows.act_order(name))
    order = rows.act_order("a")
    asked = [order[order < 64], order[order >= 64]]
    for got, want in zip(blocks.second_moment_blocks("a", asked), rows.second_moment_blocks("a", asked), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(blocks.second_moments("b"), rows.second_moments("b"), rtol=1e-5, atol=1e-6)
    e, w = rng.normal(size=(96, 4)), rng.normal(size=(96, 4))
    for got, want in zip(blocks.output_error("a", e, w), rows.output_error("a", e, w), strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    # the disk: the blocks' float32 sums and the report's rows, not every row
    sizes_on_disk = {p.name: p.stat().st_size for p in blocks.folder.iterdir()}
    kept_rows = len(range(0, tokens, -(-tokens // 50)))
    assert sorted(sizes_on_disk.values()) == sorted(
        [4 * (64 * 64 + 32 * 32), 4 * 64 * 64, kept_rows * 96 * 4, kept_rows * 64 * 2]
    )
    with pytest.raises(ValueError, match="across runs"):
        blocks.second_moments("a", np.arange(60, 70))
    folder = blocks.folder
    blocks.close()
    rows.close()
    assert not folder.exists()


def test_which_inputs_keep_blocks_and_the_space_they_need(tmp_path):
    from olive_int4_pass.plan.activation_store import keeps_blocks

    runs = [(0, 1024), (1024, 2048)]
    assert keeps_blocks(2048, runs, 4096)  # 8 MB of blocks against 32 MB of rows
    assert not keeps_blocks(2048, runs, 512)  # fewer tokens than a run is wide: rows are smaller
    assert not keeps_blocks(2048, None, 10**6)  # no span: H whole would be K^2
    # a 16-bit model's rows take half: at 2,048 tokens they beat 8 MB of blocks plus the report's 512 rows
    assert keeps_blocks(2048, runs, 2048, row_bytes=4) and not keeps_blocks(2048, runs, 2048, row_bytes=2)
    widths = {"a": 2048, "b": 512}
    needed = ActivationStore.check_space(widths, 16384, tmp_path, runs={"a": runs})
    assert needed == 4 * 2 * 1024 * 1024 + 4 * 512 * 2048 + 4 * 16384 * 512  # blocks + report rows; b as rows
    with pytest.raises(ValueError, match="do not cover"):
        ActivationStore({"a": 96}, tmp_path, runs={"a": [(0, 64), (70, 96)]}, tokens=1000)


def test_a_disk_that_fails_while_block_sums_move_there_is_a_clear_error(tmp_path, monkeypatch):
    from olive_int4_pass.plan import activation_store

    monkeypatch.setattr(activation_store, "_CACHE_BYTES", 4 * 8 * 8)  # one input's sums at a time
    store = ActivationStore({"a": 8, "b": 8}, tmp_path, runs={"a": [(0, 8)], "b": [(0, 8)]}, tokens=100)
    store.add("a", np.ones((10, 8), np.float32))
    store._files["a"].mkdir()  # the sums of "a" cannot be written where they go
    with pytest.raises(ValueError, match="cannot keep the calibration statistics"):
        store.add("b", np.ones((10, 8), np.float32))
    store.close()
