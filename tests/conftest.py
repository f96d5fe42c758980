"""Session fixtures shared by several test files: a tiny random Qwen2 and its genai-builder exports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny_model


def run_builder(hf_dir: Path, out_dir: Path, precision: str, provider: str, cache: Path) -> Path:
    """``python -m onnxruntime_genai.models.builder`` (its Python API needs private preparation steps)."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir)]
    cmd += ["-p", precision, "-e", provider, "-c", str(cache)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out_dir


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="session")
def builder_exports(tiny_qwen2, tmp_path_factory) -> dict[str, Path]:
    """The builder's fp32/cpu, int4/cpu, fp16/cuda and int4/cuda exports of ``tiny_qwen2`` (export runs on CPU)."""
    root = tmp_path_factory.mktemp("builder")
    return {
        f"{p}-{e}": run_builder(tiny_qwen2, root / f"{p}-{e}", p, e, root / "cache")
        for p, e in [("fp32", "cpu"), ("int4", "cpu"), ("fp16", "cuda"), ("int4", "cuda")]
    }
