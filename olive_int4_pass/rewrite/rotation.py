"""Rotate a decoder's residual stream by an orthogonal ``Q``, folded into its weights (``rotation: residual``).

The float model computes the same function; only where its weights' outliers sit changes, and so what rounding
loses. One pass over a genai-builder decoder (RMSNorm: ``SimplifiedLayerNormalization`` /
``SkipSimplifiedLayerNormalization``):

- the embedding ``Gather(E, ids)``                -> ``Gather(E Q, ids)``
- a writer ``MatMul(x, W)`` into a norm's inputs   -> ``MatMul(x, W Q)``                    (o_proj, down_proj)
- a reader ``MatMul(Norm(h, g), W)``               -> ``MatMul(Norm(h, 1), Qᵀ diag(g) W)``   (q/k/v, gate/up, lm_head)
- a tied ``lm_head`` (``W = Eᵀ``)                  -> ``MatMul(MatMul(Norm(h, 1), Qᵀ diag(g) Q), Qᵀ W)``: the table
  stays shared (``Transpose(Qᵀ W) = E Q``); the final norm's weight moves to one extra ``d x d`` MatMul.

It holds because ``RMSNorm(x Q) = RMSNorm(x) Q`` for orthogonal ``Q`` once the norm's weight is 1. Not written as
onnxscript pattern rules: the rewrite is all or nothing (one reader or writer left out changes the model's function),
so the whole stream is traced and checked first, and nothing is changed when any node on it is not one of the above.
Rotated weights are lazy tensors: each is computed when the model is saved, one at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from olive_int4_pass.kernels.rotation import Rotation
from olive_int4_pass.plan.candidates import ROTATION_MIX_WEIGHT, mapped_array

__all__ = ["RotationSummary", "rotate_residual_stream"]

_NORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}  # op -> the weight's input


@dataclasses.dataclass
class RotationSummary:
    """What the rotation changed: the stream's width, weights rotated, norms folded, and whether a tie was kept."""

    size: int
    readers: int
    writers: int
    norms: int
    tied: bool


def rotate_residual_stream(model: ir.Model, seed: int = 0) -> RotationSummary:
    """Rotate ``model``'s residual stream in place by the seeded :class:`Rotation`; raise ``ValueError`` (and change
    nothing) when the graph is not a decoder whose stream only norms, readers and writers touch."""
    plan = _trace(model.graph)
    rotation = Rotation(plan.size, seed)
    for norm, weight in plan.norms:
        gamma = _constant(weight, f"the weight of {norm.name}")
        for reader in plan.readers[norm]:
            if reader is plan.tied_lm_head:
                continue
            _replace(reader.inputs[1], lambda w, t, g=gamma: rotation.rotate_rows(w, t, row_scale=g))
    for writer in plan.writers:
        _replace(writer.inputs[1], rotation.rotate_columns)
    if plan.untied_table is not None:
        _replace(plan.untied_table, rotation.rotate_columns)
    if plan.tied_lm_head is not None:
        _keep_the_tie(model.graph, plan, rotation)
    for _, weight in plan.norms:
        _set(weight, np.ones(weight.shape.numpy(), dtype=weight.const_value.dtype.numpy()))
    readers = sum(len(r) for r in plan.readers.values())
    return RotationSummary(plan.size, readers, len(plan.writers), len(plan.norms), plan.tied_lm_head is not None)


@dataclasses.dataclass
class _Plan:
    size: int
    norms: list[tuple[ir.Node, ir.Value]]  # each norm and its weight input
    readers: dict[ir.Node, list[ir.Node]]  # norm -> the MatMuls reading its output
    writers: list[ir.Node]  # MatMuls adding into the stream
    untied_table: ir.Value | None
    tied_lm_head: ir.Node | None  # the lm_head MatMul whose weight is also the embedding (Transpose'd)
    final_norm: ir.Node | None


def _trace(graph: ir.Graph) -> _Plan:
    """Follow the stream from the embedding and check every node on it, before anything is changed."""
    gathers = [n for n in graph if n.op_type == "Gather" and n.domain == "" and _table(n) is not None]
    if len(gathers) != 1:
        raise ValueError(
            f"rotation: expected one embedding Gather of a constant table, found {len(gathers)}"
            " (only genai-builder decoders are supported)"
        )
    embedding = gathers[0]
    table, transpose = _table(embedding)
    size = table.shape[0] if transpose is not None else table.shape[1]
    stream = {embedding.outputs[0]}
    plan = _Plan(int(size), [], {}, [], None if transpose is not None else table, None, None)
    for node in graph:  # topological order: a stream value is known before its readers
        touched = [v for v in node.inputs if v in stream]
        if not touched:
            continue
        if node.op_type not in _NORMS or node.domain not in ("", "com.microsoft"):
            raise ValueError(
                f"rotation: node {node.name!r} ({node.op_type}) reads the residual stream; only RMS norms may"
            )
        _check_norm(node, stream, plan)
        if node.op_type == "SkipSimplifiedLayerNormalization" and len(node.outputs) > 3 and node.outputs[3].uses():
            stream.add(node.outputs[3])
    if not plan.norms:
        raise ValueError("rotation: no RMS norm reads the embedding's output")
    if transpose is not None:
        lm = [r for rs in plan.readers.values() for r in rs if r.inputs[1] is table]
        if len(lm) != 1 or set(transpose.outputs[0].consumers()) != {embedding}:
            raise ValueError("rotation: the tied embedding table must be read by the embedding and one lm_head MatMul")
        plan.tied_lm_head = lm[0]
        plan.final_norm = next(n for n, rs in plan.readers.items() if lm[0] in rs)
    return plan


