"""Run a decoder one transformer layer at a time: bounded memory for calibrating 7B-class models.

onnxruntime holds about twice a float model's weights while it runs it whole (30 GB for a 7B fp16 model). Cut
into segments - the nodes before the first layer, then one segment per transformer layer (the number in the node
names, ``/model/layers.7/...``), nodes outside a layer going with the last segment they read from - each segment
is a small model of its own: its inputs are the graph inputs and the values earlier segments produced, its
outputs the values later segments read (and the values the caller watches). Segments run in order over every
sequence, one onnxruntime session at a time, reading only that segment's weights from the external data; between
segments only the hidden states cross (a few MB per thousand tokens).

The cut is taken from the ONNX graph itself, not from a table per model family: any graph whose numbered layers
read only from earlier layers can be cut (GroupQueryAttention with rotary embedding, KV-cache I/O, fp16 or fp32).
A graph that cannot be cut raises :class:`NotCuttable` saying why; callers fall back to the whole-model runner.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from olive_int4_pass.genai.decoder import empty_cache, sequence_feeds

logger = logging.getLogger(__name__)

# A transformer layer's number in a node name: /model/layers.7/..., /h.7/..., blocks_7/...
LAYER = re.compile(r"(?:^|[/._])(?:layers|layer|blocks|block|h)[._]?(\d+)(?=[/._]|$)")


def layer_number(node_name: str | None) -> int | None:
    """The transformer layer a node belongs to, from its name; None outside a numbered layer."""
    match = LAYER.search(node_name or "")
    return int(match.group(1)) if match else None


class NotCuttable(ValueError):
    """The graph cannot be run layer by layer (the message says why)."""


@dataclasses.dataclass
class Segment:
    """The nodes of one segment (indices into the graph's node list, in order) and its interface."""

    name: str
    nodes: list[int]
    inputs: list[str] = dataclasses.field(default_factory=list)  # graph inputs and earlier segments' values
    outputs: list[str] = dataclasses.field(default_factory=list)  # what later segments or the caller read


def cut(graph, watch: Iterable[str] = ()) -> list[Segment]:
    """Segments of ``graph`` (an ``onnx.GraphProto``) in run order, each pruned to what its outputs need."""
    import onnx

    nodes = list(graph.node)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute):
        raise NotCuttable("the graph has control flow (If/Loop/Scan): its subgraphs may read any layer's values")
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    numbers = sorted({n for n in (layer_number(node.name) for node in nodes) if n is not None})
    if len(numbers) < 2:
        raise NotCuttable(f"found {len(numbers)} numbered transformer layer(s) in the node names; need at least 2")
    rank = {number: index + 1 for index, number in enumerate(numbers)}  # 0: the nodes before the first layer
    segment_of: list[int] = []
    for i, node in enumerate(nodes):
        reads = [segment_of[producer[x]] for x in node.input if x in producer]
        if any(producer[x] >= i for x in node.input if x in producer):
            raise NotCuttable(f"the graph is not topologically sorted (node {node.name!r})")
        latest = max(reads, default=0)
        number = layer_number(node.name)
        if number is None:
            segment_of.append(latest)
            continue
        if rank[number] < latest:
            raise NotCuttable(f"node {node.name!r} of layer {number} reads a value of a later layer")
        segment_of.append(rank[number])

    watch = set(watch)
    initializers = {init.name for init in graph.initializer}
    consumers: dict[str, set[int]] = {}
    for i, node in enumerate(nodes):
        for x in node.input:
            if x:
                consumers.setdefault(x, set()).add(segment_of[i])
    segments = [Segment("before the layers", [])] + [Segment(f"layer {n}", []) for n in numbers]
    for i, s in enumerate(segment_of):
        segments[s].nodes.append(i)
    for index, segment in enumerate(segments):
        produced = {out for i in segment.nodes for out in nodes[i].output if out}
        wanted = {x for x in produced if any(c > index for c in consumers.get(x, ())) or x in watch}
        segment.nodes = _needed(nodes, segment.nodes, wanted)
        segment.outputs = sorted(wanted)
        kept = {out for i in segment.nodes for out in nodes[i].output if out}
        reads = {x for i in segment.nodes for x in nodes[i].input if x}
        segment.inputs = sorted(x for x in reads - kept if x in producer or x not in initializers)
    missing = watch - {x for s in segments for x in s.outputs}
    if missing:
        raise NotCuttable(f"watched values are not produced by any node: {sorted(missing)[:5]}")
    return [s for s in segments if s.outputs]


def _needed(nodes, indices: list[int], wanted: set[str]) -> list[int]:
    """The nodes among ``indices`` that ``wanted`` depends on (the lm_head's logits are not computed for nothing)."""
    needed, result = set(wanted), []
    for i in reversed(indices):
        if any(out in needed for out in nodes[i].output if out):
            result.append(i)
            needed.update(x for x in nodes[i].input if x)
    return result[::-1]


