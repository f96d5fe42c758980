"""Run a genai-builder-layout decoder in onnxruntime on CPU: the one runner behind calibration, measured sensitivity
and ``olive-int4 compare`` scoring.

The builder's decoder takes ``input_ids``, ``attention_mask`` (maybe ``position_ids``) and a KV cache
``past_key_values.*``; fed an empty cache it returns logits for every prefill position, so one forward pass scores
(or calibrates on) a whole window. Text is tokenized with the ``tokenizers`` library on the model's
``tokenizer.json``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from olive_int4_pass.genai.files import GENAI_CONFIG, TOKENIZER, GenAIConfig

# Rows converted to float64 at a time: a 1024 x 152k-vocab window would take 1.2 GB in float64 at once.
_CHUNK_ROWS = 64
_KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def tokenize(text: str, folder: str | os.PathLike) -> list[int]:
    """Token ids of ``text`` from the ``tokenizer.json`` in ``folder`` (the ``tokenizers`` library, as
    transformers' fast tokenizers; special tokens as its post-processor adds them)."""
    from tokenizers import Tokenizer

    path = Path(folder) / TOKENIZER
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception for a missing or malformed file
        raise ValueError(f"cannot load the tokenizer {path}: {e}") from e
    return tokenizer.encode(text).ids


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, computed in float64 and returned as float32.

    Always float32 out, whatever the logits' dtype (fp16 models included), so that the reference's stored
    log-probabilities and a variant's freshly computed ones are compared like with like.
    """
    logits = np.asarray(logits)
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty last (vocabulary) axis, got shape {logits.shape}")
    rows = logits.reshape(-1, logits.shape[-1])
    out = np.empty(rows.shape, np.float32)
    for start in range(0, rows.shape[0], _CHUNK_ROWS):
        chunk = rows[start : start + _CHUNK_ROWS].astype(np.float64)
        chunk -= chunk.max(axis=-1, keepdims=True)
        chunk -= np.log(np.exp(chunk).sum(axis=-1, keepdims=True))
        out[start : start + _CHUNK_ROWS] = chunk
    return out.reshape(logits.shape)


def vocab_size(logits_shape: Sequence[object] | None, config_dir: str | os.PathLike) -> int | None:
    """The vocabulary size: the logits' last dimension when it is a number, else ``vocab_size`` of the
    genai_config.json in ``config_dir``; None when neither says."""
    last = logits_shape[-1] if logits_shape else None
    if isinstance(last, int) and not isinstance(last, bool):
        return last
    path = Path(config_dir) / GENAI_CONFIG
    if not path.is_file():
        return None
    try:
        return GenAIConfig.read(path).vocab_size
    except ValueError:
        return None


class DecoderRunner:
    """An onnxruntime CPU session over the decoder ``model_path``, fed one sequence at a time with an empty KV cache.

    ``config_dir``: the folder whose genai_config.json states what the graph leaves symbolic (KV head count and
    head size, vocabulary size); default the model's own folder. ``extra_outputs``: intermediate values to expose
    as graph outputs (calibration reads MatMul inputs). ``weight_inputs``: initializers to turn into graph inputs,
    which every run must then feed (the sensitivity probe swaps weights without a new session). The weights stay
    in the model's external data files, read in place.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        config_dir: str | os.PathLike | None = None,
        extra_outputs: Iterable[str] = (),
        weight_inputs: Iterable[str] = (),
    ) -> None:
        self.model_path = Path(model_path)
        self.config_dir = Path(config_dir) if config_dir is not None else self.model_path.parent
        self.weight_inputs = frozenset(weight_inputs)
        self.session = self._session(sorted(set(extra_outputs)))
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = self.session.get_outputs()
        logits = next((o for o in outputs if o.name == "logits"), outputs[0])
        self.logits_name: str = logits.name
        self._logits_shape = list(logits.shape or [])
        self._empty_cache = self._cache_feeds()

    def _session(self, extra_outputs: list[str]):
        import onnxruntime as ort

        try:
            if not extra_outputs and not self.weight_inputs:
                return ort.InferenceSession(str(self.model_path), providers=["CPUExecutionProvider"])
            options = ort.SessionOptions()
            # The model comes from bytes: tell onnxruntime where its external data lives (read, never copied).
            folder = str(self.model_path.parent)
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
            model = self._edited_graph(extra_outputs).SerializeToString()
            return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except (ValueError, TypeError):
            raise
        except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile exceptions
            raise ValueError(f"onnxruntime cannot load {self.model_path}: {e}") from e

    def _edited_graph(self, extra_outputs: list[str]):
        import onnx

        model = onnx.load(str(self.model_path), load_external_data=False)
        graph = model.graph
        existing = {o.name for o in graph.output}
        for name in extra_outputs:
            if name not in existing:
                graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        if self.weight_inputs:
            missing = self.weight_inputs - {init.name for init in graph.initializer}
            if missing:
                raise ValueError(f"not initializers of {self.model_path}: {sorted(missing)[:5]}")
            kept = [init for init in graph.initializer if init.name not in self.weight_inputs]
            for init in graph.initializer:
                if init.name in self.weight_inputs:
                    graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
            del graph.initializer[:]
            graph.initializer.extend(kept)
        return model

    def _cache_feeds(self) -> dict[str, np.ndarray]:
        return empty_cache(self.inputs, self.model_path, self.config_dir, self.weight_inputs)

    @property
    def vocab_size(self) -> int:
        """The logits' width: the graph's when static, else genai_config.json's ``vocab_size``."""
        size = vocab_size(self._logits_shape, self.config_dir)
        if size is None:
            raise ValueError(
                f"cannot tell the vocabulary size of {self.model_path}: its logits width is symbolic and"
                f" {self.config_dir / GENAI_CONFIG} does not give vocab_size"
            )
        return size

    def feeds(self, input_ids: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Inputs for one sequence (batch of one) with an empty KV cache; weight inputs are the caller's."""
        return sequence_feeds(input_ids, self.inputs, self._empty_cache)

    def run(
        self,
        input_ids: Sequence[int] | np.ndarray,
        outputs: Sequence[str] | None = None,
        extra_feeds: Mapping[str, np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """The ``outputs`` (default: the logits) for one sequence; ``extra_feeds``: e.g. the weight inputs."""
        feeds = {**self.feeds(input_ids), **(extra_feeds or {})}
        return self.session.run(list(outputs) if outputs is not None else [self.logits_name], feeds)

    def logits(
        self, input_ids: Sequence[int] | np.ndarray, extra_feeds: Mapping[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """Logits ``[len(input_ids), vocab]`` for one sequence."""
        return self.run(input_ids, None, extra_feeds)[0][0]

    def log_probs(
        self, input_ids: Sequence[int] | np.ndarray, extra_feeds: Mapping[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """:func:`log_softmax` of :meth:`logits` (float32)."""
        return log_softmax(self.logits(input_ids, extra_feeds))


def empty_cache(
    inputs: Mapping[str, Any], model_path: Path, config_dir: Path, skip: Iterable[str] = ()
) -> dict[str, np.ndarray]:
    """The empty KV cache for a decoder's ``inputs`` (name -> an object with ``.type`` like ``tensor(float16)`` and
    ``.shape``, as onnxruntime's ``NodeArg``), and a check that every other input is one :func:`sequence_feeds` or
    the caller fills (``skip``)."""
    if "input_ids" not in inputs:
        raise ValueError(
            f"{model_path} is not a genai-builder-layout decoder: it has no input_ids input (its inputs:"
            f" {sorted(inputs)})"
        )
    skip = set(skip)
    config = None
    feeds = {}
    for name, info in inputs.items():
        if name in ("input_ids", "attention_mask", "position_ids") or name in skip:
            continue
        if not name.startswith("past_key_values"):
            raise ValueError(
                f"{model_path}: cannot feed decoder input {name!r} (a genai-builder-layout decoder takes"
                " input_ids, attention_mask, position_ids and past_key_values.*)"
            )
        dims = [d if isinstance(d, int) else None for d in info.shape or []]
        if len(dims) != 4 or info.type not in _KV_DTYPES:
            raise ValueError(f"{model_path}: cannot build an empty KV cache for {name} ({info.type} {info.shape})")
        if None in (dims[1], dims[3]):  # the builder leaves the head size symbolic; genai_config.json states it
            try:
                config = config or GenAIConfig.read(config_dir / GENAI_CONFIG)
                heads = dims[1] or config.num_key_value_heads
                head_size = dims[3] or config.head_size
            except ValueError as e:
                raise ValueError(f"the KV shape of {name} in {model_path} is symbolic: {e}") from e
        else:
            heads, head_size = dims[1], dims[3]
        feeds[name] = np.zeros((1, heads, 0, head_size), _KV_DTYPES[info.type])
    return feeds


def sequence_feeds(
    input_ids: Sequence[int] | np.ndarray, inputs: Iterable[str], cache: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Feeds for one sequence (batch of one) of a decoder whose inputs are named ``inputs``."""
    inputs = set(inputs)
    ids = np.asarray(input_ids, np.int64)[None, :]
    feeds = {**cache, "input_ids": ids}
    if "attention_mask" in inputs:
        feeds["attention_mask"] = np.ones_like(ids)
    if "position_ids" in inputs:
        feeds["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
    return feeds
