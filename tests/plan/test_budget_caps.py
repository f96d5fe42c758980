"""Size budgets are hard caps: with a preset, the model's weights never exceed (1 + budget) x plain INT4's, on tied
and untied models, fp32 and fp16, block 16 and 32 - even where the lm_head at 8 bits or the zero points alone
would not fit (then they are re-planned, and the log says so)."""

from __future__ import annotations

import json
import logging

import pytest
from onnx import numpy_helper
from onnx_helpers import load_onnx, nodes_of

from olive_int4_pass.options import QUALITY_PRESETS, QuantizeOptions
from olive_int4_pass.pipeline import quantize_file


def weight_bytes(model_file) -> int:
    """Bytes of every initializer: what the budget is a fraction of (the whole model's weights)."""
    return sum(init.ByteSize() - len(init.name) for init in load_onnx(model_file).graph.initializer)


def tensor_bytes(model_file) -> int:
    """The initializers' values alone, without protobuf's few bytes per tensor (a tiny model's budget is a few KB)."""
    return sum(numpy_helper.to_array(init).nbytes for init in load_onnx(model_file).graph.initializer)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("arch", "tied", "target"), [("qwen2", True, "fp32-cpu"), ("llama", False, "fp16-cuda")])
@pytest.mark.parametrize("preset", sorted(QUALITY_PRESETS))
def test_presets_stay_within_their_budget(exports, tmp_path, preset, arch, tied, target, block_size):
    model = exports(arch, tied=tied)[target] / "model.onnx"
    plain = quantize_file(model, tmp_path / "plain", QuantizeOptions(block_size=block_size), progress=False)
    options = QuantizeOptions(quality=preset, block_size=block_size, calibration_tokens=256, sensitivity_tokens=64)
    out = quantize_file(model, tmp_path / preset, options, progress=False)
    budget = QUALITY_PRESETS[preset]["mixed_precision_budget"]
    assert weight_bytes(out) <= (1 + budget) * weight_bytes(plain), (weight_bytes(out), weight_bytes(plain))


@pytest.mark.parametrize("budget", [0.135, 0.06, 0.01])
def test_a_rotated_tied_model_pays_for_its_extra_matmul_from_the_budget(exports, tmp_path, budget, caplog):
    # rotation adds a hidden x hidden MatMul before a tied lm_head: 3 % of this tiny model at 4 bits
    model = exports("qwen2", tied=True)["fp32-cpu"] / "model.onnx"
    plain = quantize_file(model, tmp_path / "plain", QuantizeOptions(), progress=False)
    options = QuantizeOptions(
        quality="max", mixed_precision_budget=budget, rotation="residual", calibration_tokens=256, sensitivity_tokens=64
    )
    with caplog.at_level(logging.WARNING, logger="olive_int4_pass"):
        out = quantize_file(model, tmp_path / "out", options, progress=False)
    assert any(n.name.startswith("/model/final_norm_rotation") for n in nodes_of(load_onnx(out), "MatMulNBits"))
    if budget > 0.03:
        assert tensor_bytes(out) <= (1 + budget) * tensor_bytes(plain), (tensor_bytes(out), tensor_bytes(plain))
        assert tensor_bytes(out) > (1 + budget - 0.03) * tensor_bytes(plain)  # 8-bit weights still fill the rest
    else:  # the extra MatMul alone does not fit: nothing else is added, and the log says so
        assert "rotation='residual' adds before the tied lm_head alone" in caplog.text
        hidden = 64
        assert tensor_bytes(out) - tensor_bytes(plain) <= hidden * hidden * 5 // 8


def test_an_lm_head_at_8_bits_that_does_not_fit_is_kept_at_4(exports, tmp_path, caplog):
    # The tiny tied model's table is a fifth of its weights: at 8 bits it alone costs more than max's +13.5 %.
    model = exports("qwen2", tied=True)["fp32-cpu"] / "model.onnx"
    with caplog.at_level(logging.WARNING, logger="olive_int4_pass"):
        out = quantize_file(
            model, tmp_path / "max", QuantizeOptions(quality="max", sensitivity_tokens=64), progress=False
        )
    assert "lm_head" in caplog.text and "kept at 4 bits" in caplog.text
    (head,) = [n for n in nodes_of(load_onnx(out), "MatMulNBits") if n.output[0] == "logits"]
    assert next(a.i for a in head.attribute if a.name == "bits") == 4
    report = json.loads((out.parent / "quantization_report.json").read_text())
    assert report["weights_worst_first"]["lm_head.MatMul.weight"]["bits"] == 4


def test_zero_points_that_do_not_fit_make_the_model_symmetric(exports, tmp_path, caplog):
    model = exports("llama")["fp16-cuda"] / "model.onnx"
    options = QuantizeOptions(calibration="default", is_symmetric=False, mixed_precision_budget=0.01, block_size=16)
    with caplog.at_level(logging.WARNING, logger="olive_int4_pass"):
        out = quantize_file(model, tmp_path / "out", options, progress=False)
    assert "zero points alone" in caplog.text
    assert all(len(n.input) == 3 for n in nodes_of(load_onnx(out), "MatMulNBits"))  # no zero-point input