def _check_norm(node: ir.Node, stream: set, plan: _Plan) -> None:
    gamma_index = _NORMS[node.op_type]
    weight = node.inputs[gamma_index] if len(node.inputs) > gamma_index else None
    if weight is None or weight.const_value is None or weight.shape is None or list(weight.shape) != [plan.size]:
        raise ValueError(f"rotation: {node.name!r} needs a constant weight of width {plan.size}")
    if any(v is not None for v in node.inputs[gamma_index + 1 :]):
        raise ValueError(f"rotation: {node.name!r} has a bias; only RMS norms without one are supported")
    for i in range(gamma_index):  # the stream itself, or a writer's output
        value = node.inputs[i]
        if value in stream:
            continue
        writer = value.producer() if value is not None else None
        if not _is_weighted_matmul(writer) or writer.inputs[1].shape[1] != plan.size or len(value.uses()) != 1:
            raise ValueError(f"rotation: input {i} of {node.name!r} is neither the stream nor a MatMul writing to it")
        plan.writers.append(writer)
    readers = []
    for user in node.outputs[0].consumers():
        if not _is_weighted_matmul(user) or user.inputs[0] is not node.outputs[0]:
            raise ValueError(f"rotation: {user.name!r} ({user.op_type}) reads {node.name!r}'s output; only MatMuls may")
        if len(user.inputs[1].uses()) != 1 and _table_source(user.inputs[1]) is None:
            raise ValueError(f"rotation: the weight of {user.name!r} is shared with other nodes")
        readers.append(user)
    if any(node.outputs[k].uses() for k in range(1, min(3, len(node.outputs)))):
        raise ValueError(f"rotation: {node.name!r}'s mean or inverse deviation output is used")
    plan.norms.append((node, node.inputs[gamma_index]))
    plan.readers[node] = readers


def _is_weighted_matmul(node: ir.Node | None) -> bool:
    return (
        node is not None
        and node.op_type == "MatMul"
        and node.domain == ""
        and node.inputs[1] is not None
        and node.inputs[1].const_value is not None
        and node.inputs[1].shape is not None
        and len(node.inputs[1].shape) == 2
    )


def _table(gather: ir.Node) -> tuple[ir.Value, ir.Node | None] | None:
    """The embedding's constant float table and, when tied, the Transpose that reads it from the lm_head weight."""
    data = gather.inputs[0]
    if data is None or gather.attributes.get_int("axis", 0) != 0:
        return None
    if data.const_value is not None and data.shape is not None and len(data.shape) == 2 and _is_float(data):
        return data, None
    producer = data.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.inputs[0].const_value is not None:
        source = producer.inputs[0]
        if source.shape is not None and len(source.shape) == 2 and _is_float(source):
            return source, producer
    return None


def _table_source(value: ir.Value) -> ir.Node | None:
    return next((u for u in value.consumers() if u.op_type == "Transpose"), None)


def _is_float(value: ir.Value) -> bool:
    return value.const_value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _constant(value: ir.Value, what: str) -> np.ndarray:
    array = np.asarray(mapped_array(value.const_value), np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"rotation: {what} ({value.name}) is not finite")
    return array


def _replace(value: ir.Value, transform: Callable[[np.ndarray, np.dtype], np.ndarray]) -> None:
    """Give ``value`` a lazy tensor: ``transform(its current array, its dtype)``, computed when saved."""
    source = value.const_value
    dtype = source.dtype

    def compute() -> ir.TensorProtocol:  # through a private map: the float model's pages do not stay resident
        return ir.tensor(transform(mapped_array(source), dtype.numpy()), name=value.name)

    value.const_value = ir.LazyTensor(compute, dtype=dtype, shape=source.shape, name=value.name)


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array, name=value.name)


def _keep_the_tie(graph: ir.Graph, plan: _Plan, rotation: Rotation) -> None:
    """Tied lm_head ``W = Eᵀ``: ``W <- Qᵀ W`` (so the embedding reads ``E Q``), and the final norm's weight ``g``
    becomes ``MatMul(·, Qᵀ diag(g) Q)`` between the norm and the lm_head."""
    lm, norm = plan.tied_lm_head, plan.final_norm
    weight = dict(plan.norms)[norm]
    gamma = _constant(weight, f"the weight of {norm.name}")
    _replace(lm.inputs[1], rotation.rotate_rows)  # no gamma: it went to the extra MatMul
    dtype = weight.const_value.dtype
    q = rotation.matrix()
    mix = ir.Value(name=ROTATION_MIX_WEIGHT)
    mix.const_value = ir.tensor((q.T @ (gamma[:, None] * q)).astype(dtype.numpy()), name=mix.name)
    graph.register_initializer(mix)
    mixed = ir.Value(name="/model/final_norm_rotation/MatMul/output_0", type=norm.outputs[0].type)
    node = ir.Node("", "MatMul", [norm.outputs[0], mix], outputs=[mixed], name="/model/final_norm_rotation/MatMul")
    graph.insert_after(norm, node)
    lm.replace_input_with(0, mixed)
