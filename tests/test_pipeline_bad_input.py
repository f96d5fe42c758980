"""Bad input: a clear typed error, the input untouched, and no output (not even a half-written one)."""

import hashlib
import logging
import os

import numpy as np
import pytest
from onnx import helper
from onnx_helpers import load_onnx, make_model, run, tensor_info

from olive_int4_pass.cli import main
from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.pipeline import InvalidModelError, quantize_file


def small_model(path, w=None):
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32) if w is None else w
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    make_model(nodes, [tensor_info("x", np.float32, [2, 64])], [tensor_info("y", np.float32, [2, 32])], {"W": w}, path)
    return path


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def assert_fails_cleanly(tmp_path, src, error, match, **kwargs):
    before = digest(src.parent) if src.parent.exists() else None
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        quantize_file(src, out, progress=False, **kwargs)
    assert not out.exists(), "no output on failure"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "temporary folder left behind"
    if before is not None:
        assert digest(src.parent) == before, "input modified"


def test_missing_path(tmp_path):
    assert_fails_cleanly(tmp_path, tmp_path / "nope" / "model.onnx", InvalidModelError, "does not exist")


def test_not_an_onnx_file(tmp_path):
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    src.write_bytes(b"\x00\xffthis is not protobuf" * 10)
    assert_fails_cleanly(tmp_path, src, InvalidModelError, "not a readable ONNX model")


def test_missing_external_data(tmp_path):
    src = small_model(tmp_path / "in" / "model.onnx")
    (src.parent / "model.onnx.data").unlink()
    assert_fails_cleanly(tmp_path, src, InvalidModelError, "external data file .* of tensor 'W' is missing")


def test_truncated_external_data(tmp_path):
    src = small_model(tmp_path / "in" / "model.onnx")
    data = src.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    assert_fails_cleanly(tmp_path, src, InvalidModelError, "is truncated: tensor 'W'")


@pytest.mark.parametrize("block_size", [0, 12, 48])
def test_bad_block_size(tmp_path, capsys, block_size):
    """Refused before anything is read or written: by QuantizeOptions (Python, the Olive pass) and the CLI."""
    src = small_model(tmp_path / "in" / "model.onnx")
    before = digest(src.parent)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="power of two >= 16"):
        quantize_file(src, out, QuantizeOptions(block_size=block_size), progress=False)
    assert main(["quantize", str(src), str(out), "--block-size", str(block_size)]) == 2
    assert "power of two" in capsys.readouterr().err
    assert not out.exists(), "no output on failure"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"], "a temporary folder was left behind"
    assert digest(src.parent) == before, "input modified"


def test_nan_weight_names_the_tensor(tmp_path):
    w = np.ones((64, 32), np.float32)
    w[3, 4] = np.nan
    src = small_model(tmp_path / "in" / "model.onnx", w)
    assert_fails_cleanly(tmp_path, src, ValueError, "weight 'W' has 1 non-finite")


def test_output_may_not_overwrite_the_input(tmp_path):
    src = small_model(tmp_path / "in" / "model.onnx")
    before = digest(src.parent)
    with pytest.raises(InvalidModelError, match="overwrite the input"):
        quantize_file(src, src.parent, progress=False)
    assert digest(src.parent) == before


def test_no_quantizable_matmul_writes_a_valid_unchanged_model(tmp_path, caplog):
    src = tmp_path / "in" / "model.onnx"
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    make_model(nodes, [tensor_info("x", np.float32, [2, 4])], [tensor_info("y", np.float32, [2, 4])], {}, src)
    with caplog.at_level(logging.WARNING):
        out = quantize_file(src, tmp_path / "out", progress=False)
    assert "No MatMul" in caplog.text
    model = load_onnx(out)
    assert [n.op_type for n in model.graph.node] == ["Relu"]
    x = np.array([[-1, 2, -3, 4]] * 2, np.float32)
    np.testing.assert_array_equal(run(out, {"x": x})[0], np.maximum(x, 0))


def test_same_input_gives_identical_bytes_and_the_input_is_untouched(tmp_path):
    src = small_model(tmp_path / "in" / "model.onnx")
    before = digest(src.parent)
    quantize_file(src, tmp_path / "a", progress=False)
    quantize_file(src, tmp_path / "b", progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert sorted(os.listdir(tmp_path / "a")) == ["model.onnx", "model.onnx.data", "quantization_report.json"]
    assert digest(src.parent) == before


def test_folder_input_and_single_file_output(tmp_path):
    src = small_model(tmp_path / "in" / "model.onnx")
    out = quantize_file(src.parent, tmp_path / "out", external_data_name=None, progress=False)
    assert sorted(os.listdir(out.parent)) == ["model.onnx", "quantization_report.json"]
    assert [n.op_type for n in load_onnx(out).graph.node] == ["MatMulNBits"]
