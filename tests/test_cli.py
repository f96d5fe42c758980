"""``olive-int4 quantize`` / ``python -m olive_int4_pass``: same code path as the pass, clear errors, exit codes."""

import subprocess
import sys

import numpy as np
from hf_reference import ort_greedy
from onnx import helper
from onnx_helpers import attrs, load_onnx, make_model, tensor_info

from olive_int4_pass.cli import main


def small_model(path):
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    make_model(nodes, [tensor_info("x", np.float32, [2, 64])], [tensor_info("y", np.float32, [2, 32])], {"W": w}, path)
    return path


def test_module_entry_point(tmp_path):
    src = small_model(tmp_path / "in" / "model.onnx")
    cmd = [
        sys.executable,
        "-m",
        "olive_int4_pass",
        "quantize",
        str(src),
        str(tmp_path / "out"),
        "--accuracy-level",
        "4",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("model.onnx")
    (node,) = load_onnx(tmp_path / "out" / "model.onnx").graph.node
    assert attrs(node)["accuracy_level"] == 4


def test_options_reach_the_quantizer(tmp_path):
    src = small_model(tmp_path / "in" / "model.onnx")
    assert main(["quantize", str(src), str(tmp_path / "out"), "--bits", "8", "--asymmetric", "--quiet"]) == 0
    (node,) = load_onnx(tmp_path / "out" / "model.onnx").graph.node
    assert attrs(node)["bits"] == 8 and len(node.input) == 4  # zero points


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "missing.onnx"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    src = small_model(tmp_path / "in" / "model.onnx")
    assert main(["quantize", str(src), str(tmp_path / "out"), "--block-size", "12"]) == 2
    assert "power of two" in capsys.readouterr().err
    assert main(["quantize", str(src), str(tmp_path / "out"), "--sensitivity", "measured"]) == 2
    assert "set mixed_precision_budget" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_chat_subcommand_generates_from_a_package(builder_exports, capsys):
    """``olive-int4 chat`` prints the greedy answer a plain onnxruntime loop over the package's model gives."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    package, hf = builder_exports["int4-cpu"], builder_exports["hf"]
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    messages = [{"role": "user", "content": "The quick brown fox"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    reference = ort_greedy(package / "model.onnx", package, tokenizer(text, add_special_tokens=False)["input_ids"], 4)
    expected = Tokenizer.from_file(str(hf / "tokenizer.json")).decode(reference)
    code = main(["chat", str(package), "-p", "The quick brown fox", "--greedy", "--cpu", "--max-new-tokens", "4"])
    assert code == 0
    # The token stream holds back the bytes of an unfinished UTF-8 character; batch decode shows them as U+FFFD.
    assert capsys.readouterr().out == expected.replace("\ufffd", "") + "\n"
