"""Compensated rounding beside the search: the write gets back exactly what the background rounded, errors reach the
write, a result that cannot be kept is recomputed, and nothing is left on disk."""

from __future__ import annotations

import json
import tempfile
import threading

import numpy as np
import pytest

from olive_int4_pass.kernels.rtn import quantize_blockwise
from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.pipeline import quantize_file
from olive_int4_pass.plan import compensation_ahead, weight_plan
from olive_int4_pass.plan.compensation_ahead import CompensationAhead


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def weights(seed: int, symmetric: bool):
    w = np.random.default_rng(seed).normal(size=(64, 48)).astype(np.float32)
    return quantize_blockwise(w, symmetric=symmetric)


def same(a, b) -> bool:
    zp = (a.zero_points is None and b.zero_points is None) or np.array_equal(a.zero_points, b.zero_points)
    shape = (a.k, a.n, a.block_size, a.bits) == (b.k, b.n, b.block_size, b.bits)
    return np.array_equal(a.packed, b.packed) and np.array_equal(a.scales, b.scales) and zp and shape


def test_results_come_back_unchanged_and_leave_no_files(private_tmp):
    ahead = CompensationAhead()
    expected = {"sym": weights(0, True), "asym": weights(1, False)}
    for key, q in expected.items():
        ahead.submit(key, lambda q=q: q)
    assert "sym" in ahead and "other" not in ahead
    assert same(ahead.take("asym"), expected["asym"])
    assert ahead.take("asym") is None  # taken once
    assert ahead.take("other") is None  # never submitted
    assert same(ahead.take("sym"), expected["sym"])
    folders = list(private_tmp.glob("olive-int4-ahead-*"))
    assert len(folders) == 1 and not any(folders[0].iterdir())  # a taken result's files go at once
    ahead.close()
    assert not list(private_tmp.iterdir())


def test_an_error_of_the_rounding_is_raised_by_the_write(private_tmp):
    ahead = CompensationAhead()

    def fails():
        raise ValueError("weight 'w': H is too ill-conditioned to invert")

    ahead.submit("w", fails)
    with pytest.raises(ValueError, match="ill-conditioned"):
        ahead.take("w")
    ahead.close()


def test_a_result_that_cannot_be_kept_is_left_to_the_write(private_tmp, monkeypatch, caplog):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CompensationAhead, "_folder_made", full)
    ahead = CompensationAhead()
    ahead.submit("w", lambda: weights(0, True))
    with caplog.at_level("INFO", logger=compensation_ahead.__name__):
        assert ahead.take("w") is None
    assert "No space left on device" in caplog.text and "the write redoes it" in caplog.text
    ahead.close()
    assert not list(private_tmp.iterdir())


def test_discarded_work_that_has_not_started_never_runs(private_tmp):
    ahead = CompensationAhead()
    release, ran = threading.Event(), []

    def first():
        release.wait(10)
        return weights(0, True)

    def second():
        ran.append("second")
        return weights(1, True)

    ahead.submit("first", first)
    ahead.submit("second", second)
    ahead.discard("second")
    release.set()
    assert same(ahead.take("first"), weights(0, True))
    ahead.close()
    assert ran == [] and ahead.take("second") is None


def test_close_waits_for_running_work_and_removes_every_result(private_tmp):
    ahead = CompensationAhead()
    for i in range(3):
        ahead.submit(i, lambda i=i: weights(i, False))
    ahead.close()  # nothing taken: every kept result goes with the store
    assert not list(private_tmp.iterdir())


def report(folder) -> dict:
    return json.loads((folder / "quantization_report.json").read_text())


