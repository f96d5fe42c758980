"""Measured sensitivity with probes carried to the logits after a few layers (``sensitivity_depth``) against probes
run through every later layer: the same ranking of layers at a cost linear in depth?

    python benchmarks/sensitivity_depth_bench.py MODEL_DIR/model.onnx --depths 0 1 2 4 8
    python benchmarks/sensitivity_depth_bench.py MODEL_DIR/model.onnx --depths 1 2 4 --tail 8 --reference out.json

For a builder export (fp32 or fp16), each transformer layer (and each weight outside a layer) is quantized to
plain symmetric INT4 in turn and the KL at the logits is measured on the first ``--tokens`` tokens of the built-in
calibration text, as ``sensitivity: measured`` does, once per depth (0 = every probe runs to the logits, today's
measure). The table gives per depth: the sweep's wall time, Spearman's rank correlation of the per-group KLs with
depth 0's, how many of depth 0's top quarter of groups are also in the depth's top quarter, and the sum of KLs
(the budget ranks by KL per byte, so the ranking is what matters). ``--json`` writes every group's KL;
``--reference`` reuses one's depth-0 KLs; ``--tail`` sets the last layers a carried probe runs (default: its
depth, as ``sensitivity_depth`` does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from olive_int4_pass.kernels.rtn import dequantize_blockwise, quantize_blockwise
from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.plan.calibration import load_calibration_text, tokenize
from olive_int4_pass.plan.candidates import plan_graph
from olive_int4_pass.plan.sensitivity import LayeredImpactProbe, group_by_layer


def spearman(a: list[float], b: list[float]) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--tail", type=int, help="last layers every carried probe runs (default: its depth)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--reference", type=Path, help="a --json output: reuse its depth-0 KLs")
    args = parser.parse_args()

    import onnx_ir as ir

    candidates = plan_graph(ir.load(args.model).graph, QuantizeOptions()).candidates
    names = {k: c.name for k, c in candidates.items()}
    groups = group_by_layer({k: c.nodes for k, c in candidates.items()}, names)
    ids = tokenize(load_calibration_text("default"), args.model.parent, args.tokens)

    def stored(cand):
        return lambda: cand.weight().T if cand.transposed else cand.weight()

    def replacement(key):
        cand = candidates[key]
        q = quantize_blockwise(np.asarray(cand.weight()), block_size=32, bits=4)
        return cand.name, dequantize_blockwise(q, cand.source.dtype.numpy(), transposed=cand.transposed)

    loaders = {c.name: stored(c) for c in candidates.values()}
    kls, seconds = {}, {}
    if args.reference:
        kls[0], seconds[0] = json.loads(args.reference.read_text())["0"], float("nan")
        args.depths = [0, *[d for d in args.depths if d]]
    for depth in [d for d in args.depths if d not in kls]:
        start = time.perf_counter()
        probe = LayeredImpactProbe(args.model, loaders, ids, depth or None, args.tail)
        kls[depth] = probe.measure(groups, names, replacement)
        seconds[depth] = time.perf_counter() - start
        print(f"depth {depth}: {seconds[depth]:.1f} s", flush=True)

    order = sorted(groups)
    base = [kls[args.depths[0]][g] for g in order]
    top = max(1, len(order) // 4)
    best = set(sorted(order, key=lambda g: -kls[args.depths[0]][g])[:top])
    print(f"\n{args.model}: {len(order)} groups, {len(ids)} tokens; reference: depth {args.depths[0]}")
    print("| depth | seconds | Spearman | top quarter kept | sum of KL |")
    print("|---:|---:|---:|---:|---:|")
    for depth in args.depths:
        values = [kls[depth][g] for g in order]
        kept = len(best & set(sorted(order, key=lambda g: -kls[depth][g])[:top]))
        print(f"| {depth} | {seconds[depth]:.1f} | {spearman(base, values):.3f} | {kept}/{top} | {sum(values):.4f} |")
    if args.json:
        args.json.write_text(json.dumps({str(d): kls[d] for d in args.depths}, indent=1))


if __name__ == "__main__":
    main()
