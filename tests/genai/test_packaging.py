"""GenAIModelExport's export function, GenAIPackaging's pieces and the chat command, without Olive (in process).

Uses the session fixtures of conftest.py: ``tiny_qwen2`` (random Qwen2, DeepSeek-style tokenizer) and
``builder_exports`` (the genai builder's fp32/cpu, int4/cpu, fp16/cuda and int4/cuda exports of it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from hf_reference import check_greedy_tokens, ort_greedy
from onnx_helpers import load_onnx
from tiny_models import BOS, EOS
from tokenizers import Tokenizer

from olive_int4_pass.genai import chat as genai_chat
from olive_int4_pass.genai.export import export_hf_model, resolve_hf_dir
from olive_int4_pass.genai.files import PACKAGE_FILES
from olive_int4_pass.genai.packaging import (
    build_package,
    package_dir_name,
    patch_genai_config,
    special_tokens_map,
)

SIDE = ("genai_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def side_files(folder: Path, hf_dir: Path | None = None) -> dict[str, Path]:
    files = {name: folder / name for name in SIDE if (folder / name).is_file()}
    if hf_dir is not None:
        files["generation_config.json"] = hf_dir / "generation_config.json"
    return files


@pytest.fixture(scope="module")
def our_export(tiny_qwen2, tmp_path_factory) -> Path:
    return export_hf_model(tiny_qwen2, tmp_path_factory.mktemp("export") / "out", execution_provider="cpu").parent


def test_package_dir_name_follows_the_published_names(builder_exports):
    assert package_dir_name(builder_exports["int4-cuda"] / "model.onnx", "cuda") == "gpu/gpu-int4-rtn-block-32"
    cpu = package_dir_name(builder_exports["int4-cpu"] / "model.onnx", "cpu")
    assert cpu == "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"
    with pytest.raises(ValueError, match="no MatMulNBits"):
        package_dir_name(builder_exports["fp32-cpu"] / "model.onnx", "cpu")
    with pytest.raises(ValueError, match="execution_provider"):
        package_dir_name(builder_exports["int4-cpu"] / "model.onnx", "dml")


def test_patch_genai_config(builder_exports):
    cpu_config = json.loads((builder_exports["int4-cpu"] / "genai_config.json").read_text())
    cuda_config = json.loads((builder_exports["int4-cuda"] / "genai_config.json").read_text())
    assert cpu_config["model"]["decoder"]["session_options"]["provider_options"] == []
    generation = {"temperature": 0.6, "top_p": 0.95, "do_sample": True, "eos_token_id": [1, 5], "top_k": None}

    gpu = patch_genai_config(cpu_config, "cuda", generation_config=generation)
    assert gpu["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    assert gpu["model"]["eos_token_id"] == [1, 5]
    assert gpu["search"]["temperature"] == 0.6 and gpu["search"]["top_p"] == 0.95 and gpu["search"]["do_sample"]
    assert gpu["search"]["top_k"] == cpu_config["search"]["top_k"]  # None in generation_config: keep
    assert cpu_config["model"]["decoder"]["session_options"]["provider_options"] == []  # input left alone
    # The builder's cuda options are kept for gpu; cpu drops every provider.
    cuda_options = cuda_config["model"]["decoder"]["session_options"]["provider_options"]
    assert patch_genai_config(cuda_config, "cuda")["model"]["decoder"]["session_options"]["provider_options"] == (
        cuda_options
    )
    assert patch_genai_config(cuda_config, "cpu")["model"]["decoder"]["session_options"]["provider_options"] == []

    small = patch_genai_config(cpu_config, "cpu", context_length=128, search={"temperature": 0.3, "top_k": 5})
    assert small["model"]["context_length"] == 128 and small["search"]["max_length"] == 128
    assert small["search"]["temperature"] == 0.3 and small["search"]["top_k"] == 5
    with pytest.raises(ValueError, match="execution_provider"):
        patch_genai_config(cpu_config, "gpu")
    with pytest.raises(ValueError, match="context_length"):
        patch_genai_config(cpu_config, "cpu", context_length=0)


def test_special_tokens_map(tiny_qwen2):
    tokenizer_json = json.loads((tiny_qwen2 / "tokenizer.json").read_text())
    config = json.loads((tiny_qwen2 / "tokenizer_config.json").read_text())
    result = special_tokens_map({**config, "unk_token": "<|endoftext|>"}, tokenizer_json)
    assert result["bos_token"] == {
        "content": BOS,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }
    assert result["eos_token"]["content"] == EOS and result["pad_token"]["content"] == "<｜▁pad▁｜>"
    assert "unk_token" not in result  # not in this vocabulary
    assert result["additional_special_tokens"] == ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]


def test_builder_resave_alters_the_tokenizer_so_the_export_ships_the_models_own(
    tiny_qwen2, builder_exports, our_export
):
    """Upstream: the builder re-saves the tokenizer through transformers 5, which rebuilds it from its class."""
    source, resaved = (
        Tokenizer.from_file(str(d / "tokenizer.json")) for d in (tiny_qwen2, builder_exports["fp32-cpu"])
    )
    vocab_size = json.loads((tiny_qwen2 / "config.json").read_text())["vocab_size"]
    assert resaved.token_to_id("<|endoftext|>") == vocab_size  # an id past the model's embedding table
    assert source.token_to_id("<|endoftext|>") is None
    assert resaved.encode("cafe\u0301").ids != source.encode("cafe\u0301").ids  # NFC normalizer added
    # Ours: the model's own tokenizer files, the builder's model_max_length (the context length).
    assert (our_export / "tokenizer.json").read_bytes() == (tiny_qwen2 / "tokenizer.json").read_bytes()
    tok_config = json.loads((our_export / "tokenizer_config.json").read_text())
    assert tok_config == {**json.loads((tiny_qwen2 / "tokenizer_config.json").read_text()), "model_max_length": 256}
    assert sorted(p.name for p in our_export.parent.iterdir()) == ["out"]  # no temp folder left beside it
    assert {p.name for p in our_export.iterdir()} == {
        *("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json"),
        *("chat_template.jinja", "config.json", "generation_config.json"),
    }
    # The float graph itself is the builder's.
    assert (our_export / "model.onnx.data").read_bytes() == (
        builder_exports["fp32-cpu"] / "model.onnx.data"
    ).read_bytes()


def test_build_package_writes_a_verified_folder(tiny_qwen2, builder_exports, tmp_path):
    source = builder_exports["int4-cuda"]
    folder = build_package(source / "model.onnx", side_files(source, tiny_qwen2), tmp_path / "out", "cuda")
    assert folder == tmp_path / "out" / "gpu" / "gpu-int4-rtn-block-32"
    assert {p.name for p in folder.iterdir()} == set(PACKAGE_FILES)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["gpu"]  # staging folder removed
    assert (folder / "model.onnx.data").read_bytes() == (source / "model.onnx.data").read_bytes()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (source / "chat_template.jinja").read_text()
    assert "is_local" not in config  # transformers-5 session keys are dropped
    # Runs here without CUDA: load_model clears the cuda provider when CUDA is unavailable. The tokens it checks
    # with are the source model's greedy tokens for the chat-templated "Hello" (onnxruntime, no genai).
    tokens = genai_chat.verify_package(folder, max_new_tokens=3)
    assert len(tokens) == 3
    check_greedy_tokens(tokens, source / "model.onnx", source, hello_ids(tiny_qwen2))
    with pytest.raises(RuntimeError, match=r"(?i)cuda"):
        genai_chat.load_model(folder, cpu=False)


def test_build_package_resaves_other_file_names(builder_exports, tmp_path):
    source = tmp_path / "renamed"
    source.mkdir()
    model = load_onnx(builder_exports["int4-cpu"] / "model.onnx")
    onnx.save(model, str(source / "decoder.onnx"), save_as_external_data=True, location="weights.bin")
    special = tmp_path / "special_tokens_map.json"
    special.write_text('{"bos_token": "<｜begin▁of▁sentence｜>"}')
    files = {**side_files(builder_exports["int4-cpu"]), "special_tokens_map.json": special}
    folder = build_package(source / "decoder.onnx", files, tmp_path / "out", "cpu", chat_template_file=True)
    assert {p.name for p in folder.iterdir()} == {*PACKAGE_FILES, "chat_template.jinja"}
    assert (folder / "special_tokens_map.json").read_bytes() == special.read_bytes()  # the model's own wins
    assert json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.onnx"


def test_failed_verification_publishes_nothing_and_keeps_the_previous_package(builder_exports, tmp_path):
    source = builder_exports["int4-cpu"]
    out = tmp_path / "out"
    previous = build_package(source / "model.onnx", side_files(source), out, "cpu", verify=False)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    broken = tmp_path / "genai_config.json"
    config = json.loads((source / "genai_config.json").read_text())
    config["model"]["decoder"]["outputs"]["logits"] = "logits_Q4"  # what Olive's own RTN pass does to the graph
    broken.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="onnxruntime-genai cannot run"):
        build_package(source / "model.onnx", {**side_files(source), "genai_config.json": broken}, out, "cpu")
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    assert [p.name for p in out.iterdir()] == ["cpu_and_mobile"]
    # A new package replaces the previous one as a whole.
    build_package(source / "model.onnx", side_files(source), out, "cpu", search={"top_k": 7}, verify=False)
    assert json.loads((previous / "genai_config.json").read_text())["search"]["top_k"] == 7
    assert [p.name for p in out.iterdir()] == ["cpu_and_mobile"]


def test_build_package_needs_the_exports_side_files(builder_exports, tmp_path):
    source = builder_exports["int4-cpu"]
    files = side_files(source)
    del files["genai_config.json"]
    with pytest.raises(ValueError, match=r"genai_config\.json is missing.*GenAIModelExport"):
        build_package(source / "model.onnx", files, tmp_path / "out", "cpu")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    for bad in ("../elsewhere", str(tmp_path / "abs")):
        with pytest.raises(ValueError, match="package_dir"):
            build_package(source / "model.onnx", side_files(source), tmp_path / "out", "cpu", package_dir=bad)


def test_export_errors_are_value_errors(tiny_qwen2, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="precision 'fp16' is not available for cpu"):
        export_hf_model(tiny_qwen2, tmp_path / "a", execution_provider="cpu", precision="fp16")
    with pytest.raises(ValueError, match="execution_provider"):
        export_hf_model(tiny_qwen2, tmp_path / "a", execution_provider="dml")
    with pytest.raises(ValueError, match=r"no config\.json"):
        export_hf_model(tmp_path, tmp_path / "a")
    unsupported = tmp_path / "unsupported"
    shutil.copytree(tiny_qwen2, unsupported)
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(ValueError, match=r"model builder failed.*not currently supported"):
        export_hf_model(unsupported, tmp_path / "b")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))  # nothing half-written
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="-m /path/to/model"):
        resolve_hf_dir("no-such-org/no-such-model")


def hello_ids(hf_dir: Path, content: str = "Hello") -> list[int]:
    """The chat-templated prompt's ids from transformers' tokenizer of the Hugging Face model (not genai's)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_command_prints_the_greedy_answer(tiny_qwen2, builder_exports, capsys):
    folder = builder_exports["int4-cpu"]
    # The reference: the package's model in a plain onnxruntime greedy loop, decoded by the tokenizers library.
    reference = ort_greedy(folder / "model.onnx", folder, hello_ids(tiny_qwen2, "Hi"), 6)
    expected = Tokenizer.from_file(str(tiny_qwen2 / "tokenizer.json")).decode(reference)
    assert genai_chat.main([str(folder), "-p", "Hi", "--max-new-tokens", "6", "--greedy"]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("\n") and printed[:-1]
    # The token stream holds back the bytes of an unfinished UTF-8 character; batch decode shows them as U+FFFD.
    assert expected.replace("\ufffd", "") == printed[:-1]
    assert genai_chat.main([str(folder / "missing")]) == 2
