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

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from olive_int4_pass.genai.layers import LAYER
from olive_int4_pass.kernels.pages import release_pages

logger = logging.getLogger(__name__)


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


class LayeredImpactProbe:
    """The KLs of :class:`ImpactProbe`, measured one transformer layer at a time (bounded memory, one session build
    per layer).

    Every group's probe advances through the layers together: at each layer one onnxruntime session serves the
    float run and every probe that has started (a probe starts at the first layer that reads one of its weights,
    from the float hidden states there, and feeds its quantized weights wherever they are read). Memory holds one
    layer's weights, a group's replaced weights while later layers read them, and each probe's hidden states; each
    probe's logits are reduced to its KL as soon as they are computed. Raises ``NotCuttable`` for a graph that
    cannot be cut (use :class:`ImpactProbe`).

    ``depth`` (cost linear in depth): a probe runs its own layer and ``depth`` - 1 more exactly, then stops; its
    change to the residual stream (the sum of the values crossing the cut, minus the float run's), relative to the
    stream's size there, waits until the last ``tail`` layers (default ``depth``), where it is added to the float
    run's stream at that size and the probe runs exactly to the logits. Each probe then costs at most ``depth`` +
    ``tail`` layers instead of every later one. What it leaves out is how the skipped middle layers transform the
    change beyond scaling it with the stream (exact where they add nothing: ``tests/plan/test_sensitivity_depth.py``);
    the ranking it gives on real models is in docs/results.md. Unset: every probe runs to the logits.
    """

    def __init__(
        self,
        model_path: Path,
        weights: Mapping[str, Callable[[], np.ndarray]],
        token_ids: Sequence[int],
        depth: int | None = None,
        tail: int | None = None,
    ) -> None:
        from olive_int4_pass.genai.decoder import log_softmax
        from olive_int4_pass.genai.layers import LayeredDecoder

        self._log_softmax = log_softmax
        # A head MatMul (logits = x @ W, W probed) is computed here in vocabulary chunks from x: onnxruntime's CPU
        # provider would cast a 7B fp16 lm_head to a 2.2 GB float32 copy on every run.
        self.head = find_head(model_path, weights)
        watched = [self.head[0]] if self.head else ["logits"]
        self.decoder = LayeredDecoder(model_path, watched, weight_inputs=weights)
        # Loaders, not arrays: a layer's float weights are mapped while its session runs, then unmapped (a map kept
        # open keeps every page it read resident: the whole model, by the last layer).
        self.weights = dict(weights)
        self.token_ids = [int(t) for t in token_ids]
        self.depth = depth
        self.tail = (depth or 0) if tail is None else tail

    def measure(
        self,
        groups: Mapping[str, Sequence],
        names: Mapping[object, str],
        replacement: Callable[[object], tuple[str, np.ndarray]],
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, float]:
        """``{group: KL}`` with each group's weights replaced by ``replacement(key) -> (name, array)``."""
        segments = self.decoder.segments
        reads = [self.decoder.weights_read(s) for s in segments]
        if self.head:  # the head's weight is read where its input is computed
            reads[next(i for i, s in enumerate(segments) if self.head[0] in s.outputs)].add(self.head[1])
        start = {}
        for group, keys in groups.items():
            wanted = {names[k] for k in keys}
            start[group] = next((i for i, r in enumerate(reads) if r & wanted), None)
        result = {g: 0.0 for g, i in start.items() if i is None}  # weights no layer reads
        last = self._last_segment()
        # Carried probes rejoin ``tail`` segments before the logits (the last layers reshape the stream the most).
        rejoin = max(last - self.tail, 1)
        residual = self._residual_inputs(rejoin) if self.depth is not None else None
        floats = self.decoder.first_feeds(self.token_ids)
        states: dict[str, dict[str, np.ndarray]] = {}
        replaced: dict[str, dict[str, np.ndarray]] = {}
        carried: dict[str, np.ndarray] = {}  # group: its relative change to the residual stream, up to ``rejoin``
        reference = probs = None
        for index, segment in enumerate(segments):
            session = self.decoder.session(segment, floats)
            floats_here = {w: np.ascontiguousarray(self.weights[w]()) for w in reads[index]}
            for group in [g for g, i in start.items() if i == index]:
                states[group] = dict(floats)
                replaced[group] = dict(replacement(k) for k in groups[group])
            if index == rejoin:  # the carried probes go on from the float values plus their change
                for group, change in carried.items():
                    states[group], replaced[group] = _with_change(floats, residual, change), {}
                carried.clear()
            computed = self._advance(session, segment, floats_here, floats, {})
            if computed is not None:
                reference, probs = computed, np.exp(computed)
            later_inputs = set().union(*(s.inputs for s in segments[index + 1 :]))
            for group, state, weights in [(g, states[g], replaced[g]) for g in list(states)]:
                logprobs = self._advance(session, segment, floats_here, state, weights)
                if logprobs is not None:
                    result[group] = max(float(np.einsum("ij,ij->", probs, reference - logprobs) / len(logprobs)), 0.0)
                    states.pop(group, None)
                    replaced.pop(group, None)
                    if progress:
                        progress(group)
                    continue
                later = set().union(*reads[index + 1 :])
                replaced[group] = {n: w for n, w in weights.items() if n in later}
                if residual and index + 1 < rejoin and index + 1 - start[group] >= self.depth and not replaced[group]:
                    change = _residual_change(state, floats, later_inputs)
                    if change is not None:
                        carried[group] = change
                        del states[group], replaced[group]
            for state in [floats, *states.values()]:
                for name in [n for n in state if n not in later_inputs]:
                    del state[name]
            del session, floats_here
        return result

    def _last_segment(self) -> int:
        """The segment that computes the logits (or the head's input)."""
        wanted = self.head[0] if self.head else "logits"
        return next(i for i, s in enumerate(self.decoder.segments) if wanted in s.outputs)

    def _residual_inputs(self, index: int) -> list[str] | None:
        """The inputs of segment ``index`` whose sum is the residual stream: the one value the segment before produced
        for it, or the two that a single Add / Skip(Simplified)LayerNormalization adds. None (probes run to the
        logits) for any other interface."""
        graph, segments = self.decoder.model.graph, self.decoder.segments
        before = {out for i in segments[index - 1].nodes for out in graph.node[i].output} if index > 0 else set()
        inner = [x for x in segments[index].inputs if x in before]
        readers = [graph.node[i] for i in segments[index].nodes if set(graph.node[i].input) & set(inner)]
        if len(inner) == 1 or (
            len(inner) == 2
            and len(readers) == 1
            and readers[0].op_type in _SUMS
            and set(readers[0].input[:2]) == set(inner)
        ):
            return inner
        logger.info(
            "Measured sensitivity: every probe runs to the logits (the inputs of %s are not a residual stream: %s)",
            segments[index].name,
            inner,
        )
        return None

    def _advance(
        self, session, segment, weights: Mapping[str, np.ndarray], state: dict, replaced: Mapping[str, np.ndarray]
    ):
        """Run ``segment`` on ``state`` (updated in place); the log-probabilities when it computes the logits."""
        feeds = {x: state[x] for x in segment.inputs}
        head = self.head[1] if self.head else None
        fed = self.decoder.weights_read(segment)  # the head's weight only where a node reads it (a tied embedding)
        feeds.update({w: replaced.get(w, array) for w, array in weights.items() if w in fed})
        outputs = dict(zip(segment.outputs, session.run(segment.outputs, feeds), strict=True))
        if self.head is None:
            logits = outputs.pop("logits", None)
        elif self.head[0] in outputs and head in weights:  # the segment that computes the head's input
            logits = head_logits(outputs[self.head[0]], replaced.get(head, weights[head]))
        else:
            logits = None
        state.update(outputs)
        if logits is None:
            return None
        return self._log_softmax(np.asarray(logits, np.float32).reshape(-1, logits.shape[-1]))


