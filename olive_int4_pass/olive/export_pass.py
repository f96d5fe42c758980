"""Olive pass ``GenAIModelExport``: Hugging Face model -> float ONNX decoder with the onnxruntime-genai model builder.

The export itself is :func:`olive_int4_pass.genai.export.export_hf_model`; this module is the Olive glue (the
workflow's accelerator, Olive's ``--test`` model, ``additional_files`` for the later passes).
"""

from __future__ import annotations

import copy
import fnmatch
import shutil
from pathlib import Path
from typing import Any

from olive.hardware.accelerator import AcceleratorSpec
from olive.model import HfModelHandler, ONNXModelHandler
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from olive_int4_pass.genai.export import (
    _PROCESSING_PATTERNS,
    EXECUTION_PROVIDERS,
    SIDE_FILES,
    export_hf_model,
    resolve_hf_dir,
)
from olive_int4_pass.olive.common import fails_loudly, plugin_version_param


class GenAIModelExport(Pass):
    """Export a Hugging Face causal LM to a float ONNX decoder with the onnxruntime-genai model builder.

    Output: ``model.onnx`` + ``model.onnx.data``; ``genai_config.json``, the tokenizer files and the model's
    ``config.json``/``generation_config.json`` travel as Olive ``additional_files`` to the later passes.
    """

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {
            "execution_provider": PassConfigParam(
                type_=str,
                default_value=None,
                description=(
                    "Target of the package, the builder's -e: 'cuda' or 'cpu'. Unset: from the workflow's"
                    " accelerator (CUDAExecutionProvider -> cuda, else cpu). The export itself runs on CPU."
                ),
            ),
            "precision": PassConfigParam(
                type_=str,
                default_value=None,
                description="Float precision of the export: 'fp16' (cuda only) or 'fp32'. Unset: fp16 for cuda, fp32"
                " for cpu, as the builder's int4 packages use for activations.",
            ),
            "extra_options": PassConfigParam(
                type_=dict[str, Any],
                default_value=None,
                description="Builder extra options (its --extra_options KEY=VALUE), e.g. {hf_remote: true}.",
            ),
            "plugin_version": plugin_version_param(),
        }

    @staticmethod
    def is_accelerator_agnostic(accelerator_spec: AcceleratorSpec) -> bool:
        return False  # execution_provider defaults to the workflow's accelerator

    @fails_loudly
    def _run_for_config(
        self, model: HfModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> ONNXModelHandler:
        if not isinstance(model, HfModelHandler):
            raise TypeError(
                f"{type(self).__name__} needs a Hugging Face model (type: HfModel), got {type(model).__name__}"
            )
        if model.adapter_path:
            raise ValueError(f"{type(self).__name__} does not export adapters; merge the adapter into the model first")
        ep = config.execution_provider or EXECUTION_PROVIDERS.get(str(self.accelerator_spec.execution_provider), "cpu")
        output_dir = Path(output_model_path)
        output_dir = output_dir.parent if output_dir.suffix == ".onnx" else output_dir
        model_file = export_hf_model(
            _local_hf_dir(model),
            output_dir,
            execution_provider=ep,
            precision=config.precision,
            extra_options=config.extra_options,
        )
        attributes = copy.deepcopy(model.model_attributes or {})
        side_files = {str(output_dir / name) for name in SIDE_FILES if (output_dir / name).is_file()}
        attributes["additional_files"] = sorted(set(attributes.get("additional_files") or []) | side_files)
        return ONNXModelHandler(model_path=str(output_dir), onnx_file_name=model_file.name, model_attributes=attributes)


def _local_hf_dir(model: HfModelHandler) -> Path:
    """The local folder the builder reads: the model folder, a hub snapshot, or Olive's ``--test`` model."""
    if model.test_model_config:
        from olive.common.hf.utils import is_test_model_dir

        if not model.test_model_path:
            raise ValueError("test_model_config needs test_model_path (where Olive saves the small test model)")
        if not is_test_model_dir(model.test_model_path):
            model.load_model(cache_model=False)  # Olive builds and saves the random-weight test model
        test_dir = Path(model.test_model_path)
        _add_processing_files(test_dir, str(model.model_name_or_path))
        return test_dir
    return resolve_hf_dir(str(model.model_name_or_path))


def _add_processing_files(test_dir: Path, source: str) -> None:
    # Olive's --test model folder holds only config + random weights; the builder also needs the tokenizer.
    source_dir = resolve_hf_dir(source, _PROCESSING_PATTERNS)
    for path in source_dir.iterdir():
        wanted = any(fnmatch.fnmatch(path.name, p) for p in _PROCESSING_PATTERNS)
        if wanted and path.is_file() and not (test_dir / path.name).exists():
            shutil.copy2(path, test_dir / path.name)
