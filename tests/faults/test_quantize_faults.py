"""Faults through ``olive-int4 quantize``: every one exits non-zero with a message naming the file and the cause,
or produces a model that loads; none changes its input or leaves a stale or half-written file.

``tied`` is an onnxruntime-genai fp32 export of a tiny tied Qwen2 (the builder's ``-p fp32 -e cpu``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from onnx_helpers import make_model, tensor_info

from olive_int4_pass.cli import main


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def logits(model_file: Path) -> np.ndarray:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = np.array([[1, 5, 9, 42]], np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, 4), np.int64)
        else:  # past_key_values.*: an empty cache
            feeds[inp.name] = np.zeros((1, inp.shape[1], 0, 16), np.float32)
    return session.run(["logits"], feeds)[0]


def fails(argv, capsys, *words) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


def test_single_file_output_loads(tied, tmp_path):
    out = tmp_path / "out"
    assert main(["quantize", str(tied / "model.onnx"), str(out), "--single-file", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "quantization_report.json"]
    external = tmp_path / "external"
    assert main(["quantize", str(tied / "model.onnx"), str(external), "--quiet"]) == 0
    np.testing.assert_array_equal(logits(out / "model.onnx"), logits(external / "model.onnx"))


def test_single_file_over_an_earlier_output_drops_its_data_file(tied, tmp_path):
    out = tmp_path / "out"
    assert main(["quantize", str(tied / "model.onnx"), str(out), "--quiet"]) == 0
    assert (out / "model.onnx.data").is_file()
    expected = logits(out / "model.onnx")
    assert main(["quantize", str(tied / "model.onnx"), str(out), "--single-file", "--quiet"]) == 0
    assert not (out / "model.onnx.data").exists()  # the stale data file would be read at the old offsets
    np.testing.assert_array_equal(logits(out / "model.onnx"), expected)
    assert leftovers(tmp_path) == [] and leftovers(out) == []


def test_a_run_that_quantizes_nothing_drops_the_earlier_report(tied, tmp_path):
    out = tmp_path / "out"
    assert main(["quantize", str(tied / "model.onnx"), str(out), "--quiet"]) == 0
    assert (out / "quantization_report.json").is_file()
    assert main(["quantize", str(tied / "model.onnx"), str(out), "--exclude", "*", "--quiet"]) == 0
    assert not (out / "quantization_report.json").exists()
    assert not any(
        n.op_type == "MatMulNBits" for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    )


def test_extreme_weights_with_zero_points_fail_clearly(tmp_path, capsys):
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    w[0, 0], w[1, 0] = 3e38, -3e38  # finite, but max - min overflows float32
    src = tmp_path / "in" / "model.onnx"
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    make_model(nodes, [tensor_info("x", np.float32, [2, 64])], [tensor_info("y", np.float32, [2, 32])], {"W": w}, src)
    before = digest(src.parent)
    fails(["quantize", str(src), str(tmp_path / "out"), "--asymmetric", "--quiet"], capsys, "'W'", "overflows")
    assert not (tmp_path / "out").exists() and digest(src.parent) == before
    # Symmetric scales stay finite: the same weight quantizes.
    assert main(["quantize", str(src), str(tmp_path / "sym"), "--quiet"]) == 0


def test_nan_budget_is_refused(tied, tmp_path, capsys):
    argv = ["quantize", str(tied / "model.onnx"), str(tmp_path / "out"), "--calibration", "default"]
    fails([*argv, "--mixed-precision-budget", "nan"], capsys, "mixed_precision_budget", "finite")
    assert not (tmp_path / "out").exists()


def test_output_under_a_regular_file(tied, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    fails(["quantize", str(tied / "model.onnx"), str(tmp_path / "file" / "out"), "--quiet"], capsys, "file")
    assert (tmp_path / "file").read_text() == "not a folder"


def test_failed_run_leaves_no_new_parent_folders(tmp_path, capsys):
    w = np.ones((64, 32), np.float32)
    w[3, 4] = np.nan  # found while the model is written, after the output folders were made
    src = tmp_path / "in" / "model.onnx"
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    make_model(nodes, [tensor_info("x", np.float32, [2, 64])], [tensor_info("y", np.float32, [2, 32])], {"W": w}, src)
    fails(["quantize", str(src), str(tmp_path / "a" / "b" / "out"), "--quiet"], capsys, "'W'", "non-finite")
    assert not (tmp_path / "a").exists()


def test_external_data_shorter_than_its_tensor(tmp_path, capsys):
    src = tmp_path / "in" / "model.onnx"
    w = np.ones((64, 32), np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    make_model(nodes, [tensor_info("x", np.float32, [2, 64])], [tensor_info("y", np.float32, [2, 32])], {"W": w}, src)
    model = onnx.load(str(src), load_external_data=False)
    (init,) = model.graph.initializer
    for entry in init.external_data:
        if entry.key == "length":
            entry.value = "100"
    onnx.save(model, str(src))
    fails(["quantize", str(src), str(tmp_path / "out")], capsys, "'W'", "100 bytes")


def test_stale_staging_folders_of_dead_runs_are_removed(tied, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.{int(dead.stdout)}.abcd.tmp"  # what a SIGKILLed run leaves
    (stale / "out").mkdir(parents=True)
    (stale / "out" / "model.onnx.data").write_bytes(b"\0" * 1000)
    alive = tmp_path / f".out.{os.getpid()}.efgh.tmp"  # a run still going on: not ours to remove
    alive.mkdir()
    assert main(["quantize", str(tied / "model.onnx"), str(tmp_path / "out"), "--quiet"]) == 0
    assert not stale.exists() and alive.exists()


def test_sigterm_cleans_up_like_ctrl_c(tied, tmp_path):
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        import olive_int4_pass.model_io as model_io
        original = model_io._save
        def save(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the output is being written
            return original(*args, **kwargs)
        model_io._save = save
        from olive_int4_pass.cli import main
        sys.exit(main(["quantize", {str(tied / "model.onnx")!r}, {str(tmp_path / "out")!r}, "--quiet"]))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 130, result.stderr
    assert "interrupted" in result.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_publishing_waits_for_a_concurrent_run(tied, tmp_path):
    # Two runs publishing into one folder take turns: a model.onnx never lands beside another run's data.
    import fcntl
    import threading

    out = tmp_path / "out"
    out.mkdir()
    lock = os.open(out, os.O_RDONLY)  # the lock publishing takes: flock on the output folder
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (main(["quantize", str(tied / "model.onnx"), str(out), "--quiet"]), done.set())
    )
    thread.start()
    finished_while_locked = done.wait(timeout=8)  # the tiny model takes about a second unlocked
    present_while_locked = (out / "model.onnx").exists()
    os.close(lock)
    thread.join(timeout=300)
    assert not finished_while_locked and not present_while_locked
    assert (out / "model.onnx").is_file() and (out / "model.onnx.data").is_file()


def test_full_disk_says_so(tied, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        fails(["quantize", str(tied / "model.onnx"), str(small / "out"), "--quiet"], capsys, "no space left")
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_report_is_strict_json(tied, tmp_path):
    assert main(["quantize", str(tied / "model.onnx"), str(tmp_path / "out"), "--quiet"]) == 0
    text = (tmp_path / "out" / "quantization_report.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))


@pytest.mark.parametrize("kind", ["binary", "folder", "latin-1"])
def test_unusable_calibration_files_are_named(tied, tmp_path, capsys, kind):
    path = tmp_path / f"calib-{kind}"
    if kind == "folder":
        path.mkdir()
        words = [str(path), "is a folder"]
    elif kind == "binary":
        path.write_bytes(b"text\x00\x01\x02" * 100)
        words = [str(path), "binary"]
    else:
        path.write_bytes("caf\xe9 cr\xe8me".encode("latin-1") * 50)
        words = [str(path), "not UTF-8"]
    argv = ["quantize", str(tied / "model.onnx"), str(tmp_path / "out"), "--calibration", str(path), "--scale-search"]
    fails([*argv, "--quiet"], capsys, *words)
    assert not (tmp_path / "out").exists()
