"""The package-file layer: genai_config.json accessors, staging and publishing, link-or-copy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from olive_int4_pass.genai import files
from olive_int4_pass.genai.files import (
    GENAI_CONFIG,
    MODEL_NAME,
    GenAIConfig,
    link_or_copy,
    publish,
    publish_folder,
    read_json,
    staged,
)


def write_config(folder: Path, model: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / GENAI_CONFIG).write_text(json.dumps({"model": model}))
    return folder


def test_accessors_read_the_builders_config(builder_exports):
    cpu, cuda = (GenAIConfig.read(builder_exports[k]) for k in ("int4-cpu", "int4-cuda"))
    raw = json.loads((builder_exports["int4-cpu"] / GENAI_CONFIG).read_text())["model"]
    assert cpu.path == builder_exports["int4-cpu"] / GENAI_CONFIG
    assert cpu.decoder == raw["decoder"]
    assert (cpu.decoder_filename, cpu.decoder_path) == ("model.onnx", builder_exports["int4-cpu"] / "model.onnx")
    # The tiny model: 2 KV heads of 16 (hidden 64 / 4 heads), 320 tokens, a 256-token context.
    assert (cpu.num_key_value_heads, cpu.head_size, cpu.vocab_size, cpu.context_length) == (2, 16, 320, 256)
    assert cpu.providers == [] and cuda.providers == ["cuda"]
    assert GenAIConfig.read(builder_exports["int4-cpu"] / GENAI_CONFIG).data == cpu.data  # the file itself


def test_accessors_name_the_file_and_the_entry(tmp_path):
    config = GenAIConfig.read(write_config(tmp_path / "a", {"decoder": {"head_size": "16", "filename": ""}}))
    path = str(tmp_path / "a" / GENAI_CONFIG)
    with pytest.raises(ValueError, match=rf"{path}: model\.decoder\.head_size is missing or not a positive integer"):
        _ = config.head_size
    with pytest.raises(ValueError, match=r"model\.decoder\.num_key_value_heads is missing"):
        _ = config.num_key_value_heads
    with pytest.raises(ValueError, match=r"model\.decoder\.filename is missing"):
        _ = config.decoder_filename
    with pytest.raises(ValueError, match=r"model\.vocab_size"):
        _ = config.vocab_size
    assert config.context_length is None and config.providers == []
    no_decoder = GenAIConfig.read(write_config(tmp_path / "b", {"vocab_size": 7}))
    assert no_decoder.vocab_size == 7
    with pytest.raises(ValueError, match=r"is not an onnxruntime-genai config: it has no model\.decoder section"):
        _ = no_decoder.head_size
    with pytest.raises(ValueError, match=rf"cannot read {tmp_path / 'missing' / GENAI_CONFIG}"):
        GenAIConfig.read(tmp_path / "missing" / GENAI_CONFIG)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="does not hold a JSON object"):
        read_json(tmp_path / "list.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"cannot read .*bad\.json"):
        read_json(tmp_path / "bad.json")


def test_staged_folder_sits_beside_the_target_and_is_removed(tmp_path):
    target = tmp_path / "out"
    with staged(target) as folder:
        assert folder.parent == tmp_path and folder.name.startswith(".out.") and folder.name.endswith(".tmp")
        assert folder.is_dir() and not any(folder.iterdir())
        (folder / "half-written").write_text("x")
    assert list(tmp_path.iterdir()) == []  # nothing published, nothing left
    with pytest.raises(KeyError), staged(target) as folder:
        (folder / "half-written").write_text("x")
        raise KeyError("interrupted")
    assert list(tmp_path.iterdir()) == []
    # Parent folders made for the staging area go again when nothing was published into them.
    with staged(tmp_path / "a" / "b" / "out"):
        assert (tmp_path / "a" / "b").is_dir()
    assert not (tmp_path / "a").exists()
    with staged(tmp_path / "a" / "b" / "out") as folder:
        (folder / "f").write_text("kept")
        publish(folder, tmp_path / "a" / "b" / "out")
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["out"]


def test_publish_moves_the_graph_last_and_keeps_other_files(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "unrelated.txt").write_text("stays")
    (target / "tokenizer.json").write_text("old")
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(files.os, "replace", lambda src, dst: (moved.append(Path(src).name), real_replace(src, dst)))
    with staged(target) as folder:
        for name in (MODEL_NAME, "model.onnx.data", "tokenizer.json", GENAI_CONFIG):
            (folder / name).write_text(f"new {name}")
        (folder / "sub").mkdir()
        publish(folder, target)
    assert moved[-1] == MODEL_NAME  # a model.onnx present means its data is complete
    assert sorted(moved) == sorted([MODEL_NAME, "model.onnx.data", "tokenizer.json", GENAI_CONFIG, "sub"])
    assert (target / "unrelated.txt").read_text() == "stays"
    assert (target / "tokenizer.json").read_text() == "new tokenizer.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    moved.clear()
    with staged(target) as folder:
        (folder / "decoder.onnx").write_text("graph")
        (folder / "weights.bin").write_text("data")
        publish(folder, target, last="decoder.onnx")
    assert moved == ["weights.bin", "decoder.onnx"]


def test_publish_folder_swaps_the_previous_folder_out_whole(tmp_path, monkeypatch):
    target = tmp_path / "pkg"
    for content in ("first", "second"):
        with staged(target) as folder:
            (folder / "out").mkdir()
            (folder / "out" / content).write_text(content)
            publish_folder(folder / "out", target)
        assert [p.name for p in target.iterdir()] == [content]  # no file of the previous folder survives
        assert [p.name for p in tmp_path.iterdir()] == ["pkg"]
    # A failed move puts the previous folder back.
    real_replace = os.replace
    calls = []

    def failing_second_replace(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk trouble")
        real_replace(src, dst)

    with staged(target) as folder:
        (folder / "out").mkdir()
        monkeypatch.setattr(files.os, "replace", failing_second_replace)
        with pytest.raises(OSError, match="disk trouble"):
            publish_folder(folder / "out", target)
        monkeypatch.setattr(files.os, "replace", real_replace)
    assert [p.name for p in target.iterdir()] == ["second"]
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


def test_link_or_copy(tmp_path, monkeypatch):
    src = tmp_path / "model.onnx.data"
    src.write_bytes(b"weights")
    link_or_copy(src, tmp_path / "linked")
    assert (tmp_path / "linked").stat().st_ino == src.stat().st_ino  # a hard link, not a copy

    def no_links(src, dst):
        raise OSError("cross-device link")

    monkeypatch.setattr(files.os, "link", no_links)
    link_or_copy(src, tmp_path / "copied")
    assert (tmp_path / "copied").read_bytes() == b"weights"
    assert (tmp_path / "copied").stat().st_ino != src.stat().st_ino
