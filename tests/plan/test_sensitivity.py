"""Measured sensitivity: the probe measures KL at the logits on the float model, and the plan uses it."""

import json

import numpy as np
import pytest
from onnx_helpers import initializers, load_onnx, nodes_of

from olive_int4_pass.kernels.rtn import dequantize_blockwise, quantize_blockwise
from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.pipeline import quantize_file
from olive_int4_pass.plan.calibration import tokenize
from olive_int4_pass.plan.sensitivity import ImpactProbe, group_by_layer, layer_of

TEXT = "The keeper wrote the weather in a green ledger every evening, wind and rain and the lamp's hours. " * 8


def test_layer_of_reads_the_layer_number():
    assert layer_of(["/model/layers.7/attn/qkv_proj/MatMul"]) == "layer 7"
    assert layer_of(["/transformer/h.12/mlp/c_fc/MatMul", "/transformer/h.12/mlp/c_fc/MatMul_1"]) == "layer 12"
    assert layer_of(["/lm_head/MatMul"]) is None
    assert layer_of(["/model/layers.1/a/MatMul", "/model/layers.2/a/MatMul"]) is None  # shared: not one layer
    groups = group_by_layer({1: ["/model/layers.0/x"], 2: ["/model/layers.0/y"], 3: ["/lm_head/MatMul"]}, {3: "W"})
    assert groups == {"layer 0": [1, 2], "weight W": [3]}


def _matmul_weights(model_path):
    model = load_onnx(model_path)
    inits = initializers(model)
    return {n.input[1]: inits[n.input[1]] for n in nodes_of(model, "MatMul") if n.input[1] in inits}


def test_probe_measures_kl_on_the_float_model(exports):
    built = exports("qwen2")["fp32-cpu"]
    before = (built / "model.onnx").read_bytes()
    weights = _matmul_weights(built / "model.onnx")
    probe = ImpactProbe(built / "model.onnx", weights, tokenize(TEXT, built, 48))
    assert probe.kl({}) == pytest.approx(0.0, abs=1e-9)  # nothing replaced: the reference itself
    name = next(n for n in weights if "layers.0" in n)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(weights[name].shape).astype(np.float32) * weights[name].std()
    small, large = probe.kl({name: weights[name] + 0.05 * noise}), probe.kl({name: weights[name] + 0.5 * noise})
    assert 0 < small < large
    assert probe.kl({}) == pytest.approx(0.0, abs=1e-9)  # a probe leaves the other runs untouched
    with pytest.raises(ValueError, match="not probed"):
        probe.kl({"no_such_weight": weights[name]})
    assert (built / "model.onnx").read_bytes() == before


def test_group_kls_add_up_to_the_whole_models(exports):
    """The premise of measuring groups one at a time: small independent errors add up in KL."""
    built = exports("qwen2")["fp32-cpu"]
    weights = _matmul_weights(built / "model.onnx")
    probe = ImpactProbe(built / "model.onnx", weights, tokenize(TEXT, built, 48))
    deq = {n: dequantize_blockwise(quantize_blockwise(w)) for n, w in weights.items()}
    layers = {}
    for n in weights:
        layers.setdefault(layer_of([n]) or n, []).append(n)
    assert len(layers) > 2
    parts = [probe.kl({n: deq[n] for n in names}) for names in layers.values()]
    whole = probe.kl(deq)
    assert all(p > 0 for p in parts)
    assert 0.5 * whole < sum(parts) < 2 * whole, (parts, whole)


def test_measured_sensitivity_plans_by_the_measured_kl(exports, tmp_path):
    built = exports("qwen2")["fp32-cpu"]
    (tmp_path / "cal.txt").write_text(TEXT)

    def run(sensitivity):
        options = QuantizeOptions(
            calibration=str(tmp_path / "cal.txt"),
            scale_search=True,
            mixed_precision_budget=0.1,
            sensitivity=sensitivity,
            sensitivity_tokens=32,
        )
        out = quantize_file(built / "model.onnx", tmp_path / sensitivity, options, progress=False)
        return out, json.loads((out.parent / "quantization_report.json").read_text())

    out, report = run("measured")
    kl = report["measured_kl_by_group"]
    assert len(kl) > 2 and all(v >= 0 for v in kl.values()) and max(kl.values()) > 0
    assert any(g.startswith("layer ") for g in kl)
    eight = {n for n, bits in report["quantized_nodes"].items() if bits == 8}
    assert eight  # the budget was spent
    _, plain = run("error")
    assert plain["measured_kl_by_group"] == {}
    # A layer measured to cost nothing gets no 8-bit weight.
    for group, value in kl.items():
        if value == 0 and group.startswith("layer "):
            assert not any(f"layers.{group.split()[1]}/" in n for n in eight)
    model = load_onnx(out)
    assert {next(a.i for a in n.attribute if a.name == "bits") for n in nodes_of(model, "MatMulNBits")} == {4, 8}


def test_sensitivity_options_are_validated():
    with pytest.raises(ValueError, match="sensitivity must be"):
        QuantizeOptions(sensitivity="guess")
    with pytest.raises(ValueError, match="sensitivity_tokens"):
        QuantizeOptions(sensitivity_tokens=4)
    with pytest.raises(TypeError, match="sensitivity_tokens"):
        QuantizeOptions(sensitivity_tokens=32.0)
    with pytest.raises(ValueError, match="set mixed_precision_budget"):
        QuantizeOptions(calibration="default", scale_search=True, sensitivity="measured")
    assert QuantizeOptions(quality="balanced", sensitivity="measured").sensitivity == "measured"
    assert QuantizeOptions(quality="max").sensitivity == "measured"  # the preset's
    assert QuantizeOptions(quality="max", sensitivity="error").sensitivity == "error"  # an explicit choice stays
    assert QuantizeOptions().sensitivity == "error"


def test_weights_already_at_8_bits_are_not_probed(exports, tmp_path):
    """An lm_head the options put at int8 (and the budget keeps there) is not ranked, so it is not probed either:
    the 7B lm_head's 1 GB replacement is never built."""
    built = exports("qwen2", tied=False)["fp32-cpu"]
    (tmp_path / "cal.txt").write_text(TEXT)
    options = QuantizeOptions(
        calibration=str(tmp_path / "cal.txt"),
        scale_search=True,
        mixed_precision_budget=1.0,
        lm_head="int8",
        sensitivity="measured",
        sensitivity_tokens=32,
    )
    out = quantize_file(built / "model.onnx", tmp_path / "out", options, progress=False)
    report = json.loads((out.parent / "quantization_report.json").read_text())
    groups = report["measured_kl_by_group"]
    assert any(g.startswith("layer ") for g in groups)
    assert not any("lm_head" in g for g in groups), groups
    assert any("lm_head" in n and bits == 8 for n, bits in report["quantized_nodes"].items())
