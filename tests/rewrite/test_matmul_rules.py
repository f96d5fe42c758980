"""Each rewrite rule, checked by running the quantized model against the model rebuilt from dequantized weights, and
against the float model within a bound derived from the bit width (``onnx_helpers.check_numerics``): 8-bit nodes
must be sixteen times closer than 4-bit ones."""

import logging

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx_helpers import attrs, check_numerics, initializers, load_onnx, make_model, nodes_of, run, tensor_info

from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.pipeline import quantize_file

RNG = np.random.default_rng(0)


def weight(*shape, dtype=np.float32):
    return (RNG.standard_normal(shape) * 0.1).astype(dtype)


def quantize(tmp_path, nodes, inputs, outputs, inits, **options):
    src = tmp_path / "in" / "model.onnx"
    original = make_model(nodes, inputs, outputs, inits, src)
    out = quantize_file(src, tmp_path / "out", QuantizeOptions(**options), progress=False)
    return original, load_onnx(out), out


@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_any_rank_keeps_io_names_and_builder_naming(tmp_path, bits):
    w = weight(64, 40)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="/model/mm")]
    original, model, out = quantize(
        tmp_path,
        nodes,
        [tensor_info("x", np.float32, [2, 3, 64])],
        [tensor_info("y", np.float32, [2, 3, 40])],
        {"W": w},
        bits=bits,
    )
    (node,) = nodes_of(model, "MatMulNBits")
    assert node.name == f"/model/mm_Q{bits}" and node.domain == "com.microsoft"
    assert list(node.input) == ["x", f"W_Q{bits}", "W_scales"] and list(node.output) == ["y"]
    assert attrs(node) == {"K": 64, "N": 40, "bits": bits, "block_size": 32}
    assert "W" not in initializers(model)  # float weight removed
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["y"]
    check_numerics(out, {"x": RNG.standard_normal((2, 3, 64)).astype(np.float32)}, original)
    assert (out.parent / "model.onnx.data").is_file()


@pytest.mark.parametrize("bits", [4, 8])
def test_transposed_weight(tmp_path, bits):
    w = weight(40, 64)  # [N, K] as nn.Linear stores it
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm"),
    ]
    original, model, out = quantize(
        tmp_path,
        nodes,
        [tensor_info("x", np.float32, [5, 64])],
        [tensor_info("y", np.float32, [5, 40])],
        {"W": w},
        bits=bits,
    )
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    assert attrs(model.graph.node[0])["K"] == 64 and attrs(model.graph.node[0])["N"] == 40
    assert attrs(model.graph.node[0])["bits"] == bits
    check_numerics(out, {"x": RNG.standard_normal((5, 64)).astype(np.float32)}, original)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    ("trans_b", "bias_shape"),
    [(0, (40,)), (1, (40,)), (1, (1, 40)), (0, None)],
    ids=["B", "Bt", "Bt-2d-bias", "nobias"],
)
def test_gemm(tmp_path, trans_b, bias_shape, bits):
    w = weight(40, 64) if trans_b else weight(64, 40)
    inits = {"W": w}
    inputs = ["x", "W"]
    if bias_shape:
        inits["C"] = weight(*bias_shape)
        inputs.append("C")
    nodes = [helper.make_node("Gemm", inputs, ["y"], name="gemm", transB=trans_b)]
    original, model, out = quantize(
        tmp_path,
        nodes,
        [tensor_info("x", np.float32, [3, 64])],
        [tensor_info("y", np.float32, [3, 40])],
        inits,
        bits=bits,
    )
    (node,) = model.graph.node
    assert node.op_type == "MatMulNBits" and attrs(node)["bits"] == bits
    assert (len(node.input) == 6) == bool(bias_shape)  # bias is input 5
    check_numerics(out, {"x": RNG.standard_normal((3, 64)).astype(np.float32)}, original)


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({"alpha": 2.0}, "Gemm with alpha or beta != 1"),
        ({"beta": 0.5}, "Gemm with alpha or beta != 1"),
        ({"transA": 1}, "Gemm with transA"),
    ],
    ids=["alpha", "beta", "transA"],
)
def test_gemm_outside_the_pattern_is_left_alone_and_logged(tmp_path, caplog, attributes, reason):
    """README: Gemm is rewritten only with alpha = beta = 1 (and transA = 0); others stay, with the reason logged."""
    x_shape = [64, 3] if attributes.get("transA") else [3, 64]
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", **attributes)]
    inits = {"W": weight(64, 40), "C": weight(40)}
    with caplog.at_level(logging.INFO, logger="olive_int4_pass"):
        original, model, out = quantize(
            tmp_path, nodes, [tensor_info("x", np.float32, x_shape)], [tensor_info("y", np.float32, [3, 40])], inits
        )
    assert [n.op_type for n in model.graph.node] == ["Gemm"]
    assert initializers(model)["W"].tobytes() == inits["W"].tobytes()  # the float weight, untouched
    assert f"gemm: {reason}" in caplog.text
    x = RNG.standard_normal(x_shape).astype(np.float32)
    np.testing.assert_array_equal(run(out, {"x": x})[0], run(original, {"x": x})[0])


