"""Quantize a 7B-shaped fp16 ONNX model with our pass and the anchors; print wall time, peak RSS and ratios.

    python benchmarks/quantize_bench.py --layers 2 --repeat 5
    python benchmarks/quantize_bench.py --layers 4 8 --repeat 3 --tools ours olive-rtn ort-nbits cp
    python benchmarks/quantize_bench.py --layers 28 --repeat 1 --tools ours cp     # 15 GB on disk
    python benchmarks/quantize_bench.py --layers 28 --unique-layers 2 --repeat 1 --tools ours   # 3 GB on disk

The model is synthetic (random fp16 weights, Qwen2-7B shapes, onnxruntime-genai builder names and I/O), built
offline once under ``--work-dir`` and reused. Every tool runs in its own subprocess so that its peak RSS
(``ru_maxrss`` from ``os.wait4``) is its own; the time reported is the quantize step inside that process
(load + quantize + save, imports excluded) and the table shows the median over ``--repeat`` rounds, tools
interleaved within a round so that machine noise hits them alike.

Tools:
- ``ours``: ``olive_int4_pass.pipeline.quantize_file`` (the code path behind our Olive pass and CLI).
- ``ours-in-memory``: the same rewrite after ``ir.external_data.load_to_model`` (the non-streaming reference).
- ``olive-rtn``: Olive's ``OnnxBlockWiseRtnQuantization`` (block 32, symmetric, embedding Gather excluded).
- ``ort-nbits``: onnxruntime's ``MatMulNBitsQuantizer`` (default RTN config, block 32, symmetric, MatMul only).
- ``cp``: ``cp`` of the external data file, the physical floor of a tool that must read and write it.
All the quantizers compute onnxruntime's ``quantize_matmul_4bits`` bytes, so the outputs are compared in the first
round (see ``verify_output``) and the run fails on any difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
EMBED_GATHER = "/model/embed_tokens/Gather"
TOOLS = ("ours", "ours-in-memory", "olive-rtn", "ort-nbits", "cp")
ANCHORS = ("olive-rtn", "ort-nbits")
_GB = 1e9


# --------------------------------------------------------------------------------------------------------------
# Synthetic model
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A decoder's dimensions; the defaults are Qwen2-7B's."""

    layers: int = 2
    hidden: int = 3584
    intermediate: int = 18944
    heads: int = 28
    kv_heads: int = 4
    vocab: int = 152064
    # Layers from this index on reuse the stored bytes of layer ``i % unique_layers`` (external data entries
    # pointing at the same offsets): a deep model's graph, tensors and work on a fraction of the disk.
    unique_layers: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def build_model(
    out_dir: str | os.PathLike, shape: ModelShape, *, seed: int = 0, dtype: str = "float16", scale: float = 0.02
) -> Path:
    """Write ``model.onnx`` + ``model.onnx.data`` shaped like the genai builder's fp16 export of ``shape``.

    Weights are random normal, generated and written a chunk at a time (memory stays flat whatever the size).
    A finished model is reused: ``build.json`` records what was built and is written last.
    """
    import numpy as np

    out_dir = Path(out_dir)
    marker = out_dir / "build.json"
    shape_spec = {k: v for k, v in dataclasses.asdict(shape).items() if v is not None}
    spec = {"shape": shape_spec, "seed": seed, "dtype": dtype, "scale": scale, "version": 1}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out_dir / MODEL_NAME
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    try:
        _write_model(out_dir, shape, np.dtype(dtype), seed, scale)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # no half-written model (nor a full disk) left behind
        raise
    marker.write_text(json.dumps(spec))
    return out_dir / MODEL_NAME


def stored_bytes(shape: ModelShape, itemsize: int = 2) -> int:
    """Size of the data file ``build_model`` writes for ``shape``."""
    s = shape
    layer = s.hidden * (s.hidden + 2 * s.kv_dim) + s.hidden * s.hidden + 3 * s.hidden * s.intermediate
    layer += 2 * s.hidden + s.hidden + 2 * s.kv_dim  # norms and the qkv bias
    stored_layers = min(s.layers, s.unique_layers or s.layers)
    return itemsize * (stored_layers * layer + 2 * s.vocab * s.hidden + s.hidden)


