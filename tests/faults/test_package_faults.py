"""Faults on the way to an onnxruntime-genai package: a package is published only if it loads, generates, and its
tokenizer round-trips text through the model's own vocabulary."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from olive_int4_pass.genai.export import export_hf_model
from olive_int4_pass.genai.packaging import build_package
from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.pipeline import quantize_file


def test_a_folder_without_tokenizer_json_gives_no_package(tiny_qwen2, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_qwen2, hf)
    (hf / "tokenizer.json").unlink()  # the builder then rebuilds a tokenizer that encodes text as -1s
    model = export_hf_model(hf, tmp_path / "export", execution_provider="cpu")
    quantized = quantize_file(model, tmp_path / "int4", QuantizeOptions(accuracy_level=4), progress=False)
    side = {p.name: str(p) for p in model.parent.iterdir() if p.suffix in (".json", ".jinja")}
    with pytest.raises(ValueError, match="outside the model's vocabulary") as error:
        build_package(quantized, side, tmp_path / "pkg", "cpu")
    assert str(tmp_path / "export" / "tokenizer.json") in str(error.value)  # names the file
    assert not [p for p in (tmp_path / "pkg").rglob("*") if p.is_file()]  # nothing published


def test_the_same_folder_with_its_tokenizer_is_published(tiny_qwen2, tmp_path):
    model = export_hf_model(tiny_qwen2, tmp_path / "export", execution_provider="cpu")
    quantized = quantize_file(model, tmp_path / "int4", QuantizeOptions(accuracy_level=4), progress=False)
    side = {p.name: str(p) for p in model.parent.iterdir() if p.suffix in (".json", ".jinja")}
    package = build_package(quantized, side, tmp_path / "pkg", "cpu")
    assert (Path(package) / "tokenizer.json").is_file() and (Path(package) / "model.onnx").is_file()
