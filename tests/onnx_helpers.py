"""Build small ONNX graphs, run them with onnxruntime, and rebuild a float reference from a quantized model.

Nothing here uses the package: the MatMulNBits / GatherBlockQuantized layout is decoded by :func:`dequantize`
below, written from onnxruntime's operator spec, so a model that onnxruntime runs the same as its float rebuild
also shows that the package wrote the format onnxruntime reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

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


def dequantize(packed, scales, zero_points, k: int, n: int, block_size: int, bits: int) -> np.ndarray:
    """W[K, N] in float32 from MatMulNBits' inputs, as onnxruntime's contrib-op spec defines them.

    ``packed`` holds N x n_blocks x block_size values of ``bits`` bits (4 bits: two per byte, low nibble first),
    ``scales`` N x n_blocks, ``zero_points`` (optional) N x n_blocks values packed the same way, else 2**(bits-1).
    """
    n_blocks = -(-k // block_size)
    packed = np.asarray(packed, np.uint8).reshape(n, -1)
    levels = packed if bits == 8 else np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, -1)
    levels = levels[:, : n_blocks * block_size].reshape(n, n_blocks, block_size).astype(np.float32)
    if zero_points is None:
        zp = np.full((n, n_blocks), 2 ** (bits - 1), np.float32)
    else:
        zp = np.asarray(zero_points, np.uint8).reshape(n, -1)
        zp = zp if bits == 8 else np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(n, -1)
        zp = zp[:, :n_blocks].astype(np.float32)
    s = np.asarray(scales).astype(np.float32).reshape(n, n_blocks)
    w = (levels - zp[..., None]) * s[..., None]
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)


def dequantized_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """W[K, N] in float32 as the MatMulNBits node holds it."""
    inits = initializers(model)
    a = attrs(node)
    zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    return dequantize(inits[node.input[1]], inits[node.input[2]], zp, a["K"], a["N"], a["block_size"], a["bits"])


def dequantized_table(model: onnx.ModelProto, node: onnx.NodeProto, producers: dict) -> np.ndarray:
    """E[V, H] as a GatherBlockQuantized over ``Reshape(packed)`` holds it, in the scales' dtype."""
    inits = initializers(model)
    a = attrs(node)
    packed = inits[producers[node.input[0]].input[0]]  # Reshape(packed [V, nb, bs*bits/8], shape)
    scales = inits[node.input[2]]
    zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    v, n_blocks = scales.shape
    w = dequantize(packed, scales, zp, n_blocks * a["block_size"], v, a["block_size"], a["bits"])
    return w.T.astype(scales.dtype)


def original_weight(original: onnx.ModelProto, quantized: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """The float W[K, N] a MatMulNBits node replaced, found by the builder-style names ``<W>[_T]_Q<bits>``."""
    inits = initializers(original)
    a = attrs(node)
    base = node.input[1].removesuffix(f"_Q{a['bits']}")
    if base.endswith("_T") and base[:-2] in inits and inits[base[:-2]].shape == (a["N"], a["K"]):
        return inits[base[:-2]].T.astype(np.float32)
    w = inits[base]
    if w.shape != (a["K"], a["N"]):
        assert w.shape == (a["N"], a["K"]), (node.name, w.shape)  # Gemm(transB=1)
        w = w.T
    return w.astype(np.float32)


def check_weight_errors(original: onnx.ModelProto, quantized: onnx.ModelProto) -> list[int]:
    """Every MatMulNBits weight within its bit width's grid step of the original: the bits of each node.

    Hand bound: symmetric RTN moves a value by at most one step, largest |w| of its block / 2**(bits-1) (half a
    step, except the extreme opposite the one that sets the scale, which is clipped at +2**(bits-1)-1); asymmetric
    by half of (max - min) / (2**bits - 1), less. 2**-10 of the block's largest |w| covers a float16 scale's
    rounding. A weight that is 4-bit accurate in an 8-bit node breaks the 8-bit bound eight times over.
    """
    bits_seen = []
    for node in nodes_of(quantized, "MatMulNBits"):
        a = attrs(node)
        w = original_weight(original, quantized, node)
        got = dequantized_weight(quantized, node)
        k, bs = a["K"], a["block_size"]
        padded = np.zeros((-(-k // bs) * bs, a["N"]), np.float32)
        padded[:k] = np.abs(w)
        block_max = np.repeat(padded.reshape(-1, bs, a["N"]).max(axis=1), bs, axis=0)[:k]
        bound = block_max * (2.0 ** (1 - a["bits"]) + 2.0**-10)
        excess = np.abs(got - w) - bound
        assert np.all(excess <= 1e-7), f"{node.name}: {a['bits']}-bit weight off its grid by {excess.max():.3g}"
        bits_seen.append(a["bits"])
    return bits_seen


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
    used = _inputs_read(model.graph)
    kept = [t for t in model.graph.initializer if t.name in used]  # the packed tensors are read no more
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def _inputs_read(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node of ``graph`` or of its subgraphs (If/Loop bodies) reads."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                names |= _inputs_read(sub)
    return names


def check_numerics(out_path, feeds, original=None, rtol=1e-4):
    """Quantized output == float model on dequantized weights; and within the bit width's error of the original.

    With ``original`` (the float model), every MatMulNBits weight must lie within its grid step of the float weight
    (:func:`check_weight_errors`), and each output's RMS error relative to its RMS may be at most the sum over the
    quantized nodes of 2**(1 - bits): 0.125 per 4-bit node, 0.0078 per 8-bit one. Rounding to nearest gives about
    0.6 of that for Gaussian weights (a uniform error of +-step/2 against a block maximum of ~2.1 sigma).
    """
    got = run(out_path, feeds)
    want = run(float_reference(out_path), feeds)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol)
    if original is not None:
        bits = check_weight_errors(original, load_onnx(out_path))
        assert bits, "nothing was quantized"
        tolerance = sum(1.5 * 2.0 ** (1 - b) for b in bits)
        for i, (g, o) in enumerate(zip(got, run(original, feeds), strict=True)):
            o = o.astype(np.float64)
            relative = np.sqrt(np.mean((g.astype(np.float64) - o) ** 2) / np.mean(o**2))
            assert relative <= tolerance, f"output {i}: relative RMS error {relative:.4f} > {tolerance:.4f} ({bits})"
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


def genai_generation(package_dir: Path, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
    """onnxruntime-genai on the CPU: its greedy tokens, and the logits [tokens, vocab] it computes before each of
    them (the prompt in one step, then one token at a time through its KV cache)."""
    import onnxruntime_genai as og

    tokens = [int(t) for t in genai_greedy(package_dir, prompt_ids, new_tokens)]
    config = og.Config(str(package_dir))
    config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    rows = [np.asarray(generator.get_output("logits"))[0, -1]]
    for token in tokens[:-1]:
        generator.append_tokens([token])
        rows.append(np.asarray(generator.get_output("logits"))[0, -1])
    return tokens, np.array(rows, np.float64)


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
