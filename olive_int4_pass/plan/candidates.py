"""Which nodes will be quantized, decided before the graph is rewritten, and why the others are left alone.

One walk over the graph (its subgraphs too, to say why their MatMuls stay float) gives each node a plan or a reason:

- ``MatMul(X, W)``, ``MatMul(X, Transpose(W))``, ``Gemm(X, W[, C])`` (alpha = beta = 1, transA = 0) and, with
  ``fuse_bias``, ``Add(MatMul(X, W), b)``, where W is a 2-D float initializer of the main graph -> :class:`MatMulPlan`;
- ``Gather(Transpose(W), ids)`` (tied to the lm_head) and ``Gather(E, ids)`` (only with ``embedding`` int4/int8)
  -> :class:`EmbeddingPlan`.

Each distinct weight (and orientation) is one :class:`Candidate`: what calibration measures and the weight plan
chooses bits for. The rewrite rules only look these plans up, so their ``check()`` has no side effects.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from olive_int4_pass.options import QuantizeOptions

WeightKey = tuple[int, bool]  # (id of the weight value, quantized transposed)
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
# The hidden x hidden MatMul that rotation='residual' adds before a tied lm_head: not a weight of the model the
# user gave, so size budgets count its bytes as spent instead of as part of the model they are relative to.
ROTATION_MIX_WEIGHT = "model.final_norm_rotation.MatMul.weight"


@dataclasses.dataclass
class Candidate:
    """A float weight the rules will quantize, the activation it multiplies and the nodes reading it."""

    name: str
    source: ir.TensorProtocol  # memory-mapped when external
    transposed: bool
    activation: str | None
    nodes: list[str] = dataclasses.field(default_factory=list)
    min_bits: int = 0  # what the options already impose (lm_head: int8), whatever the budget picks

    def weight(self) -> np.ndarray:
        """``W[K, N]`` as an array, external data read through a private map (see :func:`mapped_array`)."""
        array = mapped_array(self.source)
        return array.T if self.transposed else array

    @property
    def k(self) -> int:
        return self.source.shape[0 if not self.transposed else 1]

    @property
    def n(self) -> int:
        return self.source.shape[1 if not self.transposed else 0]


@dataclasses.dataclass(frozen=True, eq=False)
class MatMulPlan:
    """How one MatMul-like node becomes MatMulNBits."""

    weight: ir.Value
    transposed: bool
    bits: int  # what the options ask for this node (8 for an lm_head at int8); the weight plan may raise it
    fused_add: ir.Node | None = None  # Add(MatMul(X, W), b) folded into the bias input


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingPlan:
    """An embedding Gather to become GatherBlockQuantized: sharing its lm_head's tensor (tied) or its own."""

    table: ir.Value
    tied: bool
    shares_lm_head: bool  # tied, and the lm_head weight is quantized un-transposed: one tensor for both


@dataclasses.dataclass
class Planning:
    """The walk's result: plans by node, the distinct weights, and why skipped nodes stay float."""

    matmuls: dict[ir.Node, MatMulPlan] = dataclasses.field(default_factory=dict)
    embeddings: dict[ir.Node, EmbeddingPlan] = dataclasses.field(default_factory=dict)
    candidates: dict[WeightKey, Candidate] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # node name -> reason

    def key(self, plan: MatMulPlan) -> WeightKey:
        return (id(plan.weight), plan.transposed)


def plan_graph(graph: ir.Graph, options: QuantizeOptions) -> Planning:
    """Plan every MatMul-like node and embedding Gather of ``graph`` (see the module docstring)."""
    planning = Planning()
    nodes = list(ir.traversal.RecursiveGraphIterator(graph))
    for node in nodes:
        if node.domain in ("", "ai.onnx") and node.op_type in ("MatMul", "Gemm"):
            _plan_matmul(node, graph, options, planning)
    shared = {id(p.weight) for p in planning.matmuls.values() if not p.transposed}
    for node in nodes:
        if node.domain in ("", "ai.onnx") and node.op_type == "Gather":
            _plan_embedding(node, graph, options, planning, shared)
    return planning


def weight_problem(node: ir.Node, w: ir.Value, graph: ir.Graph, options: QuantizeOptions) -> str | None:
    """Why ``w`` (read by ``node``) cannot be quantized, or None."""
    if node.graph is not graph:
        return "inside a subgraph or function (only the main graph is quantized)"
    selected, why = options.selects(node.name or "")
    if not selected:
        return why
    if w is None or w.const_value is None or not w.is_initializer():
        return "weight is not a constant initializer"
    if w.is_graph_input():
        return "weight initializer is also a graph input (it can be overridden at run time)"
    if w.const_value.dtype not in FLOAT_TYPES:
        return f"weight dtype {w.const_value.dtype} is not float32/float16/bfloat16"
    if len(w.const_value.shape) != 2:
        return f"weight rank {len(w.const_value.shape)} != 2"
    return None


