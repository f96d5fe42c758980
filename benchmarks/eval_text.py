"""Write the longer evaluation text the real-model table in docs/results.md was scored on (about 10k Qwen2.5 tokens).

    python benchmarks/eval_text.py eval.txt
    olive-int4 compare HF_DIR --text eval.txt --max-tokens 10000 ...

Two kinds of text, both on every machine and neither used for calibration: the built-in passage (our own prose,
about 3.5k tokens) and five sections of the Python language reference as shipped with Python itself
(``pydoc_data.topics``: execution model, exceptions, naming, objects, calls; about 6.5k tokens of technical
English with code). The compare report scores them in independent 1024-token windows; the passage comes first,
so the first windows are prose and the rest reference text.

``--calibration`` writes the longer calibration text of docs/results.md instead: the built-in calibration text, then
every other section of ``pydoc_data.topics`` in name order (about 100k Qwen2.5 tokens; none of the evaluation text).

    python benchmarks/eval_text.py --calibration calib.txt
    olive-int4 quantize FP32_EXPORT/model.onnx OUT --quality balanced --calibration calib.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path
from pydoc_data.topics import topics

from olive_int4_pass.compare.run import default_text
from olive_int4_pass.plan.calibration import default_calibration_text

TOPICS = ("execmodel", "exceptions", "naming", "objects", "calls")


def eval_text() -> str:
    return default_text() + "\n\n" + "\n\n".join(topics[name] for name in TOPICS)


def calibration_text() -> str:
    others = (topics[name] for name in sorted(topics) if name not in TOPICS)
    return default_calibration_text() + "\n\n" + "\n\n".join(others)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="text file to write")
    parser.add_argument("--calibration", action="store_true", help="write the longer calibration text instead")
    args = parser.parse_args()
    args.output.write_text(calibration_text() if args.calibration else eval_text(), encoding="utf-8")
    print(f"wrote {args.output} ({len(args.output.read_text(encoding='utf-8'))} characters)")


if __name__ == "__main__":
    main()
