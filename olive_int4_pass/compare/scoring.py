"""Score text windows with a genai-builder-layout decoder in onnxruntime: perplexity, KL / top-1 against a reference.

The builder's decoder returns logits for every prefill position, so one forward pass with an empty KV cache scores
a whole window. Windows are scored independently, one at a time: only one window's logits are in memory. The
reference's log-probabilities are kept in a float32 memory-mapped scratch file (positions x vocabulary) so that
each variant is loaded alone.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from olive_int4_pass.compare.metrics import QualityTotals, log_softmax


def decoder_config(package_dir: str | os.PathLike) -> dict:
    """``model.decoder`` of the package's genai_config.json (plus ``context_length`` and ``vocab_size``)."""
    path = Path(package_dir) / "genai_config.json"
    try:
        model = json.loads(path.read_text(encoding="utf-8"))["model"]
        config = dict(model["decoder"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not an onnxruntime-genai config with a model.decoder section: {e}") from e
    config["context_length"] = int(model["context_length"]) if model.get("context_length") else None
    config["vocab_size"] = model.get("vocab_size")
    for key in ("filename", "num_key_value_heads", "head_size"):
        if key not in config:
            raise ValueError(f"{path}: model.decoder has no {key!r}")
    return config


def tokenize(package_dir: str | os.PathLike, text: str) -> np.ndarray:
    """Token ids of ``text`` with the package's own tokenizer (onnxruntime-genai's)."""
    import onnxruntime_genai as og

    if not text.strip():
        raise ValueError("the text to score is empty")
    try:
        ids = og.Tokenizer(str(package_dir)).encode(text)
    except Exception as e:  # og raises RuntimeError for a missing/unreadable tokenizer
        raise ValueError(f"cannot tokenize with the tokenizer of {package_dir}: {e}") from e
    return np.asarray(ids, np.int64)


def token_windows(ids: np.ndarray, window: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Consecutive, non-overlapping windows of ``window`` tokens over the first ``max_tokens`` ids.

    A shorter last window is kept when it holds at least two tokens (one prediction).
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    ids = np.asarray(ids, np.int64)[: max_tokens if max_tokens else None]
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError(f"the text gives {len(ids)} token(s); at least 2 are needed to score it")
    return windows


class DecoderSession:
    """An onnxruntime CPU session over a builder-layout decoder, fed with an empty KV cache.

    ``config``: genai_config.json's ``model.decoder`` (KV heads and head size for the empty cache).
    """

    def __init__(self, model_path: str | os.PathLike, config: dict) -> None:
        import onnxruntime as ort

        self.config = config
        try:
            self.session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph exceptions
            raise ValueError(f"onnxruntime cannot load {model_path}: {e}") from e
        self.inputs = self.session.get_inputs()

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits ``[len(input_ids), vocab]`` for one window (batch of one)."""
        ids = np.asarray(input_ids, np.int64)[None, :]
        feeds = {}
        for inp in self.inputs:
            if inp.name == "input_ids":
                feeds[inp.name] = ids
            elif inp.name == "attention_mask":
                feeds[inp.name] = np.ones_like(ids)
            elif inp.name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in inp.type else np.float32
                shape = (1, self.config["num_key_value_heads"], 0, self.config["head_size"])
                feeds[inp.name] = np.zeros(shape, dtype)
            elif inp.name == "position_ids":
                feeds[inp.name] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
            else:
                raise ValueError(f"decoder input {inp.name!r} is not one this scorer knows how to feed")
        return self.session.run(["logits"], feeds)[0][0]


class ReferenceStore:
    """The reference's log-probabilities for every scored position, in a float32 memory-mapped scratch file."""

    def __init__(self, windows: Sequence[np.ndarray], vocab: int, scratch_dir: str | os.PathLike | None = None) -> None:
        self.offsets = np.concatenate([[0], np.cumsum([len(w) - 1 for w in windows])]).astype(np.int64)
        fd, name = tempfile.mkstemp(prefix="reference-logprobs.", suffix=".f32", dir=scratch_dir)
        os.close(fd)
        self.path = Path(name)
        self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(self.offsets[-1], vocab))

    def __getitem__(self, index: int) -> np.ndarray:
        return self.array[self.offsets[index] : self.offsets[index + 1]]

    def __setitem__(self, index: int, logprobs: np.ndarray) -> None:
        self.array[self.offsets[index] : self.offsets[index + 1]] = logprobs

    def close(self) -> None:
        del self.array
        self.path.unlink(missing_ok=True)


def score_model(
    model_path: str | os.PathLike,
    config: dict,
    windows: Sequence[np.ndarray],
    reference: ReferenceStore | None,
    *,
    write_reference: bool = False,
    progress: bool | None = None,
    desc: str = "score",
) -> QualityTotals:
    """Score ``windows`` with the decoder at ``model_path`` (``config``: its genai_config.json ``model.decoder``).

    With ``write_reference`` the model is the reference: its log-probabilities are stored first and then read
    back for KL / top-1, through the same code path as every other variant (so those are 0 and 1 exactly).
    """
    from tqdm.auto import tqdm

    session = DecoderSession(model_path, config)
    totals = QualityTotals()
    for index, window in enumerate(tqdm(windows, desc=desc, unit="window", disable=_disable(progress), leave=False)):
        logits = session.logits(window)[:-1]  # the last position predicts past the window
        logprobs = log_softmax(logits)
        del logits
        if reference is not None and logprobs.shape[1] != reference.array.shape[1]:
            raise ValueError(
                f"{model_path} has a vocabulary of {logprobs.shape[1]}, the reference {reference.array.shape[1]}:"
                " variants of different models cannot be compared"
            )
        if write_reference and reference is not None:
            reference[index] = logprobs
        ref = np.asarray(reference[index]) if reference is not None else None
        totals.add_window(logprobs, window[1:], ref)
    return totals


def vocab_size(model_path: str | os.PathLike, config: dict) -> int:
    """The decoder's logits width, from its graph output (genai_config.json's vocab_size as a fallback)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for output in model.graph.output:
        if output.name == "logits":
            dim = output.type.tensor_type.shape.dim[-1]
            if dim.HasField("dim_value"):
                return int(dim.dim_value)
    if config.get("vocab_size"):
        return int(config["vocab_size"])
    raise ValueError(f"cannot tell the vocabulary size of {model_path}")


def _disable(progress: bool | None) -> bool | None:
    return (not progress) if progress is not None else None
