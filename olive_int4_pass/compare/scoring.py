"""Score text windows with a genai-builder-layout decoder in onnxruntime: perplexity, KL / top-1 against a reference.

The builder's decoder returns logits for every prefill position, so one forward pass with an empty KV cache scores
a whole window (:class:`olive_int4_pass.genai.decoder.DecoderRunner`). Windows are scored independently, one at a
time: only one window's logits are in memory. The reference's log-probabilities are kept in a float32
memory-mapped scratch file (positions x vocabulary) so that each variant is loaded alone.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from olive_int4_pass.compare.metrics import QualityTotals
from olive_int4_pass.genai.decoder import DecoderRunner, log_softmax


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


class ReferenceStore:
    """The reference's log-probabilities for every scored position, in a float32 memory-mapped scratch file.

    The file is made on the first write, as wide as the reference's vocabulary.
    """

    def __init__(self, windows: Sequence[np.ndarray], scratch_dir: str | os.PathLike | None = None) -> None:
        self.offsets = np.concatenate([[0], np.cumsum([len(w) - 1 for w in windows])]).astype(np.int64)
        self.scratch_dir = scratch_dir
        self.path: Path | None = None
        self.array: np.ndarray | None = None

    @property
    def vocab(self) -> int | None:
        """The reference's vocabulary size; None before the first write."""
        return None if self.array is None else self.array.shape[1]

    def __getitem__(self, index: int) -> np.ndarray:
        if self.array is None:
            raise ValueError("the reference has not been scored yet: score it first, with write_reference=True")
        return self.array[self.offsets[index] : self.offsets[index + 1]]

    def __setitem__(self, index: int, logprobs: np.ndarray) -> None:
        if self.array is None:
            fd, name = tempfile.mkstemp(prefix="reference-logprobs.", suffix=".f32", dir=self.scratch_dir)
            os.close(fd)
            self.path = Path(name)
            shape = (int(self.offsets[-1]), logprobs.shape[1])
            self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=shape)
        self.array[self.offsets[index] : self.offsets[index + 1]] = logprobs

    def close(self) -> None:
        self.array = None  # the memory map closes with its last reference
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def score_model(
    model_path: str | os.PathLike,
    windows: Sequence[np.ndarray],
    reference: ReferenceStore | None,
    *,
    config_dir: str | os.PathLike | None = None,
    write_reference: bool = False,
    progress: bool | None = None,
    desc: str = "score",
) -> QualityTotals:
    """Score ``windows`` with the decoder at ``model_path`` (``config_dir``: the folder whose genai_config.json
    describes it; default the model's own).

    With ``write_reference`` the model is the reference: its log-probabilities are stored first and then read
    back for KL / top-1, through the same code path as every other variant (so those are 0 and 1 exactly).
    """
    from tqdm.auto import tqdm

    runner = DecoderRunner(model_path, config_dir=config_dir)
    totals = QualityTotals()
    for index, window in enumerate(tqdm(windows, desc=desc, unit="window", disable=_disable(progress), leave=False)):
        logits = runner.logits(window)[:-1]  # the last position predicts past the window
        logprobs = log_softmax(logits)
        del logits
        if reference is not None and reference.vocab is not None and logprobs.shape[1] != reference.vocab:
            raise ValueError(
                f"{model_path} has a vocabulary of {logprobs.shape[1]}, the reference {reference.vocab}:"
                " variants of different models cannot be compared"
            )
        if write_reference and reference is not None:
            reference[index] = logprobs
        ref = np.asarray(reference[index]) if reference is not None else None
        totals.add_window(logprobs, window[1:], ref)
    return totals


def _disable(progress: bool | None) -> bool | None:
    return (not progress) if progress is not None else None
