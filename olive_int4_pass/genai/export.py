"""Olive pass ``GenAIModelExport``: Hugging Face model -> float ONNX decoder with the onnxruntime-genai model builder.

Olive 0.13's own ``ModelBuilder`` pass fails with onnxruntime-genai 0.18 (it imports the removed
``onnxruntime_genai.models.quantized_model``, and calls ``create_model`` without the Hugging Face details that only
``parse_extra_options`` fills in), and Olive then exits 0 with "No output model produced". This pass calls the
builder's public two-step API itself, at fp16 (CUDA) or fp32 (CPU): quantization is left to
``OnnxInt4RtnQuantization``, which gives the same MatMulNBits bytes as the builder's ``-p int4``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from olive_int4_pass.genai.files import (
    CHAT_TEMPLATE,
    GENAI_CONFIG,
    GENERATION_CONFIG,
    HF_CONFIG,
    MODEL_NAME,
    SPECIAL_TOKENS_MAP,
    TOKENIZER,
    TOKENIZER_CONFIG,
    publish,
    read_json,
    staged,
)

# The builder's side files, plus the Hugging Face configs GenAIPackaging reads (search defaults, token ids).
SIDE_FILES = (
    GENAI_CONFIG,
    TOKENIZER,
    TOKENIZER_CONFIG,
    CHAT_TEMPLATE,
    SPECIAL_TOKENS_MAP,
    GENERATION_CONFIG,
    HF_CONFIG,
)
EXECUTION_PROVIDERS = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}
_PRECISIONS = {"cuda": ("fp16", "fp32"), "cpu": ("fp32",)}
# What the hub download fetches: configs, tokenizer, safetensors weights (not duplicate .bin/.pt copies).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
# What Olive's --test model lacks: the real model's tokenizer and generation config.
_PROCESSING_PATTERNS = ["tokenizer*", "special_tokens_map.json", "*.jinja", "generation_config.json", "vocab.*"]
_PROCESSING_PATTERNS += ["merges.txt", "added_tokens.json", "*.model", "*.tiktoken"]


def export_hf_model(
    hf_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    execution_provider: str = "cpu",
    precision: str | None = None,
    extra_options: Mapping[str, Any] | None = None,
) -> Path:
    """Run the genai model builder on the local Hugging Face folder ``hf_dir`` into ``output_dir``.

    Writes ``model.onnx``, ``model.onnx.data``, ``genai_config.json``, the tokenizer files and copies of the
    model's ``config.json``/``generation_config.json``. The folder's files appear only when all are written.
    Builder failures are raised as ``ValueError`` (Olive would swallow a RuntimeError and exit 0).
    """
    hf_dir, output_dir = Path(hf_dir), Path(output_dir)
    precision = _check_target(execution_provider, precision)
    if not (hf_dir / HF_CONFIG).is_file():
        raise ValueError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    options = [f"{key}={_option_str(value)}" for key, value in (extra_options or {}).items()]
    with staged(output_dir) as work:
        out, cache = work / "out", work / "cache"
        _run_builder(hf_dir, out, cache, precision, execution_provider, options)
        _use_source_tokenizer(hf_dir, out)
        for name in (HF_CONFIG, GENERATION_CONFIG):
            if (hf_dir / name).is_file() and not (out / name).exists():
                shutil.copy2(hf_dir / name, out / name)
        # Data and side files first, graph last: a model.onnx present means the export is complete.
        publish(out, output_dir, last=MODEL_NAME)
    return output_dir / MODEL_NAME


def _run_builder(
    hf_dir: Path, out: Path, cache: Path, precision: str, execution_provider: str, options: list[str]
) -> None:
    # The package's __init__ puts the builder's folder on sys.path; builder.py imports its siblings top-level.
    from onnxruntime_genai.models import builder

    try:
        # parse_extra_options also loads the Hugging Face config/tokenizer that create_model needs.
        kwargs = builder.parse_extra_options(
            None, str(hf_dir), str(out), precision, execution_provider, str(cache), options
        )
        builder.create_model(None, str(hf_dir), str(out), precision, execution_provider, str(cache), **kwargs)
    except (ValueError, TypeError):
        raise
    except Exception as e:  # builder raises bare Exception / NotImplementedError / OSError
        raise ValueError(f"onnxruntime-genai model builder failed on {hf_dir}: {type(e).__name__}: {e}") from e
    if not (out / MODEL_NAME).is_file() or not (out / GENAI_CONFIG).is_file():
        raise ValueError(f"onnxruntime-genai model builder wrote no {MODEL_NAME}/{GENAI_CONFIG} for {hf_dir}")


def _use_source_tokenizer(hf_dir: Path, out: Path) -> None:
    """Ship the model's own tokenizer files instead of the builder's transformers-5 re-save.

    The builder re-saves the tokenizer through ``AutoTokenizer``; transformers 5 rebuilds it from the class
    (e.g. Qwen2Tokenizer: NFC normalizer, Qwen's split regex, and an added ``<|endoftext|>`` unk token numbered
    past the model's vocabulary when the source names none), so the re-saved tokenizer.json can tokenize
    differently. The builder's ``model_max_length`` (the context length) is kept.
    """
    if not (hf_dir / TOKENIZER).is_file():
        return  # e.g. a sentencepiece-only model: the builder's conversion is what we have
    builder_config = read_json(out / TOKENIZER_CONFIG)
    for name in (TOKENIZER, TOKENIZER_CONFIG, CHAT_TEMPLATE, SPECIAL_TOKENS_MAP):
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / name)
    config = read_json(out / TOKENIZER_CONFIG)
    if "model_max_length" in builder_config:
        config["model_max_length"] = builder_config["model_max_length"]
    (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")


def _check_target(execution_provider: str, precision: str | None) -> str:
    if execution_provider not in _PRECISIONS:
        raise ValueError(f"execution_provider must be one of {sorted(_PRECISIONS)}, got {execution_provider!r}")
    allowed = _PRECISIONS[execution_provider]
    precision = precision or allowed[0]
    if precision not in allowed:
        raise ValueError(f"precision {precision!r} is not available for {execution_provider}; use one of {allowed}")
    return precision


def _option_str(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def resolve_hf_dir(name_or_path: str, patterns: list[str] = _HUB_PATTERNS) -> Path:
    """A local Hugging Face folder as is; a hub id downloaded (or found) in the Hugging Face cache."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=patterns))
    except Exception as e:  # offline, gated, unknown id: HfHubHTTPError, LocalEntryNotFoundError, ...
        raise ValueError(
            f"cannot get {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: {e}). With the weights on"
            " disk, pass the folder instead: olive run --config RECIPE -m /path/to/model"
        ) from e
