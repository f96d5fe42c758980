"""Fixtures of the fault tests: a private copy of the tiny tied model's fp32 export (a test may break it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def tied(exports, tmp_path) -> Path:
    """``tied/``: the onnxruntime-genai builder's ``-p fp32 -e cpu`` export of a tiny tied Qwen2, copied."""
    folder = tmp_path / "tied"
    shutil.copytree(exports("qwen2", tied=True)["fp32-cpu"], folder)
    return folder
