"""``rounding: compensated`` end to end on builder exports of a tiny Qwen2: same format and size as round to
nearest, closer to the float model on the calibration text, deterministic, temporary inputs removed, and clear
errors for too few tokens or too little disk."""

from __future__ import annotations

import collections
import json
import shutil
import tempfile
from collections import namedtuple

import numpy as np
import onnx
import pytest

from olive_int4_pass.genai.decoder import DecoderRunner, log_softmax
from olive_int4_pass.options import AUTO_COMPENSATION_TOKENS, MIN_COMPENSATION_TOKENS, QuantizeOptions
from olive_int4_pass.pipeline import quantize_file
from olive_int4_pass.plan.calibration import default_calibration_text, tokenize


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Temporary files of the run go here, so the test sees whether they are removed."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def kept_inputs(folder) -> list:
    return list(folder.glob("olive-int4-activations-*"))


def kl_to_float(float_model, quantized_model, ids) -> float:
    ref = log_softmax(DecoderRunner(float_model).logits(ids))
    out = log_softmax(DecoderRunner(quantized_model, config_dir=float_model.parent).logits(ids))
    return float((np.exp(ref) * (ref - out)).sum(-1).mean())


def report(folder) -> dict:
    return json.loads((folder / "quantization_report.json").read_text())


@pytest.mark.parametrize("target", ["fp32-cpu", "fp16-cuda"])
def test_closer_to_the_float_model_at_the_same_size(exports, tmp_path, private_tmp, target):
    model = exports("qwen2")[target] / "model.onnx"
    plain = quantize_file(model, tmp_path / "rtn", QuantizeOptions(), progress=False)
    options = QuantizeOptions(rounding="compensated", calibration="default", calibration_tokens=1024)
    compensated = quantize_file(model, tmp_path / "gptq", options, progress=False)
    assert not kept_inputs(private_tmp), "the kept calibration inputs must be removed after the write"
    # the same graph and tensor shapes: only the levels differ
    a, b = (onnx.load(str(p), load_external_data=False) for p in (plain, compensated))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert [(i.name, list(i.dims)) for i in a.graph.initializer] == [
        (i.name, list(i.dims)) for i in b.graph.initializer
    ]
    assert (tmp_path / "rtn/model.onnx.data").stat().st_size == (tmp_path / "gptq/model.onnx.data").stat().st_size
    weights = report(tmp_path / "gptq")["weights_worst_first"]
    assert weights and all(w["rounding"] == "compensated" for w in weights.values())
    assert all(0 < w["output_relative_error"] < 0.5 for w in weights.values())
    # in-sample (the calibration text): the model's predictions move less than with round to nearest
    ids = tokenize(default_calibration_text(), model.parent, 256)
    kl_rtn, kl_gptq = kl_to_float(model, plain, ids), kl_to_float(model, compensated, ids)
    assert kl_gptq < 0.8 * kl_rtn, (kl_gptq, kl_rtn)


def test_with_a_preset_deterministic_and_budget_kept(exports, tmp_path, private_tmp):
    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    preset = QuantizeOptions(quality="balanced", calibration_tokens=512)
    assert preset.rounding == "auto"  # and with 512 tokens 'auto' rounds to nearest
    balanced = quantize_file(model, tmp_path / "balanced", preset, progress=False)
    assert {w["rounding"] for w in report(tmp_path / "balanced")["weights_worst_first"].values()} == {"nearest"}
    options = QuantizeOptions(quality="balanced", rounding="compensated", calibration_tokens=512)
    first = quantize_file(model, tmp_path / "one", options, progress=False)
    second = quantize_file(model, tmp_path / "two", options, progress=False)
    data = [(p.parent / "model.onnx.data").read_bytes() for p in (balanced, first, second)]
    assert data[1] == data[2]
    assert data[1] != data[0] and len(data[1]) == len(data[0])  # same 8-bit choices and scales, other levels
    weights = report(tmp_path / "one")["weights_worst_first"]
    assert all(w["rounding"] == "compensated" for w in weights.values())
    assert report(tmp_path / "one")["seconds_while_writing"]["compensation"] > 0
    assert "seconds_while_writing" not in report(tmp_path / "balanced")
    bits = {name: w["bits"] for name, w in weights.items()}
    assert bits == {name: w["bits"] for name, w in report(tmp_path / "balanced")["weights_worst_first"].items()}
    assert 8 in bits.values()  # the 8-bit tensors are compensated too
    assert not kept_inputs(private_tmp)


