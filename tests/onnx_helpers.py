"""Build small ONNX graphs, run them with onnxruntime, and rebuild a float reference from a quantized model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from olive_int4_pass.kernels.rtn import QuantizedWeight, dequantize_blockwise

OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]


def make_model(nodes, inputs, outputs, initializers, path: Path | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", inputs, outputs, initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()]
    )
    # onnxruntime loads IR <= 13 (onnx 1.23 writes 14 by default).
    model = helper.make_model(graph, opset_imports=OPSETS, ir_version=10)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        on_disk = onnx.ModelProto()
        on_disk.CopyFrom(model)  # onnx.save rewrites the proto it gets to point at external data
        onnx.save(on_disk, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return model


def tensor_info(name: str, dtype, shape) -> onnx.ValueInfoProto:
    elem = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.int64: TensorProto.INT64}[dtype]
    return helper.make_tensor_value_info(name, elem, shape)


def run(model: str | Path | onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def nodes_of(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def dequantized_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """W[K, N] in float32 as the MatMulNBits node holds it."""
    inits = initializers(model)
    a = attrs(node)
    zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    q = QuantizedWeight(inits[node.input[1]], inits[node.input[2]], zp, a["K"], a["N"], a["block_size"], a["bits"])
    return dequantize_blockwise(q)


def dequantized_table(model: onnx.ModelProto, node: onnx.NodeProto, producers: dict) -> np.ndarray:
    """E[V, H] as a GatherBlockQuantized over ``Reshape(packed)`` holds it, in the scales' dtype."""
    inits = initializers(model)
    a = attrs(node)
    packed = inits[producers[node.input[0]].input[0]]  # Reshape(packed [V, nb, bs*bits/8], shape)
    scales = inits[node.input[2]]
    zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    v, n_blocks = scales.shape
    q = QuantizedWeight(
        packed.reshape(v, n_blocks, -1), scales, zp, n_blocks * a["block_size"], v, a["block_size"], a["bits"]
    )
    return dequantize_blockwise(q).T.astype(scales.dtype)


def float_reference(model_path: Path) -> onnx.ModelProto:
    """The quantized model with MatMulNBits -> MatMul(X, dequantized W) [+ bias], GatherBlockQuantized -> Gather."""
    model = load_onnx(model_path)
    inits = initializers(model)
    new_nodes, new_inits = [], []
    producers = {out: n for n in model.graph.node for out in n.output}
    for node in model.graph.node:
        if node.op_type == "GatherBlockQuantized":
            table_name = node.name + "_deq"
            new_inits.append(numpy_helper.from_array(dequantized_table(model, node, producers), table_name))
            new_nodes.append(helper.make_node("Gather", [table_name, node.input[1]], [node.output[0]]))
            continue
        if node.op_type != "MatMulNBits":
            new_nodes.append(node)
            continue
        dtype = inits[node.input[2]].dtype
        w_name = node.name + "_deq"
        new_inits.append(numpy_helper.from_array(dequantized_weight(model, node).astype(dtype), w_name))
        bias = node.input[5] if len(node.input) > 5 and node.input[5] else None
        mm_out = node.output[0] + "_mm" if bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=node.name + "_ref"))
        if bias:
            new_nodes.append(helper.make_node("Add", [mm_out, bias], [node.output[0]]))
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(new_inits)
    return model


def check_numerics(out_path, feeds, original=None, rtol=1e-4):
    """Quantized output == float model on dequantized weights; and not far from the original float model."""
    got = run(out_path, feeds)
    want = run(float_reference(out_path), feeds)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol)
    if original is not None:
        for g, o in zip(got, run(original, feeds), strict=True):
            assert np.abs(g - o).max() < 0.25 * np.abs(o).max()  # 4-bit noise, not garbage
    return got


def genai_greedy(package_dir: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from an onnxruntime-genai package, on the CPU whatever provider its config names."""
    import onnxruntime_genai as og

    config = og.Config(str(package_dir))
    config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    while not generator.is_done():
        generator.generate_next_token()
    return list(generator.get_sequence(0))[len(prompt_ids) :]


def as_package(model_dir: Path, side_files_from: Path) -> Path:
    """Copy the builder's genai_config/tokenizer files beside a quantized model.onnx so genai can load it."""
    import shutil

    for f in side_files_from.iterdir():
        if f.suffix in (".json", ".jinja"):
            shutil.copy(f, model_dir / f.name)
    return model_dir


def load_onnx(path) -> onnx.ModelProto:
    """``onnx.load`` with the external data read in directly.

    onnx >= 1.23 refuses external data files with several hard links ("potential hardlink attack"), and a package
    built by GenAIPackaging hard-links its data to its source; the tests read the bytes themselves.
    """
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        with open(path.parent / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            tensor.raw_data = f.read(int(info["length"])) if "length" in info else f.read()
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return model
