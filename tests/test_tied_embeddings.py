"""Tied embeddings: one quantized tensor for lm_head and embedding, as the genai builder does; embedding options."""

import numpy as np
import pytest
from hf_reference import check_greedy_tokens
from onnx_helpers import (
    as_package,
    attrs,
    check_numerics,
    float_reference,
    genai_generation,
    genai_greedy,
    initializers,
    load_onnx,
    nodes_of,
)
from test_builder_parity import decoder_logits

from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.pipeline import quantize_file

PROMPT = [0, 5, 17, 42, 99, 3, 250, 7]
CASES = {"cpu": ("fp32-cpu", "int4-cpu", 4), "cuda": ("fp16-cuda", "int4-cuda", None)}


def package_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))


@pytest.mark.parametrize("target", ["cpu", "cuda"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tied_model_matches_builder_int4(exports, tmp_path, arch, target):
    built = exports(arch, tied=True)
    float_key, int4_key, accuracy_level = CASES[target]
    out = quantize_file(
        built[float_key] / "model.onnx", tmp_path / "ours", QuantizeOptions(accuracy_level=accuracy_level)
    )
    ours, theirs = load_onnx(out), load_onnx(built[int4_key] / "model.onnx")
    ours_init, their_init = initializers(ours), initializers(theirs)
    for op_type in ("MatMulNBits", "GatherBlockQuantized"):
        mine = {n.name: n for n in nodes_of(ours, op_type)}
        reference = {n.name: n for n in nodes_of(theirs, op_type)}
        assert mine.keys() == reference.keys() and reference, op_type
        for name, ref_node in reference.items():
            assert attrs(mine[name]) == attrs(ref_node), name
            if op_type == "MatMulNBits":  # (the Gather's output keeps its original internal name)
                assert mine[name].output == ref_node.output, name
    (gbq,) = nodes_of(ours, "GatherBlockQuantized")
    reshape = next(n for n in ours.graph.node if n.output[0] == gbq.input[0])
    # One packed tensor and one scales tensor, read by both ops, bytes equal to the builder's.
    (head,) = [n for n in nodes_of(ours, "MatMulNBits") if n.output[0] == "logits"]
    assert reshape.input[0] == head.input[1] and gbq.input[2] == head.input[2]
    for name in (head.input[1], head.input[2]):
        assert (
            ours_init[name].tobytes() == their_init[name].tobytes() and ours_init[name].dtype == their_init[name].dtype
        )
    assert "lm_head.MatMul.weight" not in ours_init  # no float copy left behind
    ratio = package_bytes(out.parent) / package_bytes(built[int4_key])
    assert abs(ratio - 1) < 0.01, ratio

    genai_dir = built[int4_key]
    got = decoder_logits(out, np.array([PROMPT]), genai_dir)
    np.testing.assert_array_equal(got, decoder_logits(genai_dir / "model.onnx", np.array([PROMPT]), genai_dir))
    package = as_package(out.parent, genai_dir)
    assert genai_greedy(package, PROMPT, 6) == genai_greedy(genai_dir, PROMPT, 6)


def decoder_feeds(model_path, genai_dir):
    """Feeds for a full-graph ORT run (prefill, empty cache) so check_numerics can compare every output."""
    import json

    import onnxruntime as ort

    config = json.loads((genai_dir / "genai_config.json").read_text())["model"]["decoder"]
    feeds = {}
    for inp in ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = np.array([PROMPT])
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, len(PROMPT)), np.int64)
        else:
            shape = (1, config["num_key_value_heads"], 0, config["head_size"])
            feeds[inp.name] = np.zeros(shape, np.float16 if "float16" in inp.type else np.float32)
    return feeds


@pytest.mark.parametrize(
    ("options", "expect"),
    [
        ({"lm_head": "float"}, {"gbq_bits": None, "head": "MatMul"}),
        ({"lm_head": "int8"}, {"gbq_bits": 8, "head": "MatMulNBits"}),
        ({"is_symmetric": False}, {"gbq_bits": 4, "head": "MatMulNBits"}),
        ({"tied_embeddings": False}, {"gbq_bits": None, "head": "MatMulNBits"}),
    ],
    ids=["lm_head-float", "lm_head-int8", "asymmetric", "no-sharing"],
)
def test_tied_model_options_load_and_match_dequantized_weights(exports, tmp_path, options, expect):
    built = exports("qwen2", tied=True)
    out = quantize_file(built["fp32-cpu"] / "model.onnx", tmp_path / "ours", QuantizeOptions(**options))
    model = load_onnx(out)
    inits = initializers(model)
    head = next(n for n in model.graph.node if n.output[0] == "logits")
    assert head.op_type == expect["head"]
    gbq = nodes_of(model, "GatherBlockQuantized")
    if expect["gbq_bits"] is None:
        assert not gbq and "lm_head.MatMul.weight" in inits  # the one float matrix stays for the Gather
        float_copies = [k for k, v in inits.items() if v.shape in ((64, 320), (320, 64))]
        assert float_copies == ["lm_head.MatMul.weight"]
    else:
        (node,) = gbq
        assert attrs(node)["bits"] == expect["gbq_bits"] and "lm_head.MatMul.weight" not in inits
        assert node.input[2] == head.input[2]  # shared scales
        if not options.get("is_symmetric", True):
            assert node.input[3] == head.input[3] == "lm_head.MatMul.weight_zero_points"
    check_numerics(out, decoder_feeds(out, built["fp32-cpu"]), rtol=1e-3)
    check_package_runs(out, built["fp32-cpu"])


def check_package_runs(out, genai_dir, new_tokens=4):
    """onnxruntime-genai runs the quantized model as a package: its greedy tokens and the logits before each (KV
    cache included) are those of a plain onnxruntime run of the float model rebuilt from the dequantized weights.

    (On these random tied models greedy decoding repeats the last token whatever the weights, so the tokens alone
    would say little: the logits carry the comparison.)"""
    tokens, logits = genai_generation(as_package(out.parent, genai_dir), PROMPT, new_tokens)
    assert len(tokens) == new_tokens
    reference = check_greedy_tokens(tokens, float_reference(out), genai_dir, PROMPT)
    np.testing.assert_allclose(logits, reference, rtol=1e-3, atol=1e-3 * np.abs(reference).max())


@pytest.mark.parametrize("embedding", ["int4", "int8"])
def test_untied_embedding_option(exports, tmp_path, embedding):
    built = exports("qwen2", tied=False)
    default = quantize_file(built["fp32-cpu"] / "model.onnx", tmp_path / "default")
    out = quantize_file(built["fp32-cpu"] / "model.onnx", tmp_path / "emb", QuantizeOptions(embedding=embedding))
    model = load_onnx(out)
    (node,) = nodes_of(model, "GatherBlockQuantized")
    assert attrs(node)["bits"] == int(embedding[-1]) and node.output[0] == "/model/embed_tokens/Gather/output_0"
    assert "model.embed_tokens.weight" not in initializers(model)
    assert not nodes_of(load_onnx(default), "GatherBlockQuantized")  # off by default
    assert package_bytes(out.parent) < package_bytes(default.parent)
    check_numerics(out, decoder_feeds(out, built["fp32-cpu"]), rtol=1e-3)
    check_package_runs(out, built["fp32-cpu"])
