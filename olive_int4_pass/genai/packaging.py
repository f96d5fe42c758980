"""Olive pass ``GenAIPackaging``: lay an INT4 model out as a published onnxruntime-genai package folder.

Microsoft publishes these as ``<model>/gpu/gpu-int4-rtn-block-32/`` and
``<model>/cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4/``, each holding exactly ``genai_config.json``,
``model.onnx``, ``model.onnx.data``, ``tokenizer.json``, ``tokenizer_config.json`` (chat template inline) and
``special_tokens_map.json``. Olive flattens a single ONNX model into ``output_dir``, so the pass returns a
composite model marked ``no_flatten``, whose folder Olive copies as is.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from olive_int4_pass.genai.chat import verify_package
from olive_int4_pass.genai.files import (
    CHAT_TEMPLATE,
    DATA_NAME,
    GENAI_CONFIG,
    GENERATION_CONFIG,
    MODEL_NAME,
    SPECIAL_TOKENS_MAP,
    TOKENIZER,
    TOKENIZER_CONFIG,
    link_or_copy,
    publish_folder,
    read_json,
    staged,
)

logger = logging.getLogger(__name__)

TOP_FOLDERS = {"cuda": "gpu", "cpu": "cpu_and_mobile"}
# Search settings a Hugging Face generation_config.json can carry, by genai_config.json name.
_SEARCH_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "num_beams")
# Keys transformers 5 writes about the loading session, meaningless in a published folder.
_SESSION_KEYS = ("is_local", "local_files_only")


def package_dir_name(model_path: str | os.PathLike, execution_provider: str) -> str:
    """Folder name of the published layout, from the model's MatMulNBits: e.g. ``gpu/gpu-int4-rtn-block-32``."""
    top = _top_folder(execution_provider)
    attrs = set()
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            attrs.add((a.get("bits", 4), a.get("block_size"), a.get("accuracy_level")))
    if len(attrs) != 1:
        raise ValueError(
            f"{model_path} has {'no' if not attrs else 'mixed'} MatMulNBits settings {sorted(attrs, key=str)};"
            " set package_dir to name the package folder"
        )
    bits, block, level = attrs.pop()
    name = f"{top.split('_')[0]}-int{bits}-rtn-block-{block}" + (f"-acc-level-{level}" if level else "")
    return f"{top}/{name}"


def patch_genai_config(
    config: Mapping[str, Any],
    execution_provider: str,
    *,
    generation_config: Mapping[str, Any] | None = None,
    search: Mapping[str, Any] | None = None,
    context_length: int | None = None,
) -> dict:
    """genai_config.json for the target: provider options, token ids, context length and search defaults.

    Search defaults come from the model's generation_config.json (DeepSeek-R1: temperature 0.6, top_p 0.95),
    then ``search`` overrides them. CUDA keeps the builder's cuda options; CPU has no provider at all.
    """
    _top_folder(execution_provider)
    config = copy.deepcopy(dict(config))
    model, gen = config["model"], dict(generation_config or {})
    decoder = model["decoder"]
    decoder["filename"] = MODEL_NAME
    session = decoder.setdefault("session_options", {"log_id": "onnxruntime-genai"})
    previous = {name: opts for entry in session.get("provider_options", []) for name, opts in entry.items()}
    session["provider_options"] = [{"cuda": previous.get("cuda", {})}] if execution_provider == "cuda" else []
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if gen.get(key) is not None:
            model[key] = gen[key]
    if context_length is not None:
        if not isinstance(context_length, int) or context_length <= 0:
            raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
        model["context_length"] = context_length
    out_search = config.setdefault("search", {})
    out_search.update({key: gen[key] for key in _SEARCH_KEYS if gen.get(key) is not None})
    out_search.update(search or {})
    out_search["max_length"] = min(out_search.get("max_length", model["context_length"]), model["context_length"])
    return config


def published_tokenizer_config(tokenizer_config: Mapping[str, Any], chat_template: str | None) -> dict:
    """tokenizer_config.json with the chat template inline, as the published folders have it."""
    config = {k: v for k, v in tokenizer_config.items() if k not in _SESSION_KEYS}
    if chat_template:
        config["chat_template"] = chat_template
    return config


def special_tokens_map(tokenizer_config: Mapping[str, Any], tokenizer_json: Mapping[str, Any]) -> dict:
    """special_tokens_map.json (transformers 5 no longer writes it) from the tokenizer's own files."""
    added = {t["content"]: t for t in tokenizer_json.get("added_tokens", [])}
    vocab = (tokenizer_json.get("model") or {}).get("vocab") or {}
    result: dict[str, Any] = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = tokenizer_config.get(key)
        content = token.get("content") if isinstance(token, dict) else token
        if not content or (content not in added and content not in vocab):
            continue  # e.g. a tokenizer class's default unk token this vocabulary lacks
        flags = added.get(content, {})
        result[key] = {"content": content, **{f: flags.get(f, False) for f in ("lstrip", "normalized", "rstrip")}}
        result[key]["single_word"] = flags.get("single_word", False)
    extra = tokenizer_config.get("extra_special_tokens") or tokenizer_config.get("additional_special_tokens")
    if isinstance(extra, list) and extra:
        result["additional_special_tokens"] = [t.get("content") if isinstance(t, dict) else t for t in extra]
    return result


