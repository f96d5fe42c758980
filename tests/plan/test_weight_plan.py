"""Calibrated quality options: they use the statistics, stay deterministic, and keep the MatMulNBits format."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from hf_reference import hf_second_moments
from onnx_helpers import check_numerics, initializers, load_onnx, nodes_of
from test_tied_embeddings import decoder_feeds

from olive_int4_pass.kernels.layout import quantized_bytes
from olive_int4_pass.kernels.rtn import dequantize_blockwise, quantize_blockwise
from olive_int4_pass.kernels.scale_search import search_scales
from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.pipeline import quantize_file
from olive_int4_pass.plan.calibration import input_second_moments, tokenize
from olive_int4_pass.plan.weight_plan import choose_upgrades

TEXT_A = "The river bends twice before the mill, and the miller counts sacks of grain by lamplight. " * 30
TEXT_B = "Quantization maps weights to integers; onnxruntime multiplies packed four-bit blocks quickly. " * 30


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_scale_search_lowers_the_importance_weighted_error():
    rng = np.random.default_rng(0)
    k, n = 256, 96
    activations = rng.standard_normal((512, k)) * np.exp(1.5 * rng.standard_normal(k))  # outlier channels
    importance = (activations**2).mean(axis=0)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float16)
    for symmetric in (True, False):
        result = search_scales(w, importance, symmetric=symmetric)
        assert result.weighted_error < 0.9 * result.rtn_weighted_error
        searched = quantize_blockwise(w, symmetric=symmetric, scales=result.scales, zero_points=result.zero_points)
        rtn = quantize_blockwise(w, symmetric=symmetric)
        out_err = [
            np.mean((activations @ (dequantize_blockwise(q) - w.astype(np.float32))) ** 2) for q in (searched, rtn)
        ]
        assert out_err[0] < out_err[1]  # the real objective: the MatMul's output error
        # Without candidates the search is round to nearest, byte for byte.
        plain = search_scales(w, importance, symmetric=symmetric, grid=(1.0,), refit_steps=0)
        np.testing.assert_array_equal(plain.scales, rtn.scales)
        # Each stage keeps the best so far: the refit never loses, and here it wins.
        no_refit = search_scales(w, importance, symmetric=symmetric, refit_steps=0)
        assert result.weighted_error < no_refit.weighted_error
        if symmetric:  # some blocks take the flipped sign: the extreme lands on +7 instead of -8
            assert np.any(np.sign(result.scales) != np.sign(rtn.scales))


def test_asymmetric_search_spreads_the_range_over_a_grid_of_step_counts():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 96)) * 0.05).astype(np.float16)
    result = search_scales(w, None, symmetric=False)
    # Shrinking the range (the symmetric candidates) reached 0.923 of RTN's error here; the step grid, each
    # candidate refitted, reaches 0.902.
    assert result.weighted_error < 0.91 * result.rtn_weighted_error
    # A block's range over fewer steps than 15: some scales exceed (max - min) / 15, which no shrink gives.
    blocks = w.astype(np.float32).T.reshape(96, 8, 32)
    rtn_scale = (np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)) / 15
    assert np.any(result.scales.astype(np.float32) > rtn_scale * 1.05)


def test_choose_upgrades_respects_the_budget_and_prefers_error_per_byte():
    sensitivity = {"small_noisy": 0.20, "big_noisy": 0.25, "quiet": 0.01}
    sizes = {"small_noisy": 100, "big_noisy": 1000, "quiet": 100}
    # 4 -> 8 bits doubles a tensor's bytes: +100 for a small one fits a 10 % budget of 1200, +1000 does not.
    assert choose_upgrades(sensitivity, sizes, 0.10) == ["small_noisy"]
    assert choose_upgrades(sensitivity, sizes, 1.0) == ["small_noisy", "big_noisy", "quiet"]
    assert choose_upgrades(sensitivity, sizes, None) == [] and choose_upgrades(sensitivity, sizes, 0.0) == []
    # The budget is on the whole model: 10 % of 1200 + 9800 float bytes pays for the big one too.
    assert choose_upgrades(sensitivity, sizes, 0.10, fixed_bytes=9800) == ["small_noisy", "big_noisy"]
    # Explicit extra bytes (scales do not double): 0.12 * 1200 = 144 pays for +60 and +80, not +800.
    extra = {"small_noisy": 60, "big_noisy": 800, "quiet": 80}
    assert choose_upgrades(sensitivity, sizes, 0.12, extra) == ["small_noisy", "quiet"]
    # Growth already spent (an lm_head the options put at 8 bits) comes off the allowance first.
    assert choose_upgrades(sensitivity, sizes, 0.12, extra, prepaid=80) == ["small_noisy"]


def test_quantized_bytes_match_what_the_pass_writes():
    k, n = 96, 40
    w = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)
    for bits, symmetric in ((4, True), (4, False), (8, True), (8, False)):
        q = quantize_blockwise(w, bits=bits, symmetric=symmetric)
        written = q.packed.nbytes + q.scales.nbytes + (0 if q.zero_points is None else q.zero_points.nbytes)
        assert quantized_bytes(k, n, 32, bits, 4, symmetric) == written


def test_options_are_validated():
    with pytest.raises(ValueError, match="need calibration"):
        QuantizeOptions(scale_search=True)
    with pytest.raises(ValueError, match="quality must be one of"):
        QuantizeOptions(quality="best")
    with pytest.raises(ValueError, match="fraction >= 0"):
        QuantizeOptions(calibration="default", mixed_precision_budget=-1)
    preset = QuantizeOptions(quality="max")
    assert preset.scale_search and preset.mixed_precision_budget == 0.135 and preset.calibration == "default"
    assert not preset.is_symmetric and not QuantizeOptions(quality="balanced").is_symmetric
    assert QuantizeOptions().is_symmetric
    assert QuantizeOptions(quality="max", is_symmetric=True).is_symmetric  # an explicit choice stays
    with pytest.raises(TypeError, match="is_symmetric must be a bool"):
        QuantizeOptions(is_symmetric=1)
    assert preset.lm_head == "int8" and QuantizeOptions(quality="balanced").lm_head == "quantize"
    assert QuantizeOptions(quality="max", lm_head="float").lm_head == "float"
    assert QuantizeOptions(quality="max", mixed_precision_budget=0.05).mixed_precision_budget == 0.05


def test_calibration_statistics_drive_the_scales(exports, tmp_path):
    src = exports("qwen2")["fp32-cpu"] / "model.onnx"
    for name, text in (("a", TEXT_A), ("b", TEXT_B)):
        (tmp_path / f"{name}.txt").write_text(text)

    def run(text_name, out_name):
        options = QuantizeOptions(calibration=str(tmp_path / f"{text_name}.txt"), scale_search=True)
        return quantize_file(src, tmp_path / out_name, options, progress=False)

    a1, a2, b = run("a", "a1"), run("a", "a2"), run("b", "b")
    data = {p: digest(p.parent / "model.onnx.data") for p in (a1, a2, b)}
    assert data[a1] == data[a2]  # same calibration data: identical bytes
    assert data[a1] != data[b]  # different calibration data: different scales
    scales_a, scales_b = initializers(load_onnx(a1)), initializers(load_onnx(b))
    changed = [k for k in scales_a if k.endswith("_scales") and not np.array_equal(scales_a[k], scales_b[k])]
    assert changed
    report = json.loads((a1.parent / "quantization_report.json").read_text())
    assert report["calibration_seconds"] > 0
    assert all("weighted_relative_error" in stats for stats in report["weights_worst_first"].values())


def test_second_moments_match_the_hf_model(exports):
    """Calibration's E[x^2] of every MatMul input against the Hugging Face model's, captured with torch hooks."""
    built = exports("qwen2")
    ids = tokenize(TEXT_A, built["fp32-cpu"], 40)
    activations = [
        f"/model/layers.{i}/{name}/output_0"
        for i in range(2)
        for name in ("input_layernorm", "attn/GroupQueryAttention", "post_attention_layernorm", "mlp/Mul")
    ] + ["/model/layers.2/final_norm_layernorm/output_0"]
    got = input_second_moments(built["fp32-cpu"] / "model.onnx", activations, ids, window=16)
    want = hf_second_moments(built["hf"], [ids[0:16], ids[16:32], ids[32:40]], activations)
    for name in activations:
        assert got[name].shape == want[name].shape and np.all(want[name] > 0), name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    # A RMSNorm output of layer 0 does not depend on other tokens: the window does not change its moments.
    first = activations[0]
    whole = input_second_moments(built["fp32-cpu"] / "model.onnx", [first], ids, window=40)[first]
    np.testing.assert_allclose(whole, want[first], rtol=1e-5)


def test_max_preset_mixes_bit_widths_and_still_runs(exports, tmp_path):
    built = exports("qwen2")["fp32-cpu"]
    out = quantize_file(built / "model.onnx", tmp_path / "max", QuantizeOptions(quality="max"), progress=False)
    model = load_onnx(out)
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nodes_of(model, "MatMulNBits")}
    assert set(bits.values()) == {4, 8}, bits
    report = json.loads((out.parent / "quantization_report.json").read_text())
    eight = {name for name, s in report["weights_worst_first"].items() if s["bits"] == 8}
    assert eight and all(s["scale_search"] for s in report["weights_worst_first"].values())
    # max ranks both layers by measured sensitivity; its int8 lm_head is not ranked, so not probed
    assert sorted(report["measured_kl_by_group"]) == ["layer 0", "layer 1"]
    check_numerics(out, decoder_feeds(out, built), rtol=1e-3)


def test_the_budget_is_growth_over_plain_symmetric_int4(exports, tmp_path):
    """Zero points are paid out of the budget: asymmetric + 5 % stays within 5 % of the plain INT4 model."""
    src = exports("qwen2")["fp32-cpu"] / "model.onnx"

    def data_bytes(name, **kwargs):
        out = quantize_file(src, tmp_path / name, QuantizeOptions(**kwargs), progress=False)
        report = json.loads((out.parent / "quantization_report.json").read_text())
        size = sum(f.stat().st_size for f in out.parent.glob("model.onnx*"))  # small zero points stay inline
        return size, set(report["quantized_nodes"].values())

    plain, _ = data_bytes("plain")
    asym, _ = data_bytes("asym", is_symmetric=False)
    budgeted, bits = data_bytes(
        "budget", is_symmetric=False, calibration="default", scale_search=True, mixed_precision_budget=0.05
    )
    assert asym > plain  # the zero points
    assert bits == {4, 8} and asym < budgeted <= 1.05 * plain


def test_calibration_needs_the_tokenizer(exports, tmp_path):
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(exports("qwen2")["fp32-cpu"], folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        quantize_file(folder / "model.onnx", tmp_path / "out", QuantizeOptions(quality="balanced"), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options",
    [
        {"calibration": "default", "mixed_precision_budget": 0.1},
        {"quality": "max"},
    ],
    ids=["mixed_precision_budget", "quality-max"],
)
def test_mixed_precision_and_measured_sensitivity_are_deterministic(exports, tmp_path, options):
    """Two runs: the same files byte for byte and the same 8-bit choices (``max`` ranks by measured KL)."""
    src = exports("qwen2")["fp32-cpu"] / "model.onnx"
    runs = [quantize_file(src, tmp_path / name, QuantizeOptions(**options), progress=False) for name in ("a", "b")]
    for name in ("model.onnx", "model.onnx.data"):
        assert digest(runs[0].parent / name) == digest(runs[1].parent / name), name
    reports = [json.loads((out.parent / "quantization_report.json").read_text()) for out in runs]
    eight = [sorted(n for n, s in r["weights_worst_first"].items() if s["bits"] == 8) for r in reports]
    assert eight[0] and eight[0] == eight[1]  # some weights went to 8 bits, the same ones
    assert reports[0]["weights_worst_first"] == reports[1]["weights_worst_first"]  # errors, bits, order
    if options.get("quality") == "max":
        assert reports[0]["measured_kl_by_group"] == reports[1]["measured_kl_by_group"]
        assert len(reports[0]["measured_kl_by_group"]) == 2  # both layers (the int8 lm_head is not probed)


def test_calibration_alone_changes_no_weight(exports, tmp_path):
    """docs/quality.md: calibration changes the weights only with quality, scale_search or mixed_precision_budget.
    The reference is the genai builder's own ``-p int4`` export, tensor for tensor."""
    built = exports("qwen2")
    out = quantize_file(
        built["fp32-cpu"] / "model.onnx",
        tmp_path / "calibrated",
        QuantizeOptions(calibration="default", accuracy_level=4),
        progress=False,
    )
    ours, builders = initializers(load_onnx(out)), initializers(load_onnx(built["int4-cpu"] / "model.onnx"))
    assert ours.keys() == builders.keys()
    assert all(ours[k].dtype == v.dtype and ours[k].tobytes() == v.tobytes() for k, v in builders.items())
    report = json.loads((out.parent / "quantization_report.json").read_text())
    assert report["calibration_seconds"] > 0  # it did calibrate
