"""Searched scales wait on disk between the search and the write: the same arrays and errors come back, and the
temporary folder is gone after the run (also when the plan is dropped unclosed)."""

from __future__ import annotations

import gc
import tempfile

import numpy as np

from olive_int4_pass.kernels.scale_search import search_scales
from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.pipeline import quantize_file
from olive_int4_pass.plan.search_store import SearchStore


def folders(tmp) -> list:
    return list(tmp.glob("olive-int4-searches-*"))


def test_round_trip_and_cleanup(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 40)).astype(np.float16)
    results = {sym: search_scales(w, None, block_size=32, bits=4, symmetric=sym) for sym in (True, False)}
    store = SearchStore()
    assert store.get(("a", 4)) is None and not folders(tmp_path)  # nothing written before the first result
    for sym, result in results.items():
        store[(sym, 4)] = result
    assert len(store) == 2 and (True, 4) in store and len(folders(tmp_path)) == 1
    for sym, result in results.items():
        back = store.get((sym, 4))
        np.testing.assert_array_equal(back.scales, result.scales)
        assert back.scales.dtype == result.scales.dtype == np.float16
        if sym:
            assert back.zero_points is None
        else:
            np.testing.assert_array_equal(back.zero_points, result.zero_points)
        assert (back.weighted_error, back.rtn_weighted_error, back.weighted_energy) == (
            result.weighted_error,
            result.rtn_weighted_error,
            result.weighted_energy,
        )
    store[(True, 4)] = results[False]  # replaced, not added
    assert len(store) == 2 and store.get((True, 4)).zero_points is not None
    store.close()
    assert not folders(tmp_path)
    dropped = SearchStore()
    dropped[(True, 4)] = results[True]
    assert folders(tmp_path)
    del dropped
    gc.collect()
    assert not folders(tmp_path)


def test_nothing_left_after_a_preset_run(exports, tmp_path, monkeypatch):
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    saved = []
    original = SearchStore.__setitem__

    def spy(self, key, result):
        original(self, key, result)
        saved.append(folders(private))

    monkeypatch.setattr(SearchStore, "__setitem__", spy)
    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    out = quantize_file(model, tmp_path / "out", QuantizeOptions(quality="balanced"), progress=False)
    assert saved and all(len(f) == 1 for f in saved)  # every searched weight went to the one folder
    assert out.is_file() and not folders(private)
