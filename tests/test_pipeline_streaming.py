"""Quantizing a genai-builder-shaped model from external data: deterministic, byte-identical to the in-memory
result, published atomically, bounded in memory whatever the depth, and quiet unless asked to show progress.

The models come from the benchmark's builder (``benchmarks/quantize_bench.py``), scaled down.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from olive_int4_pass.model_io import DATA_NAME, MODEL_NAME, load_checked, save_atomically
from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.pipeline import quantize_file, quantize_model


def _load_bench():
    spec = importlib.util.spec_from_file_location(
        "quantize_bench", Path(__file__).parents[1] / "benchmarks" / "quantize_bench.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
# ~30 MB; every weight has at least 2**20 values, so that size-gated fast paths are exercised too.
SMALL = bench.ModelShape(layers=2, hidden=1024, intermediate=1024, heads=8, kv_heads=2, vocab=2048)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return bench.build_model(tmp_path_factory.mktemp("streaming") / "fp16", SMALL)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_input_gives_the_same_bytes(small_model, tmp_path):
    quantize_file(small_model, tmp_path / "a", progress=False)
    quantize_file(small_model, tmp_path / "b", progress=False)
    first = files(tmp_path / "a")
    assert {MODEL_NAME, DATA_NAME} <= set(first)
    assert first == files(tmp_path / "b")


def test_streaming_output_equals_the_in_memory_result(small_model, tmp_path):
    streamed = quantize_file(small_model, tmp_path / "streamed", progress=False).parent
    model = load_checked(small_model)
    ir.external_data.load_to_model(model)  # every weight in memory: the non-streaming reference
    quantize_model(model, QuantizeOptions())
    in_memory = save_atomically(model, tmp_path / "in_memory", progress=False).parent
    for name in (MODEL_NAME, DATA_NAME):
        assert (streamed / name).read_bytes() == (in_memory / name).read_bytes(), name
    nodes = onnx.load(streamed / MODEL_NAME, load_external_data=False).graph.node
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == 5 * SMALL.layers + 1  # every projection + lm_head


def _poison(model_path: Path, tensor: str, index: int) -> None:
    """Write a NaN into ``tensor`` (fp16) in the external data file, in place."""
    proto = onnx.load(model_path, load_external_data=False)
    init = next(t for t in proto.graph.initializer if t.name == tensor)
    offset = int(next(e.value for e in init.external_data if e.key == "offset"))
    with open(model_path.parent / DATA_NAME, "r+b") as f:
        f.seek(offset + 2 * index)
        f.write(np.array([np.nan], np.float16).tobytes())


def test_interrupted_run_leaves_no_output_and_no_temporary_folder(tmp_path):
    src = bench.build_model(tmp_path / "in", SMALL)
    # The last layer's down_proj: earlier weights are already written when the save fails.
    _poison(src, f"model.layers.{SMALL.layers - 1}.mlp.down_proj.MatMul.weight", 12345)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"down_proj.*non-finite"):
        quantize_file(src, out, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"], "a temporary folder was left behind"


def test_progress_bar_only_on_a_terminal_or_when_asked(small_model, tmp_path, capsys):
    quantize_file(small_model, tmp_path / "auto", progress=None)  # pytest's captured stderr is not a terminal
    quantize_file(small_model, tmp_path / "off", progress=False)
    assert capsys.readouterr().err == ""
    quantize_file(small_model, tmp_path / "on", progress=True)
    err = capsys.readouterr().err
    assert "100%" in err
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", err), "elapsed<remaining (ETA) missing from the bar"


# --- memory ---------------------------------------------------------------------------------------------------

_PEAK = """
import sys
from olive_int4_pass.pipeline import quantize_file
quantize_file(sys.argv[1], sys.argv[2], progress=False)
# VmHWM is this process's own peak RSS; ru_maxrss would also count the parent's RSS at spawn time.
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def _peak_rss(*runs: tuple[Path, Path]) -> list[int]:
    """Each ``(model, out)`` quantized in a process of its own, all at once (VmHWM is per process)."""
    procs = [
        subprocess.Popen([sys.executable, "-c", _PEAK, str(m), str(o)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for m, o in runs
    ]
    peaks = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr.decode(errors="replace")[-3000:]
        peaks.append(int(stdout.decode().strip().splitlines()[-1]))
    return peaks


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_peak_memory_stays_flat_as_the_model_grows(tmp_path):
    """~190 MB vs ~430 MB of fp16 weights (memory-mapped input, packed output): the peak may not follow them.

    RSS counts the pages of the input file a process has mapped and touched, so this also fails when the float
    weights are read through a memory map that stays open (onnx_ir keeps one per tensor) rather than streamed.
    """
    shape = bench.ModelShape(hidden=1024, intermediate=4096, heads=8, kv_heads=2, vocab=32000)
    # Same code paths (and libraries) as the others, ~40 MB of weights: interpreter, imports, kernels.
    small = bench.build_model(tmp_path / "small", dataclasses.replace(shape, layers=1, intermediate=1024, vocab=1024))
    shallow = bench.build_model(tmp_path / "shallow", dataclasses.replace(shape, layers=2))
    deep = bench.build_model(tmp_path / "deep", dataclasses.replace(shape, layers=10))
    size = {m: (m.parent / DATA_NAME).stat().st_size for m in (shallow, deep)}
    baseline, peak_shallow, peak_deep = _peak_rss(
        (small, tmp_path / "out-small"), (shallow, tmp_path / "out-shallow"), (deep, tmp_path / "out-deep")
    )
    added = size[deep] - size[shallow]
    report = (
        f"baseline {baseline / 1e6:.0f} MB, 2 layers {peak_shallow / 1e6:.0f} MB, 10 layers {peak_deep / 1e6:.0f} MB"
    )
    assert peak_deep - peak_shallow < 0.25 * added, f"peak grows with depth: {report} (+{added / 1e6:.0f} MB weights)"
    assert peak_deep - baseline < 0.5 * size[deep], f"peak follows the weights: {report} ({size[deep] / 1e6:.0f} MB)"
