"""Session fixtures shared by several test files: tiny random HF models and their genai-builder exports."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import run_builders, save_tiny_model

BUILDER_TARGETS = [("fp32", "cpu"), ("int4", "cpu"), ("fp16", "cuda"), ("int4", "cuda")]


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """``exports(arch, tied)`` -> {"hf": dir, "fp32-cpu": dir, "int4-cpu": ..., "fp16-cuda": ..., "int4-cuda": ...}.

    Built once per (arch, tied) per session; the builder exports for CUDA run fine on a CPU-only machine.
    """
    cache: dict[tuple[str, bool], dict[str, Path]] = {}

    def get(arch: str = "qwen2", tied: bool = False) -> dict[str, Path]:
        if (arch, tied) not in cache:
            root = tmp_path_factory.mktemp(f"{arch}_{'tied' if tied else 'untied'}")
            hf = save_tiny_model(root / "hf", arch, tie_word_embeddings=tied)
            built = {f"{p}-{e}": root / f"{p}-{e}" for p, e in BUILDER_TARGETS}
            run_builders([(hf, built[f"{p}-{e}"], p, e, root / "cache") for p, e in BUILDER_TARGETS])
            cache[(arch, tied)] = {"hf": hf, **built}
        return cache[(arch, tied)]

    return get


@pytest.fixture(scope="session")
def tiny_qwen2(exports) -> Path:
    return exports()["hf"]


@pytest.fixture(scope="session")
def builder_exports(exports) -> dict[str, Path]:
    return exports()