@pytest.mark.parametrize("fuse_bias", [False, True])
def test_matmul_add_bias(tmp_path, fuse_bias):
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="proj/MatMul"),
        helper.make_node("Add", ["h", "b"], ["y"], name="proj/Add"),
    ]
    original, model, out = quantize(
        tmp_path,
        nodes,
        [tensor_info("x", np.float32, [1, 4, 64])],
        [tensor_info("y", np.float32, [1, 4, 48])],
        {"W": weight(64, 48), "b": weight(48)},
        fuse_bias=fuse_bias,
    )
    ops = [n.op_type for n in model.graph.node]
    assert ops == (["MatMulNBits"] if fuse_bias else ["MatMulNBits", "Add"])
    if fuse_bias:
        assert model.graph.node[0].input[5] == "b"  # onnxruntime's CPU MatMulNBits takes the bias input
    check_numerics(out, {"x": RNG.standard_normal((1, 4, 64)).astype(np.float32)}, original)


def test_shared_weight_is_quantized_once(tmp_path):
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="mm_a"),
        helper.make_node("MatMul", ["a2", "W"], ["y"], name="mm_b"),
        helper.make_node("Slice", ["a", "starts", "ends", "axes"], ["a2"]),
    ]
    inits = {"W": weight(64, 64), "starts": np.array([0]), "ends": np.array([64]), "axes": np.array([1])}
    original, model, out = quantize(
        tmp_path, nodes, [tensor_info("x", np.float32, [2, 64])], [tensor_info("y", np.float32, [2, 64])], inits
    )
    qnodes = nodes_of(model, "MatMulNBits")
    assert len(qnodes) == 2 and {n.input[1] for n in qnodes} == {"W_Q4"}
    assert sum(name.startswith("W_") for name in initializers(model)) == 2  # W_Q4 + W_scales, once
    check_numerics(out, {"x": RNG.standard_normal((2, 64)).astype(np.float32)}, original)


@pytest.mark.parametrize("bits", [4, 8])
def test_fp16_graph_gets_fp16_scales_and_asymmetric_zero_points(tmp_path, bits):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    original, model, out = quantize(
        tmp_path,
        nodes,
        [tensor_info("x", np.float16, [3, 96])],
        [tensor_info("y", np.float16, [3, 24])],
        {"W": weight(96, 24, dtype=np.float16)},
        is_symmetric=False,
        bits=bits,
    )
    (node,) = model.graph.node
    inits = initializers(model)
    assert inits[node.input[2]].dtype == np.float16
    zp_bytes = 2 if bits == 4 else 3  # 3 blocks: two 4-bit zero points per byte, or one byte each
    assert node.input[3] == "W_zero_points" and inits["W_zero_points"].shape == (24, zp_bytes)
    check_numerics(out, {"x": RNG.standard_normal((3, 96)).astype(np.float16)}, original, rtol=2e-2)


