"""What the quality presets cost to build: calibration, scale search and write time, peak RSS, output size.

    python benchmarks/quality_bench.py FP32_EXPORT                       # int4, balanced, max
    python benchmarks/quality_bench.py FP32_EXPORT --variants int4 balanced --calibration my_text.txt

``FP32_EXPORT`` is an onnxruntime-genai package folder (``model.onnx`` + data, ``genai_config.json``,
``tokenizer.json``), e.g. the builder's ``-p fp32 -e cpu`` export of a Hugging Face model. Each variant runs
``quantize_file`` in its own process (peak RSS is its own, ``ru_maxrss`` from ``os.wait4``); the table shows
total seconds (imports excluded), the calibration part (``quantization_report.json``'s ``calibration_seconds``),
the rest (scale search, mixed-precision choice, quantize and write), peak RSS, the output's size and the ratios
against plain INT4 (round to nearest, the builder's bytes) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "int4": {},
    "balanced": {"quality": "balanced"},
    "max": {"quality": "max"},
}
_GB = 1e9


def _child(model: str, out: str, options_json: str, result_file: str) -> None:
    import olive_int4_pass.pipeline as qz
    from olive_int4_pass.options import QuantizeOptions

    options = QuantizeOptions(**json.loads(options_json))
    start = time.perf_counter()
    qz.quantize_file(Path(model), Path(out), options, progress=False)
    seconds = time.perf_counter() - start
    report = json.loads((Path(out) / "quantization_report.json").read_text())
    Path(result_file).write_text(json.dumps({"seconds": seconds, "calibration": report.get("calibration_seconds")}))


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))


def run(model: Path, variants: list[str], calibration: str | None, work_dir: Path) -> list[dict]:
    rows = []
    for name in variants:
        options = dict(VARIANTS[name])
        if calibration and options:
            options["calibration"] = calibration
        out = work_dir / name
        shutil.rmtree(out, ignore_errors=True)
        result_file = work_dir / f"{name}.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(model / "model.onnx"), str(out)]
        proc = subprocess.Popen([*cmd, json.dumps(options), str(result_file)])
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"{name} failed (status {status})")
        result = json.loads(result_file.read_text())
        rows.append({"variant": name, **result, "peak_rss": usage.ru_maxrss * 1024, "size": _size(out)})
        print(f"# {name:10s} {result['seconds']:8.1f} s  peak RSS {rows[-1]['peak_rss'] / _GB:.2f} GB", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["variant"] == "int4"), None)
    lines = [
        "| variant | total s | calibration s | search + quantize + write s | peak RSS GB | size GB | time vs int4 "
        "| size vs int4 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        calib = r["calibration"] or 0.0
        cells = [
            r["variant"],
            f"{r['seconds']:.1f}",
            f"{calib:.1f}" if r["calibration"] is not None else "–",
            f"{r['seconds'] - calib:.1f}",
            f"{r['peak_rss'] / _GB:.2f}",
            f"{r['size'] / _GB:.3f}",
            f"{r['seconds'] / base['seconds']:.1f}×" if base else "–",
            f"×{r['size'] / base['size']:.3f}" if base else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _child(*argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="onnxruntime-genai package folder of the float model")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--calibration", help="calibration text file (default: the built-in text)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "olive-int4-quality-bench")
    args = parser.parse_args(argv)
    if not (args.model / "model.onnx").is_file() or not (args.model / "tokenizer.json").is_file():
        raise SystemExit(f"{args.model} is not a package folder with model.onnx and tokenizer.json")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = run(args.model, args.variants, args.calibration, args.work_dir)
    print(f"\nMachine: {os.cpu_count()} cores.\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