def test_auto_compensates_from_enough_tokens_and_else_rounds_to_nearest(exports, tmp_path, private_tmp, caplog):
    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 123, size=1024).tolist() for _ in range(AUTO_COMPENSATION_TOKENS // 1024)]
    options = QuantizeOptions(quality="balanced", calibration_tokens=AUTO_COMPENSATION_TOKENS)

    def build(name, calibration_ids, opts=options):
        with caplog.at_level("INFO", logger="olive_int4_pass.plan.prepare"):
            quantize_file(model, tmp_path / name, opts, calibration_ids=calibration_ids, progress=False)
        weights = report(tmp_path / name)["weights_worst_first"].values()
        return {w["rounding"] for w in weights}, (tmp_path / name / "model.onnx.data").read_bytes()

    roundings, compensated = build("enough", ids)
    assert roundings == {"compensated"}
    assert "Compensated rounding (rounding='auto'): 4096 calibration tokens" in caplog.text
    # one token fewer: nearest, said in the log, the very bytes of rounding='nearest'
    caplog.clear()
    fewer = [ids[0][:-1], *ids[1:]]
    roundings, auto = build("fewer", fewer)
    assert roundings == {"nearest"} and "Rounding to nearest: 4095 calibration tokens" in caplog.text
    nearest = QuantizeOptions(quality="balanced", calibration_tokens=AUTO_COMPENSATION_TOKENS, rounding="nearest")
    assert auto == build("nearest", fewer, nearest)[1] != compensated
    assert not kept_inputs(private_tmp)


def test_auto_without_the_disk_rounds_to_nearest_and_warns(exports, tmp_path, private_tmp, monkeypatch, caplog):
    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    ids = [list(range(3, 123)) * 9] * 4  # 4,320 tokens
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    options = QuantizeOptions(quality="balanced", calibration_tokens=5000)
    with caplog.at_level("WARNING", logger="olive_int4_pass.plan.prepare"):
        quantize_file(model, tmp_path / "out", options, calibration_ids=ids, progress=False)
    assert "Rounding to nearest instead of compensated (rounding='auto')" in caplog.text
    assert "GB needed in" in caplog.text
    weights = report(tmp_path / "out")["weights_worst_first"].values()
    assert {w["rounding"] for w in weights} == {"nearest"}
    assert not kept_inputs(private_tmp)


def test_too_few_tokens_is_a_clear_error(exports, tmp_path, private_tmp):
    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    with pytest.raises(ValueError, match=f"at least {MIN_COMPENSATION_TOKENS} calibration tokens"):
        QuantizeOptions(rounding="compensated", calibration="default", calibration_tokens=100)
    options = QuantizeOptions(rounding="compensated", calibration="default")  # the ids replace the text: 120 tokens
    with pytest.raises(ValueError, match=f"at least {MIN_COMPENSATION_TOKENS} calibration tokens.*gave 120"):
        quantize_file(model, tmp_path / "out", options, calibration_ids=[list(range(3, 123))], progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="needs calibration"):
        QuantizeOptions(rounding="compensated", calibration=None)


def test_fewer_tokens_than_the_widest_input_is_logged(private_tmp, caplog):
    from olive_int4_pass.plan.prepare import _activation_store

    wide = namedtuple("Candidate", "activation k")
    for tokens, warned in ((300, True), (512, False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="olive_int4_pass.plan.prepare"):
            _activation_store([wide("x", 64), wide("y", 512)], tokens).close()
        assert ("300 calibration tokens for inputs up to 512 wide" in caplog.text) is warned
    assert not kept_inputs(private_tmp)


def test_not_enough_disk_is_a_clear_error(exports, tmp_path, private_tmp, monkeypatch):
    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    options = QuantizeOptions(rounding="compensated", calibration="default", calibration_tokens=512)
    with pytest.raises(ValueError, match=r"GB needed in .*TMPDIR"):
        quantize_file(model, tmp_path / "out", options, progress=False)
    assert not (tmp_path / "out").exists()
    assert not kept_inputs(private_tmp)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"compensation_damping": 0.0}, "compensation_damping"),
        ({"compensation_damping": float("nan")}, "compensation_damping"),
        ({"compensation_block_rows": 48}, "multiple of block_size"),
        ({"compensation_sweeps": -1}, "compensation_sweeps must be at least 0"),
        ({"compensation_span": 48}, "compensation_span must be a multiple of block_size"),
        ({"compensation_span": 0}, "compensation_span must be a multiple of block_size"),
        ({"rounding": "gptq"}, "rounding must be one of"),
    ],
)
def test_bad_options(values, match):
    with pytest.raises(ValueError, match=match):
        QuantizeOptions(calibration="default", **{"rounding": "compensated", **values})


