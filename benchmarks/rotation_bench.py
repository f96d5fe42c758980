"""What ``rotation: residual``'s first step costs: rotating a float export's residual stream and writing it to the
temporary disk, before quantization starts.

    python benchmarks/rotation_bench.py MODEL.onnx [--repeat 3]

Prints, per round, the seconds of tracing, rotating and writing the model (``pipeline._rotated_copy``), and the
process's peak RSS; the median of the rounds last, beside the seconds of copying the same external data file
(``cp``, the disk's own speed on this machine, measured in the same run). Timings share the machine with whatever
else runs: rerun for a median.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from olive_int4_pass.model_io import external_locations, load_checked
from olive_int4_pass.pipeline import _rotated_copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rotate, copy = [], []
    for round_ in range(args.repeat):
        start = time.perf_counter()
        folder = _rotated_copy(load_checked(args.model), args.model, 0, False)
        rotate.append(time.perf_counter() - start)
        shutil.rmtree(folder)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            for name in external_locations(args.model):
                shutil.copyfile(args.model.parent / name, Path(tmp) / name)
            copy.append(time.perf_counter() - start)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"round {round_ + 1}: rotate + write {rotate[-1]:.1f} s, cp {copy[-1]:.1f} s, peak RSS {peak:.2f} GB")
    r, c = statistics.median(rotate), statistics.median(copy)
    print(f"| rotate + write | {r:.1f} s | ×{r / c:.1f} the data file's cp ({c:.1f} s) |")


if __name__ == "__main__":
    main()