def build_package(
    model_path: str | os.PathLike,
    side_files: Mapping[str, str | os.PathLike],
    output_root: str | os.PathLike,
    execution_provider: str,
    *,
    package_dir: str | None = None,
    search: Mapping[str, Any] | None = None,
    context_length: int | None = None,
    chat_template_file: bool = False,
    verify: bool = True,
) -> Path:
    """Write ``output_root/<package_dir>/`` from an ONNX model and the export's side files (by file name).

    The folder is assembled and (``verify``) run with onnxruntime-genai in a staging folder, then moved into
    place: it appears complete or not at all. Model files are hard-linked when possible (they are large).
    """
    model_path, output_root = Path(model_path), Path(output_root)
    for required in (GENAI_CONFIG, TOKENIZER, TOKENIZER_CONFIG):
        if required not in side_files:
            raise ValueError(
                f"{required} is missing from the model's additional files; export with GenAIModelExport first"
            )
    package_dir = package_dir or package_dir_name(model_path, execution_provider)
    if Path(package_dir).is_absolute() or ".." in Path(package_dir).parts or not Path(package_dir).parts:
        raise ValueError(f"package_dir must be a relative folder inside the output, got {package_dir!r}")
    final = output_root / package_dir
    output_root.mkdir(parents=True, exist_ok=True)
    with staged(final) as staging:
        stage = staging / "package"
        stage.mkdir()
        _place_model(model_path, stage)
        generation = read_json(side_files[GENERATION_CONFIG]) if GENERATION_CONFIG in side_files else {}
        genai = patch_genai_config(
            read_json(side_files[GENAI_CONFIG]),
            execution_provider,
            generation_config=generation,
            search=search,
            context_length=context_length,
        )
        _write_json(stage / GENAI_CONFIG, genai)
        _write_tokenizer_files(stage, side_files, chat_template_file)
        if verify:
            try:
                tokens = verify_package(stage)
            except ValueError as e:
                raise ValueError(f"package {final} not published: {e} [tokenizer from {side_files[TOKENIZER]}]") from e
            logger.info("onnxruntime-genai loaded %s and generated tokens %s", package_dir, tokens)
        publish_folder(stage, final)  # a previous package is swapped out whole
    return final


def _write_tokenizer_files(stage: Path, side_files: Mapping[str, str | os.PathLike], chat_template_file: bool) -> None:
    shutil.copy2(side_files[TOKENIZER], stage / TOKENIZER)
    template_path = side_files.get(CHAT_TEMPLATE)
    template = Path(template_path).read_text(encoding="utf-8") if template_path else None
    tok_config = published_tokenizer_config(read_json(side_files[TOKENIZER_CONFIG]), template)
    if not tok_config.get("chat_template"):
        logger.warning("No chat template in the tokenizer files: apply_chat_template will not work")
    _write_json(stage / TOKENIZER_CONFIG, tok_config)
    if SPECIAL_TOKENS_MAP in side_files:  # the model's own, when it ships one
        shutil.copy2(side_files[SPECIAL_TOKENS_MAP], stage / SPECIAL_TOKENS_MAP)
    else:
        _write_json(stage / SPECIAL_TOKENS_MAP, special_tokens_map(tok_config, read_json(stage / TOKENIZER)))
    if chat_template_file and template_path:
        shutil.copy2(template_path, stage / CHAT_TEMPLATE)


def _place_model(model_path: Path, stage: Path) -> None:
    """model.onnx + model.onnx.data in ``stage``: linked when the input already has these names, else re-saved."""
    proto = onnx.load(str(model_path), load_external_data=False)
    locations = {
        entry.value
        for tensor in proto.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    if model_path.name == MODEL_NAME and locations == {DATA_NAME}:
        for name in (DATA_NAME, MODEL_NAME):
            link_or_copy(model_path.parent / name, stage / name)
        return
    import onnx_ir as ir

    logger.info("Re-saving %s (external data %s) as %s + %s", model_path, sorted(locations), MODEL_NAME, DATA_NAME)
    ir.save(ir.load(model_path), stage / MODEL_NAME, external_data=DATA_NAME, size_threshold_bytes=0)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


def _top_folder(execution_provider: str) -> str:
    if execution_provider not in TOP_FOLDERS:
        raise ValueError(f"execution_provider must be one of {sorted(TOP_FOLDERS)}, got {execution_provider!r}")
    return TOP_FOLDERS[execution_provider]
