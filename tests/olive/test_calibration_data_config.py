"""Calibration from an Olive data config: the pass reads the batches' input_ids and calibrates on those token ids."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hf_reference import hf_second_moments
from onnx_helpers import initializers, load_onnx

from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.pipeline import quantize_file
from olive_int4_pass.plan.calibration import input_second_moments, token_ids_from_batches

# A user's script as Olive imports it: a registered load_dataset returning Olive-style (inputs, label) items,
# padded to one width so that the default dataloader can batch them (the attention_mask marks the padding).
USER_SCRIPT = textwrap.dedent(
    """
    import json

    import numpy as np
    import torch
    from olive.data.registry import Registry


    @Registry.register_dataset()
    def int4_token_rows(path, width=48, pad_id=0):
        items = []
        for row in json.loads(open(path).read()):
            ids = np.full(width, pad_id, np.int64)
            ids[: len(row)] = row
            mask = (np.arange(width) < len(row)).astype(np.int64)
            items.append(({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}, 0))
        return items


    @Registry.register_dataset()
    def int4_no_input_ids():
        return [({"tokens": torch.zeros(8, dtype=torch.int64)}, 0)]


    @Registry.register_dataset()
    def int4_broken_dataset():
        return {}["missing"]
    """
)
VOCAB = 320  # the tiny models' tokenizer


def token_rows(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 300, n).tolist() for n in (40, 30, 25)]  # three samples, two batches of two


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("user_script") / "calibration_data.py"
    path.write_text(USER_SCRIPT)
    return path


def data_config(script, name: str, dataset: str, **params) -> dict:
    return {
        "name": name,
        "user_script": str(script),
        "load_dataset_config": {"type": dataset, "params": params},
        "dataloader_config": {"params": {"batch_size": 2}},
    }


def workflow(model_dir, output_dir, config: dict, **pass_config) -> dict:
    return {
        "input_model": {"type": "ONNXModel", "model_path": str(model_dir), "onnx_file_name": "model.onnx"},
        "data_configs": [config],
        "passes": {"int4": {"type": "OnnxInt4RtnQuantization", "data_config": config["name"], **pass_config}},
        "output_dir": str(output_dir),
        "log_severity_level": 1,
    }


def test_olive_workflow_calibrates_on_the_data_config(exports, script, tmp_path):
    built = exports("qwen2")["fp32-cpu"]
    rows = {}
    for seed in (0, 1):
        rows[seed] = token_rows(seed)
        (tmp_path / f"rows{seed}.json").write_text(json.dumps(rows[seed]))

    def config(seed: int, out: str, **pass_config) -> dict:
        dc = data_config(script, f"rows{seed}", "int4_token_rows", path=str(tmp_path / f"rows{seed}.json"))
        return workflow(built, tmp_path / out, dc, **pass_config)

    (tmp_path / "text.txt").write_text("some calibration text " * 20)
    (tmp_path / "empty.json").write_text("[]")
    empty = data_config(script, "empty", "int4_token_rows", path=str(tmp_path / "empty.json"))
    good = [config(0, "olive_a", quality="balanced"), config(1, "olive_b", quality="balanced")]
    bad = [
        config(0, "both", quality="balanced", calibration=str(tmp_path / "text.txt")),
        workflow(built, tmp_path / "empty", empty, quality="balanced"),
    ]
    code = textwrap.dedent(
        """
        import json, sys
        from olive.workflows import run
        for config in json.loads(sys.argv[1]):
            run(config)
        for config in json.loads(sys.argv[2]):
            try:
                run(config)
                print("NOT RAISED")
            except (ValueError, TypeError) as e:
                print("RAISED:", type(e).__name__, str(e).replace(chr(10), " "))
        """
    )
    # CI=1: Olive skips telemetry, which otherwise waits ~10 s for the network at exit.
    env = {**os.environ, "OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "CI": "1"}
    cmd = [sys.executable, "-c", code, json.dumps(good), json.dumps(bad)]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    raised = [line for line in result.stdout.splitlines() if line.startswith(("RAISED", "NOT RAISED"))]
    assert len(raised) == 2, result.stdout[-3000:]
    # Refused when Olive reads the config (a pydantic ValidationError, which is a ValueError), before any run.
    assert raised[0].startswith("RAISED: ") and "were both given" in raised[0]
    assert raised[1].startswith("RAISED: ValueError") and "gave no tokens" in raised[1]
    assert not (tmp_path / "both" / "model.onnx").exists() and not (tmp_path / "empty" / "model.onnx").exists()

    # The same token ids handed to quantize_file directly: identical bytes (the padding was dropped).
    direct = quantize_file(
        built / "model.onnx",
        tmp_path / "direct_a",
        QuantizeOptions(quality="balanced"),
        calibration_ids=rows[0],
        progress=False,
    )
    olive_a, olive_b = tmp_path / "olive_a", tmp_path / "olive_b"
    assert digest(olive_a / "model.onnx.data") == digest(direct.parent / "model.onnx.data")
    scales = {k: v for k, v in initializers(load_onnx(olive_a / "model.onnx")).items() if k.endswith("_scales")}
    direct_scales = initializers(load_onnx(direct))
    assert scales and all(np.array_equal(v, direct_scales[k]) for k, v in scales.items())
    # Different ids: different scales.
    other = initializers(load_onnx(olive_b / "model.onnx"))
    assert any(not np.array_equal(v, other[k]) for k, v in scales.items() if k in other)


def test_data_config_batches_become_unpadded_samples(script, tmp_path):
    from olive_int4_pass.olive.quantize_pass import calibration_ids_from_data_config

    rows = token_rows(0)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    config = data_config(script, "rows", "int4_token_rows", path=str(tmp_path / "rows.json"))
    assert calibration_ids_from_data_config(config, 2048) == rows
    # Capped at max_tokens: the second sample is cut and the rest is not read.
    assert calibration_ids_from_data_config(config, 50) == [rows[0], rows[1][:10]]


def test_bad_data_configs_raise_typed_errors(script, tmp_path):
    from olive_int4_pass.olive.quantize_pass import calibration_ids_from_data_config

    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="gave no tokens"):
        calibration_ids_from_data_config(
            data_config(script, "e", "int4_token_rows", path=str(tmp_path / "empty.json")), 64
        )
    with pytest.raises(ValueError, match="has no input_ids"):
        calibration_ids_from_data_config(data_config(script, "n", "int4_no_input_ids"), 64)
    # A user's load_dataset failing with a KeyError still fails the pass with a typed error.
    with pytest.raises(ValueError, match="reading the calibration data failed: KeyError"):
        calibration_ids_from_data_config(data_config(script, "b", "int4_broken_dataset"), 64)


def test_batches_are_checked():
    ids = np.arange(20).reshape(2, 10)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    assert token_ids_from_batches([{"input_ids": ids, "attention_mask": mask}], 100) == [
        list(range(10)),
        list(range(10, 16)),
    ]
    assert token_ids_from_batches([{"input_ids": [[1, 2, 3], [4]]}], 100) == [[1, 2, 3], [4]]  # ragged lists
    with pytest.raises(ValueError, match=r"no tokens \(0 batches read\)"):
        token_ids_from_batches([], 100)
    with pytest.raises(TypeError, match="expected a dict with input_ids"):
        token_ids_from_batches([np.zeros((1, 4), np.int64)], 100)
    with pytest.raises(TypeError, match="integer token ids"):
        token_ids_from_batches([{"input_ids": np.zeros((1, 4), np.float32)}], 100)
    with pytest.raises(TypeError, match="list of tensors"):
        token_ids_from_batches([{"input_ids": [np.array([1]), np.array([2])]}], 100)  # a collated Python list
    with pytest.raises(ValueError, match="attention_mask does not have the shape"):
        token_ids_from_batches([{"input_ids": ids, "attention_mask": mask[:, :5]}], 100)


def test_bad_calibration_ids_raise_typed_errors(exports, tmp_path):
    src = exports("qwen2")["fp32-cpu"] / "model.onnx"
    options = QuantizeOptions(quality="balanced")

    def run(ids, options=options):
        quantize_file(src, tmp_path / "out", options, calibration_ids=ids, progress=False)

    with pytest.raises(ValueError, match=rf"token id {VOCAB} in sample 1 is outside the vocabulary \[0, {VOCAB}\)"):
        run([[1] * 20, [2, VOCAB]])
    with pytest.raises(ValueError, match="token id -1 in sample 0"):
        run([[-1] * 20])
    with pytest.raises(TypeError, match="a list of samples"):
        run(list(range(40)))  # one flat sequence: must be [ids]
    with pytest.raises(TypeError, match="a list of samples"):
        run([[0.5] * 20])
    with pytest.raises(ValueError, match="only 3 tokens"):
        run([[1, 2, 3], []])
    (tmp_path / "text.txt").write_text("calibration text " * 20)
    with pytest.raises(ValueError, match="were both given"):
        run([[1] * 20], QuantizeOptions(calibration=str(tmp_path / "text.txt"), scale_search=True))
    assert not (tmp_path / "out").exists()


def test_samples_run_as_separate_sequences(exports):
    """Against the Hugging Face model run in torch on the windows each sample should give (hooks on o_proj)."""
    built = exports("qwen2")
    after_attention = "/model/layers.0/attn/GroupQueryAttention/output_0"  # depends on the tokens before it
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 300, 20).tolist(), rng.integers(0, 300, 12).tolist()

    def moments(ids):
        return input_second_moments(built["fp32-cpu"] / "model.onnx", [after_attention], ids, window=16)[
            after_attention
        ]

    def hf(windows):
        return hf_second_moments(built["hf"], windows, [after_attention])[after_attention]

    # Each sample is windowed on its own ([0:16], [16:20] and [0:12]); the mean is over all 32 tokens.
    separate = hf([a[:16], a[16:], b])
    np.testing.assert_allclose(moments([a, b]), separate, rtol=1e-5)
    # One flat sequence: b's tokens see a's context, in windows [0:16] and [16:32].
    flat = hf([(a + b)[:16], (a + b)[16:]])
    np.testing.assert_allclose(moments(a + b), flat, rtol=1e-5)
    assert not np.allclose(flat, separate, rtol=1e-3)  # the two are told apart
