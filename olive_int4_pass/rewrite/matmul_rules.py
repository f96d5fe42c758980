"""Rewrite rules that turn float MatMuls with constant weights into ``com.microsoft::MatMulNBits``:

- ``MatMul(X, W)``                      -> ``MatMulNBits(X, Q(W), scales[, zero_points])``
- ``MatMul(X, Transpose(W))``           -> ``MatMulNBits(X, Q(W^T), ...)``
- ``Gemm(X, W[, C])`` (alpha=beta=1)    -> ``MatMulNBits(X, Q(W or W^T), ..., bias=C)``
- ``Add(MatMul(X, W), b)`` (fuse_bias)  -> ``MatMulNBits(X, Q(W), ..., bias=b)``

Which nodes qualify, and at how many bits, is decided beforehand by :mod:`olive_int4_pass.plan.candidates`; a
rule's ``check()`` only looks the plan up. A weight used by several MatMuls is quantized once. Outputs keep their
names; nodes are named ``<original>_Q4`` (``_Q8``), weights ``<W>_Q4`` / ``<W>_scales`` / ``<W>_zero_points`` as
the genai model builder names them. The packed tensors are lazy: they are computed while the model is saved, one
weight at a time, so the float model is never duplicated in memory.
"""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from olive_int4_pass.plan.candidates import gemm_bias
from olive_int4_pass.rewrite.state import QuantizationState


class _QuantizeRuleBase(RewriteRuleClassBase):
    transposed: ClassVar[bool] = False

    def __init__(self, state: QuantizationState) -> None:
        super().__init__(name=type(self).__name__)
        self._state = state


def _result(bits: int | MatchResult) -> MatchResult:
    return bits if isinstance(bits, MatchResult) else MatchResult()


class MatMulToMatMulNBits(_QuantizeRuleBase):
    """Replaces ``MatMul(x, w)`` with ``MatMulNBits(x, Q(w), scales)``."""

    def pattern(self, op, x, w):
        return op.MatMul(x, w, _outputs=["out"])

    def check(self, context, x, w, out, **_):
        return _result(self._state.matmul_bits(out.producer(), w))

    def rewrite(self, op, x, w, out, **_):
        node = out.producer()
        bits = self._state.matmul_bits(node, w)
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
        return _result(self._state.matmul_bits(out.producer(), w))

    def rewrite(self, op, x, w, out, **_):
        node = out.producer()
        bits = self._state.matmul_bits(node, w)
        bias = gemm_bias(node)
        if bias is not None and len(bias.const_value.shape) != 1:
            self._state.replaced_weights[id(bias)] = bias  # dropped below if nothing else reads it
            # A copy, not a view: a view would pin the input's memory map.
            bias = op.initializer(ir.tensor(bias.const_value.numpy().reshape(-1).copy()), f"{bias.name}_1d")
        transposed = bool(node.attributes.get_int("transB", 0))
        return self._state.matmul_nbits(op, node, x, w, transposed, bits, bias=bias)


class MatMulAddToMatMulNBits(_QuantizeRuleBase):
    """Replaces ``Add(MatMul(x, w), b)`` (b constant, shape [N]) with ``MatMulNBits(x, Q(w), ..., bias=b)``."""

    def pattern(self, op, x, w, b):
        return op.Add(op.MatMul(x, w, _outputs=["mm_out"]), b, _outputs=["out"])

    def check(self, context, x, w, b, mm_out, out, **_):
        return _result(self._state.matmul_bits(mm_out.producer(), w, fused_add=out.producer()))

    def rewrite(self, op, x, w, b, mm_out, out, **_):
        node = mm_out.producer()
        bits = self._state.matmul_bits(node, w, fused_add=out.producer())
        return self._state.matmul_nbits(op, node, x, w, False, bits, bias=b)


def quantization_rules(state: QuantizationState) -> list[RewriteRuleSet]:
    """Rule sets to apply in order. The bias fusion runs alone first: the rewriter visits the MatMul before its
    Add, so in one set the plain MatMul rule would always win."""
    rule_sets = []
    if state.options.fuse_bias:
        rule_sets.append(RewriteRuleSet([MatMulAddToMatMulNBits.rule(state)]))
    rules = [TransposedMatMulToMatMulNBits.rule(state), MatMulToMatMulNBits.rule(state), GemmToMatMulNBits.rule(state)]
    rule_sets.append(RewriteRuleSet(rules))
    return rule_sets