class LayeredDecoder:
    """A genai-builder-layout decoder run segment by segment (see the module docstring).

    ``watch``: intermediate values handed to the caller (calibration: every quantized MatMul's input).
    ``weight_inputs``: initializers every segment that reads them takes as inputs instead (the sensitivity probe
    feeds float or quantized values). ``config_dir``: where genai_config.json states what the graph leaves
    symbolic (default: the model's folder).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        watch: Iterable[str],
        *,
        weight_inputs: Iterable[str] = (),
        config_dir: str | os.PathLike | None = None,
    ):
        import onnx

        self.model_path = Path(model_path)
        self.config_dir = Path(config_dir) if config_dir is not None else self.model_path.parent
        self.model = onnx.load(str(self.model_path), load_external_data=False)
        self.watch = sorted(set(watch))
        self.segments = cut(self.model.graph, self.watch)
        self._inits = {init.name: init for init in self.model.graph.initializer}
        self.weight_inputs = frozenset(weight_inputs)
        missing = self.weight_inputs - set(self._inits)
        if missing:
            raise ValueError(f"not initializers of {self.model_path}: {sorted(missing)[:5]}")
        self._graph_inputs = {i.name: i for i in self.model.graph.input}
        infos = {name: _InputInfo(value) for name, value in self._graph_inputs.items()}
        self._cache = empty_cache(infos, self.model_path, self.config_dir)

    def run(
        self,
        sequences: Sequence[Sequence[int]],
        on_value: Callable[[int, str, np.ndarray], None],
        progress: Callable[[Segment], None] | None = None,
    ) -> None:
        """Run every sequence through every segment; ``on_value(sequence_index, name, array)`` for each watched
        value, segment after segment (for one segment, sequences in order)."""
        store: list[dict[str, np.ndarray]] = [sequence_feeds(ids, self._graph_inputs, self._cache) for ids in sequences]
        remaining = [set(s.inputs) for s in self.segments]
        for index, segment in enumerate(self.segments):
            session = self._session(segment, store[0])
            later = set().union(*remaining[index + 1 :])
            for seq, values in enumerate(store):
                outputs = session.run(segment.outputs, {x: values[x] for x in segment.inputs})
                # Keep only what a later segment reads, as soon as this sequence has run: a layer's watched MatMul
                # inputs for every sequence at once would grow with the tokens (an MLP's 18,944-wide input is
                # 1.2 GB of float32 per 16,384 tokens at 7B).
                for name in [n for n in values if n not in later]:
                    del values[name]
                for name, array in zip(segment.outputs, outputs, strict=True):
                    if name in later:
                        values[name] = array
                    if name in self.watch:
                        on_value(seq, name, array)
                del outputs
            del session
            if progress is not None:
                progress(segment)

    def first_feeds(self, input_ids: Sequence[int]) -> dict[str, np.ndarray]:
        """The graph inputs for one sequence: what the first segment starts from."""
        return sequence_feeds(input_ids, self._graph_inputs, self._cache)

    def weights_read(self, segment: Segment) -> set[str]:
        """The weight inputs ``segment`` reads (to be fed with every run of its session)."""
        return {x for i in segment.nodes for x in self.model.graph.node[i].input if x in self.weight_inputs}

    def session(self, segment: Segment, sample: Mapping[str, np.ndarray]):
        """An onnxruntime session over ``segment`` alone; ``sample`` holds arrays of its inputs (for their types)."""
        return self._session(segment, sample)

    def _session(self, segment: Segment, sample: Mapping[str, np.ndarray]):
        import onnx
        import onnxruntime as ort

        nodes = [self.model.graph.node[i] for i in segment.nodes]
        used = {x for node in nodes for x in node.input if x}
        inputs = [
            self._graph_inputs[x] if x in self._graph_inputs else _value_info(x, sample[x]) for x in segment.inputs
        ]
        weights = sorted(used & self.weight_inputs)
        for name in weights:
            init = self._inits[name]
            inputs.append(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
        used -= set(weights)
        graph = onnx.helper.make_graph(
            nodes,
            f"{self.model.graph.name}: {segment.name}",
            inputs,
            [onnx.helper.make_empty_tensor_value_info(x) for x in segment.outputs],
            initializer=[self._inits[x] for x in sorted(used) if x in self._inits],
        )
        model = onnx.helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        model.functions.extend(self.model.functions)
        options = ort.SessionOptions()
        # From bytes: onnxruntime reads this segment's weights from the external data file in place.
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(self.model_path.parent)
        )
        # No arena: it keeps (and rounds up to a power of two) the largest buffer a run needed, e.g. the float32 cast
        # of a 7B lm_head (2.2 GB) that onnxruntime's CPU provider makes for an fp16 MatMul, for as long as the
        # session lives; a plain allocation is returned after the run.
        options.enable_cpu_mem_arena = False
        try:
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's Fail / InvalidGraph
            raise NotCuttable(f"onnxruntime cannot run {segment.name} of {self.model_path} alone: {e}") from e


class _InputInfo:
    """A graph input described as onnxruntime's ``NodeArg`` describes it (``.type``, ``.shape``)."""

    def __init__(self, value) -> None:
        import onnx

        tensor = value.type.tensor_type
        self.type = f"tensor({onnx.helper.tensor_dtype_to_string(tensor.elem_type).split('.')[-1].lower()})"
        self.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]


def _value_info(name: str, array: np.ndarray):
    import onnx

    elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    return onnx.helper.make_tensor_value_info(name, elem, [None] * array.ndim)
