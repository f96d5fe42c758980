"""Rewrite rules that turn float MatMuls with constant weights into ``com.microsoft::MatMulNBits``:

- ``MatMul(X, W)``                      -> ``MatMulNBits(X, Q(W), scales[, zero_points])``
- ``MatMul(X, Transpose(W))``           -> ``MatMulNBits(X, Q(W^T), ...)``
- ``Gemm(X, W[, C])`` (alpha=beta=1)    -> ``MatMulNBits(X, Q(W or W^T), ..., bias=C)``
- ``Add(MatMul(X, W), b)`` (fuse_bias)  -> ``MatMulNBits(X, Q(W), ..., bias=b)``

W must be a 2-D float32/float16/bfloat16 initializer of the main graph. A weight used by several MatMuls is
quantized once. Outputs keep their names; nodes are named ``<original>_Q4`` (``_Q8``), weights
``<W>_Q4`` / ``<W>_scales`` / ``<W>_zero_points`` as the genai model builder names them. The packed tensors are
lazy: they are computed while the model is saved, one weight at a time, so the float model is never duplicated
in memory. Nodes the rules decline are recorded with the reason in :class:`QuantizationState`.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase, RewriteRuleSet

from olive_int4_pass.kernels.rtn import QuantizedWeight
from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.plan.weight_plan import Candidate, QualityPlan, WeightKey

MS_DOMAIN = "com.microsoft"
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclasses.dataclass
class QuantizedInputs:
    """The initializers that replace one float weight."""

    packed: ir.Value
    scales: ir.Value
    zero_points: ir.Value | None
    k: int
    n: int
    bits: int


class QuantizationState:
    """What the rules share during one model rewrite: options, the per-weight cache and a record of decisions."""

    def __init__(self, options: QuantizeOptions, graph: ir.Graph) -> None:
        self.options = options
        self.graph = graph
        self.cache: dict[tuple[int, bool, int], QuantizedInputs] = {}
        self.replaced_weights: dict[int, ir.Value] = {}
        self.quantized: dict[str, int] = {}  # node name -> bits
        self.skipped: dict[str, str] = {}  # node name -> reason
        self.tied_decisions: list[str] = []
        self.candidates: dict[WeightKey, Candidate] = {}  # MatMul weights the rules accepted
        self.quality = QualityPlan(options)

    def forget_rewrites(self) -> None:
        """Drop everything but the candidates (after a dry run, whose replacements were discarded)."""
        self.cache.clear()
        self.replaced_weights.clear()
        self.quantized.clear()
        self.skipped.clear()
        self.tied_decisions.clear()

    def _weight_problem(self, node: ir.Node, w: ir.Value) -> str | None:
        """Why ``w`` (read by ``node``) cannot be quantized, or None."""
        if node.graph is not self.graph:
            return "inside a subgraph or function (only the main graph is quantized)"
        selected, why = self.options.selects(node.name or "")
        if not selected:
            return why
        if w.const_value is None or not w.is_initializer():
            return "weight is not a constant initializer"
        if w.is_graph_input():
            return "weight initializer is also a graph input (it can be overridden at run time)"
        if w.const_value.dtype not in _FLOAT_TYPES:
            return f"weight dtype {w.const_value.dtype} is not float32/float16/bfloat16"
        if len(w.const_value.shape) != 2:
            return f"weight rank {len(w.const_value.shape)} != 2"
        return None

    def _skip(self, node: ir.Node, reason: str) -> MatchResult:
        self.skipped.setdefault(node.name or "<unnamed>", reason)
        return MatchResult().fail(reason)

    def plan(
        self, node: ir.Node, w: ir.Value, x: ir.Value, result_value: ir.Value, transposed: bool
    ) -> MatchResult | int:
        """Return the bit width to quantize MatMul-like ``node`` with, or a failed MatchResult saying why not."""
        problem = self._weight_problem(node, w)
        if problem:
            return self._skip(node, problem)
        bits = self.options.bits
        if result_value.is_graph_output():
            if self.options.lm_head == "float":
                return self._skip(node, "final projection kept in float (lm_head='float')")
            if self.options.lm_head == "int8":
                bits = 8
        self.skipped.pop(node.name or "<unnamed>", None)
        key = (id(w), transposed)
        candidate = self.candidates.setdefault(key, Candidate(w.name, w.const_value, transposed, x.name))
        if node.name not in candidate.nodes:
            candidate.nodes.append(node.name)
        candidate.min_bits = max(candidate.min_bits, bits)
        return max(bits, self.quality.bits.get(key, bits))

    def plan_embedding(self, node: ir.Node, table: ir.Value, tied: bool) -> MatchResult | int:
        """Bit width for an embedding ``Gather`` (``Gather(Transpose(W))`` when ``tied``), or why it stays float."""
        value = table.const_value
        if value is None or value.dtype not in _FLOAT_TYPES or len(value.shape) != 2:
            return MatchResult().fail("not a float embedding table")  # e.g. shape arithmetic: not worth a log line
        problem = self._weight_problem(node, table)
        if problem:
            return self._skip(node, problem)
        hidden = table.const_value.shape[0 if tied else 1]
        shared = self._shared_matmul_bits(table) if tied and self.options.tied_embeddings else None
        if shared is not None:
            bits = shared
        elif self.options.embedding == "float":
            reason = "embedding kept in float (embedding='float')"
            if tied:
                reason = "tied embedding kept in float: its lm_head weight is not quantized"
            return self._skip(node, reason)
        else:
            bits = int(self.options.embedding[-1])
        if hidden % self.options.block_size:
            return self._skip(node, f"embedding width {hidden} is not a multiple of block_size")
        self.skipped.pop(node.name or "<unnamed>", None)
        return bits

    def _shared_matmul_bits(self, w: ir.Value) -> int | None:
        for (weight_id, transposed, bits), _ in self.cache.items():
            if weight_id == id(w) and not transposed:
                return bits
        return None

    def embedding_inputs(self, op, node: ir.Node, table: ir.Value, tied: bool) -> QuantizedInputs:
        bits = self.plan_embedding(node, table, tied)
        if tied and (id(table), False, bits) in self.cache:
            self.tied_decisions.append(f"{table.name}: one quantized tensor shared by the lm_head and {node.name}")
        # Tied: rows of Transpose(W) are W's columns, i.e. W itself in MatMulNBits layout. Untied E[V, H]: E^T.
        q = self.quantized_inputs(op, table, not tied, bits)
        self.quantized[node.name or "<unnamed>"] = bits
        return q

    def quantized_inputs(self, op, w: ir.Value, transposed: bool, bits: int) -> QuantizedInputs:
        """Initializers for ``Q(W)`` (``Q(W^T)`` when transposed), created once per weight."""
        key = (id(w), transposed, bits)
        if key in self.cache:
            return self.cache[key]
        source = w.const_value
        rows, cols = source.shape.numpy()
        k, n = (cols, rows) if transposed else (rows, cols)
        opts = self.options
        n_blocks = -(-k // opts.block_size)
        candidate = self.candidates.get((id(w), transposed)) or Candidate(w.name, source, transposed, None)
        lazy = _LazyQuantization(self.quality, (id(w), transposed), candidate, bits, opts.is_symmetric)
        suffix = "" if not transposed else "_T"
        base = f"{w.name}{suffix}"
        packed = op.initializer(
            lazy.tensor("packed", ir.DataType.UINT8, (n, n_blocks, opts.block_size * bits // 8)), f"{base}_Q{bits}"
        )
        scales = op.initializer(lazy.tensor("scales", source.dtype, (n, n_blocks)), f"{base}_scales")
        zero_points = None
        if not opts.is_symmetric:
            zp_shape = (n, (n_blocks * bits + 7) // 8)
            zero_points = op.initializer(lazy.tensor("zero_points", ir.DataType.UINT8, zp_shape), f"{base}_zero_points")
        result = QuantizedInputs(packed, scales, zero_points, k, n, bits)
        self.cache[key] = result
        self.replaced_weights[id(w)] = w
        return result

    def matmul_nbits(self, op, node: ir.Node, x: ir.Value, w: ir.Value, transposed: bool, bits: int, bias=None):
        q = self.quantized_inputs(op, w, transposed, bits)
        inputs = [x, q.packed, q.scales, q.zero_points]
        if bias is not None:
            inputs += [None, bias]  # g_idx unused
        while inputs[-1] is None:
            inputs.pop()
        attrs = {"K": q.k, "N": q.n, "bits": bits, "block_size": self.options.block_size}
        if self.options.accuracy_level is not None:
            attrs["accuracy_level"] = self.options.accuracy_level
        self.quantized[node.name or "<unnamed>"] = bits
        name = f"{node.name}_Q{bits}" if node.name else None
        return op.call_op("MatMulNBits", inputs, attrs, domain=MS_DOMAIN, version=1, name=name)

    def byte_counts(self) -> tuple[int, int]:
        """Bytes of the float weights replaced and of the quantized tensors that replace them."""
        float_bytes = sum(w.const_value.nbytes for w in self.replaced_weights.values() if w.const_value is not None)
        quantized = [v for q in self.cache.values() for v in (q.packed, q.scales, q.zero_points) if v is not None]
        return float_bytes, sum(v.const_value.nbytes for v in quantized)

    def remove_replaced_weights(self) -> list[str]:
        """Drop float weights no node reads any more; return their names."""
        removed = []
        for w in self.replaced_weights.values():
            if not w.uses() and not w.is_graph_output() and w.name in self.graph.initializers:
                del self.graph.initializers[w.name]
                removed.append(w.name)
        return removed


class _LazyQuantization:
    """Quantizes one weight on first access of any of its parts; forgets the result once every part was read."""

    def __init__(self, plan: QualityPlan, key: WeightKey, candidate: Candidate, bits: int, symmetric: bool):
        self._plan = plan
        self._key = key
        self._candidate = candidate
        self._bits = bits
        self._parts = {"packed", "scales"} | (set() if symmetric else {"zero_points"})
        self._lock = threading.Lock()
        self._result: QuantizedWeight | None = None
        self._unread: set[str] = set()

    def tensor(self, part: str, dtype: ir.DataType, shape: tuple[int, ...]) -> ir.LazyTensor:
        return ir.LazyTensor(lambda: ir.tensor(self._part(part)), dtype=dtype, shape=ir.Shape(shape))

    def _part(self, part: str) -> np.ndarray:
        with self._lock:
            if self._result is None:
                self._result = self._plan.quantize(self._key, self._candidate, self._bits)
                self._unread = set(self._parts)
            value = getattr(self._result, part)
            self._unread.discard(part)
            if not self._unread:
                self._result = None
            elif part == "packed":  # the bulk is being written: keep only the parts still to be read
                self._result = dataclasses.replace(self._result, packed=None)
            return value


class _QuantizeRuleBase(RewriteRuleClassBase):
    transposed: ClassVar[bool] = False

    def __init__(self, state: QuantizationState) -> None:
        super().__init__(name=type(self).__name__)
        self._state = state


class MatMulToMatMulNBits(_QuantizeRuleBase):
    """Replaces ``MatMul(x, w)`` with ``MatMulNBits(x, Q(w), scales)``."""

    def pattern(self, op, x, w):
        return op.MatMul(x, w, _outputs=["out"])

    def check(self, context, x, w, out, **_):
        plan = self._state.plan(out.producer(), w, x, out, self.transposed)
        return plan if isinstance(plan, MatchResult) else MatchResult()

    def rewrite(self, op, x, w, out, **_):
        node = out.producer()
        bits = self._state.plan(node, w, x, out, self.transposed)
        return self._state.matmul_nbits(op, node, x, w, self.transposed, bits)


class TransposedMatMulToMatMulNBits(MatMulToMatMulNBits):
    """Replaces ``MatMul(x, Transpose(w))`` with ``MatMulNBits(x, Q(w^T), scales)``."""

    transposed: ClassVar[bool] = True

    def pattern(self, op, x, w):
        return op.MatMul(x, op.Transpose(w, perm=[1, 0]), _outputs=["out"])


class GemmToMatMulNBits(_QuantizeRuleBase):
    """Replaces ``Gemm(x, w[, c])`` (alpha = beta = 1, transA = 0) with ``MatMulNBits(x, Q(w), ..., bias=c)``."""

    def pattern(self, op, x, w):
        return op.Gemm(x, w, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, w, out, **_):
        node = out.producer()
        result = MatchResult()
        if node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0:
            return result.fail("Gemm with alpha or beta != 1")
        if node.attributes.get_int("transA", 0):
            return result.fail("Gemm with transA")
        if _gemm_bias(node) is False:
            return result.fail("Gemm bias is not a constant broadcastable to [N]")
        plan = self._state.plan(node, w, x, out, bool(node.attributes.get_int("transB", 0)))
        return plan if isinstance(plan, MatchResult) else result

    def rewrite(self, op, x, w, out, **_):
        node = out.producer()
        transposed = bool(node.attributes.get_int("transB", 0))
        bits = self._state.plan(node, w, x, out, transposed)
        bias = _gemm_bias(node)
        if bias is not None and len(bias.const_value.shape) != 1:
            self._state.replaced_weights[id(bias)] = bias  # dropped below if nothing else reads it
            # A copy, not a view: a view would pin the input's memory map.
            bias = op.initializer(ir.tensor(bias.const_value.numpy().reshape(-1).copy()), f"{bias.name}_1d")
        return self._state.matmul_nbits(op, node, x, w, transposed, bits, bias=bias)


class MatMulAddToMatMulNBits(_QuantizeRuleBase):
    """Replaces ``Add(MatMul(x, w), b)`` (b constant, shape [N]) with ``MatMulNBits(x, Q(w), ..., bias=b)``."""

    def pattern(self, op, x, w, b):
        return op.Add(op.MatMul(x, w, _outputs=["mm_out"]), b, _outputs=["out"])

    def check(self, context, x, w, b, mm_out, out, **_):
        result = MatchResult()
        if b.const_value is None or len(b.const_value.shape) != 1:
            return result.fail("bias is not a constant 1-D tensor")
        if w.const_value is not None and b.const_value.shape[0] != w.const_value.shape[-1]:
            return result.fail("bias length != N")
        plan = self._state.plan(mm_out.producer(), w, x, out, False)
        return plan if isinstance(plan, MatchResult) else result

    def rewrite(self, op, x, w, b, mm_out, out, **_):
        node = mm_out.producer()
        bits = self._state.plan(node, w, x, out, False)
        return self._state.matmul_nbits(op, node, x, w, False, bits, bias=b)


def _gemm_bias(node: ir.Node) -> ir.Value | bool | None:
    """The Gemm's C input if usable as a MatMulNBits bias, None if absent, False if unusable."""
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is None:
        return None
    w = node.inputs[1]
    if c.const_value is None or w.const_value is None:
        return False
    n = w.const_value.shape[0 if node.attributes.get_int("transB", 0) else 1]
    shape = tuple(c.const_value.shape.numpy())
    if int(np.prod(shape)) != n or (len(shape) == 2 and shape[0] != 1) or len(shape) > 2:
        return False
    return c


def quantization_rules(state: QuantizationState) -> list[RewriteRuleSet]:
    """Rule sets to apply in order. The bias fusion runs alone first: the rewriter visits the MatMul before its
    Add, so in one set the plain MatMul rule would always win."""
    rule_sets = []
    if state.options.fuse_bias:
        rule_sets.append(RewriteRuleSet([MatMulAddToMatMulNBits.rule(state)]))
    rules = [TransposedMatMulToMatMulNBits.rule(state), MatMulToMatMulNBits.rule(state), GemmToMatMulNBits.rule(state)]
    rule_sets.append(RewriteRuleSet(rules))
    return rule_sets
