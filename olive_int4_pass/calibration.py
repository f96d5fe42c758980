"""Calibration: per-channel second moments ``E[x_k^2]`` of every quantized MatMul's input, from the float model.

The float decoder (genai builder layout: ``input_ids``, ``attention_mask``, ``past_key_values.*``) runs in
onnxruntime over the calibration text in independent windows with an empty KV cache; the MatMul inputs are
exposed as extra graph outputs and reduced to one float64 vector per input right away, so memory holds one
window's activations at a time. The weights stay in the input's external data file (read in place).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_TEXT = "default"
_WINDOW = 256


def default_calibration_text() -> str:
    """A deterministic built-in passage (our own prose, unrelated to any evaluation text)."""
    return resources.files("olive_int4_pass").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def load_calibration_text(source: str | os.PathLike) -> str:
    if str(source) == DEFAULT_TEXT:
        return default_calibration_text()
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"calibration text file {path} does not exist (use 'default' for the built-in text)")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"calibration text file {path} is empty")
    return text


def tokenize(text: str, model_dir: Path, max_tokens: int) -> list[int]:
    """Token ids from the ``tokenizer.json`` beside the model (the builder and Olive's export put it there)."""
    from tokenizers import Tokenizer

    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ValueError(f"calibration needs the model's tokenizer: {tokenizer_file} not found")
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text).ids[:max_tokens]
    if len(ids) < 16:
        raise ValueError(f"calibration text gives only {len(ids)} tokens; give at least a paragraph")
    return ids


def input_second_moments(
    model_path: Path, activations: Iterable[str], token_ids: list[int], window: int = _WINDOW
) -> dict[str, np.ndarray]:
    """``{activation name: E[x^2] per channel}`` over ``token_ids``, run in windows of ``window`` tokens."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path), load_external_data=False)
    names = sorted(set(activations))
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    # The model comes from bytes: tell onnxruntime where its external data lives (it is read, never copied).
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path.parent))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds_template = _empty_cache_feeds(session, model_path.parent)
    sums = {name: None for name in names}
    count = 0
    for start in range(0, len(token_ids), window):
        ids = np.array([token_ids[start : start + window]], np.int64)
        feeds = {**feeds_template, "input_ids": ids}
        if "attention_mask" in feeds:
            feeds["attention_mask"] = np.ones_like(ids)
        outputs = session.run(names, feeds)
        for name, x in zip(names, outputs, strict=True):
            x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
            sq = np.einsum("ij,ij->j", x, x)
            sums[name] = sq if sums[name] is None else sums[name] + sq
        count += ids.shape[1]
    return {name: s / count for name, s in sums.items()}


def _empty_cache_feeds(session, model_dir: Path) -> dict[str, np.ndarray]:
    inputs = {i.name: i for i in session.get_inputs()}
    if "input_ids" not in inputs:
        raise ValueError(
            "calibration runs decoders with an input_ids input (onnxruntime-genai builder layout); "
            f"this model's inputs are {sorted(inputs)}"
        )
    feeds = {}
    for name, info in inputs.items():
        if name in ("input_ids", "attention_mask"):
            feeds[name] = np.zeros((1, 1), np.int64)
        elif name.startswith("past_key_values"):
            dims = [d if isinstance(d, int) else None for d in info.shape]
            if len(dims) != 4 or dims[1] is None:
                raise ValueError(f"cannot build an empty KV cache for input {name} of shape {info.shape}")
            head_size = dims[3] if dims[3] is not None else _head_size(model_dir, name)
            dtype = np.float16 if "float16" in info.type else np.float32
            feeds[name] = np.zeros((1, dims[1], 0, head_size), dtype)
        else:
            raise ValueError(f"calibration does not know how to feed model input {name!r}")
    return feeds


def _head_size(model_dir: Path, name: str) -> int:
    """The builder leaves the KV head size symbolic; genai_config.json beside the model states it."""
    import json

    config = model_dir / "genai_config.json"
    try:
        return int(json.loads(config.read_text())["model"]["decoder"]["head_size"])
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"the head size of {name} is symbolic and {config} does not give it ({e})") from e
