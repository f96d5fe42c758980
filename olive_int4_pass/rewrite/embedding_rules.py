"""Rewrite rules for embedding tables, applied after the MatMul rules:

- ``Gather(Transpose(W), ids)`` where ``W`` is the quantized lm_head weight (tied embeddings)
      -> ``GatherBlockQuantized(Reshape(Q(W)), ids, scales[, zero_points])``: one packed tensor feeds both ops;
- ``Gather(E, ids)`` with a constant float table ``E[V, H]`` (only with ``embedding='int4'|'int8'``)
      -> ``GatherBlockQuantized(Reshape(Q(E^T)), ids, scales[, zero_points])``.

Both store rows of ``V`` packed along ``H`` exactly as MatMulNBits stores ``N`` along ``K``, which is why the
genai builder can share the lm_head tensor with the embedding: ``GatherBlockQuantized(bits, block_size,
gather_axis=0, quantize_axis=1)`` reads ``Q(W)`` reshaped to ``[V, H * bits / 8]``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from olive_int4_pass.rewrite.state import MS_DOMAIN, QuantizationState, QuantizedInputs


class _EmbeddingRuleBase(RewriteRuleClassBase):
    tied: ClassVar[bool]

    def __init__(self, state: QuantizationState) -> None:
        super().__init__(name=type(self).__name__)
        self._state = state

    def check(self, context, table, ids, out, **_):
        bits = self._state.embedding_bits(out.producer(), table, tied=self.tied)
        return bits if isinstance(bits, MatchResult) else MatchResult()

    def rewrite(self, op, table, ids, out, **_):
        node = out.producer()
        q: QuantizedInputs = self._state.embedding_inputs(op, node, table, tied=self.tied)
        prefix = node.name.rsplit("/", 1)[0] if node.name and "/" in node.name else (node.name or "embedding")
        rows, row_bytes = q.layout.n, q.layout.row_bytes
        shape_name = f"/model/constants/INT64/[{rows}, {row_bytes}]"  # the builder's name for this constant
        shape = self._state.graph.initializers.get(shape_name)
        if shape is None:
            shape = op.initializer(ir.tensor(np.array([rows, row_bytes], np.int64)), shape_name)
        reshape = f"{prefix}/Reshape"
        data = op.call_op("Reshape", [q.packed, shape], {}, name=reshape, outputs=[f"{reshape}/output_0"])
        inputs = [data, ids, q.scales] + ([q.zero_points] if q.zero_points is not None else [])
        attrs = {
            "bits": q.layout.bits,
            "block_size": self._state.options.block_size,
            "gather_axis": 0,
            "quantize_axis": 1,
        }
        name = f"{prefix}/GatherBlockQuantized"
        return op.call_op("GatherBlockQuantized", inputs, attrs, domain=MS_DOMAIN, version=1, name=name)


class TiedEmbeddingToGatherBlockQuantized(_EmbeddingRuleBase):
    """Replaces ``Gather(Transpose(W), ids)`` by a GatherBlockQuantized over the lm_head's quantized ``W``."""

    tied: ClassVar[bool] = True

    def pattern(self, op, table, ids):
        return op.Gather(op.Transpose(table, perm=[1, 0]), ids, _outputs=["out"])


class EmbeddingToGatherBlockQuantized(_EmbeddingRuleBase):
    """Replaces ``Gather(E, ids)`` (constant float ``E[V, H]``) by a GatherBlockQuantized over ``Q(E^T)``."""

    tied: ClassVar[bool] = False

    def pattern(self, op, table, ids):
        return op.Gather(table, ids, _outputs=["out"])


def embedding_rules(state: QuantizationState) -> RewriteRuleSet:
    return RewriteRuleSet(
        [TiedEmbeddingToGatherBlockQuantized.rule(state), EmbeddingToGatherBlockQuantized.rule(state)]
    )
