"""``sensitivity_depth``: probes that run a few layers exactly, then carry their change to the residual stream (scaled
with the stream's size) to the last layers. Exact when the skipped layers add nothing to the stream."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import run_builders, save_tiny_model

from olive_int4_pass.kernels.rtn import dequantize_blockwise, quantize_blockwise
from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.plan import sensitivity
from olive_int4_pass.plan.candidates import plan_graph
from olive_int4_pass.plan.sensitivity import LayeredImpactProbe, group_by_layer


def _hf(root, silent_layers=()):
    """A 4-layer random Qwen2 (its fp32 export is the job returned); ``silent_layers`` write nothing to the residual
    stream (o_proj and down_proj zero), so a change carried across them is exactly what running them gives."""
    from safetensors.torch import load_file, save_file

    hf = save_tiny_model(root / "hf", num_layers=4)
    path = hf / "model.safetensors"
    tensors = load_file(str(path))
    for i in silent_layers:
        for name in (f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"):
            tensors[name].zero_()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return hf, root / "fp32", "fp32", "cpu", root / "cache"


def _measure(model_path, depth):
    import onnx_ir as ir

    candidates = plan_graph(ir.load(model_path).graph, QuantizeOptions()).candidates
    names = {k: c.name for k, c in candidates.items()}
    groups = group_by_layer({k: c.nodes for k, c in candidates.items()}, names)

    def replacement(key):
        cand = candidates[key]
        q = quantize_blockwise(np.asarray(cand.weight()), block_size=32, bits=4)
        return cand.name, dequantize_blockwise(q, np.float32, transposed=cand.transposed)

    loaders = {c.name: (lambda c=c: c.weight().T if c.transposed else c.weight()) for c in candidates.values()}
    return LayeredImpactProbe(model_path, loaders, list(range(5, 69)), depth).measure(groups, names, replacement)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth")
    jobs = {"silent": _hf(root / "silent", silent_layers=(1, 2)), "plain": _hf(root / "plain")}
    run_builders(list(jobs.values()))
    return {name: job[1] / "model.onnx" for name, job in jobs.items()}


def test_a_carried_change_is_exact_across_layers_that_add_nothing(models, monkeypatch):
    carried = []
    with_change = sensitivity._with_change
    monkeypatch.setattr(sensitivity, "_with_change", lambda *a: carried.append(a) or with_change(*a))
    exact = _measure(models["silent"], None)
    assert not carried
    shallow = _measure(models["silent"], 1)
    # Layer 0's probe skipped layers 1 and 2 (layer 1's, silent, carried no change; layer 3 and the norm run exactly).
    assert [a[2].size > 0 for a in carried] == [True, False]
    assert exact.keys() == shallow.keys()
    assert exact["layer 0"] > 0
    for group, kl in exact.items():
        np.testing.assert_allclose(shallow[group], kl, rtol=1e-4, atol=1e-9, err_msg=group)


def test_a_carried_change_is_an_estimate_where_layers_transform_it(models):
    exact, shallow, deep = _measure(models["plain"], None), _measure(models["plain"], 1), _measure(models["plain"], 4)
    assert shallow["layer 0"] > 0 and np.isfinite(shallow["layer 0"])
    assert not np.isclose(shallow["layer 0"], exact["layer 0"], rtol=1e-3)  # the skipped layers did change it
    for group in ("layer 3", next(g for g in exact if g.startswith("weight"))):  # probes that start late run exactly
        np.testing.assert_allclose(shallow[group], exact[group], rtol=1e-4)
    assert deep == pytest.approx(exact, rel=1e-6)  # a depth reaching the logits is the exact measure


def test_the_option_is_checked():
    with pytest.raises(ValueError, match="sensitivity_depth"):
        QuantizeOptions(quality="max", sensitivity_depth=-1)
    assert QuantizeOptions().sensitivity_depth == 0