def test_max_inputs_rounds_the_widest_weights_to_nearest(exports, tmp_path, private_tmp):
    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    options = QuantizeOptions(
        rounding="compensated", calibration="default", calibration_tokens=512, compensation_max_inputs=64
    )
    quantize_file(model, tmp_path / "out", options, progress=False)
    weights = report(tmp_path / "out")["weights_worst_first"]
    k = {name: onnx_k(model, name) for name in weights}
    assert {w["rounding"] for w in weights.values()} == {"compensated", "nearest"}
    for name, w in weights.items():
        assert w["rounding"] == ("compensated" if k[name] <= 64 else "nearest"), name


def onnx_k(model, name) -> int:
    """Input channels of the MatMul weight ``name`` (stored [K, N])."""
    init = next(i for i in onnx.load(str(model), load_external_data=False).graph.initializer if i.name == name)
    return int(init.dims[0])


def test_span_splits_wide_weights_into_independent_runs(exports, tmp_path, private_tmp):
    """A span at least every K changes no byte; a 32-wide span compensates each block of inputs on its own: other
    levels than the whole-weight compensation, the same size, each weight's output error still below round to
    nearest's on the calibration inputs."""
    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    common = {"rounding": "compensated", "calibration": "default", "calibration_tokens": 512}
    outs = {}
    for name, span in [("whole", None), ("wide", 4096), ("split", 32)]:
        quantize_file(model, tmp_path / name, QuantizeOptions(**common, compensation_span=span), progress=False)
        outs[name] = (tmp_path / name / "model.onnx.data").read_bytes()
    assert outs["wide"] == outs["whole"]
    assert outs["split"] != outs["whole"] and len(outs["split"]) == len(outs["whole"])
    split, whole = (report(tmp_path / n)["weights_worst_first"] for n in ("split", "whole"))
    assert all(w["rounding"] == "compensated" for w in split.values())
    # Passing no error between runs gives up some of the compensation, not all of it.
    errors = [(split[n]["output_relative_error"], whole[n]["output_relative_error"]) for n in split]
    assert sum(e for e, _ in errors) > sum(e for _, e in errors)
    plain = quantize_file(model, tmp_path / "rtn", QuantizeOptions(), progress=False)
    ids = tokenize(default_calibration_text(), model.parent, 256)
    assert kl_to_float(model, tmp_path / "split" / "model.onnx", ids) < kl_to_float(model, plain, ids)
    assert not kept_inputs(private_tmp)


def test_h_is_formed_once_per_input(exports, tmp_path, private_tmp, monkeypatch):
    """The weights that read one input (q/k/v, gate/up) share its factored H: it is formed once per input, and the
    bytes are those of forming it for every weight."""
    from olive_int4_pass.plan import weight_plan
    from olive_int4_pass.plan.activation_store import ActivationStore

    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    options = QuantizeOptions(rounding="compensated", calibration="default", calibration_tokens=512)
    formed = []
    original = ActivationStore.second_moment_blocks

    def counted(self, name, orders):
        formed.append(name)
        return original(self, name, orders)

    monkeypatch.setattr(ActivationStore, "second_moment_blocks", counted)
    quantize_file(model, tmp_path / "shared", options, progress=False)
    weights = report(tmp_path / "shared")["weights_worst_first"]
    assert len(formed) == len(set(formed)) < len(weights)  # once per input, fewer inputs than weights
    shared = (tmp_path / "shared" / "model.onnx.data").read_bytes()
    formed.clear()
    # no user counts: a factor is dropped after its first weight
    no_users = property(lambda self: collections.Counter(), lambda self, value: None)
    monkeypatch.setattr(weight_plan.QualityPlan, "compensation_users", no_users, raising=False)
    quantize_file(model, tmp_path / "each", options, progress=False)
    assert len(formed) == len(weights)  # nothing kept: every weight forms its own
    assert (tmp_path / "each" / "model.onnx.data").read_bytes() == shared


