"""Graph rewriting on ``onnx_ir`` with onnxscript rewrite rules: MatMul/Gemm -> MatMulNBits (:mod:`.matmul_rules`),
embedding Gathers -> GatherBlockQuantized (:mod:`.embedding_rules`), and what the rules share (:mod:`.state`)."""