def _write_model(out_dir: Path, shape: ModelShape, np_dtype, seed: int, scale: float) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    needed = stored_bytes(shape, np_dtype.itemsize)
    free = shutil.disk_usage(out_dir).free
    if needed > free - 2 * _GB:
        raise ValueError(f"{out_dir} has {free / _GB:.1f} GB free, the model needs {needed / _GB:.1f} GB (+2 GB spare)")
    onnx_dtype = helper.np_dtype_to_tensor_dtype(np_dtype)
    onnx_dtype = helper.np_dtype_to_tensor_dtype(np_dtype)
    s = shape
    initializers: list[TensorProto] = []
    nodes = []
    rng = np.random.default_rng(seed)
    stored: dict[str, tuple[int, int]] = {}  # name -> (offset, length) in the data file
    layer = [0]  # the layer being built (aliased weights are looked up under the stored layer's name)

    with open(out_dir / DATA_NAME, "wb") as data:

        def weight(name: str, dims: tuple[int, ...], fill: float | None = None) -> str:
            """Append a tensor to the data file (random normal * scale, or a constant) and declare it."""
            source = name
            if s.unique_layers and layer[0] >= s.unique_layers:
                source = name.replace(f"layers.{layer[0]}.", f"layers.{layer[0] % s.unique_layers}.", 1)
            if source not in stored:
                offset = data.tell()
                count = int(np.prod(dims))
                chunk = 1 << 24
                for start in range(0, count, chunk):
                    n = min(chunk, count - start)
                    values = np.full(n, fill, np_dtype) if fill is not None else rng.standard_normal(n, np.float32)
                    if fill is None:
                        values *= np.float32(scale)
                    data.write(values.astype(np_dtype).tobytes())
                stored[source] = (offset, data.tell() - offset)
            offset, length = stored[source]
            tensor = TensorProto(name=name, data_type=onnx_dtype, dims=dims, data_location=TensorProto.EXTERNAL)
            for key, value in (("location", DATA_NAME), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            initializers.append(tensor)
            return name

        def node(op: str, name: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
            outputs = [f"{name}/output_{i}" for i in range(n_out)]
            nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
            return outputs

        def norm(prefix: str, weight_name: str, x: str) -> str:
            return node(
                "LayerNormalization", f"{prefix}/LayerNorm", [x, weight(weight_name, (s.hidden,), 1.0)], epsilon=1e-6
            )[0]

        def matmul(prefix: str, x: str, k: int, n: int) -> str:
            w = weight(prefix.strip("/").replace("/", ".") + ".MatMul.weight", (k, n))
            return node("MatMul", f"{prefix}/MatMul", [x, w])[0]

        embed = weight("model.embed_tokens.weight", (s.vocab, s.hidden))
        x = node("Gather", EMBED_GATHER, [embed, "input_ids"])[0]
        outputs = []
        split_sizes = helper.make_tensor("qkv_split", TensorProto.INT64, [3], [s.hidden, s.kv_dim, s.kv_dim])
        initializers.append(split_sizes)
        for i in range(s.layers):
            layer[0] = i
            p = f"/model/layers.{i}"
            h = norm(f"{p}/input_layernorm", f"model.layers.{i}.input_layernorm.weight", x)
            qkv = matmul(f"{p}/attn/qkv_proj", h, s.hidden, s.hidden + 2 * s.kv_dim)
            bias = weight(f"model.layers.{i}.attn.qkv_proj.Add.bias", (s.hidden + 2 * s.kv_dim,))
            qkv = node("Add", f"{p}/attn/qkv_proj/Add", [qkv, bias])[0]
            q, k, v = node("Split", f"{p}/attn/Split", [qkv, "qkv_split"], 3, axis=-1)
            # A stand-in for attention (the benchmark never runs the model): q goes on, k/v become the outputs.
            for kind, value in (("key", k), ("value", v)):
                name = f"present.{i}.{kind}"
                nodes.append(helper.make_node("Identity", [value], [name], name=f"{p}/attn/{kind}/Identity"))
                outputs.append(helper.make_tensor_value_info(name, onnx_dtype, ["batch_size", "sequence_length", 0]))
                outputs[-1].type.tensor_type.shape.dim[2].dim_value = s.kv_dim
            o = matmul(f"{p}/attn/o_proj", q, s.hidden, s.hidden)
            x = node("Add", f"{p}/residual_add/Add", [x, o])[0]
            h = norm(f"{p}/post_attention_layernorm", f"model.layers.{i}.post_attention_layernorm.weight", x)
            gate = matmul(f"{p}/mlp/gate_proj", h, s.hidden, s.intermediate)
            up = matmul(f"{p}/mlp/up_proj", h, s.hidden, s.intermediate)
            sig = node("Sigmoid", f"{p}/mlp/act_fn/Sigmoid", [gate])[0]
            act = node("Mul", f"{p}/mlp/act_fn/Mul", [gate, sig])[0]
            act = node("Mul", f"{p}/mlp/Mul", [act, up])[0]
            down = matmul(f"{p}/mlp/down_proj", act, s.intermediate, s.hidden)
            x = node("Add", f"{p}/residual_add_2/Add", [x, down])[0]
        layer[0] = s.layers
        h = norm(f"/model/layers.{s.layers}/final_norm_layernorm", "model.norm.weight", x)
        w = weight("lm_head.MatMul.weight", (s.hidden, s.vocab))
        nodes.append(helper.make_node("MatMul", [h, w], ["logits"], name="/lm_head/MatMul"))

    graph = helper.make_graph(
        nodes,
        "main_graph",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("logits", onnx_dtype, ["batch_size", "sequence_length", s.vocab]), *outputs],
        initializer=initializers,
    )
    # onnx 1.23 writes IR 14 by default, which onnxruntime 1.31/1.32 refuse; 10 is what the builder writes.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    model.producer_name = "olive-int4-pass benchmark (synthetic, genai builder layout)"
    onnx.save_model(model, out_dir / MODEL_NAME)


def weight_bytes(shape: ModelShape) -> int:
    """Bytes of all the model's initializers (aliased layers counted: each is read and quantized)."""
    return stored_bytes(dataclasses.replace(shape, unique_layers=None))


# --------------------------------------------------------------------------------------------------------------
# Tools (each runs in a child process: `quantize_bench.py --child TOOL IN_DIR OUT_DIR`)
# --------------------------------------------------------------------------------------------------------------


def _run_ours(model: Path, out: Path) -> None:
    from olive_int4_pass.options import QuantizeOptions
    from olive_int4_pass.pipeline import quantize_file

    quantize_file(model, out, QuantizeOptions(), progress=False)


def _run_ours_in_memory(model: Path, out: Path) -> None:
    import onnx_ir as ir

    from olive_int4_pass.model_io import load_checked, save_atomically
    from olive_int4_pass.options import QuantizeOptions
    from olive_int4_pass.pipeline import quantize_model

    loaded = load_checked(model)
    ir.external_data.load_to_model(loaded)
    quantize_model(loaded, QuantizeOptions())
    save_atomically(loaded, out, progress=False)


def _run_olive_rtn(model: Path, out: Path) -> None:
    from olive.model import ONNXModelHandler
    from olive.passes.olive_pass import create_pass_from_dict
    from olive.passes.onnx.rtn_quantization import OnnxBlockWiseRtnQuantization

    config = {"block_size": 32, "is_symmetric": True, "nodes_to_exclude": [EMBED_GATHER]}
    rtn = create_pass_from_dict(OnnxBlockWiseRtnQuantization, config, disable_search=True)
    out.mkdir(parents=True, exist_ok=True)
    rtn.run(ONNXModelHandler(model_path=str(model)), str(out / MODEL_NAME))


def _run_ort_nbits(model: Path, out: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    proto = onnx.load(model)  # loads the external data: onnxruntime's quantizer works on an in-memory proto
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(proto, block_size=32, is_symmetric=True, algo_config=config)
    quantizer.process()
    out.mkdir(parents=True, exist_ok=True)
    quantizer.model.save_model_to_file(str(out / MODEL_NAME), use_external_data_format=True)


_RUNNERS = {
    "ours": _run_ours,
    "ours-in-memory": _run_ours_in_memory,
    "olive-rtn": _run_olive_rtn,
    "ort-nbits": _run_ort_nbits,
}
# torch: the streaming kernel imports it on first use (olive imports it too, outside the step).
_IMPORTS = {
    "ours": ["olive_int4_pass.pipeline", "torch"],
    "ours-in-memory": ["olive_int4_pass.pipeline"],
    "olive-rtn": ["olive.passes.onnx.rtn_quantization", "olive.model"],
    "ort-nbits": ["onnx", "onnxruntime.quantization.matmul_nbits_quantizer"],
}


def _in_child(*args: str) -> str:
    """Run a memory-hungry helper (model build, output checks) in a child and return what it prints.

    The driver must stay small: Linux counts the parent's peak RSS at spawn time in each child's ru_maxrss.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *args]
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]


def _child(tool: str, *args: str) -> None:
    if tool == "build":  # args: model dir, shape as JSON
        print(build_model(args[0], ModelShape(**json.loads(args[1]))))
        return
    if tool == "verify":  # args: our output, the other output, the other tool
        print(verify_output(Path(args[0]), Path(args[1]), args[2]))
        return
    model, out, result_file = map(Path, args)
    for module in _IMPORTS[tool]:  # imports are not part of the timed step
        __import__(module)
    logging.disable(logging.INFO)  # the anchors log every node
    start, cpu = time.perf_counter(), _cpu_seconds()
    _RUNNERS[tool](model, out)
    result_file.write_text(json.dumps({"seconds": time.perf_counter() - start, "cpu": _cpu_seconds() - cpu}))


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclasses.dataclass
class Run:
    tool: str
    seconds: float  # the quantize step (load + quantize + save), imports excluded
    wall: float  # the whole process
    peak_rss: int  # bytes
    cpu: float  # user + system seconds of the step, all threads


def run_tool(tool: str, model: Path, out: Path) -> Run:
    """Run ``tool`` in a fresh process; return its step time, process wall time and peak RSS."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = Path(f.name)
    if tool == "cp":  # `cp` itself is the child, so its RSS is cp's, not a python wrapper's
        out.mkdir(parents=True, exist_ok=True)
        cmd = ["cp", str(model.parent / DATA_NAME), str(out / DATA_NAME)]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", tool, str(model), str(out), str(result_file)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    try:
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
        if tool == "cp":
            seconds, cpu = wall, usage.ru_utime + usage.ru_stime
        else:
            result = json.loads(result_file.read_text())
            seconds, cpu = result["seconds"], result["cpu"]
    finally:
        result_file.unlink(missing_ok=True)
    return Run(tool, seconds, wall, usage.ru_maxrss * 1024, cpu)  # Linux reports ru_maxrss in KiB


# --------------------------------------------------------------------------------------------------------------
# Output checks
# --------------------------------------------------------------------------------------------------------------


def same_files(a: Path, b: Path) -> bool:
    """Byte-for-byte equality of the model and data files of two output folders."""
    return all(filecmp.cmp(a / name, b / name, shallow=False) for name in (MODEL_NAME, DATA_NAME))


def same_graph_and_tensors(a: Path, b: Path) -> tuple[bool, str]:
    """Equal nodes, inputs and outputs, and every initializer byte-identical (the data file's layout aside)."""
    import numpy as np
    import onnx
    import onnx_ir as ir

    pa, pb = (onnx.load(d / MODEL_NAME, load_external_data=False).graph for d in (a, b))
    for field in ("node", "input", "output"):
        if [x.SerializeToString() for x in getattr(pa, field)] != [x.SerializeToString() for x in getattr(pb, field)]:
            return False, f"graph {field}s differ"
    ma, mb = ir.load(a / MODEL_NAME), ir.load(b / MODEL_NAME)
    if set(ma.graph.initializers) != set(mb.graph.initializers):
        return False, "different initializers"
    for name, value in ma.graph.initializers.items():
        x, y = value.const_value, mb.graph.initializers[name].const_value
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(_raw(x), _raw(y)):
            return False, f"{name} differs"
    return True, f"same graph, {len(ma.graph.initializers)} initializers byte-identical"


def _raw(tensor):
    """A tensor's bytes as a flat uint8 array (memory-mapped, not copied)."""
    import numpy as np

    return tensor.numpy().reshape(-1).view(np.uint8)


def nbits_tensors(model_dir: Path) -> dict[str, tuple[str, str]]:
    """MatMulNBits node name (``_Q4`` suffix dropped) -> (packed weight name, scales name)."""
    import onnx

    proto = onnx.load(model_dir / MODEL_NAME, load_external_data=False)
    return {
        n.name.removesuffix("_Q4"): (n.input[1], n.input[2]) for n in proto.graph.node if n.op_type == "MatMulNBits"
    }


def same_quantized_weights(a: Path, b: Path) -> tuple[bool, str]:
    """Compare every MatMulNBits' packed weight and scales of two outputs byte for byte, one tensor at a time."""
    import numpy as np
    import onnx_ir as ir

    ta, tb = nbits_tensors(a), nbits_tensors(b)
    if set(ta) != set(tb):
        return False, f"different MatMulNBits nodes: {sorted(set(ta) ^ set(tb))[:4]}"
    ma, mb = ir.load(a / MODEL_NAME), ir.load(b / MODEL_NAME)
    for node, names in ta.items():
        for name_a, name_b in zip(names, tb[node], strict=True):
            x, y = ma.graph.initializers[name_a].const_value, mb.graph.initializers[name_b].const_value
            # Olive writes scales 1-D ([N * n_blocks]); the bytes are what MatMulNBits reads.
            if x.dtype != y.dtype or not np.array_equal(_raw(x), _raw(y)):
                return False, f"{node}: {name_a} differs"
    return True, f"{len(ta)} MatMulNBits identical"


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------


def benchmark(shape: ModelShape, tools: list[str], repeat: int, work_dir: Path, anchor_ram_fraction: float) -> dict:
    alias = f"-alias{shape.unique_layers}" if shape.unique_layers else ""
    model_dir = work_dir / f"qwen2-7b-shape-{shape.layers}L{alias}-fp16"
    t0 = time.perf_counter()
    model = Path(_in_child("build", str(model_dir), json.dumps(dataclasses.asdict(shape))))
    data_gb = weight_bytes(shape) / _GB
    stored_gb = (model_dir / DATA_NAME).stat().st_size / _GB
    took = time.perf_counter() - t0
    print(f"# model {model_dir}: {data_gb:.2f} GB of weights, {stored_gb:.2f} GB on disk (ready in {took:.0f} s)")
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / _GB
    selected = []
    for tool in tools:
        # The in-memory tools hold the float model and its packed copy: ~1.5x the data (measured 1.45x for Olive).
        if (tool in ANCHORS or tool == "ours-in-memory") and 1.6 * data_gb > anchor_ram_fraction * ram_gb:
            print(f"# skipping {tool}: it loads all {data_gb:.1f} GB of weights, too much for {ram_gb:.0f} GB RAM")
            continue
        selected.append(tool)
    runs: dict[str, list[Run]] = {t: [] for t in selected}
    checks: list[str] = []
    out_root = work_dir / "outputs"
    embedding_gb = shape.vocab * shape.hidden * 2 / _GB
    output_gb = {"cp": stored_gb, **dict.fromkeys(TOOLS[:-1], (data_gb - embedding_gb) * 0.32 + embedding_gb)}
    for r in range(repeat):
        for tool in selected:
            out = out_root / tool
            shutil.rmtree(out, ignore_errors=True)
            out_root.mkdir(parents=True, exist_ok=True)
            free_gb = shutil.disk_usage(out_root).free / _GB
            if free_gb < output_gb[tool] + 2:
                raise ValueError(
                    f"{out_root}: {free_gb:.1f} GB free, {tool} writes ~{output_gb[tool]:.1f} GB (+2 spare)"
                )
            run = run_tool(tool, model, out)
            runs[tool].append(run)
            print(
                f"# round {r + 1}/{repeat} {tool:15s} {run.seconds:7.2f} s  CPU {run.cpu:6.1f} s"
                f"  peak RSS {run.peak_rss / _GB:.2f} GB"
            )
            # Checked right away against ours (which runs first), then deleted: one extra output on disk at a time.
            if r == 0 and tool != "ours" and tool in _COMPARED and "ours" in selected:
                checks.append(_in_child("verify", str(out_root / "ours"), str(out), tool))
                print(f"# check: {checks[-1]}")
            if tool != "ours" or r > 0:
                shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out_root / "ours", ignore_errors=True)
    return {"layers": shape.layers, "aliased": bool(alias), "data_gb": data_gb, "runs": runs, "checks": checks}


_COMPARED = ("ours-in-memory", *ANCHORS)


def verify_output(ours: Path, other: Path, tool: str) -> str:
    """One line: whether ``tool``'s output matches ours.

    ``ours-in-memory`` runs our non-streaming path (weights loaded first, the numpy/onnxruntime kernel) on the same
    input: graph and tensors must be identical. The anchors name and shape some tensors their own way: their
    packed weights and scales must be identical.
    """
    if tool == "ours-in-memory" and same_files(ours, other):
        return f"ours vs {tool}: byte-identical files"
    ok, why = same_quantized_weights(ours, other) if tool in ANCHORS else same_graph_and_tensors(ours, other)
    return f"ours vs {tool}: {why if ok else 'MISMATCH: ' + why}"


def table(results: list[dict], repeat: int) -> str:
    """Markdown: medians of the step time, the largest peak RSS, and ratios computed from those."""
    rows = [
        f"| layers | weights GB | tool | step s (median of {repeat}) | CPU s | process s | peak RSS GB | GB/s "
        "| speed vs Olive RTN | speed vs ORT MatMulNBitsQuantizer | RSS vs Olive RTN | time vs cp |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        med = {t: statistics.median(r.seconds for r in runs) for t, runs in res["runs"].items()}
        wall = {t: statistics.median(r.wall for r in runs) for t, runs in res["runs"].items()}
        cpu = {t: statistics.median(r.cpu for r in runs) for t, runs in res["runs"].items()}
        rss = {t: max(r.peak_rss for r in runs) for t, runs in res["runs"].items()}

        def ratio(x: float) -> str:
            return f"{x:.2f}×" if x >= 0.095 else f"{x:.3f}×"

        for tool in res["runs"]:
            cells = [
                f"{res['layers']}{' (aliased)' if res['aliased'] else ''}",
                f"{res['data_gb']:.2f}",
                tool,
                f"{med[tool]:.2f}",
                f"{cpu[tool]:.1f}",
                f"{wall[tool]:.2f}",
                f"{rss[tool] / _GB:.2f}",
                f"{res['data_gb'] / med[tool]:.2f}",
                ratio(med["olive-rtn"] / med[tool]) if "olive-rtn" in med else "–",
                ratio(med["ort-nbits"] / med[tool]) if "ort-nbits" in med else "–",
                ratio(rss[tool] / rss["olive-rtn"]) if "olive-rtn" in rss else "–",
                ratio(med[tool] / med["cp"]) if "cp" in med else "–",
            ]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _child(*argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2], help="decoder layers (one model per value)")
    parser.add_argument(
        "--unique-layers",
        type=int,
        help="store only this many layers' weights; deeper layers point at the same bytes (saves disk)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds per tool; the table shows medians")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "olive-int4-bench")
    parser.add_argument(
        "--anchor-ram-fraction",
        type=float,
        default=0.8,
        help="skip the in-memory tools when ~1.6x the weights exceed this fraction of RAM",
    )
    parser.add_argument("--json", type=Path, help="also write the raw runs here")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        raise ValueError("--repeat must be >= 1")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    shapes = [ModelShape(layers=n, unique_layers=args.unique_layers) for n in args.layers]
    results = [benchmark(s, args.tools, args.repeat, args.work_dir, args.anchor_ram_fraction) for s in shapes]
    print()
    print(f"Machine: {os.cpu_count()} cores, {_ram_gb():.0f} GB RAM; median of {args.repeat} run(s).")
    print()
    print(table(results, args.repeat))
    for res in results:
        for line in res["checks"]:
            print(f"- {res['layers']} layers: {line}")
    if args.json:
        raw = [
            {**res, "runs": {t: [dataclasses.asdict(r) for r in v] for t, v in res["runs"].items()}} for res in results
        ]
        args.json.write_text(json.dumps(raw, indent=1))
    failed = any("DIFFER" in line or "MISMATCH" in line for res in results for line in res["checks"])
    return 1 if failed else 0


def _ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3


if __name__ == "__main__":
    sys.exit(main())