def test_with_a_span_the_blocks_of_h_replace_the_kept_inputs(exports, tmp_path, private_tmp, monkeypatch, caplog):
    """With ``compensation_span`` calibration keeps each run's block of H instead of the inputs: the disk no longer
    grows with the tokens, and the model is the one the kept inputs give (float32 sums in another order aside)."""
    from olive_int4_pass.plan import activation_store, prepare

    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    common = {"calibration": "default", "calibration_tokens": 768}
    options = QuantizeOptions(rounding="compensated", compensation_span=32, **common)
    with caplog.at_level("INFO"):
        quantize_file(model, tmp_path / "blocks", options, progress=False)
    assert "inputs as their blocks of H, 0 as rows" in caplog.text
    monkeypatch.setattr(prepare, "keeps_blocks", lambda *a: False)
    monkeypatch.setattr(activation_store, "keeps_blocks", lambda *a: False)
    caplog.clear()
    with caplog.at_level("INFO"):
        quantize_file(model, tmp_path / "rows", options, progress=False)
    assert "0 inputs as their blocks of H" in caplog.text
    a, b = (np.frombuffer((tmp_path / n / "model.onnx.data").read_bytes(), np.uint8) for n in ("blocks", "rows"))
    assert a.shape == b.shape and np.mean(a != b) < 0.01
    blocks, rows = (report(tmp_path / n)["weights_worst_first"] for n in ("blocks", "rows"))
    for name, w in rows.items():
        assert blocks[name]["output_relative_error"] == pytest.approx(w["output_relative_error"], rel=0.05, abs=1e-4)
    assert not kept_inputs(private_tmp)


def test_unset_damping_follows_the_tokens_per_channel(exports, tmp_path, private_tmp, monkeypatch, caplog):
    """Unset, the damping is 0.01 for inputs with at least 16 calibration tokens per compensated channel and 0.1
    below (the earlier default, same bytes); a damping set explicitly applies to every weight."""
    from olive_int4_pass.plan import weight_plan

    model = exports("qwen2")["fp32-cpu"] / "model.onnx"  # inputs 64 wide (attention, gate/up) and 160 (down)
    used = {}
    original = weight_plan.compensated_quantize_spans

    def recorded(weight, *args, compensation, name, **kwargs):
        used[name] = (weight.shape[0], compensation.damp)
        return original(weight, *args, compensation=compensation, name=name, **kwargs)

    monkeypatch.setattr(weight_plan, "compensated_quantize_spans", recorded)

    def build(out, **values):
        used.clear()
        options = QuantizeOptions(rounding="compensated", calibration="default", **values)
        quantize_file(model, tmp_path / out, options, progress=False)
        return dict(used), (tmp_path / out / "model.onnx.data").read_bytes()

    with caplog.at_level("INFO"):
        many, _ = build("many", calibration_tokens=1024)  # 16 per channel at K = 64, 6.4 at K = 160
    assert {k for k, _ in many.values()} == {64, 160}
    assert all(d == (0.01 if k == 64 else 0.1) for k, d in many.values()), many
    said = [r.getMessage() for r in caplog.records if "Compensated rounding: damping" in r.getMessage()]
    assert len(said) == 2 and any("0.01 x" in m and "at least 16" in m for m in said), said
    # a span of 32 channels gives the 160-wide down projections 32 tokens per channel too
    spanned, _ = build("spanned", calibration_tokens=1024, compensation_span=32)
    assert {d for _, d in spanned.values()} == {0.01}
    few, few_bytes = build("few", calibration_tokens=512)
    assert {d for _, d in few.values()} == {0.1}
    _, explicit_bytes = build("explicit", calibration_tokens=512, compensation_damping=0.1)
    assert few_bytes == explicit_bytes
    chosen, _ = build("chosen", calibration_tokens=1024, compensation_damping=0.05)
    assert {d for _, d in chosen.values()} == {0.05}
