"""``rotate_residual_stream`` on genai-builder exports of tiny Qwen2 (untied) and Llama (tied) models: the float
model's logits do not change, norms are folded, a tied table stays tied, and a graph it cannot rotate is refused
untouched."""

from __future__ import annotations

import shutil

import numpy as np
import onnx_ir as ir
import pytest

from olive_int4_pass.genai.decoder import DecoderRunner, log_softmax
from olive_int4_pass.rewrite.rotation import rotate_residual_stream

IDS = [3, 17, 42, 5, 99, 7, 64, 23, 11, 88, 2, 31]
NORMS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


def with_random_norms(export, folder):
    """A copy of ``export`` whose norm weights are random (the tiny models' are all ones, which folds to nothing)."""
    shutil.copytree(export, folder)
    model = ir.load(folder / "model.onnx")
    rng = np.random.default_rng(0)
    for node in model.graph:
        if node.op_type in NORMS:
            gamma = node.inputs[-1] if node.op_type == NORMS[0] else node.inputs[2]
            array = gamma.const_value.numpy()
            gamma.const_value = ir.tensor(rng.uniform(0.3, 3.0, array.shape).astype(array.dtype), name=gamma.name)
    ir.save(model, folder / "model.onnx", external_data="model.onnx.data")
    return folder / "model.onnx"


def rotated(source, folder, seed=0):
    model = ir.load(source)
    summary = rotate_residual_stream(model, seed)
    folder.mkdir()
    for f in source.parent.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, folder)
    ir.save(model, folder / "model.onnx", external_data="model.onnx.data")
    return folder / "model.onnx", summary


def log_probs(path):
    return log_softmax(DecoderRunner(path).logits(IDS))


@pytest.mark.parametrize(("arch", "tied", "target"), [("qwen2", False, "fp32-cpu"), ("llama", True, "fp32-cpu")])
def test_the_float_model_computes_the_same(exports, tmp_path, arch, tied, target):
    source = with_random_norms(exports(arch, tied)[target].parent / target, tmp_path / "src")
    out, summary = rotated(source, tmp_path / "rot")
    ref, got = log_probs(source), log_probs(out)
    np.testing.assert_allclose(got, ref, atol=2e-4)
    assert summary.tied is tied
    layers = summary.norms // 2
    assert summary.writers == 2 * layers  # o_proj and down_proj of every layer
    model = ir.load(out)
    for node in model.graph:
        if node.op_type in NORMS:
            gamma = node.inputs[1] if node.op_type == NORMS[0] else node.inputs[2]
            np.testing.assert_array_equal(gamma.const_value.numpy(), 1.0)
    original = ir.load(source)
    qkv = "model.layers.0.attn.qkv_proj.MatMul.weight"
    changed = model.graph.initializers[qkv].const_value.numpy() - original.graph.initializers[qkv].const_value.numpy()
    assert np.abs(changed).max() > 0.01
    embedding = next(n for n in model.graph if n.name.endswith("embed_tokens/Gather"))
    # tied: still Gather(Transpose(lm_head weight)), one table for both
    assert (embedding.inputs[0].producer() is not None) is tied
    if tied:
        assert any(n.name == "/model/final_norm_rotation/MatMul" for n in model.graph)


def test_half_precision_export(exports, tmp_path):
    source = with_random_norms(exports("qwen2", False)["fp16-cuda"], tmp_path / "src")
    out, _ = rotated(source, tmp_path / "rot")
    ref, got = log_probs(source), log_probs(out)
    kl = float((np.exp(ref) * (ref - got)).sum(-1).mean())
    assert kl < 1e-4, kl  # the rotated weights are rounded to float16 again: close, not equal


def test_the_seed_changes_the_weights_not_the_function(exports, tmp_path):
    source = exports("qwen2", False)["fp32-cpu"] / "model.onnx"
    a, _ = rotated(source, tmp_path / "a", seed=1)
    b, _ = rotated(source, tmp_path / "b", seed=2)
    np.testing.assert_allclose(log_probs(a), log_probs(b), atol=2e-4)
    wa, wb = (ir.load(p).graph.initializers["lm_head.MatMul.weight"].const_value.numpy() for p in (a, b))
    assert np.abs(wa - wb).max() > 0.01


def test_a_graph_it_cannot_rotate_is_refused_unchanged(exports, tmp_path):
    model = ir.load(exports("qwen2", False)["fp32-cpu"] / "model.onnx")
    # a node other than a norm now reads the stream: the embedding's output also feeds an Identity
    gather = next(n for n in model.graph if n.op_type == "Gather" and n.name.endswith("embed_tokens/Gather"))
    extra = ir.Node("", "Identity", [gather.outputs[0]], name="/extra/Identity")
    model.graph.insert_after(gather, extra)
    before = {name: v.const_value for name, v in model.graph.initializers.items()}
    with pytest.raises(ValueError, match=r"Identity.*reads the residual stream"):
        rotate_residual_stream(model)
    assert {name: v.const_value for name, v in model.graph.initializers.items()} == before
