"""What the rewrite rules share during one model rewrite: the plans they look up, the quantized tensors they build
(once per weight, lazily computed while the model is saved) and a record of what was done."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult

from olive_int4_pass.kernels.layout import NBitsLayout
from olive_int4_pass.kernels.rtn import QuantizedWeight
from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.plan.candidates import Candidate, Planning, WeightKey
from olive_int4_pass.plan.weight_plan import QualityPlan

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class QuantizedInputs:
    """The initializers that replace one float weight."""

    packed: ir.Value
    scales: ir.Value
    zero_points: ir.Value | None
    layout: NBitsLayout


class QuantizationState:
    """Plans in (from :func:`olive_int4_pass.plan.candidates.plan_graph`), quantized tensors and decisions out.

    The ``*_bits`` lookups are what the rules' ``check()`` calls: they read, never write.
    """

    def __init__(self, options: QuantizeOptions, graph: ir.Graph, planning: Planning, quality: QualityPlan) -> None:
        self.options = options
        self.graph = graph
        self.planning = planning
        self.quality = quality
        self.cache: dict[tuple[int, bool, int], QuantizedInputs] = {}
        self.replaced_weights: dict[int, ir.Value] = {}
        self.quantized: dict[str, int] = {}  # node name -> bits
        self.tied_decisions: list[str] = []

    @property
    def skipped(self) -> dict[str, str]:
        return self.planning.skipped

    @property
    def candidates(self) -> dict[WeightKey, Candidate]:
        return self.planning.candidates

    def matmul_bits(self, node: ir.Node, w: ir.Value, fused_add: ir.Node | None = None) -> int | MatchResult:
        """The bit width ``node`` (reading weight ``w``) is planned at, or a failed match saying why not."""
        plan = self.planning.matmuls.get(node)
        if plan is None:
            return MatchResult().fail(self.skipped.get(node.name or "<unnamed>", "not planned"))
        if plan.weight is not w or plan.fused_add is not fused_add:
            return MatchResult().fail("planned in another form")
        # The weight plan's choice wins: 8 bits bought by the budget, or an imposed 8 bits that did not fit it.
        return self.quality.bits.get(self.planning.key(plan), plan.bits)

    def embedding_bits(self, node: ir.Node, table: ir.Value, tied: bool) -> int | MatchResult:
        """The bit width of an embedding Gather's table (its lm_head's when shared), or why it stays float."""
        plan = self.planning.embeddings.get(node)
        if plan is None or plan.table is not table or plan.tied != tied:
            return MatchResult().fail(self.skipped.get(node.name or "<unnamed>", "not planned"))
        if plan.shares_lm_head:
            shared = [bits for (weight_id, transposed, bits) in self.cache if weight_id == id(table) and not transposed]
            if shared:
                return shared[0]
        if self.options.embedding == "float":
            return MatchResult().fail("its lm_head weight was not quantized")
        return int(self.options.embedding[-1])

    def embedding_inputs(self, op, node: ir.Node, table: ir.Value, tied: bool) -> QuantizedInputs:
        bits = self.embedding_bits(node, table, tied)
        if tied and (id(table), False, bits) in self.cache:
            self.tied_decisions.append(f"{table.name}: one quantized tensor shared by the lm_head and {node.name}")
        # Tied: rows of Transpose(W) are W's columns, i.e. W itself in MatMulNBits layout. Untied E[V, H]: E^T.
        q = self.quantized_inputs(op, table, not tied, bits)
        self.quantized[node.name or "<unnamed>"] = bits
        return q

    def quantized_inputs(self, op, w: ir.Value, transposed: bool, bits: int) -> QuantizedInputs:
        """Initializers for ``Q(W)`` (``Q(W^T)`` when transposed), created once per weight and bit width."""
        key = (id(w), transposed, bits)
        if key in self.cache:
            return self.cache[key]
        source = w.const_value
        rows, cols = source.shape.numpy()
        k, n = (cols, rows) if transposed else (rows, cols)
        layout = NBitsLayout(k, n, self.options.block_size, bits)
        candidate = self.candidates.get((id(w), transposed)) or Candidate(w.name, source, transposed, None)
        lazy = _LazyQuantization(self.quality, (id(w), transposed), candidate, bits, self.options.is_symmetric)
        base = f"{w.name}{'_T' if transposed else ''}"
        packed = op.initializer(lazy.tensor("packed", ir.DataType.UINT8, layout.packed_shape), f"{base}_Q{bits}")
        scales = op.initializer(lazy.tensor("scales", source.dtype, layout.scales_shape), f"{base}_scales")
        zero_points = None
        if not self.options.is_symmetric:
            zp = lazy.tensor("zero_points", ir.DataType.UINT8, layout.zero_points_shape)
            zero_points = op.initializer(zp, f"{base}_zero_points")
        result = QuantizedInputs(packed, scales, zero_points, layout)
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
        attrs = {"K": q.layout.k, "N": q.layout.n, "bits": bits, "block_size": self.options.block_size}
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
