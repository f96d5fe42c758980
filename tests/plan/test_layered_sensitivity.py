"""Measured sensitivity layer by layer: the same per-group KLs as the whole-model probe, so ``max`` chooses the same
8-bit tensors, with one onnxruntime session per layer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from olive_int4_pass.kernels.rtn import dequantize_blockwise, quantize_blockwise
from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.pipeline import quantize_file
from olive_int4_pass.plan import prepare
from olive_int4_pass.plan.candidates import plan_graph
from olive_int4_pass.plan.sensitivity import ImpactProbe, LayeredImpactProbe, group_by_layer, measure_groups


@pytest.mark.parametrize(("arch", "tied", "target"), [("qwen2", True, "fp32-cpu"), ("llama", False, "fp16-cuda")])
def test_layered_kls_equal_the_whole_model_ones(exports, arch, tied, target):
    import onnx_ir as ir

    model_path = exports(arch, tied=tied)[target] / "model.onnx"
    planning = plan_graph(ir.load(model_path).graph, QuantizeOptions())
    candidates = planning.candidates
    weights = {}
    for cand in candidates.values():
        w = cand.weight()
        weights[cand.name] = w.T if cand.transposed else w
    groups = group_by_layer({k: c.nodes for k, c in candidates.items()}, {k: c.name for k, c in candidates.items()})

    def replacement(key):
        cand = candidates[key]
        q = quantize_blockwise(np.asarray(cand.weight()), block_size=32, bits=4)
        w = dequantize_blockwise(q).astype(cand.source.dtype.numpy())
        return cand.name, np.ascontiguousarray(w.T if cand.transposed else w)

    ids = list(range(5, 69))
    whole = measure_groups(ImpactProbe(model_path, weights, ids), groups, replacement)
    loaders = {name: (lambda w=w: w) for name, w in weights.items()}
    probe = LayeredImpactProbe(model_path, loaders, ids)
    assert probe.head is not None  # the lm_head is computed in vocabulary chunks, outside onnxruntime
    layered = probe.measure(groups, {k: c.name for k, c in candidates.items()}, replacement)
    assert whole.keys() == layered.keys() and len(whole) == 3  # two layers and the lm_head
    for group, kl in whole.items():
        assert kl > 0
        np.testing.assert_allclose(layered[group], kl, rtol=2e-3 if target.startswith("fp16") else 1e-4, err_msg=group)


def test_max_chooses_the_same_bits_either_way(exports, tmp_path, monkeypatch):
    model = exports("qwen2")["fp32-cpu"] / "model.onnx"
    options = QuantizeOptions(quality="max", sensitivity_tokens=64, calibration_tokens=256)
    layered = quantize_file(model, tmp_path / "layered", options, progress=False)

    def whole_probe(candidates, tokens, model_path, token_ids, depth=0):
        sample = list(prepare._sequences(token_ids)[0][:tokens])
        weights = {c.name: (c.weight().T if c.transposed else c.weight()) for c in candidates.values()}
        return ImpactProbe(model_path, weights, sample)

    monkeypatch.setattr(prepare, "impact_probe", whole_probe)  # the whole-model probe, as before
    whole = quantize_file(model, tmp_path / "whole", options, progress=False)
    reports = [json.loads((p.parent / "quantization_report.json").read_text()) for p in (layered, whole)]
    bits = [{k: v["bits"] for k, v in r["weights_worst_first"].items()} for r in reports]
    assert bits[0] == bits[1]
    kls = [r["measured_kl_by_group"] for r in reports]
    assert kls[0].keys() == kls[1].keys()
    for group in kls[0]:
        np.testing.assert_allclose(kls[0][group], kls[1][group], rtol=1e-4, err_msg=group)
