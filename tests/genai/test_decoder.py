"""The decoder runner against onnxruntime fed by hand, its graph edits, empty KV cache, vocabulary and tokenizer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx_helpers import initializers, load_onnx

from olive_int4_pass.compare.run import default_text
from olive_int4_pass.genai.decoder import DecoderRunner, log_softmax, tokenize, vocab_size
from olive_int4_pass.genai.files import GENAI_CONFIG
from olive_int4_pass.plan import calibration

IDS = [5, 17, 42, 101, 7, 250, 3, 64, 64, 12]


def by_hand(model_path, ids, dtype):
    """Logits from an InferenceSession on the file, fed as the builder layout wants (2 KV heads of 16)."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = np.array([ids], np.int64)
    feeds = {"input_ids": x, "attention_mask": np.ones_like(x)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, 2, 0, 16), dtype)
    return session.run(["logits"], feeds)[0][0]


@pytest.mark.parametrize(("export", "dtype"), [("fp32-cpu", np.float32), ("fp16-cuda", np.float16)])
def test_logits_equal_onnxruntime_fed_by_hand(builder_exports, export, dtype):
    model = builder_exports[export] / "model.onnx"
    runner = DecoderRunner(model)
    got = runner.logits(IDS)
    assert got.shape == (len(IDS), 320) and got.dtype == dtype
    np.testing.assert_array_equal(got, by_hand(model, IDS, dtype))
    # The KV head size is symbolic in the graph: the runner took it from genai_config.json.
    assert runner.inputs["past_key_values.0.key"].shape[3] == "kv_cache_dim"
    assert runner.feeds(IDS)["past_key_values.0.key"].shape == (1, 2, 0, 16)
    logprobs = runner.log_probs(IDS)
    assert logprobs.dtype == np.float32
    np.testing.assert_array_equal(logprobs, log_softmax(got))
    np.testing.assert_allclose(np.exp(logprobs.astype(np.float64)).sum(axis=-1), 1.0, rtol=1e-5)


def test_extra_outputs_expose_activations(builder_exports):
    """Calibration's view: the first RMSNorm's output, checked against the norm computed from the weights."""
    model_path = builder_exports["fp32-cpu"] / "model.onnx"
    before = model_path.read_bytes()
    name = "/model/layers.0/input_layernorm/output_0"
    runner = DecoderRunner(model_path, extra_outputs=[name])
    logits, normed = runner.run(IDS, ["logits", name])
    weights = initializers(load_onnx(model_path))
    x = weights["model.embed_tokens.weight"][IDS].astype(np.float64)
    expected = (
        x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + 1e-6) * weights["model.layers.0.input_layernorm.weight"]
    )
    np.testing.assert_allclose(normed[0], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits[0], DecoderRunner(model_path).logits(IDS), rtol=1e-5, atol=1e-5)
    assert model_path.read_bytes() == before  # edited in memory only


def test_weight_inputs_are_fed_by_the_caller(builder_exports):
    model_path = builder_exports["fp32-cpu"] / "model.onnx"
    lm_head = "lm_head.MatMul.weight"
    weight = initializers(load_onnx(model_path))[lm_head]
    runner = DecoderRunner(model_path, weight_inputs=[lm_head])
    assert lm_head in runner.inputs and lm_head not in runner.feeds(IDS)  # the caller's to feed
    np.testing.assert_array_equal(runner.logits(IDS, {lm_head: weight}), DecoderRunner(model_path).logits(IDS))
    # lm_head is a MatMul without bias: a zero weight gives zero logits, a doubled one doubles them.
    assert not runner.logits(IDS, {lm_head: np.zeros_like(weight)}).any()
    np.testing.assert_allclose(runner.logits(IDS, {lm_head: 2 * weight}), 2 * runner.logits(IDS, {lm_head: weight}))
    with pytest.raises(ValueError, match=r"not initializers of .*model\.onnx: \['no_such_weight'\]"):
        DecoderRunner(model_path, weight_inputs=["no_such_weight"])


def test_symbolic_shapes_come_from_the_given_genai_config(builder_exports, tmp_path):
    model_path = builder_exports["fp32-cpu"] / "model.onnx"
    config = json.loads((builder_exports["fp32-cpu"] / GENAI_CONFIG).read_text())
    config["model"]["decoder"]["head_size"] = 8
    (tmp_path / GENAI_CONFIG).write_text(json.dumps(config))
    runner = DecoderRunner(model_path, config_dir=tmp_path)
    assert runner.feeds(IDS)["past_key_values.1.value"].shape == (1, 2, 0, 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        ValueError, match=rf"past_key_values\.0\.key .* is symbolic: cannot read {empty / GENAI_CONFIG}"
    ):
        DecoderRunner(model_path, config_dir=empty)


def test_vocab_size(builder_exports, tmp_path):
    folder = builder_exports["fp32-cpu"]
    assert DecoderRunner(folder / "model.onnx").vocab_size == 320  # the logits' static width
    assert vocab_size(["batch", "sequence", 320], tmp_path) == 320
    assert vocab_size(["batch", "sequence", "vocab"], folder) == 320  # symbolic: genai_config.json's
    assert vocab_size(["batch", "sequence", None], tmp_path) is None  # neither says
    assert vocab_size(None, tmp_path) is None


def test_tokenize_gives_onnxruntime_genais_ids_on_the_compare_text(builder_exports, tiny_qwen2, tmp_path):
    import onnxruntime_genai as og

    # The builder's re-saved tokenizer, and the model's own (what GenAIModelExport ships beside genai_config.json).
    own = tmp_path / "own"
    own.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_qwen2 / name, own / name)
    shutil.copy(builder_exports["fp32-cpu"] / GENAI_CONFIG, own / GENAI_CONFIG)
    text = default_text()
    for folder in (builder_exports["fp32-cpu"], own):
        ids = tokenize(text, folder)
        assert len(ids) > 1000
        assert ids == [int(i) for i in og.Tokenizer(str(folder)).encode(text)], folder
    # Calibration tokenizes through the same function; its ids (which decide quantized bytes) are the prefix.
    fp32 = builder_exports["fp32-cpu"]
    assert calibration.tokenize(text, fp32, 300) == tokenize(text, fp32)[:300]
    shutil.copy(tiny_qwen2 / "config.json", tmp_path / "tokenizer.json")  # JSON, but not a tokenizer
    with pytest.raises(ValueError, match=r"cannot load the tokenizer .*tokenizer\.json"):
        tokenize(text, tmp_path)


def test_models_outside_the_builder_layout_are_refused(tmp_path):
    def save(inputs, name):
        nodes = [helper.make_node("Identity", [inputs[0].name], ["logits"])]
        graph = helper.make_graph(
            nodes, "g", inputs, [helper.make_tensor_value_info("logits", TensorProto.INT64, None)]
        )
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), tmp_path / name)
        return tmp_path / name

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    other = helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["b", "s"])
    with pytest.raises(ValueError, match=r"plain\.onnx is not a genai-builder-layout decoder: it has no input_ids"):
        DecoderRunner(save([helper.make_tensor_value_info("X", TensorProto.INT64, ["s"])], "plain.onnx"))
    with pytest.raises(ValueError, match=r"cannot feed decoder input 'token_type_ids'"):
        DecoderRunner(save([ids, other], "bert.onnx"))
    np.testing.assert_array_equal(DecoderRunner(save([ids], "echo.onnx")).logits([3, 4]), [3, 4])
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"onnxruntime cannot load .*broken\.onnx"):
        DecoderRunner(tmp_path / "broken.onnx")