def _plan_matmul(node: ir.Node, graph: ir.Graph, options: QuantizeOptions, planning: Planning) -> None:
    name = node.name or "<unnamed>"
    if len(node.inputs) < 2 or node.inputs[0] is None:
        return
    x, w = node.inputs[0], node.inputs[1]
    transposed, fused_add = False, None
    if node.op_type == "Gemm":
        why = _gemm_problem(node)
        if why:
            planning.skipped[name] = why
            return
        transposed = bool(node.attributes.get_int("transB", 0))
    else:
        source = _transposed_source(w)
        if source is not None:
            w, transposed = source, True
        elif options.fuse_bias:
            fused_add = _fusable_add(node, w)
    result = (fused_add or node).outputs[0]
    problem = weight_problem(node, w, graph, options)
    if problem:
        planning.skipped[name] = problem
        return
    bits = options.bits
    if result.is_graph_output():
        if options.lm_head == "float":
            planning.skipped[name] = "final projection kept in float (lm_head='float')"
            return
        if options.lm_head == "int8":
            bits = 8
    plan = MatMulPlan(w, transposed, bits, fused_add)
    planning.matmuls[node] = plan
    candidate = planning.candidates.setdefault(planning.key(plan), Candidate(w.name, w.const_value, transposed, x.name))
    candidate.nodes.append(node.name)
    candidate.min_bits = max(candidate.min_bits, bits)


def _plan_embedding(
    node: ir.Node, graph: ir.Graph, options: QuantizeOptions, planning: Planning, shared: set[int]
) -> None:
    if node.attributes.get_int("axis", 0) != 0 or not node.inputs or node.inputs[0] is None:
        return
    table = _transposed_source(node.inputs[0])
    tied = table is not None
    table = table if tied else node.inputs[0]
    value = table.const_value
    if value is None or value.dtype not in FLOAT_TYPES or len(value.shape) != 2:
        return  # e.g. shape arithmetic: not worth a log line
    name = node.name or "<unnamed>"
    problem = weight_problem(node, table, graph, options)
    shares = tied and options.tied_embeddings and id(table) in shared
    if problem is None and not shares and options.embedding == "float":
        problem = "embedding kept in float (embedding='float')"
        if tied:
            problem = "tied embedding kept in float: its lm_head weight is not quantized"
    hidden = value.shape[0 if tied else 1]
    if problem is None and hidden % options.block_size:
        problem = f"embedding width {hidden} is not a multiple of block_size"
    if problem:
        planning.skipped[name] = problem
        return
    planning.embeddings[node] = EmbeddingPlan(table, tied, shares)


def _transposed_source(value: ir.Value | None) -> ir.Value | None:
    """``W`` when ``value`` is ``Transpose(W, perm=[1, 0])`` read by one node only (the rewrite replaces both)."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
        return None
    perm = producer.attributes.get_ints("perm", None)
    if perm is None or list(perm) != [1, 0] or len(value.uses()) != 1 or value.is_graph_output():
        return None
    return producer.inputs[0]


def _fusable_add(node: ir.Node, w: ir.Value) -> ir.Node | None:
    """The ``Add(MatMul(X, W), b)`` to fold into MatMulNBits' bias, if b is a constant [N] and nothing else reads
    the MatMul's output."""
    out = node.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output():
        return None
    add, index = uses[0].node, uses[0].idx
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or index != 0 or len(add.inputs) != 2:
        return None
    b = add.inputs[1]
    if b is None or b.const_value is None or len(b.const_value.shape) != 1:
        return None
    if w.const_value is not None and b.const_value.shape[0] != w.const_value.shape[-1]:
        return None
    return add


def _gemm_problem(node: ir.Node) -> str | None:
    if node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0:
        return "Gemm with alpha or beta != 1"
    if node.attributes.get_int("transA", 0):
        return "Gemm with transA"
    if gemm_bias(node) is False:
        return "Gemm bias is not a constant broadcastable to [N]"
    return None


def gemm_bias(node: ir.Node) -> ir.Value | bool | None:
    """The Gemm's C input if usable as a MatMulNBits bias, None if absent, False if unusable."""
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is None:
        return None
    w = node.inputs[1]
    if c.const_value is None or w is None or w.const_value is None:
        return False
    n = w.const_value.shape[0 if node.attributes.get_int("transB", 0) else 1]
    shape = tuple(c.const_value.shape.numpy())
    if int(np.prod(shape)) != n or (len(shape) == 2 and shape[0] != 1) or len(shape) > 2:
        return False
    return c


def mapped_array(source: ir.TensorProtocol) -> np.ndarray:
    """``source`` as an array; external data is read through a private map, unmapped once the array is dropped.

    onnx_ir's own map stays open with the tensor and keeps every page read through it resident (the whole float
    model, in the end).
    """
    if isinstance(source, ir.ExternalTensor):
        shape = tuple(int(d) for d in source.shape)
        return np.memmap(source.path, dtype=source.dtype.numpy(), mode="r", offset=source.offset or 0, shape=shape)
    return source.numpy()
