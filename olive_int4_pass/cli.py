"""Command line: ``olive-int4 quantize IN.onnx OUT_DIR`` (also ``python -m olive_int4_pass``), no Olive needed."""

from __future__ import annotations

import argparse
import logging
import sys

from olive_int4_pass.options import EMBEDDING_CHOICES, LM_HEAD_CHOICES, QuantizeOptions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olive-int4", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    q = commands.add_parser("quantize", help="quantize an ONNX model's MatMuls to MatMulNBits")
    q.add_argument("input", help="input .onnx file (or a folder holding exactly one)")
    q.add_argument("output_dir", help="folder to write model.onnx + model.onnx.data into")
    q.add_argument("--block-size", type=int, default=32, help="values per block along K (power of two >= 16)")
    q.add_argument("--bits", type=int, default=4, choices=(4, 8))
    q.add_argument("--asymmetric", action="store_true", help="uint4 with zero points instead of symmetric")
    q.add_argument("--accuracy-level", type=int, default=None, help="MatMulNBits accuracy_level (4 for CPU)")
    q.add_argument("--include", action="append", default=None, metavar="PATTERN", help="only these node names/globs")
    q.add_argument("--exclude", action="append", default=None, metavar="PATTERN", help="skip these node names/globs")
    q.add_argument("--lm-head", choices=LM_HEAD_CHOICES, default="quantize", help="final projection handling")
    q.add_argument("--fuse-bias", action="store_true", help="fold Add(MatMul, b) into MatMulNBits' bias")
    q.add_argument("--no-tied-embeddings", action="store_true", help="keep a float table for a tied embedding")
    q.add_argument("--embedding", choices=EMBEDDING_CHOICES, default="float", help="untied embedding table")
    q.add_argument("--single-file", action="store_true", help="no external data file (models under 1 GB)")
    q.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO, format="%(message)s")
    try:
        if args.command == "quantize":
            return _quantize(args)
    except (ValueError, TypeError) as e:
        print(f"olive-int4: error: {e}", file=sys.stderr)
        return 2
    return 1


def _quantize(args: argparse.Namespace) -> int:
    from olive_int4_pass.quantize import DATA_NAME, quantize_file

    options = QuantizeOptions(
        block_size=args.block_size,
        bits=args.bits,
        is_symmetric=not args.asymmetric,
        accuracy_level=args.accuracy_level,
        nodes_to_include=args.include,
        nodes_to_exclude=args.exclude,
        lm_head=args.lm_head,
        fuse_bias=args.fuse_bias,
        tied_embeddings=not args.no_tied_embeddings,
        embedding=args.embedding,
    )
    path = quantize_file(
        args.input,
        args.output_dir,
        options,
        external_data_name=None if args.single_file else DATA_NAME,
        progress=False if args.quiet else None,
    )
    print(path)
    return 0
