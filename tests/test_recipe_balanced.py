"""``olive run --config recipes/deepseek_int4_balanced.yaml -m <tiny model>``: a package named for the preset, with
the preset's weights (zero points, calibrated scales), that onnxruntime-genai loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from onnx_helpers import initializers, load_onnx, nodes_of

from olive_int4_pass.genai.chat import generate, load_model
from olive_int4_pass.genai.files import PACKAGE_FILES

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CI": "1", "OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}


def test_balanced_recipe_end_to_end(exports, tmp_path):
    built = exports("qwen2")
    cmd = [sys.executable, "-m", "olive", "run", "--config", str(ROOT / "recipes" / "deepseek_int4_balanced.yaml")]
    cmd += ["-m", str(built["hf"]), "-o", str(tmp_path / "out")]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    package = tmp_path / "out" / "gpu" / "gpu-int4-balanced-block-32"
    assert {p.name for p in package.iterdir()} == set(PACKAGE_FILES)
    assert not (tmp_path / "out" / "gpu" / "gpu-int4-rtn-block-32").exists()

    ours, rtn = load_onnx(package / "model.onnx"), load_onnx(built["int4-cuda"] / "model.onnx")
    ours_nodes = {n.name: n for n in nodes_of(ours, "MatMulNBits")}
    rtn_nodes = {n.name: n for n in nodes_of(rtn, "MatMulNBits")}
    assert ours_nodes.keys() == rtn_nodes.keys()
    assert all(len(n.input) >= 4 and n.input[3] for n in ours_nodes.values())  # zero points: asymmetric
    ours_init, rtn_init = initializers(ours), initializers(rtn)
    differing = [
        name
        for name, node in ours_nodes.items()
        if not np.array_equal(ours_init[node.input[1]], rtn_init.get(rtn_nodes[name].input[1]))
    ]
    assert set(differing) == set(ours_nodes)  # not the published RTN bytes, anywhere

    model = load_model(package, cpu=True)  # the cuda package runs on CPU here
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(model)
    tokens = generate(model, list(tokenizer.encode("The quick brown fox")), 8, greedy=True)
    vocab = int(json.loads((package / "genai_config.json").read_text())["model"]["vocab_size"])
    assert len(tokens) >= 1 and all(0 <= t < vocab for t in tokens)
