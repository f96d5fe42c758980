"""Measured sensitivity: how far each group of weights' quantization error moves the model's next-token
distribution (KL divergence at the logits), measured with onnxruntime on the float model.

The float model runs once on a short calibration sample as is, then once per group with that group's weights
replaced by their dequantized values. Independent small errors add up in KL, so a group's KL is its share of
the whole model's loss, measured through everything downstream of it (which a weight-space error cannot see:
the same relative error costs more in some layers than in others). Groups are the transformer layers (the
number in the node names, e.g. ``/model/layers.7/attn/qkv_proj/MatMul``); a weight outside any layer (the
lm_head) is a group of its own. The weights become graph inputs of one
:class:`olive_int4_pass.genai.decoder.DecoderRunner`, fed from the model's memory-mapped data, so one session
serves every group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from olive_int4_pass.genai.layers import LAYER


def layer_of(node_names: Iterable[str]) -> str | None:
    """``"layer 7"`` for a weight read by ``/model/layers.7/...`` nodes; None outside a numbered layer."""
    found = {m.group(1) for name in node_names for m in [LAYER.search(name)] if m}
    return f"layer {found.pop()}" if len(found) == 1 else None


def group_by_layer(nodes: Mapping[object, Sequence[str]], names: Mapping[object, str]) -> dict[str, list]:
    """``{group: [keys]}``: one group per layer number, and every weight outside a layer alone."""
    groups: dict[str, list] = {}
    for key, node_names in nodes.items():
        groups.setdefault(layer_of(node_names) or f"weight {names[key]}", []).append(key)
    return groups


class ImpactProbe:
    """KL(float || float with some weights replaced) on ``token_ids``, one onnxruntime session for all probes.

    ``weights``: ``{initializer name: its float array}`` (memory-mapped arrays are read, never copied); these
    become graph inputs fed with the original values unless a probe replaces them.
    """

    def __init__(self, model_path: Path, weights: Mapping[str, np.ndarray], token_ids: Sequence[int]) -> None:
        from olive_int4_pass.genai.decoder import DecoderRunner

        self.runner = DecoderRunner(model_path, weight_inputs=weights)
        self.weights = {name: np.ascontiguousarray(w) for name, w in weights.items()}
        self.token_ids = np.asarray(token_ids, np.int64)
        self.reference = self._logprobs({})
        self.probs = np.exp(self.reference)

    def _logprobs(self, replaced: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.runner.log_probs(self.token_ids, {**self.weights, **replaced})

    def kl(self, replaced: Mapping[str, np.ndarray]) -> float:
        """Mean KL(reference || model with ``replaced`` weights) per position, in nats."""
        unknown = set(replaced) - set(self.weights)
        if unknown:
            raise ValueError(f"not probed weights: {sorted(unknown)[:5]}")
        logprobs = self._logprobs(replaced)
        return float(np.einsum("ij,ij->", self.probs, self.reference - logprobs) / len(logprobs))


def measure_groups(
    probe: ImpactProbe,
    groups: Mapping[str, Sequence],
    replacement: Callable[[object], tuple[str, np.ndarray]],
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """``{group: KL}`` with each group's weights replaced by ``replacement(key) -> (name, array)`` in turn."""
    result = {}
    for group, keys in groups.items():
        replaced = dict(replacement(key) for key in keys)
        result[group] = max(probe.kl(replaced), 0.0)
        del replaced
        if progress:
            progress(group)
    return result
