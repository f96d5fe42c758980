"""Quality presets at 7B scale: wall time, peak RSS and where the time goes, for plain INT4, ``balanced`` and ``max``
(and the same with ``rounding: compensated``).

    python benchmarks/quality_scale_bench.py                       # Qwen2-7B shape, 28 layers (~30 GB of disk)
    python benchmarks/quality_scale_bench.py --layers 2 4          # the same width, fewer layers: memory growth
    python benchmarks/quality_scale_bench.py --shape 14b --layers 2 --variants int4 balanced

The model is a real onnxruntime-genai builder export (``-p fp16 -e cuda``, GroupQueryAttention with rotary
embedding, KV-cache I/O) of a Hugging Face Qwen2 folder with random bf16 weights, written shard by shard so that
building it needs little memory. Both are built once under ``--work-dir`` and reused. Each variant runs
``olive_int4_pass.pipeline.quantize_file`` in a child process of its own; the table shows its wall time, its peak
RSS (the child's own VmHWM) and the split that ``quantization_report.json`` records (calibration, sensitivity,
the search before writing; compensated rounding, in parentheses the seconds of it that ran beside the search; the
rest is loading and writing, which quantizes as it goes), with the ratio of time
and memory to plain INT4 measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

_GB = 1e9
PRESETS = {
    "int4": {},
    "calibrate": {"calibration": "default"},  # the calibration pass alone: the weights stay plain RTN
    "balanced": {"quality": "balanced"},
    "max": {"quality": "max"},
    # error-compensated rounding: in runs of at most 1,024 (4,096) inputs, or every weight at once
    "balanced-compensated": {"quality": "balanced", "rounding": "compensated", "compensation_span": 1024},
    "max-compensated": {"quality": "max", "rounding": "compensated", "compensation_span": 1024},
    "balanced-compensated-span4096": {"quality": "balanced", "rounding": "compensated", "compensation_span": 4096},
    "balanced-compensated-whole": {"quality": "balanced", "rounding": "compensated"},
}


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    def params(self) -> int:
        head = self.hidden // self.heads
        attn = self.hidden * (self.hidden + 2 * self.kv_heads * head) + self.hidden * self.hidden
        return self.layers * (attn + 3 * self.hidden * self.intermediate) + 2 * self.vocab * self.hidden


SHAPES = {
    "7b": Shape(28, 3584, 18944, 28, 4, 152064),  # Qwen2-7B / DeepSeek-R1-Distill-Qwen-7B
    "14b": Shape(48, 5120, 13824, 40, 8, 152064),  # Qwen2.5-14B
}


def build_hf(folder: Path, shape: Shape, seed: int = 0) -> Path:
    """A Qwen2 Hugging Face folder with random bf16 weights (std 0.02; norms 1), reused when already built."""
    import torch
    from safetensors.torch import save_file

    spec = {"shape": dataclasses.asdict(shape), "seed": seed, "version": 1}
    marker = folder / "build.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    needed = 2 * shape.params()
    if shutil.disk_usage(folder).free < needed + 4 * _GB:
        raise SystemExit(f"{folder}: {needed / _GB:.1f} GB needed for the weights (+4 GB spare)")
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    _tokenizer(folder)
    generator = torch.Generator().manual_seed(seed)

    def rand(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims, generator=generator) * 0.02).to(torch.bfloat16)

    head = shape.hidden // shape.heads
    kv = shape.kv_heads * head
    index, shard = {}, {}
    shards = []
    total = [0]

    def flush() -> None:
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            total[0] += sum(t.numel() * t.element_size() for t in shard.values())
            index.update(dict.fromkeys(shard, name))
            shards.append(name)
            shard.clear()

    shard["model.embed_tokens.weight"] = rand(shape.vocab, shape.hidden)
    flush()
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        shard.update(
            {
                f"{p}.input_layernorm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16),
                f"{p}.post_attention_layernorm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16),
                f"{p}.self_attn.q_proj.weight": rand(shape.hidden, shape.hidden),
                f"{p}.self_attn.q_proj.bias": rand(shape.hidden),
                f"{p}.self_attn.k_proj.weight": rand(kv, shape.hidden),
                f"{p}.self_attn.k_proj.bias": rand(kv),
                f"{p}.self_attn.v_proj.weight": rand(kv, shape.hidden),
                f"{p}.self_attn.v_proj.bias": rand(kv),
                f"{p}.self_attn.o_proj.weight": rand(shape.hidden, shape.hidden),
                f"{p}.mlp.gate_proj.weight": rand(shape.intermediate, shape.hidden),
                f"{p}.mlp.up_proj.weight": rand(shape.intermediate, shape.hidden),
                f"{p}.mlp.down_proj.weight": rand(shape.hidden, shape.intermediate),
            }
        )
        flush()
    shard["model.norm.weight"] = torch.ones(shape.hidden, dtype=torch.bfloat16)
    shard["lm_head.weight"] = rand(shape.vocab, shape.hidden)
    flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total[0]}, "weight_map": index}, indent=1)
    )
    marker.write_text(json.dumps(spec))
    return folder


def _tokenizer(folder: Path) -> None:
    """A byte-level BPE trained on the built-in calibration text (the model's vocabulary only needs to hold it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from olive_int4_pass.plan.calibration import default_calibration_text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<|bos|>", "<|eos|>"], show_progress=False)
    tokenizer.train_from_iterator([default_calibration_text()], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    tok_config = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "model_max_length": 4096}
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))


