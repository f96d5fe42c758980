"""Package sizes on disk: genai builder fp32 / int4, Olive's RTN pass and ours, for a tied and an untied model.

Random weights at real shapes (sizes do not depend on values), built offline. Usage:

    python benchmarks/size_table.py --work-dir /tmp/size_table            # Qwen2.5-0.5B shape, tied + untied
    python benchmarks/size_table.py --layers 4 --work-dir /tmp/size_table   # quicker, same structure
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# Qwen2.5-0.5B: the smallest popular model with tie_word_embeddings=true.
SHAPE = {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2}
VOCAB = 151936


def make_hf(folder: Path, tied: bool, layers: int) -> Path:
    import torch
    from tiny_models import save_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    config = Qwen2Config(**SHAPE, vocab_size=VOCAB, num_hidden_layers=layers, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # the builder drops all-zero biases; real models have them
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.02)
    model.save_pretrained(str(folder))
    return folder


def builder(hf: Path, out: Path, precision: str) -> Path:
    if not (out / "model.onnx").exists():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
        subprocess.run(
            [*cmd, "-p", precision, "-e", "cpu", "-c", str(out.parent / "cache")], check=True, capture_output=True
        )
    return out


def olive_rtn(src: Path, out: Path) -> Path:
    """Olive's own OnnxBlockWiseRtnQuantization, block 32, on the fp32 export."""
    if not (out / "model.onnx").exists():
        config = {
            "input_model": {"type": "ONNXModel", "model_path": str(src / "model.onnx")},
            "passes": {
                "rtn": {"type": "OnnxBlockWiseRtnQuantization", "block_size": 32, "save_as_external_data": True}
            },
            "output_dir": str(out),
        }
        path = out.parent / f"{out.name}.json"
        path.write_text(json.dumps(config))
        subprocess.run(
            [sys.executable, "-m", "olive", "run", "--config", str(path)],
            check=True,
            capture_output=True,
            cwd=out.parent,
        )
    return out


def ours(src: Path, out: Path, **options) -> Path:
    from olive_int4_pass.options import QuantizeOptions
    from olive_int4_pass.pipeline import quantize_file

    if not (out / "model.onnx").exists():
        quantize_file(src / "model.onnx", out, QuantizeOptions(accuracy_level=4, **options), progress=False)
    return out


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.endswith((".onnx", ".onnx.data", ".data"))) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/olive_int4_size_table"))
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    rows = []
    for tied in (True, False):
        root = args.work_dir / f"{'tied' if tied else 'untied'}_{args.layers}l"
        hf = make_hf(root / "hf", tied, args.layers)
        fp32 = builder(hf, root / "builder-fp32", "fp32")
        ref = size_mb(builder(hf, root / "builder-int4", "int4"))
        variants = {
            "genai builder `-p fp32`": fp32,
            "genai builder `-p int4` (reference)": root / "builder-int4",
            "Olive `OnnxBlockWiseRtnQuantization`": olive_rtn(fp32, root / "olive-rtn"),
            "ours, default": ours(fp32, root / "ours"),
            "ours, `lm_head: int8`": ours(fp32, root / "ours-lm8", lm_head="int8"),
        }
        if not tied:
            variants["ours, `embedding: int4`"] = ours(fp32, root / "ours-emb4", embedding="int4")
        for name, folder in variants.items():
            rows.append(
                (f"Qwen2.5-0.5B shape, {'tied' if tied else 'untied'}", name, size_mb(folder), size_mb(folder) / ref)
            )
    print(f"\n{args.layers} layers, {time.strftime('%Y-%m-%d')}\n")
    print("| model | variant | package MB | vs builder int4 |")
    print("|---|---|---:|---:|")
    for model, name, mb, ratio in rows:
        print(f"| {model} | {name} | {mb:,.1f} | x{ratio:.2f} |")


if __name__ == "__main__":
    main()