def test_the_write_takes_the_weights_rounded_beside_the_search(exports, tmp_path, private_tmp, monkeypatch):
    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    options = QuantizeOptions(quality="balanced", rounding="compensated", calibration_tokens=512)
    quantize_file(model, tmp_path / "ahead", options, progress=False)
    seconds = report(tmp_path / "ahead")["seconds_while_writing"]
    assert seconds["compensation beside the search"] > 0
    bits = {w["bits"] for w in report(tmp_path / "ahead")["weights_worst_first"].values()}
    assert 8 in bits and seconds["compensation"] > 0  # a weight moved to 8 bits is rounded by the write
    assert not list(private_tmp.glob("olive-int4-*"))
    # every weight rounded by the write instead: the very same bytes
    monkeypatch.setattr(weight_plan.QualityPlan, "_compensate_ahead", lambda self, *args: None)
    quantize_file(model, tmp_path / "write", options, progress=False)
    assert "compensation beside the search" not in report(tmp_path / "write")["seconds_while_writing"]
    data = [(tmp_path / name / "model.onnx.data").read_bytes() for name in ("ahead", "write")]
    assert data[0] == data[1]


def test_a_failed_plan_stops_the_background_and_leaves_nothing(exports, tmp_path, private_tmp, monkeypatch):
    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    started = []
    original = weight_plan.QualityPlan._compensate_ahead

    def counted(self, *args):
        started.append(args[0])
        return original(self, *args)

    def fails(*args, **kwargs):
        raise ValueError("the budget cannot be planned")

    monkeypatch.setattr(weight_plan.QualityPlan, "_compensate_ahead", counted)
    monkeypatch.setattr(weight_plan, "choose_upgrades", fails)
    options = QuantizeOptions(quality="balanced", rounding="compensated", calibration_tokens=512)
    with pytest.raises(ValueError, match="cannot be planned"):
        quantize_file(model, tmp_path / "out", options, progress=False)
    assert started  # the background had work when the plan failed
    assert not list(private_tmp.glob("olive-int4-*")) and not (tmp_path / "out").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("compensation-ahead")]


def test_the_sensitivity_probe_measures_the_compensated_weights(exports, tmp_path, private_tmp, monkeypatch):
    """`quality: max` ranks layers by the KL their weights cause, measured with the weights as the write rounds
    them: compensated, taken from the background (waited for, left for the write), which moves the logits less."""
    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    peeked = []
    original = CompensationAhead.peek

    def counted(self, key):
        peeked.append(key)
        return original(self, key)

    monkeypatch.setattr(CompensationAhead, "peek", counted)
    kls = {}
    for rounding in ("nearest", "compensated"):
        options = QuantizeOptions(quality="max", rounding=rounding, calibration_tokens=512)
        quantize_file(model, tmp_path / rounding, options, progress=False)
        kls[rounding] = report(tmp_path / rounding)["measured_kl_by_group"]
    assert peeked and all(bits == 4 for _, bits in peeked)
    assert kls["nearest"].keys() == kls["compensated"].keys()
    assert sum(kls["compensated"].values()) < 0.8 * sum(kls["nearest"].values())
    # the write still took every probed weight from the background: none was rounded twice
    seconds = report(tmp_path / "compensated")["seconds_while_writing"]
    assert "compensation for the sensitivity probe" not in seconds
    assert seconds["compensation beside the search"] > 0
    assert not list(private_tmp.glob("olive-int4-*"))


def test_without_room_for_the_background_results_the_model_is_the_same(exports, tmp_path, private_tmp, monkeypatch):
    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    options = QuantizeOptions(quality="max", rounding="compensated", calibration_tokens=512)
    quantize_file(model, tmp_path / "kept", options, progress=False)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CompensationAhead, "_folder_made", full)  # the background's results only
    quantize_file(model, tmp_path / "full", options, progress=False)
    seconds = report(tmp_path / "full")["seconds_while_writing"]
    assert seconds["compensation for the sensitivity probe"] > 0  # the probe rounded them itself
    data = [(tmp_path / name / "model.onnx.data").read_bytes() for name in ("kept", "full")]
    assert data[0] == data[1]
    assert report(tmp_path / "kept")["measured_kl_by_group"] == report(tmp_path / "full")["measured_kl_by_group"]
    assert not list(private_tmp.glob("olive-int4-*"))
