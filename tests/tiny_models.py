"""Tiny random-weight Hugging Face models and a local byte-level BPE tokenizer, built offline for tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# A DeepSeek-R1-Distill-style chat template (shortened) and its special tokens.
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
SPECIAL_TOKENS = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜▁pad▁｜>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

CORPUS = (
    "The quick brown fox jumps over the lazy dog. "
    "Quantization maps floating point weights to a small set of integers with a scale per block. "
    "Language models predict the next token from the previous ones; a tokenizer splits text into tokens. "
    "Onnxruntime runs graphs of operators; MatMulNBits multiplies activations by packed four-bit weights. "
) * 20


def save_tokenizer(out_dir: Path, vocab_size: int = 320) -> None:
    """Train a byte-level BPE on a local corpus and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token="<｜▁pad▁｜>",
        additional_special_tokens=["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def save_tiny_model(
    out_dir: Path,
    arch: str = "qwen2",
    *,
    tie_word_embeddings: bool = False,
    hidden_size: int = 64,
    intermediate_size: int = 160,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Save a random-weight causal LM (qwen2 or llama) plus tokenizer into ``out_dir``."""
    import torch
    from tokenizers import Tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(out_dir)
    vocab = Tokenizer.from_file(str(out_dir / "tokenizer.json")).get_vocab_size()
    tok_cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    del tok_cfg  # ids come from the vocab below
    vocab_ids = Tokenizer.from_file(str(out_dir / "tokenizer.json")).get_vocab()
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=vocab_ids[BOS],
        eos_token_id=vocab_ids[EOS],
        pad_token_id=vocab_ids["<｜▁pad▁｜>"],
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**common))
        # Random-init q/k/v biases are zero and the builder drops all-zero biases: randomise them.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.02)
    elif arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(f"unknown arch {arch!r}")
    model.generation_config.temperature = 0.6
    model.generation_config.top_p = 0.95
    model.generation_config.do_sample = True
    model.save_pretrained(str(out_dir))
    return out_dir


# Runs the builder's own command line once per export in one interpreter: importing the builder costs ~11 s of
# the ~12 s a tiny export takes, so four exports in one process take a third of four processes' time.
_BUILD_MANY = """
import json, runpy, sys
for argv in json.loads(sys.argv[1]):
    sys.argv = ["builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
"""

BuildJob = tuple[Path, Path, str, str, Path]  # hf_dir, out_dir, precision, provider, cache_dir


def builders_command(jobs: list[BuildJob]) -> list[str]:
    """One process running ``builder -i HF -o OUT -p PRECISION -e PROVIDER -c CACHE`` for each job in turn."""
    argvs = [["-i", str(h), "-o", str(o), "-p", p, "-e", e, "-c", str(c)] for h, o, p, e, c in jobs]
    return [sys.executable, "-c", _BUILD_MANY, json.dumps(argvs)]


def run_builders(jobs: list[BuildJob]) -> None:
    """:func:`builders_command`, checked: every export wrote its ``model.onnx``."""
    result = subprocess.run(builders_command(jobs), capture_output=True, text=True)
    tail = result.stdout[-2000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    assert all((job[1] / "model.onnx").is_file() for job in jobs), tail