_SUMS = {"Add", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}


def _residual_change(
    state: Mapping[str, np.ndarray], floats: Mapping[str, np.ndarray], crossing: Iterable[str]
) -> np.ndarray | None:
    """A probe's change to the residual stream at a cut, relative to the stream's size: the sum of its differences
    from the float run over the values ``crossing`` the cut (between layers they add up to the residual stream),
    over the float stream's median norm per position. Empty for no change; None when values of different shapes
    differ (not a residual stream)."""
    floating = [x for x in crossing if x in state and np.issubdtype(floats[x].dtype, np.floating)]
    changed = [x for x in floating if not np.array_equal(state[x], floats[x])]
    if not changed:
        return np.zeros(0, np.float32)
    if any(state[x].shape != state[changed[0]].shape for x in changed):
        return None
    delta = sum(np.asarray(state[x], np.float32) - np.asarray(floats[x], np.float32) for x in changed)
    return delta / _stream_norm([floats[x] for x in floating if floats[x].shape == delta.shape])


def _stream_norm(parts: Sequence[np.ndarray]) -> float:
    """The median over positions of the norm of the residual stream (the sum of ``parts``).

    A median, not each position's own norm: the few positions whose stream grows a hundredfold in the early layers
    (the first token's "massive activations") would otherwise blow a carried change up by as much."""
    total = sum(np.asarray(p, np.float32) for p in parts)
    return float(np.median(np.linalg.norm(total.reshape(-1, total.shape[-1]), axis=-1))) + 1e-12


def _with_change(inputs: Mapping[str, np.ndarray], residual: Sequence[str], change: np.ndarray) -> dict:
    """``inputs`` with a relative ``change`` (see :func:`_residual_change`) added to the residual stream, scaled by
    the stream's norm here (added to the first of the values that sum to it)."""
    state = dict(inputs)
    if change.size:
        x = residual[0]
        delta = change * _stream_norm([inputs[r] for r in residual])
        state[x] = (np.asarray(inputs[x], np.float32) + delta).astype(inputs[x].dtype)
    return state


def find_head(model_path: Path, weights: Iterable[str]) -> tuple[str, str] | None:
    """``(x, W)`` when the graph's ``logits`` come straight from ``MatMul(x, W)`` with ``W`` among ``weights``."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    node = next((n for n in graph.node if "logits" in n.output), None)
    if node is None or node.op_type != "MatMul" or node.input[1] not in set(weights):
        return None
    return node.input[0], node.input[1]


def head_logits(x: np.ndarray, weight: np.ndarray, chunk_bytes: int = 1 << 26) -> np.ndarray:
    """``x @ weight`` as onnxruntime's CPU provider computes a MatMul (float32; an fp16 result rounded to fp16),
    with the weight converted a chunk of vocabulary columns at a time (~64 MB) instead of whole."""
    rows = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    out = np.empty((rows.shape[0], weight.shape[1]), np.float32)
    step = max(1, chunk_bytes // (4 * weight.shape[0]))
    for v0 in range(0, weight.shape[1], step):
        out[:, v0 : v0 + step] = rows @ np.asarray(weight[:, v0 : v0 + step], np.float32)
        release_pages(weight)  # a memory-mapped float lm_head: one chunk's pages resident, not the whole table
    if weight.dtype != np.float32:
        out = out.astype(weight.dtype).astype(np.float32)
    return out.reshape(*x.shape[:-1], weight.shape[1])


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
