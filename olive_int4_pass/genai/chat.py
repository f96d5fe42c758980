"""Load an onnxruntime-genai package folder and chat with it or generate from it.

``python -m olive_int4_pass.genai.chat PACKAGE_DIR`` (interactive) or ``... PACKAGE_DIR -p "prompt"`` (one turn).
A package built for CUDA runs on a machine without CUDA too: its providers are cleared, so it runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from olive_int4_pass.genai.files import GENAI_CONFIG, GenAIConfig


def load_model(package_dir: str | os.PathLike, *, cpu: bool | None = None):
    """``og.Model`` for a package folder. ``cpu=None``: on CPU only when the configured provider is unavailable."""
    import onnxruntime_genai as og

    config = og.Config(str(package_dir))
    if cpu is None:
        wanted = GenAIConfig.read(package_dir).providers
        cpu = bool(wanted) and not all(_available(og, name) for name in wanted)
    if cpu:
        config.clear_providers()
    return og.Model(config)


def _available(og, provider: str) -> bool:
    check = {"cuda": "is_cuda_available", "dml": "is_dml_available", "webgpu": "is_webgpu_available"}.get(provider)
    return bool(check and getattr(og, check, lambda: False)())


def chat_prompt(tokenizer, messages: Sequence[dict]) -> str:
    """The model's chat template applied to ``messages``, ending with the assistant's turn."""
    return tokenizer.apply_chat_template(json.dumps(list(messages)), add_generation_prompt=True)


def generate(
    model,
    input_ids: Sequence[int],
    max_new_tokens: int,
    *,
    greedy: bool = False,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """New tokens after ``input_ids`` until EOS or ``max_new_tokens``; sampling as genai_config.json's search says."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    options = {"max_length": len(input_ids) + max_new_tokens}
    if greedy:
        options["do_sample"] = False
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    generator.append_tokens(list(input_ids))
    new_tokens: list[int] = []
    while not generator.is_done() and len(new_tokens) < max_new_tokens:
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        new_tokens.append(token)
        if on_token:
            on_token(token)
    return new_tokens


def verify_package(package_dir: str | os.PathLike, *, max_new_tokens: int = 2) -> list[int]:
    """Load the package, apply its chat template and greedy-generate a few tokens; ValueError if anything fails."""
    try:
        import onnxruntime_genai as og

        model = load_model(package_dir)
        tokenizer = og.Tokenizer(model)
        _check_tokenizer(tokenizer, package_dir)
        prompt = chat_prompt(tokenizer, [{"role": "user", "content": "Hello"}])
        tokens = generate(model, list(tokenizer.encode(prompt)), max_new_tokens, greedy=True)
    except ValueError:
        raise
    except Exception as e:  # og raises RuntimeError for every load/run problem; Olive would exit 0 on it
        raise ValueError(f"onnxruntime-genai cannot run the package {package_dir}: {e}") from e
    if not tokens:
        raise ValueError(f"onnxruntime-genai generated no token from the package {package_dir}")
    return tokens


_PROBE_TEXT = "Hello, world! The quick brown fox jumps over 13 lazy dogs."


def _check_tokenizer(tokenizer, package_dir: str | os.PathLike) -> None:
    """The package's tokenizer must map text to ids of the model's vocabulary and back to the same text (a
    tokenizer rebuilt from a folder without tokenizer.json can have a 1-entry vocabulary and encode text as -1s)."""
    ids = [int(i) for i in tokenizer.encode(_PROBE_TEXT)]
    vocab = GenAIConfig.read(package_dir).vocab_size
    if not ids or min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(
            f"its tokenizer.json turns {_PROBE_TEXT!r} into ids {ids[:8]}..., outside the model's"
            f" vocabulary of {vocab}: it is not this model's tokenizer (does the model folder have tokenizer.json?)"
        )
    back = tokenizer.decode(ids)
    if back.strip() != _PROBE_TEXT:
        raise ValueError(f"its tokenizer.json does not round-trip: {_PROBE_TEXT!r} -> {back!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m olive_int4_pass.genai.chat", description=__doc__)
    parser.add_argument("package_dir", help=f"folder holding {GENAI_CONFIG}, model.onnx and the tokenizer files")
    parser.add_argument("-p", "--prompt", help="one user message; without it, chat on stdin (empty line quits)")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="per answer (default 1024)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of the package's sampling")
    parser.add_argument("--cpu", action="store_true", help="run on CPU whatever provider the package names")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import onnxruntime_genai as og

    try:
        model = load_model(args.package_dir, cpu=True if args.cpu else None)
    except (ValueError, KeyError, RuntimeError) as e:
        print(f"genai_chat: error: cannot load {args.package_dir}: {e}", file=sys.stderr)
        return 2
    tokenizer = og.Tokenizer(model)
    messages: list[dict] = []
    prompts = [args.prompt] if args.prompt is not None else _stdin_prompts()
    for prompt in prompts:
        messages.append({"role": "user", "content": prompt})
        text = prompt if args.raw else chat_prompt(tokenizer, messages)
        stream = tokenizer.create_stream()
        pieces: list[str] = []

        def show(token: int, stream=stream, pieces=pieces) -> None:
            pieces.append(stream.decode(token))
            print(pieces[-1], end="", flush=True)

        generate(model, list(tokenizer.encode(text)), args.max_new_tokens, greedy=args.greedy, on_token=show)
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(pieces)})
    return 0


def _stdin_prompts():
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        if not line.strip():
            return
        yield line


if __name__ == "__main__":
    sys.exit(main())
