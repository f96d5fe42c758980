"""Command line (or ``python -m olive_int4_pass``): ``olive-int4 quantize IN.onnx OUT_DIR``, ``compare``, ``chat``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from olive_int4_pass import options as schema
from olive_int4_pass.options import QuantizeOptions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olive-int4", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    q = commands.add_parser("quantize", help="quantize an ONNX model's MatMuls to MatMulNBits")
    q.add_argument("input", help="input .onnx file (or a folder holding exactly one)")
    q.add_argument("output_dir", help="folder to write model.onnx + model.onnx.data into")
    add_option_arguments(q)
    q.add_argument("--single-file", action="store_true", help="no external data file (models under 1 GB)")
    q.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    _add_compare_parser(commands)
    chat = commands.add_parser(
        "chat", help="chat with / generate from an onnxruntime-genai package folder", add_help=False
    )
    chat.add_argument("chat_args", nargs=argparse.REMAINDER, help="see `olive-int4 chat --help`")
    return parser


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """One argument per :class:`QuantizeOptions` field, derived from the schema (unset when not given)."""
    group = parser.add_argument_group("quantization options (docs/options.md)")
    for field in schema.fields():
        kind, flags = schema.value_type(field), schema.cli_flags(field)
        help_text = field.metadata["help"].replace("%", "%%")
        if kind is bool:
            pair = group.add_mutually_exclusive_group()
            pair.add_argument(flags[0], dest=field.name, action="store_const", const=True, help=help_text)
            pair.add_argument(flags[1], dest=field.name, action="store_const", const=False, help=f"not {flags[0]}")
        elif kind is list:
            group.add_argument(*flags, dest=field.name, action="append", metavar="PATTERN", help=help_text)
        else:
            # Text choices are checked here; numbers by the schema, whose message names the allowed values.
            choices = field.metadata["choices"] if kind is str else None
            group.add_argument(*flags, dest=field.name, type=kind, choices=choices, help=help_text)
        group.set_defaults(**{field.name: None})


def options_from_args(args: argparse.Namespace) -> QuantizeOptions:
    """The options given on the command line; the ones not given keep their defaults."""
    given = {f.name: getattr(args, f.name) for f in schema.fields() if getattr(args, f.name) is not None}
    return QuantizeOptions(**given)


def _add_compare_parser(commands) -> None:
    c = commands.add_parser(
        "compare",
        help="build FP32/FP16/INT8/INT4 variants and report size, speed and accuracy (Markdown table + PNG)",
        description="Build or reuse FP32/FP16/INT8/INT4 variants of a model, measure them on this machine (CPU) and"
        " write report.md, report.png and report.json.",
    )
    c.add_argument(
        "model",
        nargs="?",
        help="Hugging Face folder or hub id (exported with the onnxruntime-genai builder), or an existing ONNX /"
        " package folder (as --use would take it)",
    )
    c.add_argument("-o", "--output-dir", default="compare-report", help="where the report goes (default: %(default)s)")
    c.add_argument(
        "--variants",
        help="comma-separated names to measure; built: fp32, fp16, int8, int4, int4-search, int4-compensated,"
        " int4-balanced, int4-max (default: fp32,fp16,int8,int4 where they can be had)",
    )
    c.add_argument(
        "--use",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="an existing package or ONNX folder as variant NAME (default name from its weights: fp32, fp16, int4..)",
    )
    c.add_argument("--reference", help="variant to compare against (default: the best precision present)")
    c.add_argument("--text", help="UTF-8 text to score (default: a built-in passage of about 3,000 words)")
    c.add_argument("--window", type=int, default=1024, help="tokens per independent window (default %(default)s)")
    c.add_argument("--max-tokens", type=int, default=4096, help="tokens of the text to score (default %(default)s)")
    c.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for speed (default %(default)s)")
    c.add_argument("--decode-tokens", type=int, default=64, help="new tokens for speed (default %(default)s)")
    c.add_argument("--runs", type=int, default=3, help="timed runs per variant, median reported; 0: skip speed")
    c.add_argument("--calibration", help="calibration text for the int4 quality presets (QuantizeOptions.calibration)")
    c.add_argument("--work-dir", help="where variants are built and cached (default: OUTPUT_DIR/variants)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chat"]:  # its own parser and help
        from olive_int4_pass.genai.chat import main as chat_main

        return chat_main(argv[1:])
    args = build_parser().parse_args(argv)
    # compare: progress bars only; the quantizer's per-variant log lines would break them up.
    verbose = args.command == "quantize" and not args.quiet
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    previous = _terminate_as_interrupt()
    try:
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "compare":
            return _compare(args)
    except (ValueError, TypeError) as e:
        print(f"olive-int4: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        from olive_int4_pass.model_io import describe_os_error

        print(f"olive-int4: error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("olive-int4: interrupted; the output was not written", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 1


def _terminate_as_interrupt():
    """Treat SIGTERM like Ctrl-C, so that the staging folder is removed on the way out. Returns the previous
    handler (None when not in the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _quantize(args: argparse.Namespace) -> int:
    from olive_int4_pass.pipeline import DATA_NAME, quantize_file

    options = options_from_args(args)
    path = quantize_file(
        args.input,
        args.output_dir,
        options,
        external_data_name=None if args.single_file else DATA_NAME,
        progress=False if args.quiet else None,
    )
    print(path)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from olive_int4_pass.compare.run import CompareSettings, compare
    from olive_int4_pass.compare.variants import infer_label, onnx_file_of

    given: dict[str, str] = {}
    uses = list(args.use)
    model = args.model
    if (
        model
        and Path(model).is_dir()
        and (any(Path(model).glob("*.onnx")) or (Path(model) / "genai_config.json").is_file())
    ):
        uses.insert(0, model)  # an ONNX / package folder, not a Hugging Face one
        model = None
    for use in uses:
        name, sep, folder = use.partition("=")
        if not sep or Path(use).exists():
            name, folder = infer_label(onnx_file_of(Path(use))), use
        if name in given:
            raise ValueError(f"two folders for variant {name!r}: {given[name]} and {folder}; name them with NAME=DIR")
        given[name] = folder
    settings = CompareSettings(
        window=args.window,
        max_tokens=args.max_tokens,
        prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens,
        runs=args.runs,
    )
    result = compare(
        model,
        args.output_dir,
        variants=[v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None,
        given=given,
        reference=args.reference,
        text_file=args.text,
        settings=settings,
        calibration=args.calibration,
        work_dir=args.work_dir,
        progress=False if args.quiet else None,  # None: bars only on a terminal, as quantize draws them
    )
    print(result.markdown_path.read_text(encoding="utf-8").split("\n\nColumns:")[0])
    print()
    for label, path in (("table", result.markdown_path), ("figure", result.figure_path), ("data", result.json_path)):
        print(f"{label}: {path}")
    return 0
