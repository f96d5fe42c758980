"""Our pass on the genai builder's float export == the builder's own ``-p int4`` output, byte for byte."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx_helpers import attrs, initializers, load_onnx, nodes_of

from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.pipeline import quantize_file

CASES = {"cpu": ("fp32-cpu", "int4-cpu", 4), "cuda": ("fp16-cuda", "int4-cuda", None)}


def decoder_logits(model_path, input_ids: np.ndarray, genai_dir: Path) -> np.ndarray:
    """Prefill logits of a builder-layout decoder (empty KV cache), on onnxruntime's CPU provider."""
    config = json.loads((genai_dir / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = input_ids
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones_like(input_ids)
        elif inp.name.startswith("past_key_values"):
            dtype = np.float16 if "float16" in inp.type else np.float32
            shape = (input_ids.shape[0], config["num_key_value_heads"], 0, config["head_size"])
            feeds[inp.name] = np.zeros(shape, dtype)
        else:
            raise AssertionError(f"unexpected input {inp.name}")
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_matches_builder_int4(builder_exports, tmp_path, target):
    float_key, int4_key, accuracy_level = CASES[target]
    ours_path = quantize_file(
        builder_exports[float_key] / "model.onnx",
        tmp_path / "ours",
        QuantizeOptions(accuracy_level=accuracy_level),
        progress=False,
    )
    ours, theirs = load_onnx(ours_path), load_onnx(builder_exports[int4_key] / "model.onnx")
    ours_nodes = {n.name: n for n in nodes_of(ours, "MatMulNBits")}
    their_nodes = {n.name: n for n in nodes_of(theirs, "MatMulNBits")}
    assert len(their_nodes) == 11 and ours_nodes.keys() == their_nodes.keys()  # 2 x (qkv, o, gate, up, down) + lm_head
    ours_init, their_init = initializers(ours), initializers(theirs)
    for name, theirs_node in their_nodes.items():
        node = ours_nodes[name]
        assert list(node.input) == list(theirs_node.input) and list(node.output) == list(theirs_node.output)
        assert attrs(node) == attrs(theirs_node), name
        for tensor in node.input[1:]:
            a, b = ours_init[tensor], their_init[tensor]
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), tensor
    # Everything else in the graph is the builder's too, and no float weight is left behind.
    assert sorted(ours_init) == sorted(their_init)
    assert [i.name for i in ours.graph.input] == [i.name for i in theirs.graph.input]
    assert [o.name for o in ours.graph.output] == [o.name for o in theirs.graph.output]

    input_ids = np.array([[0, 5, 17, 42, 99, 3, 250, 7]], np.int64)
    genai_dir = builder_exports[int4_key]
    got = decoder_logits(ours_path, input_ids, genai_dir)
    want = decoder_logits(genai_dir / "model.onnx", input_ids, genai_dir)
    np.testing.assert_array_equal(got, want)
    # The quantized model still tracks the float one (4-bit noise on a random model, not garbage).
    float_logits = decoder_logits(builder_exports[float_key] / "model.onnx", input_ids, genai_dir).astype(np.float32)
    corr = np.corrcoef(got.astype(np.float32).ravel(), float_logits.ravel())[0, 1]
    assert corr > 0.9, corr