def export(build: Callable[[], Path], out: Path) -> tuple[Path, float, float]:
    """The builder's ``-p fp16 -e cuda`` export of the folder ``build()`` makes, reused when present (the Hugging
    Face folder may then be deleted to free its disk); its wall time and peak RSS (0 if reused)."""
    if (out / "model.onnx").is_file() and (out / "genai_config.json").is_file():
        return out / "model.onnx", 0.0, 0.0
    hf = build()
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
    cmd += ["-p", "fp16", "-e", "cuda", "-c", str(out.parent / "builder-cache")]
    seconds, rss, code, tail = _child(cmd)
    if code != 0:
        raise SystemExit(f"builder export failed:\n{tail}")
    return out / "model.onnx", seconds, rss


def quantize(model: Path, out: Path, preset: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    code = (
        "import json, sys; from olive_int4_pass.options import QuantizeOptions;"
        " from olive_int4_pass.pipeline import quantize_file;"
        " quantize_file(sys.argv[1], sys.argv[2], QuantizeOptions(**json.loads(sys.argv[3])), progress=False)"
    )
    seconds, rss, status, tail = _child([sys.executable, "-c", code, str(model), str(out), json.dumps(preset)])
    if status != 0:
        lines = [line for line in tail.strip().splitlines() if not line.startswith("VMHWM_KB")]
        return {"error": lines[-1] if lines else f"exit {status}", "seconds": seconds}
    report = out / "quantization_report.json"
    split = json.loads(report.read_text()).get("seconds_before_writing", {}) if report.is_file() else {}
    if report.is_file():  # compensated rounding happens while writing
        split.update(json.loads(report.read_text()).get("seconds_while_writing", {}))
    # Compensated rounding beside the search overlaps it: the rest is what neither column holds.
    beside = split.pop(BESIDE, 0.0)
    split["write"] = seconds - sum(split.values())  # the rest: loading, planning, quantizing while writing
    if beside:
        split["compensation"] = split.get("compensation", 0.0) + beside
        split["beside"] = beside
    size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    return {"seconds": seconds, "rss": rss, "split": split, "bytes": size}


BESIDE = "compensation beside the search"  # the report's key for compensated rounding run beside the search
_HWM = (
    "import atexit, sys\n"
    "def _hwm():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM'):\n"
    "            print('VMHWM_KB', line.split()[1], file=sys.stderr, flush=True)\n"
    "atexit.register(_hwm)\n"
)


def _child(cmd: list[str]) -> tuple[float, float, int, str]:
    """Run the Python command ``cmd`` (``[python, -c, code, ...]`` or ``[python, -m, module, ...]``); its wall time,
    its own peak RSS (VmHWM, printed by the child at exit: ``ru_maxrss`` of a forked child also counts the parent's
    pages before exec), exit status and the tail of its output."""
    if cmd[1] == "-m":  # run the module under a preamble that reports VmHWM
        cmd = [
            cmd[0],
            "-c",
            _HWM + f"import runpy; sys.argv = {cmd[2:]!r}; runpy.run_module({cmd[2]!r}, run_name='__main__')",
        ]
    else:
        cmd = [cmd[0], "-c", _HWM + cmd[2], *cmd[3:]]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    output = proc.stdout.decode(errors="replace")
    hwm = [line.split()[1] for line in output.splitlines() if line.startswith("VMHWM_KB")]
    rss = float(hwm[-1]) * 1024 if hwm else float("nan")
    return seconds, rss, proc.returncode, output[-4000:]


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | layers | variant | wall s | peak RSS GB | calibration s | sensitivity s | search s |"
        " compensation s | write + rest s | time / int4 | RSS / int4 | size / int4 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {(r["shape"], r["layers"]): r for r in rows if r["variant"] == "int4" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['layers']} | {r['variant']} | failed: {r['error'][:80]} |")
            continue
        b = base.get((r["shape"], r["layers"]))
        split = r["split"]

        def col(key: str, split: dict = split) -> str:
            if key == "compensation" and "beside" in split:  # part of it ran beside the search
                return f"{split[key]:.1f} ({split['beside']:.0f} beside the search)"
            return f"{split[key]:.1f}" if key in split else "–"

        ratios = ["–", "–", "–"]
        if b:
            ratios = [
                f"{r['seconds'] / b['seconds']:.2f}×",
                f"{r['rss'] / b['rss']:.2f}×",
                f"{r['bytes'] / b['bytes']:.3f}×",
            ]
        lines.append(
            f"| {r['shape']} | {r['layers']} | {r['variant']} | {r['seconds']:.1f} | {r['rss'] / _GB:.2f} |"
            f" {col('calibration')} | {col('sensitivity')} | {col('search')} | {col('compensation')} |"
            f" {col('write')} | {' | '.join(ratios)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--layers", type=int, nargs="+", help="layer counts to measure (default: the shape's)")
    default = ["int4", "calibrate", "balanced", "max"]
    parser.add_argument("--variants", nargs="+", choices=list(PRESETS), default=default)
    parser.add_argument("--work-dir", default="bench-work/quality-scale")
    parser.add_argument("--keep", action="store_true", help="keep the quantized outputs")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    rows = []
    for layers in args.layers or [SHAPES[args.shape].layers]:
        shape = dataclasses.replace(SHAPES[args.shape], layers=layers)
        root = work / f"{args.shape}-{layers}"
        model, export_s, export_rss = export(functools.partial(build_hf, root / "hf", shape), root / "fp16-cuda")
        if export_s:
            print(
                f"{args.shape} x {layers} layers: builder export {export_s:.0f} s, peak RSS {export_rss / _GB:.1f} GB"
            )
        for variant in args.variants:
            out = root / f"out-{variant}"
            result = quantize(model, out, PRESETS[variant])
            rows.append({"shape": args.shape, "layers": layers, "variant": variant, **result})
            print(table(rows).splitlines()[-1], flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    print()
    print(f"{os.cpu_count()} CPU threads; model: random bf16 weights, builder -p fp16 -e cuda")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
