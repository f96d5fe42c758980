"""Layer-by-layer calibration: the same statistics as running the whole float model, so the same bits and bytes,
with each onnxruntime session holding one layer's weights."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx_helpers import make_model, tensor_info

from olive_int4_pass.genai.layers import LayeredDecoder, NotCuttable, cut
from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.pipeline import quantize_file
from olive_int4_pass.plan import calibration


def matmul_inputs(model_path) -> list[str]:
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return sorted({n.input[0] for n in graph.node if n.op_type == "MatMul"})


@pytest.mark.parametrize("target", ["fp32-cpu", "fp16-cuda"])
def test_layerwise_second_moments_equal_the_whole_model_ones(exports, target):
    model = exports("qwen2")[target] / "model.onnx"
    names = matmul_inputs(model)
    samples = [list(range(3, 200)), list(range(250, 40, -3))]  # two samples, several windows each
    layered = calibration.input_second_moments(model, names, samples, window=64, layerwise=True)
    whole = calibration.input_second_moments(model, names, samples, window=64, layerwise=False)
    assert layered.keys() == whole.keys() == set(names)
    for name in names:
        np.testing.assert_allclose(layered[name], whole[name], rtol=1e-6, err_msg=name)
        assert (whole[name] > 0).all()


def test_a_layers_inputs_are_not_kept_for_every_sequence(exports):
    """Memory does not grow with the calibration tokens: once a sequence has run through a segment, its watched
    values (one layer's MatMul inputs) are let go unless a later segment reads them."""
    import gc
    import weakref

    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    names = matmul_inputs(model)
    decoder = LayeredDecoder(model, names)
    read_later = set().union(*(s.inputs for s in decoder.segments))
    alive: list[tuple[int, str, weakref.ref]] = []
    seen = []

    def on_value(seq, name, array):
        gc.collect()
        # every earlier sequence's watched values that no segment reads are gone already
        held = [(s, n) for s, n, ref in alive if s < seq and ref() is not None and n not in read_later]
        assert not held, held
        alive.append((seq, name, weakref.ref(array)))
        seen.append((seq, name))

    decoder.run([list(range(3, 60)), list(range(60, 120)), list(range(120, 200))], on_value)
    assert {n for _, n in seen} == set(names) and {s for s, _ in seen} == {0, 1, 2}
    assert any(n not in read_later for _, n in seen)  # the test watches values the store could have kept


def test_each_segment_holds_one_layer_and_never_the_lm_head(exports):
    model = exports("qwen2", tied=True)["fp32-cpu"] / "model.onnx"
    proto = onnx.load(str(model), load_external_data=False)
    segments = cut(proto.graph, matmul_inputs(model))
    assert [s.name for s in segments] == ["before the layers", "layer 0", "layer 1", "layer 2"]
    inits = {i.name for i in proto.graph.initializer}
    for segment in segments:
        weights = {x for i in segment.nodes for x in proto.graph.node[i].input if x in inits and "MatMul" in x}
        layers = {w.split(".")[2] for w in weights if w.startswith("model.layers.")}
        assert len(layers) <= 1, (segment.name, weights)
        # The logits are nobody's input: the lm_head MatMul is never run (the tied embedding still reads its table).
        assert not any("logits" in proto.graph.node[i].output for i in segment.nodes)
    # Between two layers only hidden states (and the attention mask's lengths, the empty KV cache) cross.
    assert all(not x.startswith("model.") for s in segments for x in s.inputs)


def test_presets_give_the_same_bytes_either_way(exports, tmp_path, monkeypatch):
    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    options = QuantizeOptions(quality="balanced", calibration_tokens=512)
    layered = quantize_file(model, tmp_path / "layered", options, progress=False)
    original = calibration.input_second_moments
    monkeypatch.setattr(calibration, "input_second_moments", lambda *a, **k: original(*a, **{**k, "layerwise": False}))
    import olive_int4_pass.plan.prepare as prepare

    monkeypatch.setattr(prepare, "input_second_moments", calibration.input_second_moments)
    whole = quantize_file(model, tmp_path / "whole", options, progress=False)

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert digest(layered.parent / "model.onnx.data") == digest(whole.parent / "model.onnx.data")
    bits = [
        {
            k: v["bits"]
            for k, v in json.loads((p.parent / "quantization_report.json").read_text())["weights_worst_first"].items()
        }
        for p in (layered, whole)
    ]
    assert bits[0] == bits[1] and 8 in bits[0].values()  # the budget bought some 8-bit tensors, the same ones


def test_a_graph_without_layers_falls_back_and_says_why(tmp_path, caplog):
    path = tmp_path / "model.onnx"
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "W"], ["logits"], name="head"),
    ]
    inits = {
        "E": rng.standard_normal((50, 32)).astype(np.float32),
        "W": rng.standard_normal((32, 50)).astype(np.float32),
    }
    make_model(
        nodes,
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, None])],
        [tensor_info("logits", np.float32, [1, None, 50])],
        inits,
        path,
    )
    with pytest.raises(NotCuttable, match="numbered transformer layer"):
        LayeredDecoder(path, ["h"])
    with caplog.at_level(logging.INFO, logger="olive_int4_pass"):
        moments = calibration.input_second_moments(path, ["h"], list(range(40)))
    assert "cannot be cut into layers" in caplog.text
    expected = (inits["E"][np.arange(40)].astype(np.float64) ** 2).mean(axis=0)  # E[x^2] by hand
    np.testing.assert_allclose(moments["h"], expected, rtol=1e-6)


def test_compensated_blocks_of_h_are_the_same_either_way(exports, tmp_path, monkeypatch, caplog):
    """With a span, calibration sums each run's block of H: layer by layer they stay in memory until the layer is
    done; the whole model adds every input each window, through a cache that here holds one input's sums, so they
    go to disk and back. The bytes are the same."""
    from olive_int4_pass.plan import activation_store

    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    options = QuantizeOptions(quality="balanced", rounding="compensated", compensation_span=32, calibration_tokens=768)
    with caplog.at_level(logging.INFO):
        layered = quantize_file(model, tmp_path / "layered", options, progress=False)
    assert "as their blocks of H, 0 as rows" in caplog.text
    monkeypatch.setattr(activation_store, "_CACHE_BYTES", 1)
    original = calibration.input_second_moments
    monkeypatch.setattr(calibration, "input_second_moments", lambda *a, **k: original(*a, **{**k, "layerwise": False}))
    import olive_int4_pass.plan.prepare as prepare

    monkeypatch.setattr(prepare, "input_second_moments", calibration.input_second_moments)
    whole = quantize_file(model, tmp_path / "whole", options, progress=False)
    assert (layered.parent / "model.onnx.data").read_bytes() == (whole.parent / "model.onnx.data").read_bytes()