def test_skips_are_logged_with_reasons(tmp_path, caplog):
    nodes = [
        helper.make_node("MatMul", ["x", "W_in"], ["a"], name="dynamic"),  # W is a graph input
        helper.make_node("MatMul", ["a", "W3"], ["b"], name="rank3"),  # 3-D weight
        helper.make_node("MatMul", ["b", "W1"], ["c"], name="/model/layers.0/mlp/MatMul"),  # excluded by glob
        helper.make_node("MatMul", ["c", "W2"], ["y"], name="/model/layers.1/mlp/MatMul"),
    ]
    inputs = [tensor_info("x", np.float32, [2, 8, 64]), tensor_info("W_in", np.float32, [64, 64])]
    inits = {"W3": weight(2, 64, 64), "W1": weight(64, 64), "W2": weight(64, 32)}
    with caplog.at_level(logging.INFO, logger="olive_int4_pass"):
        original, model, out = quantize(
            tmp_path,
            nodes,
            inputs,
            [tensor_info("y", np.float32, [2, 8, 32])],
            inits,
            nodes_to_exclude=["*/layers.0/*"],
        )
    assert [n.name for n in nodes_of(model, "MatMulNBits")] == ["/model/layers.1/mlp/MatMul_Q4"]
    log = caplog.text
    assert "dynamic: weight is not a constant initializer" in log
    assert "rank3: weight rank 3 != 2" in log
    assert "/model/layers.0/mlp/MatMul: excluded by nodes_to_exclude" in log
    feeds = {"x": RNG.standard_normal((2, 8, 64)).astype(np.float32), "W_in": weight(64, 64)}
    check_numerics(out, feeds, original)


def test_nodes_to_include(tmp_path):
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="attn/q_proj"),
        helper.make_node("MatMul", ["a", "W2"], ["y"], name="mlp/down_proj"),
    ]
    _, model, _ = quantize(
        tmp_path,
        nodes,
        [tensor_info("x", np.float32, [2, 64])],
        [tensor_info("y", np.float32, [2, 64])],
        {"W1": weight(64, 64), "W2": weight(64, 64)},
        nodes_to_include=["mlp/*"],
    )
    assert [n.op_type for n in model.graph.node] == ["MatMul", "MatMulNBits"]
    assert "W1" in initializers(model)


@pytest.mark.parametrize("lm_head", ["quantize", "int8", "float"])
def test_lm_head_options(tmp_path, lm_head):
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="/model/layers.0/mlp/MatMul"),
        helper.make_node("MatMul", ["h", "W_lm"], ["logits"], name="/lm_head/MatMul"),
    ]
    original, model, out = quantize(
        tmp_path,
        nodes,
        [tensor_info("x", np.float32, [1, 3, 64])],
        [tensor_info("logits", np.float32, [1, 3, 100])],
        {"W1": weight(64, 64), "W_lm": weight(64, 100)},
        lm_head=lm_head,
    )
    head = model.graph.node[1]
    expected = {"quantize": ("MatMulNBits", 4), "int8": ("MatMulNBits", 8), "float": ("MatMul", None)}[lm_head]
    assert head.op_type == expected[0] and head.output[0] == "logits"
    if expected[1]:
        assert attrs(head)["bits"] == expected[1] and head.input[1] == f"W_lm_Q{expected[1]}"
    check_numerics(out, {"x": RNG.standard_normal((1, 3, 64)).astype(np.float32)}, original)


def test_subgraph_matmul_is_skipped_and_main_graph_quantized(tmp_path, caplog):
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["h", "W_sub"], ["t"], name="inner_mm")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 32])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 32])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="outer_mm"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    inputs = [tensor_info("x", np.float32, [2, 64]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    with caplog.at_level(logging.INFO, logger="olive_int4_pass"):
        original, model, out = quantize(
            tmp_path,
            nodes,
            inputs,
            [tensor_info("y", np.float32, [2, 32])],
            {"W": weight(64, 32), "W_sub": weight(32, 32)},
        )
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "If"]
    assert "inner_mm: inside a subgraph" in caplog.text
    feeds = {"x": RNG.standard_normal((2, 64)).astype(np.float32), "cond": np.array(True)}
    check_numerics(out, feeds, original)


def test_already_quantized_model_is_left_alone(tmp_path, caplog):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    _, model, out = quantize(
        tmp_path,
        nodes,
        [tensor_info("x", np.float32, [2, 64])],
        [tensor_info("y", np.float32, [2, 32])],
        {"W": weight(64, 32)},
    )
    with caplog.at_level(logging.WARNING):
        again = quantize_file(out, tmp_path / "again", progress=False)
    assert "No MatMul" in caplog.text
    twice = load_onnx(again)
    assert [n.op_type for n in twice.graph.node] == ["MatMulNBits"]
    assert initializers(twice).keys() == initializers(model).keys()
    assert all(np.array_equal(initializers(twice)[k], v) for k, v in initializers(model).items())
