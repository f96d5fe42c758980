"""What error-compensated rounding (``rounding: compensated``) costs per weight, at a model's MatMul shapes.

    python benchmarks/compensation_bench.py                         # Qwen2-7B's shapes (one layer + lm_head)
    python benchmarks/compensation_bench.py --hidden 1536 --intermediate 8960 --kv 256 --vocab 151936   # 1.5B
    python benchmarks/compensation_bench.py --only down --span 4096    # the 7B down projection in 5 runs

For each distinct MatMul of one transformer layer (q, k, v, o, gate, up, down) and the lm_head, a random fp16
weight ``W[K, N]`` and the second moments ``H`` of 2,048 correlated random input rows are made; the table shows,
per weight, the seconds of forming ``H`` from the kept inputs (:class:`ActivationStore`), of the rounding
(``compensated_quantize``, act-order; the weights of one input share its factored ``H`` as in the plan, so k, v
and up form none) and of plain round to nearest (``quantize_blockwise``), and the output-error ratio against
round to nearest (below 1 is better). The last lines extrapolate one layer to the model's depth
and give the process's peak RSS (VmHWM), which the largest ``H`` (the down projection's, ``intermediate^2``
floats) sets. Timings share the machine with whatever else runs: rerun for a median.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from olive_int4_pass.kernels.gptq import compensated_quantize_spans
from olive_int4_pass.kernels.rtn import dequantize_blockwise, quantize_blockwise
from olive_int4_pass.plan.activation_store import ActivationStore

# The input each weight reads: weights of one input share its factored H (the o projection reads its own).
INPUT_OF = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "mlp", "up": "mlp", "down": "down", "lm_head": "lm"}


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def inputs(k: int, tokens: int, rng: np.random.Generator) -> np.ndarray:
    """Rows with a few shared directions and channels of very different sizes, as a transformer's are."""
    shared = rng.normal(size=(tokens, 16)).astype(np.float32) @ rng.normal(size=(16, k)).astype(np.float32)
    x = rng.normal(size=(tokens, k)).astype(np.float32) + shared
    return x * np.exp(rng.normal(size=k)).astype(np.float32)


def output_error(q, w: np.ndarray, store: ActivationStore, name: str, cols: np.ndarray) -> float:
    e = dequantize_blockwise(q)[:, cols] - w[:, cols].astype(np.float32)
    return store.output_error(name, e, w[:, cols])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--intermediate", type=int, default=18944)
    parser.add_argument("--kv", type=int, default=512, help="k/v projection width (kv heads x head size)")
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--skip-lm-head", action="store_true")
    parser.add_argument("--only", nargs="+", help="weights to run (q k v o gate up down lm_head)")
    parser.add_argument("--span", type=int, help="compensation_span: input channels compensated together")
    args = parser.parse_args()
    d, f = args.hidden, args.intermediate
    shapes = [("q", d, d), ("k", d, args.kv), ("v", d, args.kv), ("o", d, d), ("gate", d, f), ("up", d, f)]
    shapes += [("down", f, d)] + ([] if args.skip_lm_head else [("lm_head", d, args.vocab)])
    shapes = [shape for shape in shapes if not args.only or shape[0] in args.only]
    rng = np.random.default_rng(0)
    store = ActivationStore({"hidden": d, "intermediate": f})
    for name, k in store.widths.items():
        for start in range(0, args.tokens, 256):
            store.add(name, inputs(k, min(256, args.tokens - start), rng))
    print("| weight | K x N | form H s | compensated s | nearest s | output error / nearest's |")
    print("|---|---|---:|---:|---:|---:|")
    layer = 0.0
    shared: dict[str, dict] = {}
    for name, k, n in shapes:
        w = (rng.normal(size=(k, n)) * 0.02).astype(np.float16)
        source = "hidden" if k == d else "intermediate"
        order = store.act_order(source)
        formed = []

        def fresh(orders, source=source, formed=formed):  # as the weight plan does: H in act-order, owned
            start = time.perf_counter()
            blocks = store.second_moment_blocks(source, orders)
            formed.append(time.perf_counter() - start)
            return blocks

        start = time.perf_counter()
        factors = shared.setdefault(INPUT_OF[name], {})  # as the plan does: q/k/v share one factor, gate/up one
        q, _ = compensated_quantize_spans(w, fresh, order=order, span=args.span, factors=factors, name=name)
        form = sum(formed)
        comp = time.perf_counter() - start - form
        start = time.perf_counter()
        rtn = quantize_blockwise(w)
        nearest = time.perf_counter() - start
        cols = np.unique(np.linspace(0, n - 1, min(n, 256)).astype(int))
        ratio = output_error(q, w, store, source, cols) / output_error(rtn, w, store, source, cols)
        if name != "lm_head":
            layer += form + comp
        del formed
        print(f"| {name} | {k} x {n} | {form:.1f} | {comp:.1f} | {nearest:.2f} | {ratio:.3f} |", flush=True)
        del q, rtn, w
    store.close()
    print(
        f"\none layer: {layer:.0f} s; x {args.layers} layers: {layer * args.layers / 60:.1f} min (before the lm_head)"
    )
    print(f"peak RSS: {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
