"""Faults through ``olive run``: Olive 0.13 logs most exceptions as a failed pass and exits 0 ("No output model
produced"); every failure of ours must end the run with a non-zero exit and a message naming the file and the cause,
and no run may change its input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def olive_run(config: dict, cwd: Path) -> subprocess.CompletedProcess:
    path = cwd / "workflow.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "CI": "1"}
    cmd = [sys.executable, "-m", "olive", "run", "--config", str(path)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def workflow(model_path: Path, output_dir: Path, **pass_config) -> dict:
    return {
        "input_model": {"type": "ONNXModel", "model_path": str(model_path)},
        "passes": {"int4": {"type": "OnnxInt4RtnQuantization", **pass_config}},
        "output_dir": str(output_dir),
        "log_severity_level": 1,
    }


def test_output_dir_holding_the_input_is_refused(tied, tmp_path):
    before = digest(tied)
    result = olive_run(workflow(tied / "model.onnx", tied), tmp_path)
    assert result.returncode != 0
    assert "is the folder of the input model" in result.stdout + result.stderr
    assert digest(tied) == before  # the float model survives


def test_broken_tokenizer_during_calibration_fails_the_run(tied, tmp_path):
    (tied / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')  # truncated
    result = olive_run(
        workflow(tied / "model.onnx", tmp_path / "out", scale_search=True, calibration="default"), tmp_path
    )
    assert result.returncode != 0
    assert "tokenizer.json" in result.stdout + result.stderr
    assert not list((tmp_path / "out").glob("*.onnx")) if (tmp_path / "out").exists() else True


def test_a_failing_pass_raises_a_value_error_in_process(tied, tmp_path, monkeypatch):
    # Any non-ValueError inside our pass (here an OSError while saving) reaches Olive as a ValueError it re-raises.
    import errno

    from olive.workflows import run

    import olive_int4_pass.model_io as model_io

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(model_io, "_save", full_disk)
    config = workflow(tied / "model.onnx", tmp_path / "out")
    config["cache_dir"] = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="no space left"):
        run(config)


def test_invalid_hf_config_fails_the_run(tiny_qwen2, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_qwen2, hf)
    (hf / "config.json").write_text("{ not json")
    config = {
        "input_model": {"type": "HfModel", "model_path": str(hf)},
        "passes": {"export": {"type": "GenAIModelExport"}, "int4": {"type": "OnnxInt4RtnQuantization"}},
        "output_dir": str(tmp_path / "out"),
        "log_severity_level": 1,
    }
    result = olive_run(config, tmp_path)
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "config.json" in result.stdout + result.stderr


def test_any_swallowed_failure_still_fails_a_workflow_of_ours(tiny_qwen2, tmp_path, monkeypatch):
    # Olive logs a failure outside our passes (here: its own handler reading a broken config.json, with our
    # config.json pre-check switched off) and returns no model; a workflow with our passes raises instead.
    from olive.workflows import run

    import olive_int4_pass.olive.registration as registration

    monkeypatch.setattr(registration, "_check_hf_config", lambda config: None)
    hf = tmp_path / "hf"
    shutil.copytree(tiny_qwen2, hf)
    (hf / "config.json").write_text("{ not json")
    config = {
        "input_model": {"type": "HfModel", "model_path": str(hf)},
        "passes": {"export": {"type": "GenAIModelExport"}},
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "log_severity_level": 3,
    }
    with pytest.raises(ValueError, match="produced no output model"):
        run(config)


def _bad_inputs(tmp_path: Path, tied: Path) -> dict[str, tuple[Path, dict, str]]:
    """name -> (model path, pass options, words the message must hold), each a copy broken one way."""
    import numpy as np
    import onnx

    cases = {}

    def copy(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(tied, folder)
        return folder / "model.onnx"

    cases["missing model"] = (tmp_path / "nowhere" / "model.onnx", {}, "does not exist")
    corrupt = copy("corrupt")
    corrupt.write_bytes(b"\x00\xffnot protobuf" * 50)
    cases["corrupt model"] = (corrupt, {}, "not a readable ONNX model")
    truncated = copy("truncated")
    data = truncated.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    cases["truncated data"] = (truncated, {}, "truncated")
    nan = copy("nan")
    model = onnx.load(str(nan), load_external_data=False)
    init = next(i for i in model.graph.initializer if i.name.endswith("o_proj.MatMul.weight"))
    info = {e.key: int(e.value) if e.key != "location" else e.value for e in init.external_data}
    with open(nan.parent / info["location"], "r+b") as f:
        f.seek(info["offset"])
        f.write(np.array([np.nan] * 4, np.float32).tobytes())
    cases["NaN weight"] = (nan, {}, "non-finite")
    calib = copy("calibration")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01" * 100)
    cases["binary calibration"] = (calib, {"calibration": str(tmp_path / "binary.txt"), "scale_search": True}, "binary")
    return cases


CASES = ["missing model", "corrupt model", "truncated data", "NaN weight", "binary calibration"]


@pytest.mark.parametrize("case", CASES)
def test_bad_inputs_fail_the_same_way_through_olive_and_the_cli(tied, tmp_path, case, capsys):
    from olive.workflows import run

    from olive_int4_pass.cli import main

    model, options, words = _bad_inputs(tmp_path, tied)[case]
    before = digest(model.parent) if model.parent.exists() else None
    config = workflow(model, tmp_path / "olive-out", **options)
    config["cache_dir"] = str(tmp_path / "cache")
    # Errors Olive re-raises (a missing file is Olive's own AssertionError): olive run exits non-zero on them.
    with pytest.raises((ValueError, TypeError, AssertionError), match=words):
        run(config)
    argv = ["quantize", str(model), str(tmp_path / "cli-out"), "--quiet"]
    if options:
        argv += ["--calibration", options["calibration"], "--scale-search"]
    assert main(argv) == 2
    assert words in capsys.readouterr().err
    assert not list(tmp_path.rglob("*-out/*.onnx"))  # no model from either
    if before is not None:
        assert digest(model.parent) == before  # the input untouched
