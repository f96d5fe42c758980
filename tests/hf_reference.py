"""Independent references computed without the package: the Hugging Face model in torch, and a plain onnxruntime
greedy loop.

- :func:`hf_second_moments`: E[x^2] per channel of the inputs of the builder's MatMuls, captured with torch forward
  pre-hooks on the Hugging Face model's ``nn.Linear`` modules (calibration's reference: it runs the exported ONNX
  graph in onnxruntime, this runs the original model in torch);
- :func:`ort_greedy`: greedy tokens of a builder-layout decoder, recomputing the whole sequence in one onnxruntime
  session each step (no KV cache, no onnxruntime-genai): what a package must generate.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# The builder's MatMul input names (the activations calibration reads) -> the HF module that input feeds.
_ACTIVATION_TO_MODULE = [
    (r"/model/layers\.(\d+)/input_layernorm/output_0", "model.layers.{}.self_attn.q_proj"),
    (r"/model/layers\.(\d+)/attn/GroupQueryAttention/output_0", "model.layers.{}.self_attn.o_proj"),
    (r"/model/layers\.(\d+)/post_attention_layernorm/output_0", "model.layers.{}.mlp.gate_proj"),
    (r"/model/layers\.(\d+)/mlp/Mul/output_0", "model.layers.{}.mlp.down_proj"),
    (r"/model/layers\.(\d+)/final_norm_layernorm/output_0", "lm_head"),
]


def hf_module_for(activation: str) -> str:
    for pattern, module in _ACTIVATION_TO_MODULE:
        match = re.fullmatch(pattern, activation)
        if match:
            return module.format(match.group(1))
    raise KeyError(activation)


def hf_second_moments(
    hf_dir: Path, windows: Sequence[Sequence[int]], activations: Sequence[str]
) -> dict[str, np.ndarray]:
    """{builder activation: E[x^2] per channel} over ``windows``, each run as its own sequence (positions from 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    sums: dict[str, np.ndarray] = {}
    handles = []
    for name in activations:

        def hook(_module, args, name=name):
            x = args[0].detach().to(torch.float64).reshape(-1, args[0].shape[-1]).numpy()
            sums[name] = sums.get(name, 0) + np.einsum("ij,ij->j", x, x)

        handles.append(modules[hf_module_for(name)].register_forward_pre_hook(hook))
    count = 0
    try:
        with torch.no_grad():
            for ids in windows:
                model(input_ids=torch.tensor([list(ids)]))
                count += len(ids)
    finally:
        for handle in handles:
            handle.remove()
    return {name: s / count for name, s in sums.items()}


def decoder_logits(model, genai_dir: Path, ids: Sequence[int]) -> np.ndarray:
    """Logits [len(ids), vocab] (float64) of a builder-layout decoder (a path or an in-memory ModelProto) over one
    sequence with an empty KV cache, on onnxruntime's CPU provider; ``genai_dir`` holds its genai_config.json."""
    import onnxruntime as ort

    decoder = json.loads((Path(genai_dir) / "genai_config.json").read_text())["model"]["decoder"]
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    batch = np.array([list(ids)], np.int64)
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = batch
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones_like(batch)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(batch.shape[1], dtype=np.int64)[None]
        else:
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype)
    return session.run(["logits"], feeds)[0][0].astype(np.float64)


def ort_greedy(model, genai_dir: Path, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """Greedy tokens of a builder-layout decoder (see :func:`decoder_logits`), each step a full prefill with an
    empty KV cache; stops at EOS as onnxruntime-genai does (the EOS token included)."""
    eos = json.loads((Path(genai_dir) / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos = set(eos) if isinstance(eos, list) else {eos}
    ids, tokens = list(prompt), []
    for _ in range(new_tokens):
        token = int(np.argmax(decoder_logits(model, genai_dir, ids)[-1]))
        tokens.append(token)
        ids.append(token)
        if token in eos:
            break
    return tokens


def check_greedy_tokens(tokens: Sequence[int], model, genai_dir: Path, prompt: Sequence[int], tie: float = 1e-3):
    """``tokens`` (generated after ``prompt`` by the code under test) are the reference decoder's greedy tokens.

    The reference runs once over prompt + tokens (teacher forcing); each token must be its argmax, except where
    the reference's best two logits lie within ``tie`` of each other, where two correct runtimes may differ and
    the comparison stops. Returns the reference's logits before each token.
    """
    tokens = [int(t) for t in tokens]
    assert tokens, "no token generated"
    logits = decoder_logits(model, genai_dir, [*prompt, *tokens[:-1]])[len(prompt) - 1 :]
    for i, (token, row) in enumerate(zip(tokens, logits, strict=True)):
        best = int(np.argmax(row))
        if token != best:
            gap = row[best] - row[token]
            assert gap < tie, f"token {i}: generated {token}, the reference's greedy token is {best} (gap {gap:.3g})"
            break
    return logits
